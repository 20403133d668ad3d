//! QEMU confined, seen from outside and from inside: every daemon VM's QEMU
//! runs under a uid of its own with no capabilities, `no_new_privs` and
//! seccomp, in a jail holding only what it needs, and in a cgroup carrying
//! the spec's limits; a confined QEMU cannot open host files or another
//! VM's disk; `vmlet run` works without root (unconfined, and says so); a
//! SIGKILLed daemon finds its confined VMs again.
//!
//! Everything real: `vmlet serve` over HTTP, QEMU under TCG booting the test
//! guest, the host's cgroup hierarchy. Confinement needs root: without it
//! each test prints one `SKIPPED:` line.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::api::{expect, id_of, uuid_of};
use common::daemon::{guest_spec_json, unique_name, unique_uid_range, wait_for_count, Daemon};
use common::{Scratch, BOOT_TIMEOUT};
use serde_json::{json, Value};
use uuid::Uuid;
use vmlet::client::Method;
use vmlet::confine::cgroup::{Cgroups, Hierarchy};

/// The top-level entries a jail may hold: `/usr` and the host's
/// lib/bin links or binds, the jail's own `/dev`, `/proc`, `/run`, `/tmp`,
/// `/boot` with copies of a kernel and initrd QEMU's user may not read as
/// they are, and `/opt` holding the bind of a QEMU binary that lives
/// outside `/usr`.
const JAIL_ENTRIES: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "dev", "proc", "run", "tmp", "boot",
    "opt",
];

/// True when this test can confine QEMU (root); else prints the skip line.
fn confinement_runs_here(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        common::skip(test, "QEMU is confined only when vmlet runs as root");
        false
    }
}

/// One `Key:` line of `/proc/PID/status`, without the key.
fn status_field(pid: i32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status:\n{status}"))
        .trim()
        .to_string()
}

