//! What vmlet writes on the host is private to root: volume files, a VM's
//! overlays, its record, seed and serial log are mode 0600, and the
//! directories holding them 0700 (the daemon runs with umask 077), so
//! another local user reads neither guest data nor cloud-init user data.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::api::{call, create_vm, expect, force_delete_vm, id_of, uuid_of};
use common::daemon::{guest_spec_json, unique_name, Daemon};
use serde_json::json;
use vmlet::client::Method;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test]
async fn volumes_overlays_records_and_serial_logs_are_private() {
    let d = Daemon::start().await;
    let volume = unique_name("v");
    expect(
        &d,
        Method::POST,
        "/v1/volumes",
        Some(&json!({"name": volume, "size_mib": 8})),
        201,
    )
    .await;
    let mut spec = guest_spec_json(&unique_name("modes"), "guest.action=hold");
    spec["disks"] = json!([{"name": "data", "size_mib": 16}, {"volume": volume}]);
    spec["cloud_init"] = json!({"user_data": "#cloud-config\npassword: secret\n"});
    let vm = create_vm(&d, &spec).await;
    let id = id_of(&vm);
    let (status, body) = call(&d, Method::POST, &format!("/v1/vms/{id}/start"), None).await;
    assert_eq!(status, 200, "{body}");
    let log = d.serial_log(uuid_of(&vm));
    common::wait_for_line(&log, "GUEST-READY", Duration::from_secs(60)).await;

    let vm_dir = d.state_dir.join("vms").join(uuid_of(&vm).to_string());
    let files = [
        d.state_dir.join("volumes").join(format!("{volume}.qcow2")),
        vm_dir.join("disks/data.qcow2"),
        vm_dir.join("vm.json"),
        // The cloud-init seed holds the user data.
        vm_dir.join("cidata.img"),
        log.clone(),
    ];
    let dirs = [
        d.state_dir.clone(),
        d.state_dir.join("volumes"),
        d.state_dir.join("vms"),
        vm_dir.clone(),
        vm_dir.join("disks"),
    ];
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    for dir in &dirs {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
    // No temporary volume file stays behind.
    let leftovers: Vec<_> = std::fs::read_dir(d.state_dir.join("volumes"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    force_delete_vm(&d, &id).await;
}
