//! The per-VM jail against the real kernel: a child enters it between
//! `fork` and `exec`, drops to an unprivileged uid and reports what it can
//! see and do. Needs root and mount namespaces.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Scratch;
use vmlet::confine::jail::{self, EnterError, JailSpec, PreparedJail};

/// The unprivileged ids the jailed processes run as.
const UID: u32 = 64123;
const GID: u32 = 64123;

/// Whether this host can run jails; says why not in one `SKIPPED:` line.
fn can_jail(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(test, "needs root (mount namespaces, pivot_root, setuid)");
        return false;
    }
    let mut probe = Command::new("/usr/bin/true");
    // SAFETY: unshare is async-signal-safe.
    unsafe {
        probe.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    match probe.status() {
        Ok(s) if s.success() => true,
        Ok(s) => {
            common::skip(test, format!("/usr/bin/true in a mount namespace: {s}"));
            false
        }
        Err(e) => {
            common::skip(test, format!("mount namespaces are unavailable: {e}"));
            false
        }
    }
}

fn spec(scratch: &Scratch, kvm: bool, extra_ro: Vec<(PathBuf, PathBuf)>) -> JailSpec {
    JailSpec {
        root: scratch.path().join("vms/uuid/root"),
        uid: UID,
        gid: GID,
        kvm,
        extra_ro,
        binary: None,
    }
}