/// The real, effective, saved and file-system ids of a `Uid:`/`Gid:` line.
fn ids(pid: i32, key: &str) -> Vec<u32> {
    status_field(pid, key)
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

/// Creates a test-guest VM from `spec` and starts it; returns its id and
/// QEMU's pid.
async fn create_and_start(d: &Daemon, spec: &Value) -> (Uuid, i32) {
    let vm = expect(d, Method::POST, "/v1/vms", Some(spec), 201).await;
    let id = id_of(&vm);
    let vm = expect(d, Method::POST, &format!("/v1/vms/{id}/start"), None, 200).await;
    assert_eq!(vm["state"], "running", "after start: {vm}");
    let pid = vm["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("a running VM has a pid: {vm}"));
    (uuid_of(&vm), i32::try_from(pid).unwrap())
}

/// Checks the confinement of VM `id`'s QEMU `pid` as `/proc` shows it,
/// with `io_weight` the spec's I/O weight (100 when unset); returns its uid.
fn assert_confined(d: &Daemon, id: Uuid, pid: i32, io_weight: u32) -> u32 {
    let uids = ids(pid, "Uid");
    let gids = ids(pid, "Gid");
    assert_eq!(uids.len(), 4, "{uids:?}");
    assert!(
        uids.iter().all(|u| *u == uids[0]) && uids[0] != 0,
        "QEMU {pid} runs with uids {uids:?}"
    );
    assert!(
        gids.iter().all(|g| *g == gids[0]) && gids[0] != 0,
        "QEMU {pid} runs with gids {gids:?}"
    );
    assert_eq!(status_field(pid, "Groups"), "", "supplementary groups");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(pid, caps),
            "0000000000000000",
            "{caps} of {pid}"
        );
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2", "seccomp filter mode");

    // The jail is its root, in a mount namespace of its own. (readlink of
    // /proc/PID/root says "/": the jail's root mount exists only in QEMU's
    // namespace, so it is compared by device and inode, which a bind keeps.)
    let jail = d.run_dir.join("vms").join(id.to_string()).join("root");
    let root = std::fs::metadata(format!("/proc/{pid}/root")).unwrap();
    let expected = std::fs::metadata(&jail).unwrap();
    assert_eq!(
        (root.dev(), root.ino()),
        (expected.dev(), expected.ino()),
        "QEMU {pid}'s root is not {}",
        jail.display()
    );
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap(),
        "QEMU {pid} shares the host's mount namespace"
    );
    let inside = PathBuf::from(format!("/proc/{pid}/root"));
    let entries: BTreeSet<String> = std::fs::read_dir(&inside)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let unexpected: Vec<&String> = entries
        .iter()
        .filter(|e| !JAIL_ENTRIES.contains(&e.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the jail holds {unexpected:?} (all: {entries:?})"
    );
    for needed in ["usr", "dev", "proc", "run", "tmp"] {
        assert!(
            entries.contains(needed),
            "no /{needed} in the jail: {entries:?}"
        );
    }
    assert!(!inside.join("etc").exists(), "the jail has /etc");
    // Neither the daemon's state nor its run directory is reachable.
    for dir in [&d.state_dir, &d.run_dir] {
        let seen = inside.join(dir.strip_prefix("/").unwrap());
        assert!(!seen.exists(), "{} is visible in the jail", dir.display());
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // The kernel is the file vmlet opened, or a copy inside the jail.
    match arg_after(&args, "-kernel").as_deref() {
        Some(fd) if fd.starts_with("/proc/self/fd/") => {}
        Some(copy @ "/boot/kernel") => assert!(
            inside.join(copy.trim_start_matches('/')).is_file(),
            "{copy} is not in the jail"
        ),
        other => panic!("QEMU {pid} reads its kernel from {other:?}"),
    }
    assert!(
        !args.iter().any(|a| a == "-daemonize"),
        "QEMU was daemonized: {args:?}"
    );

    // The rlimits vmlet set between fork and exec.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = vmlet::qemu::process::QEMU_NOFILE.to_string();
    assert_eq!(
        limit(&limits, "Max core file size"),
        ["0", "0"],
        "no core dumps:\n{limits}"
    );
    assert_eq!(
        limit(&limits, "Max open files"),
        [nofile.as_str(), nofile.as_str()],
        "{limits}"
    );
    // A session (and process group) of its own: no signal to vmlet's
    // group or terminal reaches it.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    assert_eq!(
        (after_comm[2], after_comm[3]),
        (pid.to_string().as_str(), pid.to_string().as_str()),
        "process group and session of QEMU {pid}: {stat}"
    );
    assert_io_weight(d, id, io_weight);
    uids[0]
}

/// The argument after `flag` in `args`.
fn arg_after(args: &[String], flag: &str) -> Option<String> {
    args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone())
}

/// The soft and hard value of one `/proc/PID/limits` line.
fn limit<'a>(limits: &'a str, name: &str) -> Vec<&'a str> {
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name:?} in:\n{limits}"));
    line.split_whitespace().take(2).collect()
}

/// The I/O weight file of VM `id`'s cgroup, where the host offers one,
/// carries `weight` (v2 scale, mapped as vmlet maps it for the file found).
fn assert_io_weight(d: &Daemon, id: Uuid, weight: u32) {
    use vmlet::confine::cgroup::{bfq_weight, blkio_weight};
    let cgroups = Hierarchy::detect()
        .and_then(|h| Cgroups::new(h, &d.cgroup_root))
        .unwrap_or_else(|e| panic!("the daemon's cgroups: {e}"));
    let cgroup = cgroups
        .open(id)
        .unwrap_or_else(|| panic!("VM {id} has no cgroup"));
    let files = [
        ("io.weight", u64::from(weight)),
        ("io.bfq.weight", bfq_weight(weight)),
        ("blkio.weight", blkio_weight(weight)),
        ("blkio.bfq.weight", bfq_weight(weight)),
    ];
    let mut checked = 0;
    for dir in cgroup.dirs() {
        for (file, expected) in files {
            let path = dir.join(file);
            if !path.exists() {
                continue;
            }
            // "N" (v1) or "default N" then per-device lines (v2).
            let text = read_trimmed(&path);
            let value = text
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().last())
                .unwrap_or_default();
            assert_eq!(value, expected.to_string(), "{}: {text}", path.display());
            checked += 1;
        }
    }
    if checked == 0 {
        eprintln!("I/O weight of VM {id} not checked: its cgroup has no weight file on this host");
    }
}

