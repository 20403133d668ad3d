//! The QEMU process: spawn with `-daemonize`, find it by pidfile, prove its
//! identity, watch for its exit through a pidfd, signal it.
//!
//! Identity: a pid alone is never trusted. `/proc/PID/cmdline` must carry
//! `-uuid UUID` for the VM, checked *after* the pidfd is open, so a pid
//! recycled between the check and later signals cannot be hit: signals go
//! through the pidfd, which names one process forever.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use uuid::Uuid;

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
    /// QEMU ran and refused to start; `message` is what it printed.
    #[error("QEMU failed to start: {message}")]
    StartFailed {
        /// QEMU's own error text (stderr).
        message: String,
    },
    /// The pidfile was missing or unreadable after a successful start.
    #[error("reading pidfile {path}")]
    Pidfile {
        /// The pidfile.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
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
/// that are vmlet's children; see [`become_subreaper`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Ended, but not vmlet's child, so the status is unknown.
    Unknown,
}

/// Makes this process the reaper of its orphaned descendants. QEMU's
/// `-daemonize` orphans the real QEMU process; as a subreaper vmlet becomes its
/// parent, so it reaps it (no zombies, even when PID 1 does not reap) and
/// learns its exit status. Call once at start, before spawning QEMU.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// After the pidfd says "exited", how often and how long to wait for the
/// last threads so the process can be reaped (2 s in all).
const REAP_ATTEMPTS: u32 = 400;
const REAP_INTERVAL: Duration = Duration::from_millis(5);

/// How long QEMU's first process may take by default to set the VM up and
/// daemonize (a hung storage path must not leave a start waiting forever).
pub const SPAWN_DEADLINE: Duration = Duration::from_secs(60);

/// A running QEMU, held by pidfd.
#[derive(Debug)]
pub struct QemuProcess {
    pid: i32,
    uuid: Uuid,
    pidfd: AsyncFd<OwnedFd>,
    /// How it ended, once reaped.
    status: std::sync::OnceLock<ExitStatus>,
}

