//! The virtual TPM through the real daemon, with real `swtpm` and QEMU
//! (TCG): the guest sees a TPM 2.0 (`/dev/tpm0`) and reads a PCR from it;
//! `swtpm` runs as the VM's uid, never as root, jailed, in the VM's cgroup,
//! without capabilities, with `no_new_privs` and its seccomp filter; its state survives a stop and start (the
//! TPM's persistent resetCount goes up) and a daemon restart (the same
//! `swtpm` is found again while the VM keeps running); the state moves with
//! a live migration (QEMU carries it to the target's fresh `swtpm`);
//! stopping and deleting the VM leave no `swtpm`, and delete removes the
//! state. A spec with a TPM
//! on a profile without one, or another version, is refused naming the field.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::{assert_invalid_field, call};
use common::daemon::{guest_spec_json, unique_name, wait_for_count, wait_until, Daemon};
use common::BOOT_TIMEOUT;
use serde_json::json;
use uuid::Uuid;
use vmlet::client::Method;
use vmlet::vm::state::PowerState;
use vmlet::vm::Vm;

/// How long a process gets to go away after its VM stopped.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// The swtpm to test with, or why it cannot run here.
fn swtpm_available() -> Result<(), String> {
    match std::process::Command::new("swtpm")
        .arg("--version")
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("swtpm --version failed: {}", out.status)),
        Err(e) => Err(format!(
            "swtpm is not installed ({e}); scripts/setup.sh installs it"
        )),
    }
}

/// Kills the swtpm processes of VM `uuid` that a failed test left (their
/// `--log` names the VM); normally there are none.
struct SwtpmGuard(Uuid);

impl Drop for SwtpmGuard {
    fn drop(&mut self) {
        for pid in swtpm_pids(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Live (not zombie) processes whose command line is VM `uuid`'s swtpm.
fn swtpm_pids(uuid: Uuid) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if vmlet::qemu::tpm::cmdline_is_vm_tpm(&cmdline, uuid) && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    match stat.rfind(')') {
        Some(i) => !matches!(
            stat[i + 1..].split_whitespace().next(),
            Some("Z" | "X") | None
        ),
        None => false,
    }
}

/// The real uid of `pid` (`/proc/PID/status`).
fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Field `key` of `/proc/PID/status` (its value, trimmed).
fn status_field(pid: i32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status:\n{status}"))
        .trim()
        .to_string()
}

/// `/proc/PID/cgroup`: every hierarchy's cgroup of `pid`.
fn cgroups_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap()
}

/// The `pcr0_sha256` of every `GUEST-TPM` line in the serial log, in order:
/// the guest's TPM2_PCR_Read of PCR 0 (SHA-256 bank), which the guest
/// gives only for a response code of 0 with the selection it asked for and
/// one 32-byte digest.
fn pcr0_digests(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split("GUEST-TPM ").nth(1))
        .map(|rest| {
            let digest = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("pcr0_sha256="))
                .unwrap_or_else(|| panic!("no pcr0_sha256 in {rest}"));
            assert!(
                digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
                "TPM2_PCR_Read of PCR 0 (sha256) failed in the guest: {rest}"
            );
            digest.to_string()
        })
        .collect()
}

fn tpm_dir(d: &Daemon, id: Uuid) -> PathBuf {
    d.state_dir.join("vms").join(id.to_string()).join("tpm")
}

/// The `reset_count` of every `GUEST-TPM` line in the serial log, in order.
fn reset_counts(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split("GUEST-TPM ").nth(1))
        .map(|rest| {
            assert!(
                rest.starts_with("dev=tpm0 version=2 "),
                "the guest sees a TPM 2.0: {rest}"
            );
            let count = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("reset_count="))
                .unwrap_or_else(|| panic!("no reset_count in {rest}"));
            count
                .parse()
                .unwrap_or_else(|_| panic!("TPM2_ReadClock failed in the guest: {rest}"))
        })
        .collect()
}

async fn get(d: &Daemon, id: Uuid) -> Vm {
    d.client.get_vm(&id.to_string()).await.expect("GET VM")
}