/// Two VMs: each QEMU runs under its own uid with no capabilities,
/// `no_new_privs` and seccomp, jailed, not daemonized; both guests boot.
#[tokio::test]
async fn each_vm_runs_unprivileged_in_its_own_jail() {
    const TEST: &str = "each_vm_runs_unprivileged_in_its_own_jail";
    if !confinement_runs_here(TEST) {
        return;
    }
    let d = Daemon::start().await;
    let mut seen = Vec::new();
    for prefix in ["jail-a", "jail-b"] {
        let spec = guest_spec_json(&unique_name(prefix), "guest.action=hold");
        seen.push(create_and_start(&d, &spec).await);
    }
    for (id, _) in &seen {
        wait_for_count(&d.serial_log(*id), "GUEST-READY", 1, BOOT_TIMEOUT).await;
    }
    let uids: Vec<u32> = seen
        .iter()
        .map(|(id, pid)| assert_confined(&d, *id, *pid, 100))
        .collect();
    assert_ne!(uids[0], uids[1], "two VMs share a uid");
    let range = vmlet::confine::ids::IdRange::parse(&d.uid_range).unwrap();
    for uid in &uids {
        assert!(range.contains(*uid), "uid {uid} outside {}", d.uid_range);
    }
    for (id, _) in &seen {
        vmlet_stop(&d, *id).await;
    }
}

