//! Pure logic (mountinfo, limit values, paths) and both versions' file
//! handling against fake layouts: plain directories and files standing in
//! for the cgroupfs, pre-filled with the files the kernel would create.
//!
//! Why this file is long: it is tests only, and most of its lines are the
//! fake layouts themselves (mountinfo samples, pre-filled controller
//! files) that v1 and v2 each need in full.

use std::fs;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::*;

mod placement;
mod v2;

/// This machine's layout: v1 controllers on separate mounts, a named
/// systemd hierarchy and an empty cgroup2 mount ("hybrid").
const HYBRID: &str = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

/// A systemd v1 host: cpu and cpuacct share one mount (with symlinks
/// `cpu` and `cpuacct` that mountinfo does not show), optional fields.
const COMBINED: &str = "\
25 18 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/systemd rw,nosuid shared:10 - cgroup cgroup rw,xattr,release_agent=/lib/systemd/systemd-cgroups-agent,name=systemd
29 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:13 - cgroup cgroup rw,cpu,cpuacct
30 25 0:27 / /sys/fs/cgroup/memory rw,nosuid shared:14 - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/pids rw,nosuid shared:15 - cgroup cgroup rw,pids
32 25 0:29 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid shared:16 - cgroup cgroup rw,net_cls,net_prio
";

/// A pure cgroup v2 host.
const UNIFIED: &str = "\
24 18 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
26 24 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

/// `/proc/self/cgroup` of a process in the root cgroup of every hierarchy.
const AT_TOP: &str =
    "12:pids:/\n11:blkio:/\n10:memory:/\n9:cpuset:/\n8:cpu,cpuacct:/\n1:name=systemd:/\n0::/\n";

fn uuid() -> Uuid {
    Uuid::parse_str("6f1c2b9e-3a5d-4e7f-8a9b-0c1d2e3f4a5b").unwrap()
}

fn limits() -> Limits {
    Limits {
        cpu_weight: 200,
        cpu_quota_percent: Some(150),
        memory_max_bytes: 512 << 20,
        pids_max: 300,
        io_weight: Some(50),
    }
}

/// Fills `dir` (made if needed) with files and their contents.
fn fake(dir: &Path, files: &[(&str, &str)]) {
    fs::create_dir_all(dir).unwrap();
    for (name, content) in files {
        fs::write(dir.join(name), content).unwrap();
    }
}

fn read(path: impl AsRef<Path>) -> String {
    fs::read_to_string(path.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
}

fn v1_mounts(h: &Hierarchy) -> Vec<(String, Vec<&str>)> {
    match h {
        Hierarchy::V1 { mounts } => mounts
            .iter()
            .map(|m| {
                (
                    m.dir.display().to_string(),
                    m.controllers.iter().map(String::as_str).collect(),
                )
            })
            .collect(),
        other => panic!("expected v1, got {other:?}"),
    }
}

#[test]
fn hybrid_with_an_empty_unified_mount_is_v1_with_separate_mounts() {
    let h = Hierarchy::from_mountinfo(HYBRID).unwrap();
    assert_eq!(
        v1_mounts(&h),
        [
            ("/sys/fs/cgroup/cpu", vec!["cpu"]),
            ("/sys/fs/cgroup/cpuacct", vec!["cpuacct"]),
            ("/sys/fs/cgroup/cpuset", vec!["cpuset"]),
            ("/sys/fs/cgroup/memory", vec!["memory"]),
            ("/sys/fs/cgroup/devices", vec!["devices"]),
            ("/sys/fs/cgroup/freezer", vec!["freezer"]),
            ("/sys/fs/cgroup/blkio", vec!["blkio"]),
            ("/sys/fs/cgroup/pids", vec!["pids"]),
        ]
        .map(|(d, c)| (d.to_owned(), c))
    );
    // Devices and freezer are mounted but not used for VMs.
    let cgroups = Cgroups::for_process(h, "vmlet", AT_TOP).unwrap();
    let dirs: Vec<PathBuf> = cgroups.members(uuid()).into_iter().map(|m| m.dir).collect();
    let expected: Vec<PathBuf> = ["cpu", "cpuacct", "cpuset", "memory", "blkio", "pids"]
        .iter()
        .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}/vmlet/{}", uuid())))
        .collect();
    assert_eq!(dirs, expected);
}

