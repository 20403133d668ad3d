//! The QEMU process: spawn it confined as vmlet's own child (no
//! `-daemonize`), find it again after a restart and prove its identity,
//! watch for its exit through a pidfd, signal it.
//!
//! Identity: a pid alone is never trusted. After a restart,
//! `/proc/PID/cmdline` must carry `-uuid UUID` for the VM and the process
//! must have the recorded start time, checked *after* the pidfd is open, so
//! a pid recycled between the check and later signals cannot be hit:
//! signals go through the pidfd, which names one process forever.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use uuid::Uuid;

use crate::confine::cgroup::JoinFiles;
use crate::confine::ids::Ids;
use crate::confine::jail::PreparedJail;

/// Why a process operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The QEMU binary could not be run at all.
    #[error("running {binary}")]
    Exec {
        /// The binary.
        binary: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU ran and exited (or hung) before it was ready; `message` is what
    /// it printed.
    #[error("QEMU failed to start: {message}")]
    StartFailed {
        /// QEMU's own error text (stderr).
        message: String,
    },
    /// The pid is not (or no longer) this VM's QEMU.
    #[error("process {pid} is not the QEMU of VM {uuid}")]
    NotOurs {
        /// The pid checked.
        pid: i32,
        /// The VM.
        uuid: Uuid,
    },
    /// No process has this pid.
    #[error("process {pid} does not exist")]
    Gone {
        /// The pid.
        pid: i32,
    },
    /// A system call on the process failed.
    #[error("{op} on process {pid}")]
    Sys {
        /// What was attempted.
        op: &'static str,
        /// The pid.
        pid: i32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// How a QEMU process ended, when vmlet could see it (only for processes
/// that are vmlet's children: those it spawned itself, not those it found
/// again after a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Ended, but not vmlet's child, so the status is unknown.
    Unknown,
}

/// After the pidfd says "exited", how often and how long to wait for the
/// last threads so the process can be reaped (2 s in all).
const REAP_ATTEMPTS: u32 = 400;
const REAP_INTERVAL: Duration = Duration::from_millis(5);

/// How long QEMU gets by default to set the VM up and answer on QMP (a hung
/// storage path must not leave a start waiting forever).
pub const SPAWN_DEADLINE: Duration = Duration::from_secs(60);

/// The open-files limit of a QEMU process (disks, taps, vhost, sockets).
pub const QEMU_NOFILE: u64 = 8192;

/// A running QEMU, held by pidfd.
#[derive(Debug)]
pub struct QemuProcess {
    pid: i32,
    uuid: Uuid,
    start_time: Option<u64>,
    pidfd: AsyncFd<OwnedFd>,
    /// How it ended, once reaped.
    status: std::sync::OnceLock<ExitStatus>,
}

/// How the QEMU child is confined. Each part is prepared by the parent; the
/// child only makes system calls on what was prepared (no allocation between
/// fork and exec).
#[derive(Debug, Default, Clone, Copy)]
pub struct Confinement<'a> {
    /// Run as this uid/gid with these groups, with an empty capability
    /// bounding set; `None`: as vmlet's own user (vmlet is not root).
    pub ids: Option<&'a Ids>,
    /// Enter this jail (a private mount namespace) before dropping root.
    pub jail: Option<&'a PreparedJail>,
    /// Join this cgroup before anything else, so every thread QEMU makes
    /// is in it from the start.
    pub cgroup: Option<&'a JoinFiles>,
}

/// What to run and where its output goes.
#[derive(Debug, Clone, Copy)]
pub struct SpawnRequest<'a> {
    /// The QEMU binary (a path; resolved on `PATH` when it has no `/`).
    pub binary: &'a Path,
    /// The arguments after the binary.
    pub argv: &'a [String],
    /// The VM (`-uuid` must be in `argv`).
    pub uuid: Uuid,
    /// The fds `argv` names: QEMU inherits exactly these, at these numbers.
    pub inherit: &'a [RawFd],
    /// QEMU's stdout and stderr (its log, opened for appending).
    pub log: &'a std::fs::File,
    /// Its working directory (the VM's run directory; in a jail, the
    /// jail's root).
    pub dir: &'a Path,
}

