//! The VM's virtual TPM: one `swtpm` per VM, started by vmlet before QEMU
//! and confined like it (the VM's uid, its cgroup, a jail of its own).
//!
//! Neither process gets a path to the other: vmlet makes a connected socket
//! pair, `swtpm` inherits one end as its control channel (`--ctrl
//! type=unixio,clientfd=N`) and QEMU the other (`-chardev socket,fd=N`);
//! QEMU's `tpm-emulator` then hands `swtpm` its data channel over it. When
//! QEMU exits, its end closes and `swtpm` exits by itself, after writing its
//! state. The state directory (`STATE_DIR/vms/UUID/tpm/`) is opened by
//! vmlet and inherited as a descriptor (`--tpmstate dir=/proc/self/fd/N`),
//! so `swtpm` needs no path through vmlet's root-only directories.
//!
//! Identity after a restart: like QEMU's `-uuid`, `swtpm`'s command line
//! carries the VM's UUID in its `--log` prefix, and its start time is
//! recorded.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::confine::cgroup::JoinFiles;
use crate::confine::ids::Ids;
use crate::confine::jail::{self, JailError, JailSpec};
use crate::qemu::process::{self, Confinement, ProcessError, QemuProcess, SpawnRequest};

/// Why the TPM emulator could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The state directory could not be made, owned or opened.
    #[error("TPM state directory {path}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket pair or the log could not be made.
    #[error("preparing swtpm: {what}")]
    Setup {
        /// What was being made.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The jail of `swtpm` could not be built.
    #[error("building the swtpm jail")]
    Jail(#[source] JailError),
    /// `swtpm` could not be run.
    #[error("starting swtpm")]
    Process(#[source] ProcessError),
}

/// Where `swtpm` runs and what it holds.
#[derive(Debug, Clone, Copy)]
pub struct TpmLaunch<'a> {
    /// The `swtpm` binary (resolved on `PATH` when it has no `/`).
    pub binary: &'a Path,
    /// The VM.
    pub uuid: Uuid,
    /// The TPM's state directory (made when missing; kept across starts).
    pub state_dir: &'a Path,
    /// Where `swtpm`'s own messages are appended.
    pub log: &'a Path,
    /// The VM's run directory (its working directory; the jail is
    /// `tpm-root` in it).
    pub run_dir: &'a Path,
    /// Run as this user (`None`: as vmlet's own).
    pub ids: Option<&'a Ids>,
    /// Run in a jail of its own (needs `ids`).
    pub jail: bool,
    /// Join this cgroup (the VM's) before exec.
    pub cgroup: Option<&'a JoinFiles>,
    /// An `swtpm` outside `/usr`, bound into the jail (see
    /// [`JailSpec::binary`]).
    pub binary_bind: Option<&'a Path>,
}

/// A started `swtpm` and QEMU's end of its control channel.
#[derive(Debug)]
pub struct StartedTpm {
    /// The `swtpm` process.
    pub process: QemuProcess,
    /// The socket QEMU inherits (`-chardev socket,fd=N`); close-on-exec,
    /// so no other child of vmlet gets it.
    pub qemu_end: OwnedFd,
}

/// The directory of the jail of `swtpm` in the VM's run directory.
pub fn jail_root(run_dir: &Path) -> PathBuf {
    run_dir.join("tpm-root")
}

/// The `--log` value: errors only, each line prefixed with the VM, which is
/// also how a restarted vmlet recognises the process.
pub fn log_option(uuid: Uuid) -> String {
    format!("level=1,prefix=swtpm {uuid}: ")
}

/// The arguments after the binary: `state_fd` is the state directory,
/// `ctrl_fd` the control channel's socket.
///
/// `--seccomp action=kill` is swtpm's own default where it was built with
/// libseccomp; vmlet asks for it explicitly so that a build or
/// configuration that would run it unfiltered fails to start instead (an
/// `swtpm` without the option refuses it).
pub fn argv(uuid: Uuid, state_fd: i32, ctrl_fd: i32) -> Vec<String> {
    [
        "socket".to_string(),
        "--tpm2".into(),
        "--tpmstate".into(),
        format!("dir=/proc/self/fd/{state_fd}"),
        "--ctrl".into(),
        format!("type=unixio,clientfd={ctrl_fd}"),
        "--seccomp".into(),
        "action=kill".into(),
        "--log".into(),
        log_option(uuid),
    ]
    .into()
}

/// True when `cmdline` (NUL-separated, as in `/proc/PID/cmdline`) is the
/// `swtpm` of VM `uuid`: its `--log` option names the VM.
pub fn cmdline_is_vm_tpm(cmdline: &[u8], uuid: Uuid) -> bool {
    let want = log_option(uuid);
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"--log" && w[1] == want.as_bytes())
}

/// Takes hold of the running `swtpm` `pid` of VM `uuid` after a restart,
/// when its command line and start time prove it is that process.
pub fn adopt(pid: i32, uuid: Uuid, start_time: Option<u64>) -> Result<QemuProcess, ProcessError> {
    QemuProcess::adopt_checked(pid, uuid, start_time, |cmdline| {
        cmdline_is_vm_tpm(cmdline, uuid)
    })
}