#[test]
fn combined_cpu_cpuacct_mount_is_one_directory() {
    let h = Hierarchy::from_mountinfo(COMBINED).unwrap();
    assert_eq!(
        v1_mounts(&h),
        [
            ("/sys/fs/cgroup/cpu,cpuacct", vec!["cpu", "cpuacct"]),
            ("/sys/fs/cgroup/memory", vec!["memory"]),
            ("/sys/fs/cgroup/pids", vec!["pids"]),
            (
                "/sys/fs/cgroup/net_cls,net_prio",
                vec!["net_cls", "net_prio"]
            ),
        ]
        .map(|(d, c)| (d.to_owned(), c))
    );
    let cgroups = Cgroups::for_process(h, "vmlet", AT_TOP).unwrap();
    let members = cgroups.members(uuid());
    assert_eq!(members.len(), 3, "{members:?}");
    assert_eq!(members[0].controllers, ["cpu", "cpuacct"]);
    assert_eq!(
        members[0].dir,
        PathBuf::from(format!("/sys/fs/cgroup/cpu,cpuacct/vmlet/{}", uuid()))
    );
    assert_eq!(
        cgroups.root_dirs(),
        ["cpu,cpuacct", "memory", "pids"]
            .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}/vmlet")))
    );
}

#[test]
fn pure_v2_host_is_v2() {
    assert_eq!(
        Hierarchy::from_mountinfo(UNIFIED).unwrap(),
        Hierarchy::V2 {
            mount: PathBuf::from("/sys/fs/cgroup"),
            root: "/".to_owned()
        }
    );
}

