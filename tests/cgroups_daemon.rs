//! The daemon's VM cgroups never outlive their QEMU: a QEMU that crashes
//! while vmlet runs, one that died while vmlet was down (removed at the
//! restart), and cgroups of VMs vmlet has no record of (removed at start);
//! a running VM's cgroup made under another root is found by its QEMU's
//! membership, and removed with it.
//!
//! Everything real: `vmlet serve` over HTTP, QEMU under TCG booting the test
//! guest, the host's cgroup hierarchy. VM cgroups need root: without it
//! (or without a usable hierarchy) each test prints one `SKIPPED:` line.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::api::{expect, id_of, uuid_of};
use common::daemon::{guest_spec_json, unique_name, wait_until, Daemon};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use uuid::Uuid;
use vmlet::client::Method;
use vmlet::confine::cgroup::{Cgroups, Hierarchy};

/// The daemon's cgroups, when this test can have VM cgroups; else prints
/// the skip line.
fn cgroups_of(test: &str, d: &Daemon) -> Option<Cgroups> {
    if !nix::unistd::geteuid().is_root() {
        common::skip(test, "VM cgroups are made only when vmlet runs as root");
        return None;
    }
    match Hierarchy::detect().and_then(|h| Cgroups::new(h, &d.cgroup_root)) {
        Ok(c) => Some(c),
        Err(e) => {
            common::skip(test, format!("no usable cgroup hierarchy: {e}"));
            None
        }
    }
}

/// Creates a VM from `spec` and starts it; returns its id and QEMU's pid.
async fn create_and_start(d: &Daemon, spec: &Value) -> (Uuid, i32) {
    let vm = expect(d, Method::POST, "/v1/vms", Some(spec), 201).await;
    let id = id_of(&vm);
    let vm = expect(d, Method::POST, &format!("/v1/vms/{id}/start"), None, 200).await;
    let pid = vm["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("a running VM has a pid: {vm}"));
    (uuid_of(&vm), i32::try_from(pid).unwrap())
}

/// The directories of VM `id`'s cgroup, one per hierarchy used.
fn dirs_of(cgroups: &Cgroups, id: Uuid) -> Vec<PathBuf> {
    cgroups
        .root_dirs()
        .into_iter()
        .map(|r| r.join(id.to_string()))
        .collect()
}

/// Waits until process `pid` is gone or a zombie (its cgroup is then empty).
async fn wait_exited(pid: i32) {
    wait_until(
        &format!("process {pid} to end"),
        Duration::from_secs(10),
        || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_owned));
            async move { matches!(state.as_deref(), None | Some("Z") | Some("X")).then_some(()) }
        },
    )
    .await;
}

/// Waits up to 10 s for process `pid` to be reaped; false if it is not.
async fn wait_reaped(pid: i32) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Waits until none of `dirs` exists.
async fn wait_gone(what: &str, dirs: &[PathBuf]) {
    wait_until(what, Duration::from_secs(10), || {
        let left: Vec<&PathBuf> = dirs.iter().filter(|d| d.exists()).collect();
        async move { left.is_empty().then_some(()) }
    })
    .await;
}

/// A QEMU SIGKILLed while the daemon runs: the VM is crashed and its cgroup
/// is gone from every hierarchy.
#[tokio::test]
async fn a_crashed_qemus_cgroup_is_removed() {
    const TEST: &str = "a_crashed_qemus_cgroup_is_removed";
    let d = Daemon::start().await;
    let Some(cgroups) = cgroups_of(TEST, &d) else {
        return;
    };
    let spec = guest_spec_json(&unique_name("crash"), "guest.action=hold");
    let (id, pid) = create_and_start(&d, &spec).await;
    let dirs = dirs_of(&cgroups, id);
    assert!(dirs.iter().all(|d| d.is_dir()), "{dirs:?}");
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    wait_until("the VM to be crashed", Duration::from_secs(10), || async {
        let (_, vm) = common::api::call(&d, Method::GET, &format!("/v1/vms/{id}"), None).await;
        (vm["state"] == "crashed").then_some(())
    })
    .await;
    wait_gone("the crashed VM's cgroup to go", &dirs).await;
}

