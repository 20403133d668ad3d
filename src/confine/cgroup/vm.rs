//! The cgroup of one VM: a child joining it between `fork` and `exec`,
//! membership of a process, and its statistics.

use super::*;

/// The cgroup of one VM: a directory per v1 hierarchy, or one on v2.
#[derive(Debug, Clone)]
pub struct VmCgroup {
    pub(super) v2: bool,
    pub(super) members: Vec<Member>,
    pub(super) dirs: Vec<PathBuf>,
    pub(super) unapplied: Vec<Unapplied>,
}

/// Statistics of a VM's cgroup; a field is `None` when the host does not
/// offer it (no such controller or file), or (memory max) when unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// CPU time used, in nanoseconds.
    pub cpu_usage_ns: Option<u64>,
    /// CFS periods elapsed while a quota was set.
    pub cpu_periods: Option<u64>,
    /// Periods in which the cgroup was throttled.
    pub cpu_throttled_periods: Option<u64>,
    /// Time spent throttled, in nanoseconds.
    pub cpu_throttled_ns: Option<u64>,
    /// Memory in use, in bytes.
    pub memory_current_bytes: Option<u64>,
    /// Memory limit, in bytes.
    pub memory_max_bytes: Option<u64>,
    /// Number of tasks.
    pub pids_current: Option<u64>,
}

impl VmCgroup {
    /// The file of each of this VM's cgroup directories through which a
    /// process moves itself in, opened write-only and close-on-exec, for a
    /// child process to join with [`JoinFiles::join_in_child`] between
    /// `fork` and `exec`.
    ///
    /// On v1 that is `tasks`, not `cgroup.procs`: the child of a `fork` is
    /// single-threaded, so moving its one thread moves the whole process,
    /// and the kernel moves a thread that names itself (`0`) without the
    /// host-wide threadgroup lock. `cgroup.procs` takes that lock, and
    /// taking it after a quiet spell waits for an RCU grace period:
    /// measured at about 5 ms on each start here. On v2 a thread cannot
    /// move alone into another domain cgroup (`cgroup.threads` refuses),
    /// so it is `cgroup.procs` there.
    pub fn open_join(&self) -> Result<JoinFiles, CgroupError> {
        let file = if self.v2 { "cgroup.procs" } else { "tasks" };
        let fds = self
            .dirs
            .iter()
            .map(|dir| {
                let path = dir.join(file);
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|source| CgroupError::Write {
                        path,
                        value: "0".to_owned(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(JoinFiles { fds })
    }

    /// Removes this cgroup's directories (see [`Cgroups::remove`]): every
    /// one is tried; the first error is returned.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut first = None;
        for dir in &self.dirs {
            if let Err(error) = remove_dir(dir) {
                first.get_or_insert(error);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The cgroup's directories, for display and tests.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Limits [`Cgroups::create`] could not apply on this host (empty for
    /// a cgroup from [`Cgroups::open`]); the caller reports them.
    pub fn unapplied(&self) -> &[Unapplied] {
        &self.unapplied
    }

    /// Statistics; files missing on this host leave their fields `None`.
    pub fn stats(&self) -> CgroupStats {
        if self.v2 {
            v2::stats(&self.dirs[0])
        } else {
            v1::stats(|controller| {
                self.members
                    .iter()
                    .find(|m| m.controllers.iter().any(|c| c == controller))
                    .map(|m| m.dir.as_path())
            })
        }
    }

    /// True when process `pid` is in this cgroup in every hierarchy, per
    /// `/proc/PID/cgroup`; false when the process does not exist.
    pub fn contains(&self, pid: i32) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/cgroup")) {
            Ok(text) => self.listed_in(&text),
            Err(_) => false,
        }
    }

    /// [`VmCgroup::contains`] on the text of a `/proc/PID/cgroup` file.
    pub(super) fn listed_in(&self, proc_cgroup: &str) -> bool {
        // Lines are "ID:CONTROLLERS:PATH"; v2's is "0::PATH".
        let lines: Vec<(&str, &str)> = proc_cgroup
            .lines()
            .filter_map(|line| {
                let mut parts = line.splitn(3, ':');
                let _id = parts.next()?;
                Some((parts.next()?, parts.next()?))
            })
            .collect();
        self.members.iter().all(|member| {
            lines.iter().any(|(controllers, path)| {
                let hierarchy_matches = if self.v2 {
                    controllers.is_empty()
                } else {
                    controllers
                        .split(',')
                        .any(|c| member.controllers.iter().any(|m| m == c))
                };
                hierarchy_matches && *path == member.cgroup_path
            })
        })
    }
}

/// The open join files of a VM's cgroup (see [`VmCgroup::open_join`]),
/// for a child to join it.
#[derive(Debug)]
pub struct JoinFiles {
    fds: Vec<OwnedFd>,
}

impl JoinFiles {
    /// Moves the calling process into the cgroup by writing `0` (meaning
    /// "the writer") into each file; on v1 it must be single-threaded (a
    /// child between `fork` and `exec` is). Async-signal-safe: only `write(2)`, no
    /// allocation, so it may run in a `pre_exec` hook between `fork` and
    /// `exec`. Stops at the first failing write.
    pub fn join_in_child(&self) -> io::Result<()> {
        for fd in &self.fds {
            // SAFETY: a valid open fd and a 1-byte static buffer.
            let written = unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if written != 1 {
                // From errno: no allocation.
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
