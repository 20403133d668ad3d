use super::*;

#[test]
fn targets_must_be_absolute_without_dotdot_and_not_reserved() {
    assert_eq!(
        check_target(0, Path::new("/firmware/./code.fd")).unwrap(),
        PathBuf::from("firmware/code.fd")
    );
    for (target, needle) in [
        ("firmware/code.fd", "absolute"),
        ("/firmware/../etc/shadow", "\"..\""),
        ("/..", "\"..\""),
        ("/", "root"),
        ("/.", "root"),
        ("/usr/share/x", "reserved"),
        ("/usr", "reserved"),
        ("/dev/kvm", "reserved"),
        ("/proc", "reserved"),
        ("/run/x", "reserved"),
        ("/tmp", "reserved"),
        ("/lib64/x", "reserved"),
    ] {
        let err = check_target(3, Path::new(target)).unwrap_err().to_string();
        assert!(err.contains("extra_ro[3] target"), "{target}: {err}");
        assert!(err.contains(needle), "{target}: {err}");
    }
    // Names that merely start like reserved ones are fine.
    assert!(check_target(0, Path::new("/usr2/x")).is_ok());
    assert!(check_target(0, Path::new("/devices")).is_ok());
}

#[test]
fn extras_check_sources_and_overlap() {
    let dir = tempfile::Builder::new()
        .prefix("vmlet-test-")
        .tempdir_in("/tmp")
        .unwrap();
    let file = dir.path().join("code.fd");
    std::fs::write(&file, b"x").unwrap();
    let link = dir.path().join("link.fd");
    std::os::unix::fs::symlink(&file, &link).unwrap();

    let ok = check_extras(&[
        (link.clone(), PathBuf::from("/fw/code.fd")),
        (dir.path().to_path_buf(), PathBuf::from("/data")),
    ])
    .unwrap();
    // The source is resolved, so the child binds what was checked.
    assert_eq!(ok[0], (file.clone(), PathBuf::from("fw/code.fd"), false));
    assert!(ok[1].2);

    let err = |extras: &[(PathBuf, PathBuf)]| check_extras(extras).unwrap_err().to_string();
    let missing = err(&[(dir.path().join("nope"), PathBuf::from("/fw"))]);
    assert!(missing.starts_with("extra_ro[0] source"), "{missing}");
    assert!(missing.contains("nope"), "{missing}");
    let relative = err(&[(PathBuf::from("code.fd"), PathBuf::from("/fw"))]);
    assert!(relative.contains("absolute"), "{relative}");
    let device = err(&[(PathBuf::from("/dev/null"), PathBuf::from("/fw"))]);
    assert!(device.contains("neither a regular file"), "{device}");
    for (a, b) in [
        ("/fw", "/fw/code.fd"),
        ("/fw/code.fd", "/fw"),
        ("/fw", "/fw"),
    ] {
        let nested = err(&[
            (file.clone(), PathBuf::from(a)),
            (file.clone(), PathBuf::from(b)),
        ]);
        assert!(nested.starts_with("extra_ro[1] target"), "{nested}");
        assert!(nested.contains("extra_ro[0]"), "{nested}");
    }
}

#[test]
fn host_path_maps_into_the_root_and_stops_at_it() {
    let root = Path::new("/run/vmlet/vms/u/root");
    for (inside, host) in [
        ("/run/vnc.sock", "/run/vmlet/vms/u/root/run/vnc.sock"),
        ("run/vnc.sock", "/run/vmlet/vms/u/root/run/vnc.sock"),
        ("/../../etc/shadow", "/run/vmlet/vms/u/root/etc/shadow"),
        ("/run/../../tmp/./x", "/run/vmlet/vms/u/root/tmp/x"),
        ("/", "/run/vmlet/vms/u/root"),
    ] {
        assert_eq!(
            host_path(root, Path::new(inside)),
            PathBuf::from(host),
            "{inside}"
        );
    }
}

#[test]
fn host_layout_copies_symlinks_and_binds_real_directories() {
    let dir = tempfile::Builder::new()
        .prefix("vmlet-test-")
        .tempdir_in("/tmp")
        .unwrap();
    let host = dir.path();
    std::os::unix::fs::symlink("usr/bin", host.join("bin")).unwrap();
    std::fs::create_dir(host.join("lib")).unwrap();
    std::os::unix::fs::symlink("/usr/lib64", host.join("lib64")).unwrap();
    assert_eq!(
        host_layout(host).unwrap(),
        vec![
            ("bin", TopEntry::Symlink(PathBuf::from("usr/bin"))),
            ("lib", TopEntry::Dir),
            ("lib64", TopEntry::Symlink(PathBuf::from("/usr/lib64"))),
        ]
    );
    std::fs::write(host.join("sbin"), b"").unwrap();
    let err = host_layout(host).unwrap_err().to_string();
    assert!(err.contains("sbin") && err.contains("neither"), "{err}");
}

#[test]
fn invalid_roots_are_refused_before_touching_anything() {
    for (root, needle) in [
        ("relative/root", "absolute"),
        ("/tmp/../etc", "\"..\""),
        ("/", "must not be /"),
    ] {
        let spec = JailSpec {
            root: PathBuf::from(root),
            uid: 64123,
            gid: 64123,
            kvm: false,
            extra_ro: vec![],
            binary: None,
        };
        let err = prepare(&spec).unwrap_err().to_string();
        assert!(err.starts_with("jail root"), "{root}: {err}");
        assert!(err.contains(needle), "{root}: {err}");
    }
}