#[test]
fn v2_mount_at_sys_fs_cgroup_is_preferred() {
    let text = "\
50 24 0:40 / /run/other rw - cgroup2 cgroup2 rw
26 24 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
";
    match Hierarchy::from_mountinfo(text).unwrap() {
        Hierarchy::V2 { mount, .. } => assert_eq!(mount, Path::new("/sys/fs/cgroup")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn only_unused_v1_controllers_mean_v2() {
    // net_cls on v1 (some network tools mount it) does not make a v2 host v1.
    let text =
        format!("{UNIFIED}60 26 0:50 / /sys/fs/cgroup/net_cls rw - cgroup cgroup rw,net_cls\n");
    assert!(matches!(
        Hierarchy::from_mountinfo(&text).unwrap(),
        Hierarchy::V2 { .. }
    ));
}

#[test]
fn no_cgroup_mount_is_an_error() {
    let text = "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n";
    assert!(matches!(
        Hierarchy::from_mountinfo(text),
        Err(CgroupError::NoHierarchy)
    ));
    assert!(matches!(
        Hierarchy::from_mountinfo(""),
        Err(CgroupError::NoHierarchy)
    ));
}

#[test]
fn malformed_mountinfo_names_the_line() {
    for (text, line) in [
        ("22 1 0:21 / /sys rw sysfs sysfs rw\n", 1),
        (
            &format!("{UNIFIED}1 2 3 / - cgroup cgroup rw,cpu\n") as &str,
            3,
        ),
        ("22 1 0:21 / /sys rw - sysfs\n", 1),
        ("22 1 0:21 / relative rw - cgroup cgroup rw,cpu\n", 1),
        (
            "22 1 0:21 net:[4026532196] /x rw - cgroup cgroup rw,cpu\n",
            1,
        ),
    ] {
        match Hierarchy::from_mountinfo(text) {
            Err(CgroupError::Mountinfo { line: got, .. }) => assert_eq!(got, line, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn named_network_namespaces_do_not_break_detection() {
    // `ip netns add` leaves nsfs mounts whose root is no path; `ip netns
    // exec` shows them too.
    let text = format!(
        "112 109 0:4 net:[4026532196] /run/netns/lab rw master:2 - nsfs nsfs rw\n{UNIFIED}"
    );
    assert!(matches!(
        Hierarchy::from_mountinfo(&text).unwrap(),
        Hierarchy::V2 { .. }
    ));
}

#[test]
fn escaped_mount_points_and_subtree_roots() {
    let text = "\
32 31 0:29 /docker/abc /sys/fs/my\\040cgroups/cpu rw - cgroup cgroup rw,cpu
35 31 0:32 /docker/abc /sys/fs/my\\040cgroups/memory rw - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/my\\040cgroups/pids rw - cgroup cgroup rw,pids
";
    let h = Hierarchy::from_mountinfo(text).unwrap();
    // In a container: the cgroup the mount shows is the process's own.
    let own = "3:pids:/\n2:memory:/docker/abc\n1:cpu:/docker/abc\n";
    let cgroups = Cgroups::for_process(h.clone(), "vmlet", own).unwrap();
    let members = cgroups.members(uuid());
    assert_eq!(
        members[0].dir,
        PathBuf::from(format!("/sys/fs/my cgroups/cpu/vmlet/{}", uuid()))
    );
    assert_eq!(
        members[0].cgroup_path,
        format!("/docker/abc/vmlet/{}", uuid())
    );
    assert_eq!(members[2].cgroup_path, format!("/vmlet/{}", uuid()));
    // A process outside what the mount shows cannot place its cgroups.
    match Cgroups::for_process(h, "vmlet", AT_TOP) {
        Err(e @ CgroupError::OwnCgroup { .. }) => {
            assert!(e.to_string().contains("outside /docker/abc"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(unescape("a\\134b\\011c\\9"), "a\\b\tc\\9");
}

#[test]
fn bind_mounts_of_a_hierarchy_count_once() {
    let text = format!("{HYBRID}70 31 0:32 / /mnt/memory rw - cgroup cgroup rw,memory\n");
    let h = Hierarchy::from_mountinfo(&text).unwrap();
    let mounts = v1_mounts(&h);
    assert_eq!(
        mounts.iter().filter(|(_, c)| c.contains(&"memory")).count(),
        1
    );
}

#[test]
fn v1_without_a_required_controller_is_refused() {
    let text = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
    let h = Hierarchy::from_mountinfo(text).unwrap();
    match Cgroups::for_process(h, "vmlet", AT_TOP) {
        Err(CgroupError::MissingController { controller, .. }) => assert_eq!(controller, "pids"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn cpu_values() {
    let mut l = limits();
    for (weight, shares) in [
        (100, 1024),
        (1, 10),
        (50, 512),
        (200, 2048),
        (10_000, 102_400),
    ] {
        l.cpu_weight = weight;
        assert_eq!(l.cpu_shares(), shares, "weight {weight}");
    }
    for (percent, quota, max) in [
        (Some(10), Some(10_000), "10000 100000"),
        (Some(250), Some(250_000), "250000 100000"),
        (Some(1), Some(1_000), "1000 100000"),
        (None, None, "max 100000"),
    ] {
        l.cpu_quota_percent = percent;
        assert_eq!(l.cpu_quota_us(), quota);
        assert_eq!(l.cpu_max(), max);
    }
}

#[test]
fn io_weight_values() {
    for (weight, bfq) in [(1, 1), (50, 50), (100, 100), (5_050, 550), (10_000, 1_000)] {
        assert_eq!(bfq_weight(weight), bfq, "weight {weight}");
    }
    for (weight, blkio) in [
        (1, 10),
        (2, 10),
        (50, 250),
        (100, 500),
        (200, 1_000),
        (10_000, 1_000),
    ] {
        assert_eq!(blkio_weight(weight), blkio, "weight {weight}");
    }
}

#[test]
fn limits_out_of_range_name_the_field() {
    type Change = fn(&mut Limits);
    let cases: [(&str, Change); 10] = [
        ("cpu_weight", |l| l.cpu_weight = 0),
        ("cpu_weight", |l| l.cpu_weight = 10_001),
        ("cpu_quota_percent", |l| l.cpu_quota_percent = Some(0)),
        ("cpu_quota_percent", |l| l.cpu_quota_percent = Some(100_001)),
        ("memory_max_bytes", |l| l.memory_max_bytes = (1 << 20) - 1),
        ("memory_max_bytes", |l| l.memory_max_bytes = u64::MAX),
        ("pids_max", |l| l.pids_max = 0),
        ("pids_max", |l| l.pids_max = 4_194_305),
        ("io_weight", |l| l.io_weight = Some(0)),
        ("io_weight", |l| l.io_weight = Some(10_001)),
    ];
    for (name, change) in cases {
        let mut l = limits();
        change(&mut l);
        match l.validate() {
            Err(e @ CgroupError::InvalidLimit { field, .. }) => {
                assert_eq!(field, name);
                assert!(e.to_string().contains(name), "{e}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    let mut edge = limits();
    edge.cpu_weight = 10_000;
    edge.cpu_quota_percent = Some(100_000);
    edge.memory_max_bytes = 1 << 20;
    edge.pids_max = 4_194_304;
    edge.io_weight = Some(1);
    edge.validate().unwrap();
}

#[test]
fn root_must_be_plain_components() {
    for bad in [
        "", "/", "//vmlet", "vmlet/", "a//b", "..", "a/../b", ".", "./a", ".hidden", "a b", "a\nb",
        "vm*", "ü",
    ] {
        match validate_root(bad) {
            Err(e @ CgroupError::InvalidRoot { .. }) => {
                assert!(e.to_string().contains("invalid cgroup root"), "{e}")
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert!(validate_root(&"a".repeat(256)).is_err());
    assert_eq!(
        validate_root("vmlet").unwrap(),
        (false, vec!["vmlet".into()])
    );
    assert_eq!(
        validate_root("vmlet.slice/node_1-a").unwrap(),
        (false, vec!["vmlet.slice".into(), "node_1-a".into()])
    );
    assert_eq!(
        validate_root("/machines/vmlet").unwrap(),
        (true, vec!["machines".into(), "vmlet".into()])
    );
}

/// A fake v1 layout like this machine's, with cpu and cpuacct combined.
fn fake_v1(tmp: &Path) -> Hierarchy {
    let mount = |name: &str, controllers: &[&str]| V1Mount {
        dir: tmp.join(name),
        root: "/".to_owned(),
        controllers: controllers.iter().map(|c| c.to_string()).collect(),
    };
    let mounts = vec![
        mount("cpu,cpuacct", &["cpu", "cpuacct"]),
        mount("cpuset", &["cpuset"]),
        mount("memory", &["memory"]),
        mount("pids", &["pids"]),
        mount("blkio", &["blkio"]),
        mount("freezer", &["freezer"]),
    ];
    let vm = format!("vmlet/{}", uuid());
    let files: [(&str, &[(&str, &str)]); 5] = [
        (
            "cpu,cpuacct",
            &[
                ("cpu.shares", "1024\n"),
                ("cpu.cfs_period_us", "100000\n"),
                ("cpu.cfs_quota_us", "-1\n"),
            ],
        ),
        ("cpuset", &[("cpuset.cpus", ""), ("cpuset.mems", "")]),
        (
            "memory",
            &[
                ("memory.limit_in_bytes", "9223372036854771712\n"),
                ("memory.memsw.limit_in_bytes", "9223372036854771712\n"),
            ],
        ),
        ("pids", &[("pids.max", "max\n")]),
        ("blkio", &[]),
    ];
    for (name, vm_files) in files {
        let base = tmp.join(name);
        fake(&base, &[("cgroup.procs", "1\n")]);
        fake(&base.join("vmlet"), &[("cgroup.procs", "")]);
        fake(&base.join(&vm), &[("cgroup.procs", "")]);
        fake(&base.join(&vm), vm_files);
    }
    fake(
        &tmp.join("cpuset"),
        &[("cpuset.cpus", "0-3\n"), ("cpuset.mems", "0\n")],
    );
    fake(
        &tmp.join("cpuset/vmlet"),
        &[("cpuset.cpus", "\n"), ("cpuset.mems", "\n")],
    );
    Hierarchy::V1 { mounts }
}

#[test]
fn v1_create_writes_every_controller_and_inherits_cpusets() {
    let tmp = tempfile::tempdir().unwrap();
    let cgroups = Cgroups::for_process(fake_v1(tmp.path()), "vmlet", AT_TOP).unwrap();
    let cg = cgroups.create(uuid(), &limits()).unwrap();
    let vm = |controller: &str| tmp.path().join(format!("{controller}/vmlet/{}", uuid()));
    assert_eq!(
        cg.dirs(),
        ["cpu,cpuacct", "cpuset", "memory", "pids", "blkio"].map(vm),
        "one directory per hierarchy used, freezer left out"
    );
    assert_eq!(read(vm("cpu,cpuacct").join("cpu.shares")), "2048");
    assert_eq!(read(vm("cpu,cpuacct").join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(vm("cpu,cpuacct").join("cpu.cfs_quota_us")), "150000");
    let limit = (512u64 << 20).to_string();
    assert_eq!(read(vm("memory").join("memory.limit_in_bytes")), limit);
    assert_eq!(
        read(vm("memory").join("memory.memsw.limit_in_bytes")),
        limit
    );
    assert_eq!(read(vm("pids").join("pids.max")), "300");
    for level in ["cpuset/vmlet", &format!("cpuset/vmlet/{}", uuid())] {
        assert_eq!(read(tmp.path().join(level).join("cpuset.cpus")), "0-3");
        assert_eq!(read(tmp.path().join(level).join("cpuset.mems")), "0");
    }
    // The blkio hierarchy offers no weight file here (no CFQ, no BFQ).
    assert_eq!(
        cg.unapplied(),
        [Unapplied::IoWeight {
            detail: format!(
                "neither blkio.weight nor blkio.bfq.weight in {}",
                vm("blkio").display()
            )
        }]
    );

    // Reuse with no quota and a BFQ weight file appearing.
    fake(&vm("blkio"), &[("blkio.bfq.weight", "100\n")]);
    let mut l = limits();
    l.cpu_quota_percent = None;
    l.io_weight = Some(10_000);
    let again = cgroups.create(uuid(), &l).unwrap();
    assert_eq!(again.unapplied(), []);
    assert_eq!(read(vm("cpu,cpuacct").join("cpu.cfs_quota_us")), "-1");
    assert_eq!(read(vm("blkio").join("blkio.bfq.weight")), "1000");
}

#[test]
fn v1_stats_and_membership() {
    let tmp = tempfile::tempdir().unwrap();
    let cgroups = Cgroups::for_process(fake_v1(tmp.path()), "vmlet", AT_TOP).unwrap();
    let cg = cgroups.create(uuid(), &limits()).unwrap();
    let vm = |controller: &str| tmp.path().join(format!("{controller}/vmlet/{}", uuid()));
    fake(
        &vm("cpu,cpuacct"),
        &[
            ("cpuacct.usage", "123456789\n"),
            (
                "cpu.stat",
                "nr_periods 12\nnr_throttled 5\nthrottled_time 9000\nnr_bursts 0\n",
            ),
        ],
    );
    fake(&vm("memory"), &[("memory.usage_in_bytes", "4096\n")]);
    fake(&vm("pids"), &[("pids.current", "3\n")]);
    assert_eq!(
        cg.stats(),
        CgroupStats {
            cpu_usage_ns: Some(123_456_789),
            cpu_periods: Some(12),
            cpu_throttled_periods: Some(5),
            cpu_throttled_ns: Some(9000),
            memory_current_bytes: Some(4096),
            memory_max_bytes: Some(512 << 20),
            pids_current: Some(3),
        }
    );
    fake(
        &vm("memory"),
        &[("memory.limit_in_bytes", "9223372036854771712\n")],
    );
    assert_eq!(cg.stats().memory_max_bytes, None, "v1's unlimited");

    let id = uuid();
    let inside = format!(
        "9:name=systemd:/\n8:pids:/vmlet/{id}\n7:blkio:/vmlet/{id}\n6:freezer:/\n\
         4:memory:/vmlet/{id}\n3:cpuset:/vmlet/{id}\n2:cpu,cpuacct:/vmlet/{id}\n0::/\n"
    );
    assert!(cg.listed_in(&inside));
    let partly = inside.replace(&format!("4:memory:/vmlet/{id}"), "4:memory:/");
    assert!(!cg.listed_in(&partly));
    assert!(!cg.listed_in(""));
}

#[test]
fn a_vms_cgroup_is_found_where_its_process_is_after_the_root_moved() {
    let tmp = tempfile::tempdir().unwrap();
    // A cgroup made under the old root `vmlet` ...
    let old = Cgroups::for_process(fake_v1(tmp.path()), "vmlet", AT_TOP).unwrap();
    let made = old.create(uuid(), &limits()).unwrap();
    // ... seen by a daemon whose root is now `/machines/vmlet2`.
    let cgroups = Cgroups::for_process(fake_v1(tmp.path()), "/machines/vmlet2", AT_TOP).unwrap();
    assert!(cgroups.open(uuid()).is_none(), "not below the new root");
    let listed = format!(
        "13:freezer:/\n12:pids:/vmlet/{id}\n11:blkio:/vmlet/{id}\n10:memory:/vmlet/{id}\n\
         9:cpuset:/vmlet/{id}\n8:cpu,cpuacct:/vmlet/{id}\n1:name=systemd:/\n0::/\n",
        id = uuid()
    );
    let found = cgroups
        .open_listed(uuid(), &listed)
        .expect("found by the process's membership");
    assert_eq!(found.dirs(), made.dirs());
    assert!(found.listed_in(&listed));

    // Not named for the VM in every hierarchy: not the VM's cgroup.
    let elsewhere = listed.replace(&format!("10:memory:/vmlet/{}", uuid()), "10:memory:/");
    assert!(cgroups.open_listed(uuid(), &elsewhere).is_none());
    let other = Uuid::new_v4();
    assert!(cgroups.open_listed(other, &listed).is_none());
    // A path that climbs out of the mount is refused.
    let climbing = listed.replace("/vmlet/", "/../vmlet/");
    assert!(cgroups.open_listed(uuid(), &climbing).is_none());
}
