//! The test guest: a Debian cloud kernel plus a busybox initramfs, built by
//! `scripts/build-test-guest.sh` and cached under `target/test-guest/`.
//!
//! Boot it with direct kernel boot (`-kernel`, `-initrd`) and a command line
//! such as `console=ttyS0 panic=-1 quiet guest.action=poweroff`. Once set up
//! it prints one line to the serial console, and to the virtio-serial port
//! named `org.vmlet.guest.0` when there is one:
//!
//! ```text
//! GUEST-READY disks=vda:1073741824 nics=eth0:52:54:00:12:34:56 ports=org.vmlet.guest.0
//! ```
//!
//! (`-` for an empty list). See `scripts/test-guest/init` for the `guest.*`
//! parameters and the other lines it prints.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Paths of the built test guest.
#[derive(Debug)]
pub struct TestGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds the test guest once (cached under target/) and returns its paths.
/// Safe when many tests (threads and processes) call it at once: takes an
/// exclusive file lock (flock) on `target/test-guest.lock`, runs
/// `scripts/build-test-guest.sh`, caches the result in a `OnceLock` for the
/// process. Panics, with the script's output, if the build fails.
pub fn test_guest() -> &'static TestGuest {
    static GUEST: OnceLock<TestGuest> = OnceLock::new();
    GUEST.get_or_init(build)
}

pub(crate) fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (at run time, else
/// when the test was compiled), otherwise `<repo>/target`.
pub(crate) fn target_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target"));
    if dir.is_absolute() {
        dir
    } else {
        repo_dir().join(dir)
    }
}

fn build() -> TestGuest {
    let repo = repo_dir();
    let target = target_dir();
    let script = repo.join("scripts/build-test-guest.sh");

    std::fs::create_dir_all(&target)
        .unwrap_or_else(|e| panic!("test guest: cannot create {}: {e}", target.display()));
    let lock_path = target.join("test-guest.lock");
    // Held until this function returns (dropping the file releases the lock).
    // Rust opens files close-on-exec, so the build script does not inherit it
    // (the script takes its own lock, on a different file).
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("test guest: cannot open {}: {e}", lock_path.display()));
    lock_exclusive(&lock)
        .unwrap_or_else(|e| panic!("test guest: cannot lock {}: {e}", lock_path.display()));

    let output = Command::new("bash")
        .arg(&script)
        .env("TARGET_DIR", &target)
        .current_dir(&repo)
        .output()
        .unwrap_or_else(|e| panic!("test guest: cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "test guest: {} failed ({}):\n{stderr}{stdout}",
            script.display(),
            output.status
        );
    }
    let dir = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "test guest: {} printed no output directory:\n{stderr}",
                script.display()
            )
        });
    let guest = TestGuest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    };
    for path in [&guest.kernel, &guest.initrd] {
        if !Path::new(path).is_file() {
            panic!(
                "test guest: {} is missing after {} ran:\n{stderr}",
                path.display(),
                script.display()
            );
        }
    }
    drop(lock);
    guest
}

pub(crate) fn lock_exclusive(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: flock on a file descriptor we own, for the file's lifetime.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
