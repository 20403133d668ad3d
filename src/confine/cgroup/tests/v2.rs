//! cgroup v2 file handling against a fake unified mount.

use super::*;

/// The files the kernel shows in a v2 cgroup with cpu, io, memory and pids.
pub(super) const V2_VM_FILES: [(&str, &str); 8] = [
    ("cgroup.procs", ""),
    ("cgroup.controllers", "cpu io memory pids"),
    ("cpu.weight", "100\n"),
    ("cpu.max", "max 100000\n"),
    ("memory.max", "max\n"),
    ("memory.swap.max", "max\n"),
    ("pids.max", "max\n"),
    ("io.weight", "default 100\n"),
];

/// A fake v2 mount in a tempdir, with ROOT "vmlet/node" made.
pub(super) fn fake_v2(vm_files: &[(&str, &str)]) -> (tempfile::TempDir, Cgroups, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let mount = tmp.path();
    fake(
        mount,
        &[
            (
                "cgroup.controllers",
                "cpuset cpu io memory hugetlb pids rdma misc\n",
            ),
            ("cgroup.subtree_control", "cpuset memory\n"),
        ],
    );
    fake(
        &mount.join("vmlet"),
        &[("cgroup.subtree_control", ""), ("cgroup.procs", "")],
    );
    // Already enabled: must not be written again.
    fake(
        &mount.join("vmlet/node"),
        &[
            ("cgroup.subtree_control", "cpu io memory pids\n"),
            ("cgroup.procs", ""),
        ],
    );
    let vm = mount.join(format!("vmlet/node/{}", uuid()));
    if !vm_files.is_empty() {
        fake(&vm, vm_files);
    }
    let cgroups = Cgroups::for_process(Hierarchy::v2_at(mount), "vmlet/node", AT_TOP).unwrap();
    (tmp, cgroups, vm)
}

#[test]
fn v2_create_enables_controllers_and_writes_limits() {
    let (tmp, cgroups, vm) = fake_v2(&V2_VM_FILES);
    let cg = cgroups.create(uuid(), &limits()).unwrap();
    assert_eq!(cg.dirs(), std::slice::from_ref(&vm));
    assert_eq!(cg.unapplied(), []);
    let mount = tmp.path();
    // Only the missing controllers, in one write.
    assert_eq!(read(mount.join("cgroup.subtree_control")), "+cpu +io +pids");
    assert_eq!(
        read(mount.join("vmlet/cgroup.subtree_control")),
        "+cpu +io +memory +pids"
    );
    assert_eq!(
        read(mount.join("vmlet/node/cgroup.subtree_control")),
        "cpu io memory pids\n"
    );
    assert_eq!(read(vm.join("cpu.weight")), "200");
    assert_eq!(read(vm.join("cpu.max")), "150000 100000");
    assert_eq!(read(vm.join("memory.max")), (512u64 << 20).to_string());
    assert_eq!(read(vm.join("memory.swap.max")), "0");
    assert_eq!(read(vm.join("pids.max")), "300");
    assert_eq!(read(vm.join("io.weight")), "default 50");

    let opened = cgroups.open(uuid()).expect("open after create");
    assert_eq!(opened.dirs(), cg.dirs());
    assert_eq!(cgroups.root_dirs(), [mount.join("vmlet/node")]);
}

#[test]
fn v2_without_io_weight_uses_bfq_or_reports_it() {
    let without = |names: &[&str]| -> Vec<(&'static str, &'static str)> {
        V2_VM_FILES
            .iter()
            .copied()
            .filter(|(n, _)| !names.contains(n))
            .collect()
    };
    let mut bfq = without(&["io.weight"]);
    bfq.push(("io.bfq.weight", "default 100\n"));
    let (_tmp, cgroups, vm) = fake_v2(&bfq);
    let mut l = limits();
    l.io_weight = Some(5_050);
    cgroups.create(uuid(), &l).unwrap();
    assert_eq!(read(vm.join("io.bfq.weight")), "550");

    let (_tmp, cgroups, _vm) = fake_v2(&without(&["io.weight", "memory.swap.max"]));
    let cg = cgroups.create(uuid(), &limits()).unwrap();
    let reported: Vec<String> = cg.unapplied().iter().map(ToString::to_string).collect();
    assert_eq!(reported.len(), 2, "{reported:?}");
    assert!(reported[0].starts_with("swap not limited: no memory.swap.max in"));
    assert!(reported[1].starts_with("io_weight not applied: neither io.weight nor io.bfq.weight"));

    // No weight asked: nothing to report about I/O.
    let (_tmp, cgroups, _vm) = fake_v2(&without(&["io.weight"]));
    l.io_weight = None;
    assert_eq!(cgroups.create(uuid(), &l).unwrap().unapplied(), []);
}