/// A command that enters `jail`, drops to [`UID`]:[`GID`] without
/// supplementary groups, and execs `program`. When entering fails, the
/// failed step goes to `report` (if given) before the error ends the child.
fn jailed(jail: &Arc<PreparedJail>, program: &str, report: Option<OwnedFd>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear().env("PATH", "/usr/bin:/bin");
    let jail = Arc::clone(jail);
    // SAFETY: the closure makes system calls only (no allocation), as
    // pre_exec requires.
    unsafe {
        cmd.pre_exec(move || {
            if let Err(e) = jail.enter() {
                if let Some(fd) = &report {
                    let bytes = [
                        (e.step as u32).to_ne_bytes(),
                        (e.errno as u32).to_ne_bytes(),
                    ];
                    libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), 8);
                }
                return Err(std::io::Error::from_raw_os_error(e.errno));
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(GID) != 0
                || libc::setuid(UID) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Runs `script` with `/usr/bin/sh` in the jail; `$1`, `$2`… are `args`.
fn jailed_sh(jail: &Arc<PreparedJail>, script: &str, args: &[&str]) -> Output {
    let out = jailed(jail, "/usr/bin/sh", None)
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(args)
        .output()
        .expect("running sh in the jail");
    assert!(
        out.status.success(),
        "jailed sh failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The mount points of this process's namespace at or under `dir`.
fn host_mounts_under(dir: &Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(str::to_string)
        .collect()
}

fn mount_ns() -> PathBuf {
    std::fs::read_link("/proc/self/ns/mnt").unwrap()
}

/// What the host's `/` holds of the entries the jail copies, as the jail
/// should list them.
fn expected_root(extra_top: &str) -> Vec<String> {
    let mut names: Vec<String> = ["usr", "dev", "proc", "run", "tmp", extra_top]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        if std::fs::symlink_metadata(Path::new("/").join(name)).is_ok() {
            names.push(name.to_string());
        }
    }
    names.sort();
    names
}

/// Prints `NAME=yes` or `NAME=no` for each check, then the listings.
const PROBE: &str = r#"
check() { name=$1; shift; if "$@" >/dev/null 2>&1; then echo "$name=yes"; else echo "$name=no"; fi; }
echo "root=$(ls -A / | tr '\n' ' ')"
echo "dev=$(ls -A /dev | tr '\n' ' ')"
echo "ids=$(id -u):$(id -g):$(id -G)"
check etc test -e /etc
check shadow cat /etc/shadow
check scratch test -e "$1"
check state ls "$2"
check usr_write touch /usr/vmlet-test-probe
check root_write touch /vmlet-test-probe
check run_write sh -c 'echo x > /run/probe && test -s /run/probe'
check tmp_write sh -c 'echo x > /tmp/probe && test -s /tmp/probe'
check tmp_exec sh -c 'cp /usr/bin/true /tmp/true && /tmp/true'
check proc_fd test -e /proc/self/fd/1
check dev_null sh -c 'echo x > /dev/null'
check dev_zero sh -c 'head -c 8 /dev/zero | od -An -tx1 | grep -q "00 00"'
check urandom sh -c 'head -c 8 /dev/urandom | od -An -tx1 | grep -q .'
check dev_write touch /dev/vmlet-test-probe
check other_pid test -e "/proc/$3"
check pid1 test -e /proc/1
check proc_sys test -e /proc/sys
check kvm test -c /dev/kvm
check tun test -e /dev/net/tun
check firmware_read grep -q firmware-bytes /firmware/code.fd
check firmware_write sh -c 'echo x >> /firmware/code.fd'
echo "---mountinfo"
cat /proc/self/mountinfo
"#;

#[test]
fn jail_shows_only_what_qemu_needs() {
    if !can_jail("jail_shows_only_what_qemu_needs") {
        return;
    }
    let scratch = Scratch::new();
    let state = scratch.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("secret"), b"secret").unwrap();
    let firmware = scratch.path().join("code.fd");
    std::fs::write(&firmware, b"firmware-bytes\n").unwrap();
    let kvm = Path::new("/dev/kvm").exists();
    if !kvm {
        common::skip(
            "jail_shows_only_what_qemu_needs (/dev/kvm part)",
            "the host has no /dev/kvm",
        );
    }
    let spec = spec(
        &scratch,
        kvm,
        vec![(firmware.clone(), PathBuf::from("/firmware/code.fd"))],
    );
    let before = host_mounts_under(scratch.path());
    let ns = mount_ns();
    let jail = Arc::new(jail::prepare(&spec).unwrap());

    let out = jailed_sh(
        &jail,
        PROBE,
        &[
            scratch.path().to_str().unwrap(),
            state.to_str().unwrap(),
            &std::process::id().to_string(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (checks, mountinfo) = stdout.split_once("---mountinfo\n").expect(&stdout);
    let seen: BTreeMap<&str, &str> = checks.lines().filter_map(|l| l.split_once('=')).collect();
    let mut root: Vec<&str> = seen["root"].split_whitespace().collect();
    root.sort();
    assert_eq!(root, expected_root("firmware"), "{stdout}");
    let mut dev: Vec<&str> = seen["dev"].split_whitespace().collect();
    dev.sort();
    let mut want_dev = vec!["null", "random", "urandom", "zero"];
    if kvm {
        want_dev.push("kvm");
        want_dev.sort();
    }
    assert_eq!(dev, want_dev, "{stdout}");
    assert_eq!(seen["ids"], format!("{UID}:{GID}:{GID}"), "{stdout}");
    for (check, want) in [
        ("etc", "no"),
        ("shadow", "no"),
        ("scratch", "no"),
        ("state", "no"),
        ("usr_write", "no"),
        ("root_write", "no"),
        ("run_write", "yes"),
        ("tmp_write", "yes"),
        ("tmp_exec", "no"),
        ("proc_fd", "yes"),
        ("dev_null", "yes"),
        ("dev_zero", "yes"),
        ("urandom", "yes"),
        ("dev_write", "no"),
        ("other_pid", "no"),
        ("pid1", "no"),
        ("proc_sys", "no"),
        ("kvm", if kvm { "yes" } else { "no" }),
        ("tun", "no"),
        ("firmware_read", "yes"),
        ("firmware_write", "no"),
    ] {
        assert_eq!(seen.get(check), Some(&want), "check {check}:\n{stdout}");
    }

    // The jail's own mount table: exactly the expected mount points, with
    // the expected flags.
    let mounts: BTreeMap<&str, (&str, &str)> = mountinfo
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let fs = l.split(" - ").nth(1).unwrap_or("");
            (f[4], (f[5], fs))
        })
        .collect();
    let mut want_points = vec![
        "/",
        "/usr",
        "/dev/null",
        "/dev/zero",
        "/dev/urandom",
        "/dev/random",
        "/firmware/code.fd",
        "/run",
        "/tmp",
        "/proc",
    ];
    if kvm {
        want_points.push("/dev/kvm");
    }
    for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(name);
        if std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) {
            want_points.push(Box::leak(format!("/{name}").into_boxed_str()));
        }
    }
    want_points.sort();
    assert_eq!(
        mounts.keys().copied().collect::<Vec<_>>(),
        want_points,
        "{mountinfo}"
    );
    let opts = |point: &str| -> Vec<&str> { mounts[point].0.split(',').collect() };
    for point in ["/", "/usr", "/firmware/code.fd"] {
        let o = opts(point);
        for flag in ["ro", "nosuid", "nodev"] {
            assert!(o.contains(&flag), "{point} lacks {flag}: {mountinfo}");
        }
    }
    for point in ["/run", "/tmp"] {
        let o = opts(point);
        for flag in ["rw", "nosuid", "nodev", "noexec"] {
            assert!(o.contains(&flag), "{point} lacks {flag}: {mountinfo}");
        }
    }
    let null = opts("/dev/null");
    assert!(
        null.contains(&"nosuid") && !null.contains(&"nodev"),
        "{mountinfo}"
    );
    let proc = mounts["/proc"].1;
    assert!(
        proc.contains("hidepid=invisible") && proc.contains("subset=pid"),
        "proc options: {mountinfo}"
    );

    // The writes in /run and /tmp landed in the jail directory, owned by the
    // VM's uid; nothing leaked into the host's mount table.
    let probe = jail.host_path(Path::new("/run/probe"));
    assert_eq!(std::fs::read(&probe).unwrap(), b"x\n");
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&probe).unwrap());
    assert_eq!(owner, UID);
    assert_eq!(host_mounts_under(scratch.path()), before);
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(mount_ns(), ns);

    jail::remove(jail.root()).unwrap();
    assert!(!spec.root.exists());
    assert!(spec.root.parent().unwrap().exists());
    assert_eq!(std::fs::read(&firmware).unwrap(), b"firmware-bytes\n");
    assert_eq!(std::fs::read(state.join("secret")).unwrap(), b"secret");
}

