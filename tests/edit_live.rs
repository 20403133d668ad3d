//! `PATCH /v1/vms/{id}` on a running VM, end to end: a real daemon in a
//! network namespace of its own, the real test guest under QEMU and the
//! real `vmlet` binary. Disk I/O limits are applied live (the guest reads
//! at the throttled rate), a volume disk and a NIC are plugged in and out
//! by patching the spec (the guest sees them come and go, QEMU stays the
//! same process), growth beyond the host's capacity is refused with
//! nothing changed, and a change the running VM cannot take is shown as
//! pending (API and CLI) until the next start.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::api::{assert_error, call, create_vm, expect, id_of, serial_token, uuid_of};
use common::daemon::{guest_spec_json, unique_name, wait_for_count, Daemon};
use common::netns::NetNs;
use common::serial_shell::SerialShell;
use common::BOOT_TIMEOUT;
use serde_json::{json, Value};
use vmlet::client::Method;

const MIB: u64 = 1024 * 1024;
/// How long one shell command in the guest may take.
const SHELL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the guest may take to see a hot-plugged device.
const PLUG_TIMEOUT: Duration = Duration::from_secs(60);

async fn show(d: &Daemon, id: &str) -> Value {
    expect(d, Method::GET, &format!("/v1/vms/{id}"), None, 200).await
}

async fn patch(d: &Daemon, id: &str, body: &Value) -> (u16, Value) {
    call(d, Method::PATCH, &format!("/v1/vms/{id}"), Some(body)).await
}

/// Runs `vmlet ARGS` against the daemon; returns (ok, stdout, stderr).
async fn vmlet(d: &Daemon, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"))
        .args(args)
        .arg("--socket")
        .arg(&d.socket)
        .env_remove("VMLET_URL")
        .env_remove("VMLET_TOKEN_FILE")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), out)
        .await
        .unwrap_or_else(|_| panic!("vmlet {args:?} did not finish"))
        .expect("running vmlet");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Seconds the guest takes to read 4 MiB from `/dev/DEV`, past its page
/// cache.
fn read_seconds(shell: &mut SerialShell, dev: &str) -> u64 {
    let out = shell.run(
        &format!(
            "echo 3 > /proc/sys/vm/drop_caches; s=$(date +%s); dd if=/dev/{dev} of=/dev/null bs=1048576 count=4 2>/dev/null; e=$(date +%s); echo SECONDS=$((e - s))"
        ),
        SHELL_TIMEOUT,
    );
    out.lines()
        .find_map(|l| l.trim().strip_prefix("SECONDS=")?.parse().ok())
        .unwrap_or_else(|| panic!("no SECONDS= in {out:?}"))
}

