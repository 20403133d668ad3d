//! The QEMU guest agent, end to end: the real daemon over HTTP, real QEMU
//! (TCG) and the real `qemu-ga` from Debian inside the test guest
//! (`guest.agent=on`). The VM view shows what the agent tells of the guest,
//! a guest that ignores the ACPI power button is shut down through the
//! agent, and a VM whose guest runs no agent (or has no agent port) stops
//! and answers as quickly as ever.

mod common;

use std::time::{Duration, Instant};

use common::api::{create_vm, expect, force_delete_vm, id_of, uuid_of};
use common::daemon::{guest_spec_json, unique_name, wait_until, Daemon};
use common::netns::NetNs;
use common::{wait_for_line, BOOT_TIMEOUT};
use serde_json::{json, Value};
use vmlet::client::Method;

/// How long the agent may take to be read after GUEST-READY (the daemon
/// asks every 2 s until the first answer).
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

async fn create_and_start(d: &Daemon, spec: &Value) -> Value {
    let vm = create_vm(d, spec).await;
    let id = id_of(&vm);
    let vm = expect(d, Method::POST, &format!("/v1/vms/{id}/start"), None, 200).await;
    assert_eq!(vm["state"], "running", "{vm}");
    vm
}

async fn show(d: &Daemon, id: &str) -> Value {
    expect(d, Method::GET, &format!("/v1/vms/{id}"), None, 200).await
}

/// A graceful stop with `timeout_s`, timed.
async fn graceful_stop(d: &Daemon, id: &str, timeout_s: u64) -> (Value, Duration) {
    let started = Instant::now();
    let vm = expect(
        d,
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(&json!({"force": false, "timeout_s": timeout_s})),
        200,
    )
    .await;
    (vm, started.elapsed())
}