async fn wait_gone(pid: i32, what: &str) {
    wait_until(
        what,
        EXIT_TIMEOUT,
        || async move { (!alive(pid)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_is_seen_by_the_guest_persists_and_follows_the_vm() {
    const TEST: &str = "tpm_is_seen_by_the_guest_persists_and_follows_the_vm";
    if let Err(reason) = swtpm_available() {
        common::skip(TEST, reason);
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        common::skip(
            TEST,
            "swtpm runs as the VM's own uid only when vmlet is root",
        );
        return;
    }
    let mut d = Daemon::start().await;
    let mut spec = guest_spec_json(&unique_name("tpm"), "guest.tpm=report");
    spec["tpm"] = json!({"version": "2.0"});
    let vm = d.client.create_vm(&spec).await.expect("creating VM");
    let id = vm.id;
    let _guard = SwtpmGuard(id);
    let shown = serde_json::to_value(&vm.spec).unwrap();
    assert_eq!(shown["tpm"], json!({"version": "2.0"}));
    let log = d.serial_log(id);

    // First boot: the guest sees the TPM; swtpm runs as the VM's uid.
    let vm = d.client.start(&id.to_string()).await.expect("start");
    assert_eq!(vm.state, PowerState::Running);
    let qemu = vm.pid.expect("QEMU pid");
    let swtpm = vm.tpm_pid.expect("a VM with a TPM records its swtpm pid");
    assert!(vm.tpm_pid_start.is_some());
    assert_eq!(swtpm_pids(id), vec![swtpm], "one swtpm, the recorded one");
    let uid = uid_of(swtpm);
    assert_ne!(uid, 0, "swtpm never runs as root");
    assert_eq!(uid, uid_of(qemu), "swtpm runs as its VM's uid");
    // Jailed: a mount namespace of its own, whose root holds no /etc.
    assert_ne!(
        std::fs::read_link(format!("/proc/{swtpm}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap(),
        "swtpm has a mount namespace of its own"
    );
    assert!(Path::new("/etc/passwd").exists());
    assert!(
        !Path::new(&format!("/proc/{swtpm}/root/etc/passwd")).exists(),
        "swtpm is jailed: it sees no /etc"
    );
    // In the VM's cgroup (the same as its QEMU's in every hierarchy, below
    // this daemon's cgroup root), not the daemon's.
    let cgroups = cgroups_of(swtpm);
    assert_eq!(cgroups, cgroups_of(qemu), "swtpm is in its VM's cgroup");
    assert_ne!(cgroups, cgroups_of(d.pid()), "not in the daemon's cgroup");
    assert!(
        cgroups.contains(&format!("{}/{id}", d.cgroup_root)),
        "the VM's cgroup below the daemon's root {}: {cgroups}",
        d.cgroup_root
    );
    // No capabilities, no_new_privs, and swtpm's own seccomp filter
    // (mode 2, a filter), asked for explicitly.
    assert_eq!(
        status_field(swtpm, "CapEff"),
        "0000000000000000",
        "swtpm has no capabilities"
    );
    assert_eq!(status_field(swtpm, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(swtpm, "NoNewPrivs"), "1");
    assert_eq!(status_field(swtpm, "Seccomp"), "2", "swtpm runs filtered");
    let cmdline = std::fs::read(format!("/proc/{swtpm}/cmdline")).unwrap();
    assert!(
        cmdline
            .split(|b| *b == 0)
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w == [&b"--seccomp"[..], &b"action=kill"[..]]),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    wait_for_count(&log, "GUEST-TPM", 1, BOOT_TIMEOUT).await;
    let first = reset_counts(&log);
    assert_eq!(first.len(), 1);
    // The guest read PCR 0 of the SHA-256 bank through /dev/tpm0.
    assert_eq!(pcr0_digests(&log).len(), 1);
    let state = tpm_dir(&d, id);
    assert!(
        state.join("tpm2-00.permall").is_file(),
        "the TPM state lives in the VM's state directory"
    );
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&state).unwrap());
    assert_eq!(owner, uid, "the state directory belongs to the VM's uid");

    // A daemon restart: the same swtpm is found again, the VM keeps running.
    d.restart().await;
    let vm = get(&d, id).await;
    assert_eq!(vm.state, PowerState::Running, "{vm:?}");
    assert_eq!(vm.pid, Some(qemu));
    assert_eq!(vm.tpm_pid, Some(swtpm), "the swtpm is found again");
    assert!(alive(swtpm));
    assert_eq!(swtpm_pids(id), vec![swtpm]);

    // A migration to a target that is not there fails before anything
    // moved: the VM and its swtpm are untouched.
    let request = json!({
        "target": {"url": "http://127.0.0.1:9", "token": "unused"},
        "max_downtime_ms": 300,
    });
    let (status, body) = call(
        &d,
        Method::POST,
        &format!("/v1/vms/{id}/migrate"),
        Some(&request),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "target_unreachable", "{body}");
    let vm = get(&d, id).await;
    assert_eq!(vm.state, PowerState::Running);
    assert_eq!(vm.tpm_pid, Some(swtpm));
    assert!(alive(swtpm));

    // Stop: no swtpm is left; the state stays.
    let vm = d
        .client
        .stop(&id.to_string(), true, None)
        .await
        .expect("stop");
    assert_eq!(vm.state, PowerState::Stopped);
    assert_eq!(vm.tpm_pid, None);
    wait_gone(swtpm, "the swtpm to exit with its VM").await;
    assert!(swtpm_pids(id).is_empty(), "no swtpm after stop");
    assert!(state.join("tpm2-00.permall").is_file(), "state kept");
    // Its uid is free for another VM now: the state is root's again.
    for path in [state.clone(), state.join("tpm2-00.permall")] {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            0,
            "{} after the stop",
            path.display()
        );
    }

    // Start again: a new swtpm on the same state: the TPM counts one more
    // reset than before (a TPM made afresh would start over).
    let vm = d.client.start(&id.to_string()).await.expect("second start");
    let swtpm2 = vm.tpm_pid.expect("swtpm pid");
    assert_ne!(swtpm2, swtpm);
    wait_for_count(&log, "GUEST-TPM", 2, BOOT_TIMEOUT).await;
    let counts = reset_counts(&log);
    assert_eq!(counts.len(), 2);
    assert!(
        counts[1] > counts[0],
        "the TPM state survived the restart: reset counts {counts:?}"
    );
    assert_eq!(pcr0_digests(&log).len(), 2, "a PCR read at every boot");

    // Delete (forced, while running): swtpm and its state go.
    d.client
        .delete_vm(&id.to_string(), true)
        .await
        .expect("delete");
    wait_gone(swtpm2, "the swtpm to exit with its deleted VM").await;
    assert!(swtpm_pids(id).is_empty(), "no swtpm after delete");
    assert!(!state.exists(), "the TPM state goes with the VM");
}

#[tokio::test]
async fn tpm_is_refused_where_it_cannot_be() {
    let d = Daemon::start().await;
    // A profile without a TPM device.
    let mut spec = guest_spec_json(&unique_name("tpm-microvm"), "");
    spec["profile"] = json!("microvm");
    spec["tpm"] = json!({"version": "2.0"});
    let answer = call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
    assert_invalid_field(&answer, "tpm");
    // Versions other than 2.0, and unknown fields.
    for bad in [
        json!({"version": "1.2"}),
        json!({"version": 2}),
        json!({}),
        json!({"version": "2.0", "model": "tis"}),
        json!("2.0"),
    ] {
        let mut spec = guest_spec_json(&unique_name("tpm-bad"), "");
        spec["tpm"] = bad.clone();
        let (status, body) = call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
        assert!(status == 400 || status == 422, "{bad}: {status} {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("tpm"),
            "{bad}: the error names the field: {body}"
        );
    }
    let vms = d.client.list_vms().await.unwrap();
    assert!(vms.is_empty(), "nothing was created: {vms:?}");
}

#[tokio::test]
async fn the_tpm_state_moves_with_a_live_migration() {
    const TEST: &str = "the_tpm_state_moves_with_a_live_migration";
    if let Err(reason) = swtpm_available() {
        common::skip(TEST, reason);
        return;
    }
    let a = Daemon::start().await;
    let target = common::daemon::TcpTarget::start("tpm-migration-token").await;
    let b = &target.daemon;
    let mut spec = guest_spec_json(&unique_name("tpm-mig"), "guest.tpm=report");
    spec["tpm"] = json!({"version": "2.0"});
    let vm = a.client.create_vm(&spec).await.expect("creating VM");
    let id = vm.id;
    let _guard = SwtpmGuard(id);
    a.client.start(&id.to_string()).await.expect("start");
    // Two resets on the source: the TPM's reset count goes up by one each.
    let log = a.serial_log(id);
    wait_for_count(&log, "GUEST-TPM", 1, BOOT_TIMEOUT).await;
    for n in 2..=3 {
        a.client
            .reboot_with(&id.to_string(), true, None)
            .await
            .expect("reset");
        wait_for_count(&log, "GUEST-TPM", n, BOOT_TIMEOUT).await;
    }
    let before = *reset_counts(&log).last().unwrap();

    let started = a
        .client
        .migrate_vm(&id.to_string(), &target.request())
        .await
        .expect("migrate");
    let done = common::daemon::wait_for_migration(&a.client, started.id).await;
    assert_eq!(done.phase, vmlet::spec::Phase::Completed, "{done:?}");
    let moved = get(b, id).await;
    assert_eq!(moved.state, PowerState::Running, "{moved:?}");
    let swtpm = moved.tpm_pid.expect("the target records its swtpm");
    assert_eq!(
        swtpm_pids(id),
        vec![swtpm],
        "only the target's swtpm is left"
    );

    // A reset on the target: the count goes on from the source's (a fresh
    // TPM would start again from zero).
    b.client
        .reboot_with(&id.to_string(), true, None)
        .await
        .expect("reset on the target");
    let log = b.serial_log(id);
    wait_for_count(&log, "GUEST-TPM", 1, BOOT_TIMEOUT).await;
    let after = *reset_counts(&log).last().unwrap();
    assert_eq!(after, before + 1, "the TPM state moved with the VM");
    assert_eq!(pcr0_digests(&log).len(), 1, "the guest reads a PCR on B");
    common::api::force_delete_vm(b, &id.to_string()).await;
}