#[tokio::test]
async fn a_running_vm_takes_limits_disks_and_nics_live_and_refuses_growth_beyond_capacity() {
    let ns = NetNs::new();
    let d = Daemon::start_in_netns(
        &ns,
        &[
            ("VMLET_CAPACITY_MEMORY_MIB", "1024"),
            ("VMLET_RESERVED_MEMORY_MIB", "0"),
        ],
    )
    .await;
    expect(
        &d,
        Method::POST,
        "/v1/networks",
        Some(&json!({"name": "lan"})),
        201,
    )
    .await;
    let vol = unique_name("live-vol");
    expect(
        &d,
        Method::POST,
        "/v1/volumes",
        Some(&json!({"name": vol, "size_mib": 8})),
        201,
    )
    .await;
    let mut spec = guest_spec_json(&unique_name("edit-live"), "guest.action=shell");
    spec["disks"] = json!([{"name": "data", "size_mib": 16}]);
    let vm = create_vm(&d, &spec).await;
    let id = id_of(&vm);
    let log = d.serial_log(uuid_of(&vm));
    let running = expect(&d, Method::POST, &format!("/v1/vms/{id}/start"), None, 200).await;
    let pid = running["pid"].as_i64().expect("pid");
    wait_for_count(&log, "GUEST-READY", 1, BOOT_TIMEOUT).await;
    let token = serial_token(&d, &id).await;
    let (socket, shell_log) = (d.socket.clone(), log.clone());
    let mut shell =
        tokio::task::spawn_blocking(move || SerialShell::connect(&socket, &token, &shell_log))
            .await
            .unwrap();

    // Limits, a volume and a NIC in one patch: all live.
    let mut data = running["spec"]["disks"][0].clone();
    data["limits"] = json!({"bps_read": MIB});
    let (status, after) = patch(
        &d,
        &id,
        &json!({
            "disks": [data, {"name": "extra", "volume": vol}],
            "nics": [{"network": "lan", "mac": "52:54:00:7b:00:03"}],
        }),
    )
    .await;
    assert_eq!(status, 200, "{after}");
    assert!(after.get("pending").is_none(), "all of it is live: {after}");
    assert_eq!(after["pid"].as_i64(), Some(pid), "same QEMU");
    assert_eq!(after["spec"]["disks"][0]["limits"]["bps_read"], MIB);
    assert_eq!(after["spec"]["disks"][1]["volume"], vol.as_str());
    assert_eq!(after["spec"]["nics"].as_array().map(Vec::len), Some(1));
    wait_for_count(&log, "GUEST-DISK-ADDED vdb:8388608", 1, PLUG_TIMEOUT).await;
    wait_for_count(&log, "GUEST-NIC-ADDED", 1, PLUG_TIMEOUT).await;
    let volume = expect(&d, Method::GET, &format!("/v1/volumes/{vol}"), None, 200).await;
    assert_eq!(volume["attached_to"]["vm"], id.as_str(), "{volume}");

    // The throttle is QEMU's: 4 MiB at 1 MiB/s take seconds.
    let (throttled, mut shell) = tokio::task::spawn_blocking(move || {
        let seconds = read_seconds(&mut shell, "vda");
        (seconds, shell)
    })
    .await
    .unwrap();
    assert!(
        throttled >= 2,
        "4 MiB read in {throttled}s at a limit of 1 MiB/s"
    );

    // Out again: the limit lifted, the volume and the NIC unplugged.
    let data = json!({"name": "data", "size_mib": 16});
    let (status, after) = patch(&d, &id, &json!({"disks": [data], "nics": []})).await;
    assert_eq!(status, 200, "{after}");
    assert!(after.get("pending").is_none(), "{after}");
    assert_eq!(after["pid"].as_i64(), Some(pid), "same QEMU");
    assert_eq!(after["spec"]["disks"].as_array().map(Vec::len), Some(1));
    assert!(after["spec"]["disks"][0].get("limits").is_none(), "{after}");
    wait_for_count(&log, "GUEST-DISK-REMOVED vdb", 1, PLUG_TIMEOUT).await;
    wait_for_count(&log, "GUEST-NIC-REMOVED", 1, PLUG_TIMEOUT).await;
    let volume = expect(&d, Method::GET, &format!("/v1/volumes/{vol}"), None, 200).await;
    assert_eq!(volume["attached_to"], Value::Null, "{volume}");
    let unthrottled = tokio::task::spawn_blocking(move || read_seconds(&mut shell, "vda"))
        .await
        .unwrap();
    assert!(
        unthrottled < throttled,
        "the limit was not lifted: {unthrottled}s, throttled {throttled}s"
    );

    // Growth beyond what the host has left: 409, and nothing changes.
    let before = show(&d, &id).await;
    let refused = patch(&d, &id, &json!({"memory_mib": 2048})).await;
    let error = assert_error(&refused, 409, "conflict");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("memory"),
        "{error}"
    );
    let unchanged = show(&d, &id).await;
    assert_eq!(unchanged["spec"], before["spec"]);
    assert_eq!(unchanged["generation"], before["generation"]);
    assert!(unchanged.get("pending").is_none(), "{unchanged}");

    // A change the running VM cannot take: pending, in the view and the
    // CLI, until the next start.
    let (ok, out, err) = vmlet(&d, &["vm", "set", &id, "vcpus=2", "autostart=true"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("applied live: autostart"), "{out}");
    assert!(out.contains("pending until the next start: vcpus"), "{out}");
    let (ok, shown, err) = vmlet(&d, &["vm", "show", &id]).await;
    assert!(ok, "{err}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("pending:") && l.contains("vcpus (at the next start)")),
        "{shown}"
    );
    let view = show(&d, &id).await;
    assert_eq!(view["pending"]["fields"], json!(["vcpus"]), "{view}");
    assert_eq!(view["spec"]["vcpus"], 1);
    let (ok, out, err) = vmlet(&d, &["vm", "stop", &id, "--force"]).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = vmlet(&d, &["vm", "start", &id]).await;
    assert!(ok, "{out}{err}");
    let view = show(&d, &id).await;
    assert_eq!(view["spec"]["vcpus"], 2, "{view}");
    assert!(view.get("pending").is_none(), "{view}");
    let (_, shown, _) = vmlet(&d, &["vm", "show", &id]).await;
    assert!(!shown.contains("pending:"), "{shown}");
    let (ok, out, err) = vmlet(&d, &["vm", "delete", &id, "--force"]).await;
    assert!(ok, "{out}{err}");
}