/// Makes the state directory (mode 0700) when missing and gives it, and
/// every file in it, to `ids`: the uid of a VM may change between starts.
/// Symlinks are neither followed nor given away.
fn own_state_dir(dir: &Path, ids: Option<&Ids>) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid C string; the result is a new fd we own.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    let dir_fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(ids) = ids {
        give_state(&dir_fd, ids.uid, ids.gid)?;
    }
    Ok(dir_fd)
}

/// Gives the state directory open as `dir_fd` (mode 0700), and every
/// regular file in it, to `uid`:`gid`; symlinks are neither followed nor
/// given away.
fn give_state(dir_fd: &OwnedFd, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::fchown(dir_fd, Some(uid), Some(gid))?;
    std::fs::set_permissions(
        format!("/proc/self/fd/{}", dir_fd.as_raw_fd()),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    for entry in std::fs::read_dir(format!("/proc/self/fd/{}", dir_fd.as_raw_fd()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// Gives a VM's TPM state directory back to root once its `swtpm` is
/// gone, so the uid it ran as, free for another VM now, owns none of it.
/// A VM without one (no such directory) is fine.
pub fn take_back_state_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir_fd = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
    {
        Ok(file) => OwnedFd::from(file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    give_state(&dir_fd, 0, 0)
}

/// Starts the `swtpm` of a VM, confined as `launch` says. Returns once the
/// exec succeeded; `swtpm` then waits for QEMU on its end of the pair.
pub fn start(launch: TpmLaunch<'_>) -> Result<StartedTpm, TpmError> {
    let state =
        own_state_dir(launch.state_dir, launch.ids).map_err(|source| TpmError::StateDir {
            path: launch.state_dir.to_path_buf(),
            source,
        })?;
    let mut pair = [0; 2];
    // SAFETY: a valid out-array of two ints.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(TpmError::Setup {
            what: "the socket pair",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: both are fresh descriptors we own.
    let (swtpm_end, qemu_end) =
        unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(launch.log)
            .map_err(|source| TpmError::Setup {
                what: "the swtpm log",
                source,
            })?
    };
    let jail = match (launch.jail, launch.ids) {
        (true, Some(ids)) => Some(
            jail::prepare(&JailSpec {
                root: jail_root(launch.run_dir),
                uid: ids.uid,
                gid: ids.gid,
                kvm: false,
                extra_ro: vec![],
                binary: launch.binary_bind.map(Path::to_path_buf),
            })
            .map_err(TpmError::Jail)?,
        ),
        _ => None,
    };
    let binary = match (&jail, launch.binary_bind) {
        (Some(_), Some(_)) => Path::new(jail::JAIL_BINARY),
        _ => launch.binary,
    };
    let argv = argv(launch.uuid, state.as_raw_fd(), swtpm_end.as_raw_fd());
    let process = process::spawn(
        SpawnRequest {
            binary,
            argv: &argv,
            uuid: launch.uuid,
            inherit: &[state.as_raw_fd(), swtpm_end.as_raw_fd()],
            log: &log,
            dir: launch.run_dir,
        },
        Confinement {
            ids: launch.ids,
            jail: jail.as_ref(),
            cgroup: launch.cgroup,
        },
    )
    .map_err(TpmError::Process)?;
    // swtpm holds its own copies now: vmlet's end must go, or swtpm would
    // never see QEMU's end close.
    drop(swtpm_end);
    Ok(StartedTpm { process, qemu_end })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_names_the_inherited_fds_and_the_vm() {
        let uuid = Uuid::parse_str("5b0c2d4e-8a51-4f3e-9b1c-2a7f4d6e8c10").unwrap();
        let argv = argv(uuid, 7, 9);
        assert_eq!(
            argv,
            [
                "socket",
                "--tpm2",
                "--tpmstate",
                "dir=/proc/self/fd/7",
                "--ctrl",
                "type=unixio,clientfd=9",
                "--seccomp",
                "action=kill",
                "--log",
                "level=1,prefix=swtpm 5b0c2d4e-8a51-4f3e-9b1c-2a7f4d6e8c10: ",
            ]
        );
        let mut cmdline = b"swtpm".to_vec();
        for arg in &argv {
            cmdline.push(0);
            cmdline.extend_from_slice(arg.as_bytes());
        }
        assert!(cmdline_is_vm_tpm(&cmdline, uuid));
        assert!(!cmdline_is_vm_tpm(&cmdline, Uuid::new_v4()));
        // The UUID elsewhere on the line does not count.
        let elsewhere = format!("swtpm\0socket\0--tpmstate\0dir=/x/{uuid}\0");
        assert!(!cmdline_is_vm_tpm(elsewhere.as_bytes(), uuid));
        assert!(!cmdline_is_vm_tpm(b"", uuid));
    }

    #[test]
    fn state_dir_is_made_private_and_never_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let scratch = std::env::temp_dir().join(format!("vmlet-tpm-unit-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&scratch).unwrap();
        let dir = scratch.join("tpm");
        let fd = own_state_dir(&dir, None).expect("made");
        assert!(fd.as_raw_fd() >= 0);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        // Again: the same directory is reused (state survives restarts).
        std::fs::write(dir.join("tpm2-00.permall"), b"state").unwrap();
        own_state_dir(&dir, None).expect("reused");
        assert_eq!(
            std::fs::read(dir.join("tpm2-00.permall")).unwrap(),
            b"state"
        );
        // A symlink in its place is refused.
        let link = scratch.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(own_state_dir(&link, None).is_err());
        std::fs::remove_dir_all(&scratch).unwrap();
    }
}