/// Runs QEMU with `argv` (which must include `-daemonize` and `-pidfile
/// pidfile`) and returns the daemonized process. With `-daemonize`, QEMU's
/// first process exits only once the VM is set up (paused by `-S`), and
/// reports failures on its stderr, which becomes [`ProcessError::StartFailed`].
///
/// QEMU gets `deadline` to daemonize; then it is killed and the start fails.
pub async fn spawn(
    binary: &Path,
    argv: &[String],
    pidfile: &Path,
    uuid: Uuid,
    deadline: Duration,
    inherit: &[std::os::fd::RawFd],
) -> Result<QemuProcess, ProcessError> {
    let mut command = tokio::process::Command::new(binary);
    command
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if !inherit.is_empty() {
        let inherit = inherit.to_vec();
        // SAFETY: between fork and exec only async-signal-safe calls run:
        // fcntl clears close-on-exec on the fds QEMU is told about (tap
        // fds), so exactly these cross into QEMU, at the same numbers.
        unsafe {
            command.pre_exec(move || {
                for fd in &inherit {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    let run = command.output();
    let output = match tokio::time::timeout(deadline, run).await {
        Ok(output) => output.map_err(|source| ProcessError::Exec {
            binary: binary.to_path_buf(),
            source,
        })?,
        Err(_) => {
            // The first process was killed when its future was dropped; a
            // daemonized QEMU it may have left behind goes too.
            if let Ok(Ok(orphan)) = read_pidfile(pidfile).map(|pid| QemuProcess::adopt(pid, uuid)) {
                let _ = orphan.kill().await;
            }
            reap_daemonize_leftovers(None).await;
            return Err(ProcessError::StartFailed {
                message: format!("QEMU did not finish starting within {deadline:?}"),
            });
        }
    };
    if !output.status.success() {
        reap_daemonize_leftovers(None).await;
        let mut message = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if message.is_empty() {
            message = format!("exited with {}", output.status);
        }
        return Err(ProcessError::StartFailed { message });
    }
    let pid = read_pidfile(pidfile)?;
    let process = QemuProcess::adopt(pid, uuid)?;
    reap_daemonize_leftovers(Some(pid)).await;
    Ok(process)
}

/// The fields of `/proc/PID/stat` that reaping needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    pid: i32,
    state: char,
    ppid: i32,
    session: i32,
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_proc_stat(pid, &text)
}

/// Parses `/proc/PID/stat`; the command name may hold spaces and `)`, so
/// fields are counted from the last `)`.
fn parse_proc_stat(pid: i32, text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let _pgrp = fields.next()?;
    let session = fields.next()?.parse().ok()?;
    Some(ProcStat {
        pid,
        state,
        ppid,
        session,
    })
}

/// `-daemonize` forks twice: QEMU's first process forks a session leader,
/// which forks the real QEMU and exits at once. With vmlet as subreaper
/// ([`become_subreaper`]) that leader, and after a failed start the failed
/// QEMU too, become vmlet's zombie children. This reaps them: zombie children
/// that lead their own session, and the other processes of those sessions
/// once they are zombies, waiting up to a second for them to get there.
/// `keep`: the VM's QEMU after a good start, which its own [`QemuProcess`]
/// reaps; it is never a session leader itself.
async fn reap_daemonize_leftovers(keep: Option<i32>) {
    let me = std::process::id() as i32;
    let mut sessions: Vec<i32> = keep
        .and_then(proc_stat)
        .map(|s| s.session)
        .into_iter()
        .collect();
    for round in 0..100 {
        let children: Vec<ProcStat> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| Some(*pid) != keep)
            .filter_map(proc_stat)
            .filter(|s| s.ppid == me)
            .collect();
        for child in &children {
            if child.state == 'Z' && child.pid == child.session && !sessions.contains(&child.pid) {
                sessions.push(child.pid);
            }
        }
        let mut left = 0;
        for child in children.iter().filter(|c| sessions.contains(&c.session)) {
            // A multi-threaded process shows `Z` as soon as its main thread
            // is gone, but cannot be reaped until every thread is: then
            // waitpid says "still alive" and it counts as left.
            let reaped = child.state == 'Z'
                && !matches!(
                    nix::sys::wait::waitpid(
                        nix::unistd::Pid::from_raw(child.pid),
                        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                    ),
                    Ok(nix::sys::wait::WaitStatus::StillAlive)
                );
            if !reaped {
                left += 1;
            }
        }
        if !sessions.is_empty() && left == 0 {
            return;
        }
        // No leader turned up: vmlet is not a subreaper (they went to init).
        if sessions.is_empty() && round >= 10 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads a QEMU pidfile.
pub fn read_pidfile(path: &Path) -> Result<i32, ProcessError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProcessError::Pidfile {
        path: path.to_path_buf(),
        source,
    })?;
    text.trim().parse().map_err(|_| ProcessError::Pidfile {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a pid"),
    })
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
    /// Takes hold of the running process `pid` if it is VM `uuid`'s QEMU.
    /// Used after spawn and when reattaching after a daemon restart.
    pub fn adopt(pid: i32, uuid: Uuid) -> Result<QemuProcess, ProcessError> {
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
        // Checked after the pidfd exists: from here on the pidfd pins this
        // exact process, whatever happens to the number.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !cmdline_names_uuid(&cmdline, uuid) {
            return Err(ProcessError::NotOurs { pid, uuid });
        }
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
            pidfd,
            status: std::sync::OnceLock::new(),
        })
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
    fn proc_stat_fields_count_from_the_last_paren() {
        let text = "4242 (qemu (x) y) Z 17 4240 4240 0 -1 4194560 0 0";
        assert_eq!(
            parse_proc_stat(4242, text),
            Some(ProcStat {
                pid: 4242,
                state: 'Z',
                ppid: 17,
                session: 4240
            })
        );
        assert_eq!(parse_proc_stat(1, "garbage"), None);
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
            QemuProcess::adopt(me, uuid),
            Err(ProcessError::NotOurs { .. })
        ));
        assert!(matches!(
            QemuProcess::adopt(0, uuid),
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
        let process = QemuProcess::adopt(pid, uuid).expect("adopts its own VM");
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