/// Kills and reaps a child on drop, even when the test fails.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads from `stream` until `needle` shows up or `deadline` passes.
fn read_until(stream: &mut impl Read, needle: &str, deadline: Instant) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {:?}",
            String::from_utf8_lossy(&seen)
        );
        match stream.read(&mut buf) {
            Ok(0) => panic!(
                "EOF before {needle:?}: {:?}",
                String::from_utf8_lossy(&seen)
            ),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading: {e}"),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn qemu_runs_in_the_jail_and_its_vnc_socket_is_reachable_from_the_host() {
    let test = "qemu_runs_in_the_jail_and_its_vnc_socket_is_reachable_from_the_host";
    if !can_jail(test) {
        return;
    }
    let qemu = "/usr/bin/qemu-system-x86_64";
    let host_version = match Command::new(qemu).arg("--version").output() {
        Ok(o) if o.status.success() => o.stdout,
        Ok(o) => panic!("{qemu} --version: {}", o.status),
        Err(e) => {
            common::skip(test, format!("{qemu}: {e}"));
            return;
        }
    };
    let scratch = Scratch::new();
    let jail = Arc::new(jail::prepare(&spec(&scratch, false, vec![])).unwrap());

    let out = jailed(&jail, qemu, None).arg("--version").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, host_version);

    // A real machine (SeaBIOS and option ROMs come from /usr/share), its
    // VNC socket in the jail's /run, QMP on stdio.
    let child = jailed(&jail, qemu, None)
        .args([
            "-nodefaults",
            "-machine",
            "pc,accel=tcg",
            "-m",
            "64",
            "-display",
            "none",
            "-vga",
            "std",
            "-vnc",
            "unix:/run/vnc.sock",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Reap(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut qmp_out = child.0.stdout.take().unwrap();
    let mut qmp_in = child.0.stdin.take().unwrap();
    read_until(&mut qmp_out, "\"QMP\"", deadline);
    qmp_in
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n")
        .unwrap();
    let status = read_until(&mut qmp_out, "\"running\"", deadline);
    assert!(status.contains("\"status\": \"running\""), "{status}");

    let socket = jail.host_path(Path::new("/run/vnc.sock"));
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket(), "{socket:?}");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), UID);
    let mut vnc = UnixStream::connect(&socket).unwrap();
    vnc.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 12];
    vnc.read_exact(&mut greeting).unwrap();
    assert!(greeting.starts_with(b"RFB "), "{greeting:?}");
    drop(vnc);

    qmp_in.write_all(b"{\"execute\":\"quit\"}\n").unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "QEMU exited with {status}");
    jail::remove(jail.root()).unwrap();
    assert!(!jail.root().exists());
}