#[tokio::test]
async fn the_agent_reports_the_guest_and_shuts_down_a_guest_that_ignores_acpi() {
    let ns = NetNs::new();
    let d = Daemon::start_in_netns(&ns, &[]).await;
    expect(
        &d,
        Method::POST,
        "/v1/networks",
        Some(&json!({"name": "lan"})),
        201,
    )
    .await;
    let mac = "52:54:00:79:00:02";
    let mut spec = guest_spec_json(
        &unique_name("agent"),
        "guest.agent=on guest.acpi=ignore guest.ip=10.79.0.2/24",
    );
    spec["nics"] = json!([{"network": "lan", "mac": mac}]);
    spec["disks"] = json!([{"name": "data", "size_mib": 16}]);
    let vm = create_and_start(&d, &spec).await;
    assert_eq!(vm["spec"]["guest_agent"], true, "the default: {vm}");
    let id = id_of(&vm);
    let log = d.serial_log(uuid_of(&vm));
    let ready = wait_for_line(&log, "GUEST-READY", BOOT_TIMEOUT).await;
    assert!(
        ready.contains("org.qemu.guest_agent.0"),
        "the guest sees the agent's port: {ready}"
    );

    let guest = wait_until(
        "the guest agent's view of the guest",
        AGENT_TIMEOUT,
        || async {
            let vm = show(&d, &id).await;
            let guest = vm.get("guest")?.clone();
            let has_address = guest["interfaces"]
                .as_array()?
                .iter()
                .any(|i| i["addresses"].to_string().contains("10.79.0.2/24"));
            has_address.then_some(guest)
        },
    )
    .await;
    assert_eq!(guest["hostname"], "vmlet-agent-guest", "{guest}");
    assert_eq!(guest["os"]["id"], "vmlet-test-guest", "{guest}");
    assert_eq!(guest["os"]["pretty_name"], "vmlet test guest 1", "{guest}");
    assert_eq!(guest["os"]["machine"], "x86_64", "{guest}");
    assert!(
        guest["os"]["kernel_release"]
            .as_str()
            .is_some_and(|k| k.contains("cloud-amd64")),
        "{guest}"
    );
    let eth0 = guest["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["mac"] == mac)
        .unwrap_or_else(|| panic!("no interface with the NIC's MAC: {guest}"));
    assert_eq!(eth0["addresses"][0], "10.79.0.2/24", "{guest}");
    assert!(guest["read_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    // A listing shows no guest info (it never asks an agent), and the
    // record on disk keeps none.
    let list = expect(&d, Method::GET, "/v1/vms", None, 200).await;
    assert!(list.to_string().contains(&id) && !list.to_string().contains("vmlet-agent-guest"));
    let record = std::fs::read_to_string(d.record(uuid_of(&vm))).unwrap();
    assert!(!record.contains("vmlet-agent-guest"), "{record}");
    // `vmlet vm show` prints it.
    let show_cli = vmlet_show(&d, &id).await;
    assert!(
        show_cli.contains("hostname:   vmlet-agent-guest"),
        "{show_cli}"
    );
    assert!(
        show_cli.contains(&format!("eth0 {mac} 10.79.0.2/24")),
        "{show_cli}"
    );

    // A snapshot with the agent answering is taken with the guest's
    // filesystems frozen (the freeze is refused unless the agent answers),
    // and thawed after it: the agent's shutdown below still works.
    let snapshot = snapshot(&d, &id, "quiet").await;
    assert_eq!(snapshot["quiesced"], true, "{snapshot}");
    let listed = expect(
        &d,
        Method::GET,
        &format!("/v1/vms/{id}/snapshots"),
        None,
        200,
    )
    .await;
    assert_eq!(listed["snapshots"][0]["quiesced"], true, "{listed}");

    // The guest ignores the power button: after half the grace time the
    // agent is asked, and the guest powers off well before the grace ends.
    let (vm, took) = graceful_stop(&d, &id, 16).await;
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert_eq!(vm["last_stop"], "guest_agent_shutdown", "{vm}");
    assert!(took < Duration::from_secs(16), "stop took {took:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    let ignored = text
        .find("GUEST-ACPI-IGNORED")
        .expect("the button was pressed");
    let agent = text
        .find("GUEST-AGENT-SHUTDOWN")
        .expect("the agent shut the guest down");
    assert!(ignored < agent, "{text}");
    assert!(
        show(&d, &id).await.get("guest").is_none(),
        "stopped: no guest info"
    );
    force_delete_vm(&d, &id).await;
}

#[tokio::test]
async fn without_an_answering_agent_nothing_waits() {
    let d = Daemon::start().await;
    // The port is there (the default), but no agent runs in the guest.
    let mut spec = guest_spec_json(&unique_name("noagent"), "guest.acpi=ignore");
    spec["disks"] = json!([{"name": "data", "size_mib": 16}]);
    let vm = create_and_start(&d, &spec).await;
    let id = id_of(&vm);
    let log = d.serial_log(uuid_of(&vm));
    wait_for_line(&log, "GUEST-READY", BOOT_TIMEOUT).await;
    // Long enough for several reads of the silent agent to time out.
    tokio::time::sleep(Duration::from_secs(8)).await;
    for _ in 0..5 {
        let started = Instant::now();
        let vm = show(&d, &id).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(vm.get("guest").is_none(), "{vm}");
    }
    // A snapshot does not wait for the silent agent beyond its handshake
    // deadline, and is not quiesced.
    let started = Instant::now();
    let taken = snapshot(&d, &id, "plain").await;
    assert_eq!(taken["quiesced"], false, "{taken}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // The stop asks the silent agent (bounded), then quits QEMU at the end
    // of the grace time as before.
    let (vm, took) = graceful_stop(&d, &id, 6).await;
    assert_eq!(vm["last_stop"], "quit", "{vm}");
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(12),
        "stop took {took:?}"
    );
    force_delete_vm(&d, &id).await;

    // guest_agent: false: no port at all, and the channel name is free.
    let mut spec = guest_spec_json(&unique_name("noport"), "guest.action=hold");
    spec["guest_agent"] = json!(false);
    spec["channels"] = json!([{"name": "org.qemu.guest_agent.0"}]);
    let vm = create_and_start(&d, &spec).await;
    let id = id_of(&vm);
    let ready = wait_for_line(&d.serial_log(uuid_of(&vm)), "GUEST-READY", BOOT_TIMEOUT).await;
    // The caller's own channel, not vmlet's agent port.
    assert!(ready.contains("ports=org.qemu.guest_agent.0"), "{ready}");
    assert!(
        !walk_has(&d.run_dir, "agent.sock"),
        "no agent socket without guest_agent"
    );
    force_delete_vm(&d, &id).await;

    // With the agent on, that channel name is the agent's.
    let mut spec = guest_spec_json(&unique_name("clash"), "");
    spec["channels"] = json!([{"name": "org.qemu.guest_agent.0"}]);
    let answer = common::api::call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
    common::api::assert_invalid_field(&answer, "channels[0].name");
    spec["guest_agent"] = json!("yes");
    let answer = common::api::call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
    assert_eq!(answer.0, 422, "{answer:?}");
}

/// Takes snapshot `name` of VM `id`: the snapshot.
async fn snapshot(d: &Daemon, id: &str, name: &str) -> Value {
    expect(
        d,
        Method::POST,
        &format!("/v1/vms/{id}/snapshots"),
        Some(&json!({ "name": name })),
        201,
    )
    .await
}

/// `vmlet vm show ID` against the daemon: its stdout.
async fn vmlet_show(d: &Daemon, id: &str) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"))
        .args(["vm", "show", id, "--socket"])
        .arg(&d.socket)
        .env_remove("VMLET_SOCKET")
        .env_remove("VMLET_URL")
        .env_remove("VMLET_TOKEN_FILE")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("vmlet runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Whether a file named `name` is anywhere under `dir`.
fn walk_has(dir: &std::path::Path, name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        e.file_name() == name || (path.is_dir() && !path.is_symlink() && walk_has(&path, name))
    })
}