/// A kernel and initrd QEMU's user may read are handed over as the files
/// vmlet opened (`/proc/self/fd/N`), with no copy in the jail; ones it may
/// not read (root's, mode 0600) are copied into its jail, readable by its
/// uid alone. Both guests boot.
#[tokio::test]
async fn boot_files_are_copied_only_when_qemus_user_may_not_read_them() {
    const TEST: &str = "boot_files_are_copied_only_when_qemus_user_may_not_read_them";
    if !confinement_runs_here(TEST) {
        return;
    }
    let d = Daemon::start().await;
    let guest = common::guest::test_guest();
    // The test guest's files are 0644: readable by anyone.
    let readable = guest_spec_json(&unique_name("bootfd"), "guest.action=hold");
    let kernel = d.scratch().join("private-vmlinuz");
    let initrd = d.scratch().join("private-initrd.img");
    for (from, to) in [(&guest.kernel, &kernel), (&guest.initrd, &initrd)] {
        std::fs::copy(from, to).unwrap();
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut private = guest_spec_json(&unique_name("bootcopy"), "guest.action=hold");
    private["boot"]["kernel"] = json!(kernel);
    private["boot"]["initrd"] = json!(initrd);

    let (fd_id, fd_pid) = create_and_start(&d, &readable).await;
    let (copy_id, copy_pid) = create_and_start(&d, &private).await;
    for id in [fd_id, copy_id] {
        wait_for_count(&d.serial_log(id), "GUEST-READY", 1, BOOT_TIMEOUT).await;
    }
    let args = |pid: i32| -> Vec<String> {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap()
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    };

    let fd_args = args(fd_pid);
    for flag in ["-kernel", "-initrd"] {
        let named = arg_after(&fd_args, flag).unwrap_or_default();
        assert!(
            named.starts_with("/proc/self/fd/"),
            "{flag} {named}: a readable file is handed over as it is"
        );
    }
    let fd_jail = PathBuf::from(format!("/proc/{fd_pid}/root"));
    assert!(!fd_jail.join("boot").exists(), "a copy was made anyway");
    assert_confined(&d, fd_id, fd_pid, 100);

    let copy_args = args(copy_pid);
    let copy_uid = assert_confined(&d, copy_id, copy_pid, 100);
    for (flag, inside) in [("-kernel", "/boot/kernel"), ("-initrd", "/boot/initrd")] {
        assert_eq!(arg_after(&copy_args, flag).as_deref(), Some(inside));
        let path = PathBuf::from(format!("/proc/{copy_pid}/root{inside}"));
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(meta.uid(), copy_uid, "{inside} belongs to QEMU's uid");
        assert_eq!(meta.mode() & 0o777, 0o400, "{inside} mode");
    }
    assert_eq!(
        std::fs::metadata(&kernel).unwrap().mode() & 0o777,
        0o600,
        "the host's file is left as it was"
    );
    for id in [fd_id, copy_id] {
        vmlet_stop(&d, id).await;
    }
}

/// Force-stops VM `id`.
async fn vmlet_stop(d: &Daemon, id: Uuid) {
    let vm = expect(
        d,
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(&json!({"force": true})),
        200,
    )
    .await;
    assert_eq!(vm["state"], "stopped", "after stop: {vm}");
}

/// The directory of VM `id`'s cgroup in the hierarchy holding
/// `controller` (v1), or the one v2 directory: below the daemon's root,
/// which is below the cgroup the daemon (like this test) runs in.
fn cgroup_dir(cgroups: &Cgroups, controller: &str, id: Uuid) -> PathBuf {
    let roots = cgroups.root_dirs();
    let root = match cgroups.hierarchy() {
        Hierarchy::V1 { mounts } => {
            let mount = mounts
                .iter()
                .find(|m| m.controllers.iter().any(|c| c == controller))
                .unwrap_or_else(|| panic!("no v1 mount with {controller}"));
            roots
                .into_iter()
                .find(|r| r.starts_with(&mount.dir))
                .unwrap_or_else(|| panic!("no root dir below {}", mount.dir.display()))
        }
        Hierarchy::V2 { .. } => roots.into_iter().next().expect("one v2 root dir"),
    };
    root.join(id.to_string())
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .to_string()
}

/// `nr_throttled` of a `cpu.stat` file.
fn nr_throttled(path: &Path) -> u64 {
    read_trimmed(path)
        .lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .unwrap_or_else(|| panic!("no nr_throttled in {}", path.display()))
        .parse()
        .unwrap()
}

/// A VM's cgroup carries the spec's resources, holds QEMU and every one of
/// its threads, throttles it while the booted guest spins (10 % of a core
/// for a vCPU that never sleeps), and goes when the VM stops.
#[tokio::test]
async fn a_vms_cgroup_holds_its_qemu_with_the_specs_limits() {
    const TEST: &str = "a_vms_cgroup_holds_its_qemu_with_the_specs_limits";
    if !confinement_runs_here(TEST) {
        return;
    }
    let hierarchy = match Hierarchy::detect() {
        Ok(h) => h,
        Err(e) => return common::skip(TEST, format!("no cgroup hierarchy: {e}")),
    };
    let d = Daemon::start().await;
    let cgroups = match Cgroups::new(hierarchy, &d.cgroup_root) {
        Ok(c) => c,
        Err(e) => return common::skip(TEST, format!("cgroups unusable here: {e}")),
    };
    let mut spec = guest_spec_json(&unique_name("cg"), "guest.action=spin");
    spec["resources"] = json!({
        "cpu_quota_percent": 10,
        "cpu_weight": 50,
        "pids_max": 200,
        "memory_overhead_mib": 300,
        "io_weight": 300,
    });
    let memory_mib = spec["memory_mib"].as_u64().unwrap();
    let (id, pid) = create_and_start(&d, &spec).await;
    let root = d.cgroup_root.as_str();
    let v2 = matches!(cgroups.hierarchy(), Hierarchy::V2 { .. });
    let cpu = cgroup_dir(&cgroups, "cpu", id);
    let memory = cgroup_dir(&cgroups, "memory", id);
    let pids = cgroup_dir(&cgroups, "pids", id);
    let memory_max = (memory_mib + 300) << 20;
    if v2 {
        assert_eq!(read_trimmed(&cpu.join("cpu.max")), "10000 100000");
        assert_eq!(read_trimmed(&cpu.join("cpu.weight")), "50");
        assert_eq!(
            read_trimmed(&memory.join("memory.max")),
            memory_max.to_string()
        );
    } else {
        assert_eq!(read_trimmed(&cpu.join("cpu.cfs_period_us")), "100000");
        assert_eq!(read_trimmed(&cpu.join("cpu.cfs_quota_us")), "10000");
        assert_eq!(read_trimmed(&cpu.join("cpu.shares")), "512");
        assert_eq!(
            read_trimmed(&memory.join("memory.limit_in_bytes")),
            memory_max.to_string()
        );
    }
    assert_eq!(read_trimmed(&pids.join("pids.max")), "200");

    // QEMU and all its threads are in the VM's cgroup, in every hierarchy.
    let suffix = format!("/{root}/{id}");
    let tasks: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    assert!(tasks.contains(&pid), "{tasks:?}");
    assert!(tasks.len() > 1, "QEMU has threads: {tasks:?}");
    for tid in &tasks {
        let text = read_trimmed(Path::new(&format!("/proc/{pid}/task/{tid}/cgroup")));
        for wanted in ["cpu", "memory", "pids"] {
            let line = text
                .lines()
                .find(|l| {
                    let mut parts = l.splitn(3, ':');
                    let controllers = parts.nth(1).unwrap_or_default();
                    if v2 {
                        controllers.is_empty()
                    } else {
                        controllers.split(',').any(|c| c == wanted)
                    }
                })
                .unwrap_or_else(|| panic!("no {wanted} line for task {tid}:\n{text}"));
            assert!(
                line.ends_with(&suffix),
                "task {tid} of QEMU {pid} is in {line}, not in …{suffix}"
            );
        }
    }

    // Once booted the guest spins: the 10 % quota throttles QEMU in most
    // 100 ms periods, and holds its CPU time near a tenth of the time.
    wait_for_count(&d.serial_log(id), "GUEST-SPINNING", 1, BOOT_TIMEOUT * 3).await;
    assert_confined(&d, id, pid, 300);
    let stat = cpu.join("cpu.stat");
    let cgroup = cgroups.open(id).expect("the VM's cgroup");
    let interval = Duration::from_secs(3);
    let (throttled_before, used_before) = (nr_throttled(&stat), cgroup.stats().cpu_usage_ns);
    let started = Instant::now();
    tokio::time::sleep(interval).await;
    let elapsed = started.elapsed();
    let (throttled_after, used_after) = (nr_throttled(&stat), cgroup.stats().cpu_usage_ns);
    let periods = throttled_after - throttled_before;
    eprintln!("nr_throttled {throttled_before} -> {throttled_after} over {elapsed:?}");
    // 30 periods in 3 s; most are throttled while the vCPU spins.
    assert!(
        periods >= 10,
        "only {periods} throttled periods in {elapsed:?} of a spinning guest"
    );
    if let (Some(before), Some(after)) = (used_before, used_after) {
        let share = (after - before) as f64 / elapsed.as_nanos() as f64;
        eprintln!("CPU share of the spinning VM: {:.1} %", share * 100.0);
        assert!(
            share < 0.2,
            "a 10 % quota let QEMU use {:.1} %",
            share * 100.0
        );
    }

    let dirs: Vec<PathBuf> = cgroups
        .root_dirs()
        .into_iter()
        .map(|r| r.join(id.to_string()))
        .collect();
    assert!(dirs.iter().all(|d| d.is_dir()), "{dirs:?}");
    vmlet_stop(&d, id).await;
    for dir in &dirs {
        assert!(!dir.exists(), "{} is left after stop", dir.display());
    }
}

/// A confined QEMU asked over QMP to open a host file or another VM's disk
/// cannot: the jail has no such path and its uid no right to it.
#[tokio::test]
async fn a_confined_qemu_cannot_open_host_files_or_other_disks() {
    const TEST: &str = "a_confined_qemu_cannot_open_host_files_or_other_disks";
    if !confinement_runs_here(TEST) {
        return;
    }
    let scratch = Scratch::new();
    let other_disk = scratch.qcow2("other-vm.qcow2", "16M");
    std::fs::set_permissions(&other_disk, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&other_disk, Some(0), Some(0)).unwrap();
    let cgroup_root = unique_name(common::SCRATCH_PREFIX.trim_end_matches('-'));
    let settings = vmlet::config::QemuSettings {
        cgroup_root: cgroup_root.clone(),
        uid_range: unique_uid_range(),
        ..Default::default()
    };
    let spec = common::guest_spec("q35", "guest.action=hold");
    let vm = common::launch_confined(&spec, &scratch, &settings)
        .await
        .expect("launching a confined QEMU");
    let pid = vm.process.pid();
    assert_ne!(ids(pid, "Uid")[0], 0, "QEMU runs as root");
    let deadline = Duration::from_secs(10);
    for (node, file) in [
        ("shadow", PathBuf::from("/etc/shadow")),
        ("other", other_disk.clone()),
    ] {
        let answer = vm
            .qmp
            .query_raw(
                "blockdev-add",
                Some(json!({
                    "driver": "file",
                    "node-name": node,
                    "filename": file,
                    "read-only": true,
                })),
                deadline,
            )
            .await;
        let message = match answer {
            Ok(v) => panic!("QEMU opened {}: {v}", file.display()),
            Err(e) => e.to_string(),
        };
        assert!(
            message.contains("Permission denied") || message.contains("No such file"),
            "opening {}: {message}",
            file.display()
        );
    }
    drop(vm);
    common::daemon::remove_cgroup_root(&cgroup_root);
}

/// Runs `command`, killing it after `timeout`; returns its exit status
/// (`None` on timeout).
fn run_with_timeout(mut command: Command, timeout: Duration) -> Option<std::process::ExitStatus> {
    let mut child = command.spawn().expect("spawning");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `vmlet run` by a user other than root (nobody) boots the guest with
/// QEMU as that user, unjailed and without a cgroup, says so in one line,
/// and exits 0 when the guest powers off.
#[tokio::test]
async fn vmlet_run_works_without_root() {
    const TEST: &str = "vmlet_run_works_without_root";
    if !confinement_runs_here(TEST) {
        return;
    }
    let setpriv = Command::new("setpriv").arg("--version").output();
    if !setpriv.is_ok_and(|o| o.status.success()) {
        return common::skip(TEST, "setpriv (util-linux) is not installed");
    }
    const NOBODY: u32 = 65534;
    let scratch = Scratch::new();
    let dir = scratch.path();
    let guest = common::guest::test_guest();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.img");
    std::fs::copy(&guest.kernel, &kernel).unwrap();
    std::fs::copy(&guest.initrd, &initrd).unwrap();
    let mut spec = guest_spec_json(&unique_name("nobody"), "guest.action=poweroff");
    spec["boot"]["kernel"] = json!(kernel);
    spec["boot"]["initrd"] = json!(initrd);
    let spec_file = dir.join("spec.json");
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    for path in [dir.to_path_buf(), kernel, initrd, spec_file.clone()] {
        std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let out_path = dir.join("out.log");
    let err_path = dir.join("err.log");
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            env!("CARGO_BIN_EXE_vmlet"),
            "--config",
            "/dev/null",
            "run",
            "--accel",
            "tcg",
            "--run-dir",
        ])
        .arg(dir.join("run"))
        .arg(&spec_file)
        .env("VMLET_STATE_DIR", dir.join("state"))
        .env("VMLET_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let status = tokio::task::spawn_blocking(move || run_with_timeout(command, BOOT_TIMEOUT))
        .await
        .unwrap();
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("vmlet run did not end within {BOOT_TIMEOUT:?}:\n{out}\n---\n{err}")
    });
    assert!(status.success(), "vmlet run: {status}\n{out}\n---\n{err}");
    assert!(
        out.contains("GUEST-READY"),
        "no GUEST-READY:\n{out}\n---\n{err}"
    );
    assert!(out.contains("GUEST-POWEROFF"), "{out}");
    let notes: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("QEMU runs as vmlet's own user, without jail or cgroup"))
        .collect();
    assert_eq!(notes.len(), 1, "the unconfined note, once:\n{err}");
}

