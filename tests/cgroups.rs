//! Per-VM cgroups against the host's real cgroup hierarchy (v1 or v2):
//! limits written, a process joining between fork and exec, statistics
//! including CPU throttling, and removal. Each test works below a root of
//! its own, removed (processes killed first) even when the test fails.
//! Needs root and a writable cgroup hierarchy; otherwise it says SKIPPED.

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{access, AccessFlags, Pid};
use uuid::Uuid;
use vmlet::confine::cgroup::{
    bfq_weight, blkio_weight, CgroupError, Cgroups, Hierarchy, Limits, Unapplied, VmCgroup,
};

/// A test's cgroup root in every hierarchy, and the processes it started:
/// on drop the processes are killed and every cgroup below the root, then
/// the root, removed.
struct TestRoot {
    name: String,
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in &self.dirs {
            remove_tree(dir);
        }
    }
}

/// Removes cgroup `dir` and the cgroups below it, killing what runs there.
fn remove_tree(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Only this test's processes can be below its unique root.
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!("cannot remove test cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// vmlet's cgroups below a root unique to this test, or `None` (after a
/// SKIPPED line) when this host offers no writable cgroup hierarchy.
fn setup(test: &str) -> Option<(Cgroups, TestRoot)> {
    let hierarchy = match Hierarchy::detect() {
        Ok(hierarchy) => hierarchy,
        Err(e) => {
            common::skip(test, format!("no usable cgroup hierarchy: {e}"));
            return None;
        }
    };
    if !nix::unistd::geteuid().is_root() {
        common::skip(test, "creating cgroups needs root");
        return None;
    }
    let mounts: Vec<PathBuf> = match &hierarchy {
        Hierarchy::V1 { mounts } => mounts.iter().map(|m| m.dir.clone()).collect(),
        Hierarchy::V2 { mount, .. } => vec![mount.clone()],
    };
    if let Some(read_only) = mounts
        .iter()
        .find(|m| access(m.as_path(), AccessFlags::W_OK).is_err())
    {
        common::skip(
            test,
            format!("cgroup mount {} is not writable", read_only.display()),
        );
        return None;
    }
    let name = format!(
        "vmlet-test-cg-{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let cgroups = match Cgroups::new(hierarchy, &name) {
        Ok(cgroups) => cgroups,
        Err(e @ CgroupError::MissingController { .. }) => {
            common::skip(test, e);
            return None;
        }
        Err(e) => panic!("{e}"),
    };
    let root = TestRoot {
        name,
        dirs: cgroups.root_dirs(),
        children: Vec::new(),
    };
    Some((cgroups, root))
}

/// Creates the VM cgroup, or `None` (after a SKIPPED line) when the host
/// refuses cgroup directories even to root (e.g. a container's cgroupfs).
fn create(test: &str, cgroups: &Cgroups, uuid: Uuid, limits: &Limits) -> Option<VmCgroup> {
    match cgroups.create(uuid, limits) {
        Ok(cg) => Some(cg),
        Err(e)
            if matches!(
                e.io_kind(),
                Some(std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem)
            ) =>
        {
            common::skip(test, format!("cgroups cannot be created here: {e}"));
            None
        }
        Err(e) => panic!("create: {e}"),
    }
}

/// Starts `program args` as a member of `cg`, joining between fork and exec.
fn spawn_in(cg: &VmCgroup, program: &str, args: &[&str]) -> Child {
    let procs = cg.open_join().unwrap();
    let mut command = Command::new(program);
    command.args(args);
    // SAFETY: join_in_child only calls write(2): async-signal-safe.
    unsafe {
        command.pre_exec(move || procs.join_in_child());
    }
    command.spawn().unwrap()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// The content of `file` in whichever of `dirs` has it.
fn find(dirs: &[PathBuf], file: &str) -> Option<String> {
    dirs.iter()
        .map(|d| d.join(file))
        .find(|p| p.exists())
        .map(|p| read(&p))
}

#[test]
fn vm_cgroup_limits_membership_stats_and_removal() {
    const TEST: &str = "vm_cgroup_limits_membership_stats_and_removal";
    let Some((cgroups, mut root)) = setup(TEST) else {
        return;
    };
    let uuid = Uuid::new_v4();
    let limits = Limits {
        cpu_weight: 300,
        cpu_quota_percent: Some(50),
        memory_max_bytes: 256 << 20,
        pids_max: 64,
        io_weight: Some(200),
    };
    let Some(cg) = create(TEST, &cgroups, uuid, &limits) else {
        return;
    };
    let dirs = cg.dirs().to_vec();
    assert!(!dirs.is_empty());
    for (dir, root_dir) in dirs.iter().zip(cgroups.root_dirs()) {
        assert_eq!(dir, &root_dir.join(uuid.to_string()));
        assert!(dir.is_dir(), "{}", dir.display());
    }

    // The limits, in the files of this host's cgroup version.
    let memory = (256u64 << 20).to_string();
    match cgroups.hierarchy() {
        Hierarchy::V1 { .. } => {
            assert_eq!(find(&dirs, "cpu.shares").as_deref(), Some("3072"));
            assert_eq!(find(&dirs, "cpu.cfs_period_us").as_deref(), Some("100000"));
            assert_eq!(find(&dirs, "cpu.cfs_quota_us").as_deref(), Some("50000"));
            assert_eq!(find(&dirs, "memory.limit_in_bytes"), Some(memory.clone()));
            if let Some(memsw) = find(&dirs, "memory.memsw.limit_in_bytes") {
                assert_eq!(memsw, memory);
            }
            if let Some(cpus) = find(&dirs, "cpuset.cpus") {
                assert!(!cpus.is_empty(), "cpuset.cpus inherited");
                assert!(!find(&dirs, "cpuset.mems").unwrap().is_empty());
            }
        }
        Hierarchy::V2 { .. } => {
            assert_eq!(find(&dirs, "cpu.weight").as_deref(), Some("300"));
            assert_eq!(find(&dirs, "cpu.max").as_deref(), Some("50000 100000"));
            assert_eq!(find(&dirs, "memory.max"), Some(memory.clone()));
            if let Some(swap) = find(&dirs, "memory.swap.max") {
                assert_eq!(swap, "0");
            }
        }
    }
    assert_eq!(find(&dirs, "pids.max").as_deref(), Some("64"));
    let io_weight = [
        ("io.weight", "default 200".to_owned()),
        ("io.bfq.weight", bfq_weight(200).to_string()),
        ("blkio.weight", blkio_weight(200).to_string()),
        ("blkio.bfq.weight", bfq_weight(200).to_string()),
    ]
    .into_iter()
    .find_map(|(file, expected)| find(&dirs, file).map(|got| (file, got, expected)));
    let io_unapplied = cg
        .unapplied()
        .iter()
        .any(|u| matches!(u, Unapplied::IoWeight { .. }));
    match io_weight {
        // The weight file shows the default weight first (v2, BFQ).
        Some((file, got, expected)) => {
            assert!(
                got.lines().next().unwrap().ends_with(&expected),
                "{file}: {got}"
            );
            assert!(!io_unapplied);
        }
        None => assert!(io_unapplied, "no I/O weight file, yet not reported"),
    }

    // A process joins between fork and exec.
    let child = spawn_in(&cg, "sleep", &["30"]);
    let pid = child.id() as i32;
    root.children.push(child);
    assert!(
        cg.contains(pid),
        "{}",
        fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap()
    );
    assert!(
        !cg.contains(std::process::id() as i32),
        "only the child joined"
    );
    let proc_cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let suffix = format!("/{}/{uuid}", root.name);
    assert_eq!(
        proc_cgroup.lines().filter(|l| l.ends_with(&suffix)).count(),
        dirs.len(),
        "one line per hierarchy: {proc_cgroup}"
    );
    for dir in &dirs {
        let procs = read(&dir.join("cgroup.procs"));
        assert_eq!(procs, pid.to_string(), "{}", dir.display());
    }

    let stats = cg.stats();
    assert_eq!(stats.pids_current, Some(1), "{stats:?}");
    assert_eq!(stats.memory_max_bytes, Some(256 << 20), "{stats:?}");
    assert!(stats.memory_current_bytes.is_some(), "{stats:?}");
    assert!(stats.cpu_usage_ns.is_some(), "{stats:?}");
    assert!(stats.cpu_periods.is_some(), "{stats:?}");

    let opened = cgroups.open(uuid).expect("open finds the cgroup");
    assert_eq!(opened.dirs(), dirs);
    assert!(opened.contains(pid));
    assert!(cgroups.open(Uuid::new_v4()).is_none());

    // In use: neither reused nor removed.
    assert!(matches!(
        cgroups.create(uuid, &limits),
        Err(CgroupError::Busy { .. })
    ));
    match cgroups.remove(uuid) {
        Err(e @ CgroupError::Busy { .. }) => {
            assert!(e.to_string().contains(&uuid.to_string()), "{e}")
        }
        other => panic!("remove of a busy cgroup: {other:?}"),
    }
    assert!(dirs.iter().all(|d| d.is_dir()));

    for mut child in root.children.drain(..) {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert!(!cg.contains(pid));
    cgroups.remove(uuid).unwrap();
    for dir in &dirs {
        assert!(!dir.exists(), "{} removed", dir.display());
    }
    assert!(cgroups.open(uuid).is_none());
    cgroups.remove(uuid).unwrap();
    // The root is shared with other VMs: left for the guard.
    assert!(root.dirs.iter().all(|d| d.is_dir()));

    // An empty existing cgroup is reused (after a daemon restart).
    let again = create(TEST, &cgroups, uuid, &limits).unwrap();
    let reused = cgroups.create(uuid, &limits).unwrap();
    assert_eq!(again.dirs(), reused.dirs());
    cgroups.remove(uuid).unwrap();
}

#[test]
fn cpu_quota_throttles_a_busy_loop() {
    const TEST: &str = "cpu_quota_throttles_a_busy_loop";
    let Some((cgroups, mut root)) = setup(TEST) else {
        return;
    };
    let uuid = Uuid::new_v4();
    let limits = Limits {
        cpu_weight: 100,
        cpu_quota_percent: Some(10),
        memory_max_bytes: 64 << 20,
        pids_max: 16,
        io_weight: None,
    };
    let Some(cg) = create(TEST, &cgroups, uuid, &limits) else {
        return;
    };
    let started = Instant::now();
    let child = spawn_in(&cg, "sh", &["-c", "while :; do :; done"]);
    let pid = child.id() as i32;
    root.children.push(child);
    assert!(cg.contains(pid));

    // 1.5 s is 15 periods; on a loaded host the loop may get less than its
    // 10 ms in some of them, so wait longer for the first throttled one.
    std::thread::sleep(Duration::from_millis(1500));
    let deadline = started + Duration::from_secs(15);
    let mut stats = cg.stats();
    while stats.cpu_throttled_periods == Some(0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        stats = cg.stats();
    }
    let elapsed = started.elapsed();
    assert!(
        stats.cpu_throttled_periods.is_some_and(|n| n > 0),
        "{stats:?}"
    );
    assert!(stats.cpu_periods.is_some_and(|n| n > 0), "{stats:?}");
    assert!(stats.cpu_throttled_ns.is_some_and(|n| n > 0), "{stats:?}");
    // A tenth of a core: well below the whole core the loop would take
    // unthrottled (twice the quota plus one period's worth as margin).
    let used = stats.cpu_usage_ns.expect("cpu usage");
    let allowed = elapsed.as_nanos() as u64 / 5 + 10_000_000;
    assert!(
        used > 0 && used <= allowed,
        "used {used} ns of CPU in {elapsed:?} with a 10% quota"
    );

    for mut child in root.children.drain(..) {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    cgroups.remove(uuid).unwrap();
    assert!(cg.dirs().iter().all(|d| !d.exists()));
}