#[test]
fn a_failed_step_is_reported_by_name() {
    if !can_jail("a_failed_step_is_reported_by_name") {
        return;
    }
    let scratch = Scratch::new();
    let firmware = scratch.path().join("code.fd");
    std::fs::write(&firmware, b"x").unwrap();
    let jail = Arc::new(
        jail::prepare(&spec(
            &scratch,
            false,
            vec![(firmware.clone(), PathBuf::from("/firmware/code.fd"))],
        ))
        .unwrap(),
    );
    // The source vanishes between prepare and the child's bind.
    std::fs::remove_file(&firmware).unwrap();
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array it is given.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors owned here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut cmd = jailed(&jail, "/usr/bin/true", Some(write_end));
    let err = cmd.status().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    drop(cmd); // closes the parent's copy of the write end
    let mut report = Vec::new();
    std::fs::File::from(read_end)
        .read_to_end(&mut report)
        .unwrap();
    assert_eq!(report.len(), 8, "{report:?}");
    let word = |i: usize| u32::from_ne_bytes(report[i..i + 4].try_into().unwrap());
    let failure = EnterError {
        step: word(0) as usize,
        errno: word(4) as i32,
    };
    let text = jail.describe(failure);
    assert!(text.contains("bind-mounting"), "{text}");
    assert!(text.contains(firmware.to_str().unwrap()), "{text}");
    assert!(text.contains("No such file"), "{text}");
    assert!(host_mounts_under(scratch.path()).is_empty());
    jail::remove(jail.root()).unwrap();
}

/// A bind mount on the host, undone on drop.
struct HostBind(PathBuf);

impl HostBind {
    fn new(source: &Path, target: &Path) -> HostBind {
        let status = Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .status()
            .unwrap();
        assert!(status.success(), "mount --bind {source:?} {target:?}");
        HostBind(target.to_path_buf())
    }
}

impl Drop for HostBind {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn prepare_replaces_a_stale_jail_and_remove_never_leaves_it() {
    if !can_jail("prepare_replaces_a_stale_jail_and_remove_never_leaves_it") {
        return;
    }
    let scratch = Scratch::new();
    let outside = scratch.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"keep").unwrap();
    let spec = spec(&scratch, false, vec![]);

    // A stale jail, with what a hostile QEMU could leave in /tmp: symlinks
    // to the outside and a deep tree.
    let jail = jail::prepare(&spec).unwrap();
    let tmp = jail.host_path(Path::new("/tmp"));
    std::os::unix::fs::symlink(&outside, tmp.join("dir-link")).unwrap();
    std::os::unix::fs::symlink(outside.join("keep"), tmp.join("file-link")).unwrap();
    std::fs::create_dir_all(tmp.join("a/b/c/d")).unwrap();
    std::fs::write(tmp.join("a/b/c/d/f"), b"f").unwrap();
    let again = jail::prepare(&spec).unwrap();
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");

    // A mount point under the jail stops the removal, and nothing behind
    // the mount is touched.
    {
        let _bind = HostBind::new(&outside, &again.host_path(Path::new("/run")));
        let err = jail::remove(again.root()).unwrap_err().to_string();
        assert!(err.contains("mount point"), "{err}");
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
    }
    // A root that is itself a mount point is refused too.
    {
        let _bind = HostBind::new(&outside, again.root());
        let err = jail::remove(again.root()).unwrap_err().to_string();
        assert!(err.contains("mount point"), "{err}");
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
    }
    jail::remove(again.root()).unwrap();
    assert!(!spec.root.exists());
    jail::remove(again.root()).unwrap(); // already gone: fine

    // A symlink in place of the root is refused, its target untouched.
    std::os::unix::fs::symlink(&outside, &spec.root).unwrap();
    assert!(jail::remove(&spec.root).is_err());
    assert!(jail::prepare(&spec).is_err());
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
    std::fs::remove_file(&spec.root).unwrap();

    // Bad extra binds are refused naming the field.
    let mut bad = spec.clone();
    bad.extra_ro = vec![(scratch.path().join("missing.fd"), PathBuf::from("/fw.fd"))];
    let err = jail::prepare(&bad).unwrap_err().to_string();
    assert!(err.starts_with("extra_ro[0] source"), "{err}");
    assert!(!spec.root.exists(), "a refused spec builds nothing");
    assert!(host_mounts_under(scratch.path()).is_empty());
}