/// Starts QEMU as vmlet's child: a new session, the cgroup joined, resource
/// limits set (no core dumps: they would hold guest memory; [`QEMU_NOFILE`]
/// open files), the jail entered, the user switched, `no_new_privs` set,
/// then exec. Returns once the exec succeeded; every failure before it
/// (including in the child) is an error here, and no process is left.
pub fn spawn(
    request: SpawnRequest<'_>,
    confine: Confinement<'_>,
) -> Result<QemuProcess, ProcessError> {
    use std::os::unix::process::CommandExt;
    let SpawnRequest {
        binary,
        argv,
        uuid,
        inherit,
        log,
        dir,
    } = request;
    let stdout = log.try_clone().map_err(|source| ProcessError::Exec {
        binary: binary.to_path_buf(),
        source,
    })?;
    let stderr = log.try_clone().map_err(|source| ProcessError::Exec {
        binary: binary.to_path_buf(),
        source,
    })?;
    let mut command = std::process::Command::new(binary);
    command
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    let inherit = inherit.to_vec();
    let ids = confine.ids.cloned();
    let groups: Vec<libc::gid_t> = ids.as_ref().map(|i| i.groups.clone()).unwrap_or_default();
    // The closure must be 'static, but runs only inside `command.spawn()`
    // below (in the child), and `command` is dropped before this function
    // returns: the borrowed jail and cgroup files outlive every use.
    let jail = confine.jail.map(|j| j as *const PreparedJail as usize);
    let cgroup = confine.cgroup.map(|c| c as *const JoinFiles as usize);
    // SAFETY: between fork and exec only async-signal-safe system calls run,
    // on values prepared before the fork (no allocation, no locks).
    unsafe {
        command.pre_exec(move || {
            let jail = jail.map(|j| &*(j as *const PreparedJail));
            let cgroup = cgroup.map(|c| &*(c as *const JoinFiles));
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(cgroup) = cgroup {
                cgroup.join_in_child()?;
            }
            let core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let nofile = libc::rlimit {
                rlim_cur: QEMU_NOFILE,
                rlim_max: QEMU_NOFILE,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &core) == -1
                || libc::setrlimit(libc::RLIMIT_NOFILE, &nofile) == -1
            {
                return Err(std::io::Error::last_os_error());
            }
            // Exactly the fds the argv names cross into QEMU.
            for fd in &inherit {
                if libc::fcntl(*fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(jail) = jail {
                jail.enter_in_child()?;
            }
            if let Some(ids) = &ids {
                // No capability can come back, whatever QEMU executes.
                for cap in 0..=libc::c_ulong::from(63u8) {
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) == -1
                        && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setgroups(groups.len(), groups.as_ptr()) == -1
                    || libc::setresgid(ids.gid, ids.gid, ids.gid) == -1
                    || libc::setresuid(ids.uid, ids.uid, ids.uid) == -1
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| ProcessError::Exec {
        binary: binary.to_path_buf(),
        source,
    })?;
    let pid = child.id() as i32;
    // The std handle neither waits nor kills on drop: the pidfd below reaps.
    drop(child);
    drop(command);
    QemuProcess::own_child(pid, uuid)
}

/// The start time in `/proc/PID/stat`; the command name may hold spaces
/// and `)`, so fields are counted from the last `)` (the state is field 3,
/// the start time field 22).
fn parse_start_time(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The start time of process `pid` (clock ticks after boot, field 22 of
/// `/proc/PID/stat`): with the pid, it names one process for the life of
/// the host.
pub fn start_time(pid: i32) -> Option<u64> {
    parse_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// True when `cmdline` (NUL-separated, as in `/proc/PID/cmdline`) carries
/// `-uuid UUID`.
pub fn cmdline_names_uuid(cmdline: &[u8], uuid: Uuid) -> bool {
    let want = uuid.to_string();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"-uuid" && w[1].eq_ignore_ascii_case(want.as_bytes()))
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success it returns a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::PIDFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl QemuProcess {
    /// Takes hold of the running process `pid` if it is VM `uuid`'s QEMU:
    /// its command line carries `-uuid UUID` and, when `start_time` is
    /// known, it started then. Used when reattaching after a daemon restart.
    pub fn adopt(
        pid: i32,
        uuid: Uuid,
        start_time: Option<u64>,
    ) -> Result<QemuProcess, ProcessError> {
        QemuProcess::adopt_checked(pid, uuid, start_time, |cmdline| {
            cmdline_names_uuid(cmdline, uuid)
        })
    }

    /// Like [`QemuProcess::adopt`], for a helper process of VM `uuid`
    /// (its `swtpm`): `is_ours` checks its command line instead of `-uuid`.
    pub fn adopt_checked(
        pid: i32,
        uuid: Uuid,
        start_time: Option<u64>,
        is_ours: impl FnOnce(&[u8]) -> bool,
    ) -> Result<QemuProcess, ProcessError> {
        let process = QemuProcess::hold(pid, uuid)?;
        // Checked after the pidfd exists: from here on the pidfd pins this
        // exact process, whatever happens to the number.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let started_then = match start_time {
            Some(want) => process.start_time == Some(want),
            None => true,
        };
        if !is_ours(&cmdline) || !started_then {
            return Err(ProcessError::NotOurs { pid, uuid });
        }
        Ok(process)
    }

    /// Takes hold of vmlet's own child `pid`, just spawned: an unreaped
    /// child's pid cannot be reused, so no identity check is needed (its
    /// command line may still be vmlet's until the exec completes).
    fn own_child(pid: i32, uuid: Uuid) -> Result<QemuProcess, ProcessError> {
        QemuProcess::hold(pid, uuid)
    }

    fn hold(pid: i32, uuid: Uuid) -> Result<QemuProcess, ProcessError> {
        if pid <= 0 {
            return Err(ProcessError::Gone { pid });
        }
        let pidfd = pidfd_open(pid).map_err(|source| match source.raw_os_error() {
            Some(libc::ESRCH) => ProcessError::Gone { pid },
            _ => ProcessError::Sys {
                op: "pidfd_open",
                pid,
                source,
            },
        })?;
        let start_time = start_time(pid);
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged for as
        // long as the AsyncFd owns it.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
                .map_err(|e| ProcessError::Sys {
                    op: "registering pidfd",
                    pid,
                    source: std::io::Error::other(e.to_string()),
                })?;
        Ok(QemuProcess {
            pid,
            uuid,
            start_time,
            pidfd,
            status: std::sync::OnceLock::new(),
        })
    }

    /// When the process started (see [`start_time`]).
    pub fn start_time(&self) -> Option<u64> {
        self.start_time
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The VM this process runs.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// True while the process has not exited.
    pub fn is_running(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.pidfd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        !(rc > 0 && fds[0].revents & libc::POLLIN != 0)
    }

    /// Waits until the process exits, then reaps it when it is vmlet's child.
    pub async fn exited(&self) -> ExitStatus {
        loop {
            match self.pidfd.readable().await {
                Ok(mut guard) => {
                    if !self.is_running() {
                        guard.retain_ready();
                        break;
                    }
                    guard.clear_ready();
                }
                // Registration failed: fall back to polling.
                Err(_) => {
                    if !self.is_running() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        for _ in 0..REAP_ATTEMPTS {
            if let Some(status) = self.try_reap() {
                return status;
            }
            tokio::time::sleep(REAP_INTERVAL).await;
        }
        ExitStatus::Unknown
    }

    /// Waits up to `timeout` for the exit; `None` when still running.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.exited()).await.ok()
    }

    /// Reaps the exited process: `None` while it cannot be reaped yet (a
    /// multi-threaded process whose last threads are still exiting). The
    /// first answer is kept, so every caller learns the same status.
    fn try_reap(&self) -> Option<ExitStatus> {
        if let Some(status) = self.status.get() {
            return Some(*status);
        }
        // SAFETY: zeroed siginfo is a valid out-buffer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // P_PIDFD reaps exactly this process, never another child.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.pidfd.get_ref().as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        let status = if rc != 0 {
            // ECHILD: not vmlet's child (reattached after a restart).
            ExitStatus::Unknown
        } else {
            // SAFETY: waitid filled the siginfo (si_pid 0: nothing to reap yet).
            let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
            match code {
                _ if pid == 0 => return None,
                libc::CLD_EXITED => ExitStatus::Code(status),
                libc::CLD_KILLED | libc::CLD_DUMPED => ExitStatus::Signal(status),
                _ => ExitStatus::Unknown,
            }
        };
        Some(*self.status.get_or_init(|| status))
    }

    /// Sends `signal` through the pidfd (never to a recycled pid).
    pub fn signal(&self, signal: i32) -> Result<(), ProcessError> {
        // SAFETY: valid pidfd, null siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ESRCH) {
            // Already gone: the goal of any signal we send.
            return Ok(());
        }
        Err(ProcessError::Sys {
            op: "pidfd_send_signal",
            pid: self.pid,
            source,
        })
    }

    /// SIGKILL, then wait (blocking the thread, at most `timeout`) for the
    /// exit. For `Drop` guards and shutdown paths that cannot await.
    pub fn kill_blocking(&self, timeout: Duration) -> Option<ExitStatus> {
        let _ = self.signal(libc::SIGKILL);
        let started = std::time::Instant::now();
        while self.is_running() {
            if started.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for _ in 0..REAP_ATTEMPTS {
            if let Some(status) = self.try_reap() {
                return Some(status);
            }
            std::thread::sleep(REAP_INTERVAL);
        }
        Some(ExitStatus::Unknown)
    }

    /// SIGKILL, then wait for the exit.
    pub async fn kill(&self) -> Result<ExitStatus, ProcessError> {
        self.signal(libc::SIGKILL)?;
        Ok(self.exited().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_counted_from_the_last_paren() {
        let text =
            "4242 (qemu (x) y) Z 17 4240 4240 0 -1 4194560 0 0 0 0 5 6 0 0 20 0 9 0 123456 0 0";
        assert_eq!(parse_start_time(text), Some(123456));
        assert_eq!(parse_start_time("garbage"), None);
        assert_eq!(parse_start_time("1 (short) S 0 1 1"), None);
    }

    #[test]
    fn cmdline_must_carry_the_uuid_after_dash_uuid() {
        let uuid = Uuid::parse_str("5b0c2d4e-8a51-4f3e-9b1c-2a7f4d6e8c10").unwrap();
        let ok = b"qemu-system-x86_64\0-name\0guest=a\0-uuid\x005b0c2d4e-8a51-4f3e-9b1c-2a7f4d6e8c10\0-S\0";
        assert!(cmdline_names_uuid(ok, uuid));
        // Elsewhere on the line (a disk path, a name) does not count.
        let elsewhere = b"qemu\0-name\0guest=5b0c2d4e-8a51-4f3e-9b1c-2a7f4d6e8c10\0";
        assert!(!cmdline_names_uuid(elsewhere, uuid));
        let other = b"qemu\0-uuid\x0000000000-0000-0000-0000-000000000001\0";
        assert!(!cmdline_names_uuid(other, uuid));
        assert!(!cmdline_names_uuid(b"", uuid));
    }

    #[tokio::test]
    async fn adopt_refuses_a_process_that_is_not_the_vm() {
        let uuid = Uuid::new_v4();
        let me = std::process::id() as i32;
        assert!(matches!(
            QemuProcess::adopt(me, uuid, None),
            Err(ProcessError::NotOurs { .. })
        ));
        assert!(matches!(
            QemuProcess::adopt(0, uuid, None),
            Err(ProcessError::Gone { .. })
        ));
    }

    #[tokio::test]
    async fn exit_is_seen_and_reaped_with_its_signal() {
        let uuid = Uuid::new_v4();
        // A stand-in for QEMU whose /proc cmdline keeps `-uuid UUID`.
        // (`sh` blocked in `read` on a pipe: one process, no children.)
        let child = std::process::Command::new("sh")
            .args(["-c", "read line", "-uuid", &uuid.to_string()])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Until exec completes, the cmdline is still the forked test binary's.
        for _ in 0..100 {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline_names_uuid(&cmdline, uuid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = start_time(pid);
        assert!(started.is_some());
        assert!(
            matches!(
                QemuProcess::adopt(pid, uuid, started.map(|t| t + 1)),
                Err(ProcessError::NotOurs { .. })
            ),
            "another start time is another process"
        );
        let process = QemuProcess::adopt(pid, uuid, started).expect("adopts its own VM");
        assert!(process.is_running());
        assert_eq!(process.wait_exit(Duration::from_millis(100)).await, None);
        process.signal(libc::SIGTERM).unwrap();
        assert_eq!(
            process.wait_exit(Duration::from_secs(10)).await,
            Some(ExitStatus::Signal(libc::SIGTERM))
        );
        assert!(!process.is_running());
        // Every later caller learns the same status.
        assert_eq!(process.exited().await, ExitStatus::Signal(libc::SIGTERM));
        // Reaped: no zombie is left under this pid.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        // Signalling a process that is gone is not an error.
        process.signal(libc::SIGKILL).unwrap();
        drop(child);
    }
}
