//! Where VM cgroups go: below vmlet's own cgroup (per hierarchy on v1),
//! the leaf vmlet moves into on v2, absolute roots.

use super::v2::{fake_v2, V2_VM_FILES};
use super::*;

/// `/proc/self/cgroup` of a vmlet started by systemd as `vmlet.service`.
const IN_SERVICE_V1: &str = "\
12:pids:/system.slice/vmlet.service
11:blkio:/system.slice
10:memory:/system.slice/vmlet.service
9:cpuset:/
8:cpu,cpuacct:/system.slice/vmlet.service
1:name=systemd:/system.slice/vmlet.service
0::/system.slice/vmlet.service
";

#[test]
fn v1_vm_cgroups_go_below_vmlets_own_cgroup_in_each_hierarchy() {
    let h = Hierarchy::from_mountinfo(COMBINED).unwrap();
    let text = format!("{COMBINED}33 25 0:30 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n34 25 0:31 / /sys/fs/cgroup/blkio rw - cgroup cgroup rw,blkio\n");
    let full = Hierarchy::from_mountinfo(&text).unwrap();
    for h in [h, full] {
        let cgroups = Cgroups::for_process(h, "vmlet", IN_SERVICE_V1).unwrap();
        assert_eq!(cgroups.daemon_leaf(), None, "no leaf on v1");
        for m in cgroups.members(uuid()) {
            let own = match m.controllers[0].as_str() {
                "cpuset" => "",
                "blkio" => "/system.slice",
                _ => "/system.slice/vmlet.service",
            };
            let path = format!("{own}/vmlet/{}", uuid());
            assert_eq!(m.cgroup_path, path, "{m:?}");
            let mount = if m.controllers[0] == "cpu" {
                "cpu,cpuacct".to_owned()
            } else {
                m.controllers[0].clone()
            };
            assert_eq!(
                m.dir,
                PathBuf::from(format!("/sys/fs/cgroup/{mount}{path}"))
            );
        }
    }
    // An absolute root ignores vmlet's own cgroup.
    let h = Hierarchy::from_mountinfo(COMBINED).unwrap();
    let cgroups = Cgroups::for_process(h, "/machines/vmlet", IN_SERVICE_V1).unwrap();
    assert_eq!(
        cgroups.root_dirs(),
        ["cpu,cpuacct", "memory", "pids"]
            .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}/machines/vmlet")))
    );
    // A hierarchy /proc/self/cgroup says nothing of.
    let h = Hierarchy::from_mountinfo(COMBINED).unwrap();
    match Cgroups::for_process(h, "vmlet", "10:memory:/\n8:cpu,cpuacct:/\n") {
        Err(e @ CgroupError::OwnCgroup { .. }) => assert!(e.to_string().contains("pids"), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// A fake v2 mount where vmlet runs in `/system.slice/vmlet.service`
/// (delegated: vmlet may write only below it).
fn fake_v2_delegated() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let mount = tmp.path();
    // The top is systemd's: a write there would show in the file.
    fake(
        mount,
        &[
            ("cgroup.controllers", "cpuset cpu io memory pids\n"),
            ("cgroup.subtree_control", "untouched\n"),
        ],
    );
    fake(
        &mount.join("system.slice"),
        &[("cgroup.subtree_control", "untouched\n")],
    );
    let own = mount.join("system.slice/vmlet.service");
    fake(
        &own,
        &[
            ("cgroup.controllers", "cpu io memory pids\n"),
            ("cgroup.subtree_control", ""),
            ("cgroup.procs", "4242\n"),
        ],
    );
    // What the kernel would show in the directories vmlet makes.
    fake(&own.join(DAEMON_LEAF), &[("cgroup.procs", "")]);
    fake(
        &own.join("vmlet"),
        &[("cgroup.subtree_control", ""), ("cgroup.procs", "")],
    );
    fake(&own.join(format!("vmlet/{}", uuid())), &V2_VM_FILES);
    (tmp, own)
}

#[test]
fn v2_vmlet_moves_into_a_leaf_and_vms_go_below_its_cgroup() {
    let (tmp, own) = fake_v2_delegated();
    let h = Hierarchy::v2_at(tmp.path());
    let proc_cgroup = "0::/system.slice/vmlet.service\n";
    let cgroups = Cgroups::for_process(h.clone(), "vmlet", proc_cgroup).unwrap();
    let leaf = own.join(DAEMON_LEAF);
    assert_eq!(cgroups.daemon_leaf(), Some(leaf.as_path()));
    assert_eq!(cgroups.root_dirs(), [own.join("vmlet")]);
    let cg = cgroups.create(uuid(), &limits()).unwrap();
    let vm = own.join(format!("vmlet/{}", uuid()));
    assert_eq!(cg.dirs(), std::slice::from_ref(&vm));
    // vmlet wrote itself ("0") into the leaf before enabling controllers
    // in its own cgroup.
    assert_eq!(read(leaf.join("cgroup.procs")), "0");
    assert_eq!(
        read(own.join("cgroup.subtree_control")),
        "+cpu +io +memory +pids"
    );
    assert_eq!(
        read(own.join("vmlet/cgroup.subtree_control")),
        "+cpu +io +memory +pids"
    );
    for above in [
        "cgroup.subtree_control",
        "system.slice/cgroup.subtree_control",
    ] {
        assert_eq!(read(tmp.path().join(above)), "untouched\n", "{above}");
    }
    assert_eq!(read(vm.join("pids.max")), "300");
    let id = uuid();
    assert!(cg.listed_in(&format!("0::/system.slice/vmlet.service/vmlet/{id}\n")));
    assert!(!cg.listed_in(&format!("0::/vmlet/{id}\n")));
    // The move happens once: a second VM does not write it again.
    fs::write(leaf.join("cgroup.procs"), "4242\n").unwrap();
    let other = Uuid::new_v4();
    fake(&own.join(format!("vmlet/{other}")), &V2_VM_FILES);
    cgroups.create(other, &limits()).unwrap();
    assert_eq!(read(leaf.join("cgroup.procs")), "4242\n");
    assert_eq!(cgroups.vm_cgroups(), BTreeSet::from([uuid(), other]));

    // A vmlet already in its leaf (restarted by an exec) keeps the same
    // places.
    let again = Cgroups::for_process(
        h.clone(),
        "vmlet",
        "0::/system.slice/vmlet.service/daemon\n",
    )
    .unwrap();
    assert_eq!(again.root_dirs(), [own.join("vmlet")]);
    assert_eq!(again.daemon_leaf(), Some(leaf.as_path()));

    // An absolute root: from the mount, no leaf.
    fake(
        tmp.path(),
        &[("cgroup.subtree_control", "cpu io memory pids\n")],
    );
    let absolute = Cgroups::for_process(h.clone(), "/machines", proc_cgroup).unwrap();
    assert_eq!(absolute.daemon_leaf(), None);
    assert_eq!(absolute.root_dirs(), [tmp.path().join("machines")]);

    // The controllers are looked for where vmlet's cgroups go.
    fake(&own, &[("cgroup.controllers", "cpu io pids\n")]);
    match Cgroups::for_process(h, "vmlet", proc_cgroup) {
        Err(e @ CgroupError::MissingController { .. }) => {
            assert!(e.to_string().contains("vmlet.service"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn v2_in_the_root_cgroup_needs_no_leaf() {
    let (_tmp, cgroups, _vm) = fake_v2(&V2_VM_FILES);
    assert_eq!(cgroups.daemon_leaf(), None);
    match Cgroups::for_process(Hierarchy::v2_at("/sys/fs/cgroup"), "vmlet", "1:cpu:/\n") {
        Err(e @ CgroupError::OwnCgroup { .. }) => assert!(e.to_string().contains("0::"), "{e}"),
        other => panic!("{other:?}"),
    }
}