#[test]
fn v2_busy_cgroup_is_not_reused() {
    let mut files = V2_VM_FILES.to_vec();
    files[0] = ("cgroup.procs", "4242\n");
    let (_tmp, cgroups, vm) = fake_v2(&files);
    match cgroups.create(uuid(), &limits()) {
        Err(CgroupError::Busy { path }) => assert_eq!(path, vm),
        other => panic!("{other:?}"),
    }
    // Not made by this call: left alone.
    assert_eq!(read(vm.join("cpu.weight")), "100\n");
}

#[test]
fn v2_failed_create_names_the_file_and_undoes_the_directory() {
    // No VM files: the directory is made, but the kernel files a real
    // cgroupfs would add are missing, as when a controller is not enabled.
    let (_tmp, cgroups, vm) = fake_v2(&[]);
    match cgroups.create(uuid(), &limits()) {
        Err(e @ CgroupError::Write { .. }) => {
            assert!(
                e.to_string()
                    .contains(&*vm.join("cpu.weight").to_string_lossy()),
                "{e}"
            );
            assert_eq!(e.io_kind(), Some(std::io::ErrorKind::NotFound));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !vm.exists(),
        "the directory made by create is removed again"
    );
    assert!(cgroups.open(uuid()).is_none());
}

#[test]
fn v2_missing_controllers() {
    let tmp = tempfile::tempdir().unwrap();
    fake(tmp.path(), &[("cgroup.controllers", "cpu io pids\n")]);
    match Cgroups::for_process(Hierarchy::v2_at(tmp.path()), "vmlet", AT_TOP) {
        Err(e @ CgroupError::MissingController { .. }) => {
            assert!(e.to_string().contains("\"memory\""), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // No cgroup.controllers at all: not a cgroup2 mount.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Cgroups::for_process(Hierarchy::v2_at(empty.path()), "vmlet", AT_TOP),
        Err(CgroupError::Read { .. })
    ));
}

#[test]
fn remove_takes_only_the_vm_directory_and_missing_is_fine() {
    let (tmp, cgroups, vm) = fake_v2(&[]);
    fs::create_dir(&vm).unwrap();
    let other = tmp.path().join("vmlet/node/other-daemon-vm");
    fs::create_dir(&other).unwrap();
    assert!(cgroups.open(uuid()).is_some());
    cgroups.remove(uuid()).unwrap();
    assert!(!vm.exists());
    assert!(other.exists() && tmp.path().join("vmlet/node").exists());
    assert!(cgroups.open(uuid()).is_none());
    cgroups.remove(uuid()).unwrap();
}

#[test]
fn remove_error_names_the_directory() {
    // A plain non-empty directory: ENOTEMPTY, which the cgroupfs never
    // returns, but it stands for any unexpected failure.
    let (_tmp, cgroups, vm) = fake_v2(&V2_VM_FILES);
    match cgroups.remove(uuid()) {
        Err(e @ CgroupError::Remove { .. }) => {
            assert!(e.to_string().contains(&*vm.to_string_lossy()), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn v2_stats_from_files() {
    let (_tmp, cgroups, vm) = fake_v2(&V2_VM_FILES);
    let cg = cgroups.create(uuid(), &limits()).unwrap();
    fake(
        &vm,
        &[
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 30\nnr_throttled 7\nthrottled_usec 20\n",
            ),
            ("memory.current", "8192\n"),
            ("memory.max", "max\n"),
        ],
    );
    assert_eq!(
        cg.stats(),
        CgroupStats {
            cpu_usage_ns: Some(1_500_000),
            cpu_periods: Some(30),
            cpu_throttled_periods: Some(7),
            cpu_throttled_ns: Some(20_000),
            memory_current_bytes: Some(8192),
            memory_max_bytes: None,
            pids_current: None,
        }
    );
}

#[test]
fn v2_membership() {
    let (_tmp, cgroups, _vm) = fake_v2(&V2_VM_FILES);
    let cg = cgroups.create(uuid(), &limits()).unwrap();
    let id = uuid();
    assert!(cg.listed_in(&format!("0::/vmlet/node/{id}\n")));
    assert!(!cg.listed_in(&format!("0::/vmlet/node/{id}/sub\n")));
    assert!(!cg.listed_in("0::/\n"));
    assert!(!cg.contains(-1));
}