/// A SIGKILLed daemon finds its confined VM again (same pid, same uid) and
/// can still hot-plug a disk into it.
#[tokio::test]
async fn a_restarted_daemon_reattaches_a_confined_vm() {
    const TEST: &str = "a_restarted_daemon_reattaches_a_confined_vm";
    if !confinement_runs_here(TEST) {
        return;
    }
    let mut d = Daemon::start().await;
    let spec = guest_spec_json(&unique_name("reattach"), "guest.action=hold");
    let (id, pid) = create_and_start(&d, &spec).await;
    wait_for_count(&d.serial_log(id), "GUEST-READY", 1, BOOT_TIMEOUT).await;
    let uid = assert_confined(&d, id, pid, 100);

    d.kill();
    d.start_again().await;
    let vm = expect(&d, Method::GET, &format!("/v1/vms/{id}"), None, 200).await;
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["pid"].as_i64(), Some(i64::from(pid)), "{vm}");
    assert_eq!(
        assert_confined(&d, id, pid, 100),
        uid,
        "the uid after reattach"
    );

    let volume = unique_name("plug");
    expect(
        &d,
        Method::POST,
        "/v1/volumes",
        Some(&json!({"name": volume, "size_mib": 8})),
        201,
    )
    .await;
    expect(
        &d,
        Method::POST,
        &format!("/v1/vms/{id}/disks"),
        Some(&json!({"volume": volume})),
        200,
    )
    .await;
    let log = d.serial_log(id);
    wait_for_count(&log, "GUEST-DISK-ADDED", 1, BOOT_TIMEOUT).await;

    // A second VM started now gets another uid: the reattached one is taken.
    let spec = guest_spec_json(&unique_name("after"), "guest.action=hold");
    let (other, other_pid) = create_and_start(&d, &spec).await;
    assert_ne!(ids(other_pid, "Uid")[0], uid, "a taken uid was handed out");
    vmlet_stop(&d, other).await;
    vmlet_stop(&d, id).await;
}

