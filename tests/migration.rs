//! Live migration between two daemons, each with its own state directory,
//! TCP listener and token, under real QEMU (TCG).

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use vmlet::client::{Client, Endpoint};

use common::api::{create_vm, id_of};
use common::daemon::{free_port, guest_spec_json, unique_name, wait_until, Daemon};

/// A daemon with a TCP listener and its token.
struct Host {
    daemon: Daemon,
    url: String,
    token: String,
    _token_dir: common::Scratch,
}

impl Host {
    async fn start() -> Host {
        let token_dir = common::Scratch::new();
        let token_file = token_dir.path().join("token");
        let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
        std::fs::write(&token_file, &token).unwrap();
        std::fs::set_permissions(
            &token_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let daemon = Daemon::start_with_env(&[
            ("VMLET_TCP_LISTEN", &addr),
            ("VMLET_AUTH_TOKEN_FILE", token_file.to_str().unwrap()),
        ])
        .await;
        Host {
            daemon,
            url: format!("http://{addr}"),
            token,
            _token_dir: token_dir,
        }
    }

    fn client(&self) -> &Client {
        &self.daemon.client
    }
}

async fn migration_of(host: &Host, id: &str) -> Value {
    let (status, body) = common::api::call(
        &host.daemon,
        vmlet::client::Method::GET,
        &format!("/v1/migrations/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn a_running_vm_with_a_blank_disk_moves_to_the_other_host() {
    let a = Host::start().await;
    let b = Host::start().await;
    let name = unique_name("mig");
    let mut spec = guest_spec_json(&name, "guest.action=hold");
    spec["disks"] = json!([{"name": "data", "size_mib": 64}]);
    let vm = create_vm(&a.daemon, &spec).await;
    let id = id_of(&vm);
    a.client().start(&id).await.unwrap();
    common::daemon::wait_for_count(
        &a.daemon.serial_log(common::api::uuid_of(&vm)),
        "GUEST-READY",
        1,
        Duration::from_secs(60),
    )
    .await;
    let (status, m) = common::api::call(
        &a.daemon,
        vmlet::client::Method::POST,
        &format!("/v1/vms/{id}/migrate"),
        Some(&json!({"target": {"url": b.url, "token": b.token}})),
    )
    .await;
    assert_eq!(status, 202, "{m}");
    let mid = m["id"].as_str().unwrap().to_string();
    let done = wait_until("the migration to end", Duration::from_secs(120), || async {
        let m = migration_of(&a, &mid).await;
        let phase = m["phase"].as_str().unwrap().to_string();
        matches!(phase.as_str(), "completed" | "failed" | "cancelled").then_some(m)
    })
    .await;
    assert_eq!(
        done["phase"],
        "completed",
        "{done}\nA:\n{}\nB:\n{}",
        a.daemon.log_text(),
        b.daemon.log_text()
    );
    let moved = b.client().get_vm(&id).await.unwrap();
    assert_eq!(moved.state.as_str(), "running");
    assert!(a.client().get_vm(&id).await.is_err());
    let _ = Endpoint::default();
}