/// The daemon is SIGKILLed, then one VM's QEMU dies while it is down; a
/// cgroup of a VM the daemon never had appears meanwhile. At the restart
/// the dead QEMU's cgroup and the unknown one are gone from every
/// hierarchy, the other VM's stays (its QEMU runs), a directory whose name
/// is not a VM's is left alone, and the dead VM's uid is free again.
#[tokio::test]
async fn stale_and_unknown_cgroups_are_removed_at_restart() {
    const TEST: &str = "stale_and_unknown_cgroups_are_removed_at_restart";
    let mut d = Daemon::start().await;
    let Some(cgroups) = cgroups_of(TEST, &d) else {
        return;
    };
    let spec = guest_spec_json(&unique_name("dies"), "guest.action=hold");
    let (dies, dies_pid) = create_and_start(&d, &spec).await;
    let dies_uid = uid_of(dies_pid);
    let spec = guest_spec_json(&unique_name("lives"), "guest.action=hold");
    let (lives, lives_pid) = create_and_start(&d, &spec).await;
    let dies_dirs = dirs_of(&cgroups, dies);
    let lives_dirs = dirs_of(&cgroups, lives);
    assert!(
        dies_dirs.iter().chain(&lives_dirs).all(|d| d.is_dir()),
        "{dies_dirs:?} {lives_dirs:?}"
    );

    d.kill();
    kill(Pid::from_raw(dies_pid), Signal::SIGKILL).unwrap();
    wait_exited(dies_pid).await;
    let unknown = Uuid::new_v4();
    let unknown_dirs = dirs_of(&cgroups, unknown);
    let other_dirs: Vec<PathBuf> = cgroups
        .root_dirs()
        .into_iter()
        .map(|r| r.join("not-a-vm"))
        .collect();
    for dir in unknown_dirs.iter().chain(&other_dirs) {
        std::fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    // Still there while the daemon is down: nothing else removes them.
    assert!(dies_dirs.iter().all(|d| d.is_dir()), "{dies_dirs:?}");

    d.start_again().await;
    for dir in dies_dirs.iter().chain(&unknown_dirs) {
        assert!(!dir.exists(), "{} is left after the restart", dir.display());
    }
    assert!(lives_dirs.iter().all(|d| d.is_dir()), "{lives_dirs:?}");
    assert!(other_dirs.iter().all(|d| d.is_dir()), "{other_dirs:?}");
    let vm = expect(&d, Method::GET, &format!("/v1/vms/{lives}"), None, 200).await;
    assert_eq!(vm["pid"].as_i64(), Some(i64::from(lives_pid)), "{vm}");

    // The dead VM's uid (the lowest of the range) is handed out again,
    // once no process runs as it: a zombie not yet reaped by whoever
    // inherited it still counts as one.
    let reaped = wait_reaped(dies_pid).await;
    let spec = guest_spec_json(&unique_name("again"), "guest.action=hold");
    let (_, again_pid) = create_and_start(&d, &spec).await;
    if reaped {
        assert_eq!(uid_of(again_pid), dies_uid, "the released uid is reused");
    } else {
        eprintln!("uid reuse not checked: QEMU {dies_pid} is still an unreaped zombie");
    }
    for dir in &other_dirs {
        std::fs::remove_dir(dir).unwrap();
    }
}

/// The real uid of process `pid`.
fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Uid in /proc/{pid}/status"))
}

/// Removes a cgroup root of this test when dropped, also on a panic.
struct RootGuard(String);

impl Drop for RootGuard {
    fn drop(&mut self) {
        common::daemon::remove_cgroup_root(&self.0);
    }
}

/// A daemon restarted with another cgroup root (as when an upgrade put
/// vmlet below a systemd unit of its own) finds a running VM's cgroup where
/// its QEMU is: the VM's cgroup figures stay in `/metrics`, and the cgroup
/// goes when the VM stops.
#[tokio::test]
async fn a_cgroup_made_under_another_root_is_found_by_its_qemu_and_removed_with_it() {
    const TEST: &str = "a_cgroup_made_under_another_root_is_found_by_its_qemu_and_removed_with_it";
    // Declared first, dropped last: after the daemon's guard ended QEMU.
    let _old_root: RootGuard;
    let mut d = Daemon::start().await;
    let Some(old) = cgroups_of(TEST, &d) else {
        return;
    };
    _old_root = RootGuard(d.cgroup_root.clone());
    let spec = guest_spec_json(&unique_name("moved"), "guest.action=hold");
    let (id, pid) = create_and_start(&d, &spec).await;
    let old_dirs = dirs_of(&old, id);
    assert!(old_dirs.iter().all(|d| d.is_dir()), "{old_dirs:?}");

    d.kill();
    d.cgroup_root = format!("{}n", d.cgroup_root);
    d.start_again().await;
    let vm = expect(&d, Method::GET, &format!("/v1/vms/{id}"), None, 200).await;
    assert_eq!(vm["pid"].as_i64(), Some(i64::from(pid)), "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");
    // Neither swept as unknown nor duplicated below the new root.
    assert!(old_dirs.iter().all(|d| d.is_dir()), "{old_dirs:?}");
    let new = Hierarchy::detect()
        .and_then(|h| Cgroups::new(h, &d.cgroup_root))
        .unwrap();
    assert!(dirs_of(&new, id).iter().all(|d| !d.exists()));
    // Its figures come from the cgroup it was found in.
    let metrics = d
        .client
        .request(Method::GET, "/metrics", None)
        .await
        .expect("GET /metrics")
        .text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("vmlet_vm_cgroup_memory_bytes{")
                && l.contains(&format!("id=\"{id}\""))),
        "no cgroup memory figure for {id}:\n{metrics}"
    );

    let vm = expect(
        &d,
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(&serde_json::json!({"force": true})),
        200,
    )
    .await;
    assert_eq!(vm["state"], "stopped", "{vm}");
    wait_until(
        "the old cgroup to go with its QEMU",
        Duration::from_secs(10),
        || async { old_dirs.iter().all(|d| !d.exists()).then_some(()) },
    )
    .await;
}