/// `[qemu] user`: every QEMU runs as that one user (here `nobody`), still
/// jailed, without capabilities, under seccomp and in its own cgroup.
#[tokio::test]
async fn one_configured_user_runs_every_qemu() {
    const TEST: &str = "one_configured_user_runs_every_qemu";
    if !confinement_runs_here(TEST) {
        return;
    }
    let Ok(Some(user)) = nix::unistd::User::from_name("nobody") else {
        return common::skip(TEST, "no user nobody on this host");
    };
    let d = Daemon::start_with_env(&[("VMLET_QEMU_USER", "nobody")]).await;
    let mut seen = Vec::new();
    for prefix in ["user-a", "user-b"] {
        let spec = guest_spec_json(&unique_name(prefix), "guest.action=hold");
        seen.push(create_and_start(&d, &spec).await);
    }
    for (id, pid) in &seen {
        wait_for_count(&d.serial_log(*id), "GUEST-READY", 1, BOOT_TIMEOUT).await;
        let uid = assert_confined(&d, *id, *pid, 100);
        assert_eq!(uid, user.uid.as_raw(), "QEMU {pid} runs as nobody");
        assert_eq!(ids(*pid, "Gid")[0], user.gid.as_raw(), "nobody's group");
    }
    for (id, _) in &seen {
        vmlet_stop(&d, *id).await;
    }
}
