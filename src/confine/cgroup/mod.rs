//! A cgroup per VM, on cgroup v1 and v2 hosts: `OWN/ROOT/UUID` in every
//! hierarchy vmlet uses, where OWN is the cgroup vmlet itself runs in (so
//! on a systemd host with `Delegate=yes` the VMs sit in vmlet's delegated
//! subtree), with the VM's limits written into it, a way for a child
//! process to join it between `fork` and `exec`, and its statistics. An
//! absolute ROOT (`/machines/vmlet`) is taken from the top of each
//! hierarchy instead.
//!
//! cgroup v2 forbids processes in a cgroup whose controllers are enabled
//! for its children ("no internal processes"). When vmlet's own cgroup is
//! not the hierarchy's root, vmlet therefore moves itself into the leaf
//! `OWN/daemon` ([`DAEMON_LEAF`]) before it makes the first VM cgroup; a
//! vmlet already in such a leaf (restarted by an exec) counts its parent as
//! OWN.
//!
//! The hierarchy is read from `/proc/self/mountinfo` ([`Hierarchy::detect`]):
//! a host where any of the controllers vmlet uses (cpu, cpuacct, cpuset,
//! memory, pids, blkio) is bound to a cgroup v1 mount is treated as v1
//! (including systemd's "hybrid" layout, whose cgroup2 mount has no
//! controllers); otherwise the cgroup2 mount is used.
//!
//! Decisions about limits (see [`Limits`]):
//! - Memory: the limit covers memory and swap together, so a VM cannot
//!   grow past it by being swapped out: v2 writes `memory.swap.max` = 0,
//!   v1 writes `memory.memsw.limit_in_bytes` = the memory limit. Hosts
//!   without swap accounting lack those files; that limit is then reported
//!   as not applied ([`Unapplied::Swap`]), not an error.
//! - I/O weight: proportional I/O weights exist only with some I/O
//!   schedulers (`io.weight` needs iocost; BFQ offers `io.bfq.weight` /
//!   `blkio.bfq.weight`; CFQ offered `blkio.weight`). When none exists an
//!   explicitly asked weight is reported as not applied
//!   ([`Unapplied::IoWeight`]), not an error.
//! - cpu, memory and pids are required: a host without one of them is an
//!   error, since a VM would otherwise run with no limit at all.
//!
//! Only cgroups the caller names are ever removed: several daemons may
//! share a root.

mod hierarchy;
mod limits;
mod v1;
mod v2;
mod vm;

pub use hierarchy::{Hierarchy, V1Mount};
pub use limits::{bfq_weight, blkio_weight, Limits, Unapplied};
pub use vm::{CgroupStats, JoinFiles, VmCgroup};

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use uuid::Uuid;

/// The leaf cgroup vmlet moves itself into on cgroup v2 when its own
/// cgroup is not the hierarchy's root, so VM cgroups may be its siblings.
pub const DAEMON_LEAF: &str = "daemon";

/// The CFS period vmlet uses for CPU quotas: 100 ms, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The cgroup v1 controllers a VM's cgroup is created in, when mounted.
const V1_CONTROLLERS: [&str; 6] = ["blkio", "cpu", "cpuacct", "cpuset", "memory", "pids"];
/// The cgroup v2 controllers enabled for VM cgroups, when available.
const V2_CONTROLLERS: [&str; 4] = ["cpu", "io", "memory", "pids"];
/// Controllers without which limits cannot be enforced (both versions).
const REQUIRED_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// Every cgroup v1 controller name the kernel knows; other mount options
/// (`rw`, `name=systemd`, `clone_children`, …) are not controllers.
const KNOWN_V1_CONTROLLERS: [&str; 14] = [
    "blkio",
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "hugetlb",
    "memory",
    "misc",
    "net_cls",
    "net_prio",
    "perf_event",
    "pids",
    "rdma",
];

/// A cgroup operation that failed; names the file or directory concerned.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A value could not be written into a cgroup file.
    #[error("cannot write {value:?} to {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be created.
    #[error("cannot create cgroup directory {}: {source}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be removed (other than for processes in it).
    #[error("cannot remove cgroup directory {}: {source}", path.display())]
    Remove {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A cgroup still has processes (or child cgroups) in it.
    #[error("cgroup {} is in use: it still holds processes or child cgroups", path.display())]
    Busy {
        /// The directory.
        path: PathBuf,
    },
    /// No cgroup hierarchy is mounted.
    #[error("no cgroup hierarchy is mounted (no cgroup or cgroup2 entry in mountinfo)")]
    NoHierarchy,
    /// A line of mountinfo could not be parsed.
    #[error("malformed mountinfo line {line}: {reason}")]
    Mountinfo {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A controller vmlet needs is not available.
    #[error("cgroup controller {controller:?} is not available: {detail}")]
    MissingController {
        /// The controller.
        controller: &'static str,
        /// Where it was looked for.
        detail: String,
    },
    /// The root name given for vmlet's cgroups is not acceptable.
    #[error("invalid cgroup root {root:?}: {reason}")]
    InvalidRoot {
        /// The name given.
        root: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// vmlet's own cgroup could not be placed in a hierarchy.
    #[error("cannot find vmlet's own cgroup: {detail}")]
    OwnCgroup {
        /// What is missing or wrong in `/proc/self/cgroup`.
        detail: String,
    },
    /// A limit is out of its range.
    #[error("invalid cgroup limit {field}: {reason}")]
    InvalidLimit {
        /// The field of [`Limits`].
        field: &'static str,
        /// The accepted range.
        reason: String,
    },
}

impl CgroupError {
    /// The kind of the underlying I/O error, if any (e.g. to tell a host
    /// where cgroups are read-only or need privileges).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            CgroupError::Read { source, .. }
            | CgroupError::Write { source, .. }
            | CgroupError::Create { source, .. }
            | CgroupError::Remove { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

/// The set of cgroups vmlet manages: `OWN/ROOT/UUID` (or `/ROOT/UUID` for
/// an absolute ROOT) in the hierarchy (in every controller vmlet uses on v1).
#[derive(Debug, Clone)]
pub struct Cgroups {
    hierarchy: Hierarchy,
    /// The validated components of ROOT.
    root: Vec<String>,
    /// Where ROOT begins in each hierarchy used (one on v2).
    bases: Vec<Base>,
    /// v2 below a non-root cgroup: the leaf vmlet moves itself into before
    /// it makes the first VM cgroup, and whether it has.
    leaf: Option<(PathBuf, Arc<AtomicBool>)>,
}

/// Where ROOT begins in one hierarchy.
#[derive(Debug, Clone)]
struct Base {
    /// The directory ROOT is made in: vmlet's own cgroup (relative ROOT) or
    /// the mount (absolute ROOT).
    top: PathBuf,
    /// `top` as `/proc/PID/cgroup` names it, without a trailing `/`.
    top_path: String,
    /// v1: the controllers of this hierarchy vmlet uses; v2: empty.
    controllers: Vec<String>,
    /// Where the hierarchy is mounted, and which of its cgroups the mount
    /// shows at that directory (`/` but in a container).
    mount: PathBuf,
    mount_root: String,
}

/// One directory of a VM's cgroup: a v1 hierarchy or the v2 one.
#[derive(Debug, Clone)]
struct Member {
    /// The cgroup ROOT is made in (see [`Base::top`]).
    top: PathBuf,
    /// The directory, e.g. `/sys/fs/cgroup/memory/vmlet/UUID`.
    dir: PathBuf,
    /// v1: the controllers of this hierarchy vmlet uses; v2: empty.
    controllers: Vec<String>,
    /// The cgroup as `/proc/PID/cgroup` names it.
    cgroup_path: String,
}

impl Cgroups {
    /// vmlet's cgroups in `hierarchy` below `root`, plain components
    /// (letters, digits, `-`, `_`, `.`; none starting with `.`) separated
    /// by `/`. A relative root (`vmlet`) is placed below the cgroup this
    /// process runs in (from `/proc/self/cgroup`), an absolute one
    /// (`/machines/vmlet`) below the top of each hierarchy. Fails when cpu,
    /// memory or pids is unavailable.
    pub fn new(hierarchy: Hierarchy, root: &str) -> Result<Cgroups, CgroupError> {
        // The root first: a bad setting is named whatever the host has.
        validate_root(root)?;
        let path = Path::new("/proc/self/cgroup");
        let own = fs::read_to_string(path).map_err(|source| CgroupError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Cgroups::for_process(hierarchy, root, &own)
    }

    /// [`Cgroups::new`] for a process whose `/proc/PID/cgroup` reads
    /// `proc_cgroup` (tests give fake layouts a cgroup of their own).
    pub fn for_process(
        hierarchy: Hierarchy,
        root: &str,
        proc_cgroup: &str,
    ) -> Result<Cgroups, CgroupError> {
        let (absolute, components) = validate_root(root)?;
        let mut leaf = None;
        let bases = match &hierarchy {
            Hierarchy::V1 { mounts } => {
                for wanted in REQUIRED_CONTROLLERS {
                    if !mounts
                        .iter()
                        .any(|m| m.controllers.iter().any(|c| c == wanted))
                    {
                        return Err(CgroupError::MissingController {
                            controller: wanted,
                            detail: "no cgroup v1 mount has it".to_owned(),
                        });
                    }
                }
                let mut bases = Vec::new();
                for m in mounts {
                    let used: Vec<String> = m
                        .controllers
                        .iter()
                        .filter(|c| V1_CONTROLLERS.contains(&c.as_str()))
                        .cloned()
                        .collect();
                    if used.is_empty() {
                        continue;
                    }
                    let own = if absolute {
                        m.root.clone()
                    } else {
                        own_cgroup(proc_cgroup, Some(&m.controllers))?
                    };
                    let (top, top_path) = place(&m.dir, &m.root, &own)?;
                    bases.push(Base {
                        top,
                        top_path,
                        controllers: used,
                        mount: m.dir.clone(),
                        mount_root: m.root.clone(),
                    });
                }
                bases
            }
            Hierarchy::V2 { mount, root } => {
                let mut own = if absolute {
                    root.clone()
                } else {
                    own_cgroup(proc_cgroup, None)?
                };
                if !absolute && own.trim_end_matches('/') != root.trim_end_matches('/') {
                    // Below a cgroup that is not the hierarchy's root, VM
                    // cgroups cannot sit beside vmlet: vmlet moves into a
                    // leaf, or is in one it made before an exec.
                    if let Some((parent, DAEMON_LEAF)) = own.rsplit_once('/') {
                        own = parent.to_owned();
                    }
                    let (top, _) = place(mount, root, &own)?;
                    leaf = Some((top.join(DAEMON_LEAF), Arc::new(AtomicBool::new(false))));
                }
                let (top, top_path) = place(mount, root, &own)?;
                let available = v2::available_controllers(&top)?;
                for wanted in REQUIRED_CONTROLLERS {
                    if !available.contains(wanted) {
                        return Err(CgroupError::MissingController {
                            controller: wanted,
                            detail: format!(
                                "not listed in {}",
                                top.join("cgroup.controllers").display()
                            ),
                        });
                    }
                }
                vec![Base {
                    top,
                    top_path,
                    controllers: Vec::new(),
                    mount: mount.clone(),
                    mount_root: root.clone(),
                }]
            }
        };
        Ok(Cgroups {
            hierarchy,
            root: components,
            bases,
            leaf,
        })
    }

    /// The hierarchy these cgroups live in.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// The ROOT directory in each hierarchy used (one on v2).
    pub fn root_dirs(&self) -> Vec<PathBuf> {
        self.bases
            .iter()
            .map(|base| {
                self.root
                    .iter()
                    .fold(base.top.clone(), |dir, c| dir.join(c))
            })
            .collect()
    }

    /// The leaf vmlet moves itself into on v2 below a non-root cgroup
    /// (`None` when it needs none).
    pub fn daemon_leaf(&self) -> Option<&Path> {
        self.leaf.as_ref().map(|(dir, _)| dir.as_path())
    }

    /// The VMs with a cgroup directory below ROOT in any hierarchy: every
    /// directory whose name is a UUID.
    pub fn vm_cgroups(&self) -> BTreeSet<Uuid> {
        self.root_dirs()
            .iter()
            .filter_map(|dir| fs::read_dir(dir).ok())
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| Uuid::parse_str(e.file_name().to_str()?).ok())
            .collect()
    }

    /// The directories of VM `uuid`'s cgroup.
    fn members(&self, uuid: Uuid) -> Vec<Member> {
        let name = uuid.hyphenated().to_string();
        self.bases
            .iter()
            .map(|base| {
                let mut dir = base.top.clone();
                let mut cgroup_path = base.top_path.clone();
                for component in self.root.iter().chain(std::iter::once(&name)) {
                    dir.push(component);
                    cgroup_path.push('/');
                    cgroup_path.push_str(component);
                }
                Member {
                    top: base.top.clone(),
                    dir,
                    controllers: base.controllers.clone(),
                    cgroup_path,
                }
            })
            .collect()
    }

    /// Creates (or reuses, if it exists and holds no process) the cgroup of
    /// VM `uuid` with `limits`. v1: in every controller used (cpuset gets
    /// `cpuset.cpus`/`cpuset.mems` from its parent at each level, as no task
    /// can join a cpuset without them); v2: vmlet first moves into its leaf
    /// (see [`Cgroups::daemon_leaf`]), then the controllers are enabled in
    /// `cgroup.subtree_control` from vmlet's cgroup (or the mount) down to
    /// ROOT. On failure a VM directory this call made is removed again.
    pub fn create(&self, uuid: Uuid, limits: &Limits) -> Result<VmCgroup, CgroupError> {
        limits.validate()?;
        self.enter_leaf()?;
        let members = self.members(uuid);
        let mut made = Vec::new();
        let result = match &self.hierarchy {
            Hierarchy::V1 { .. } => v1::create(&members, &self.root, limits, &mut made),
            Hierarchy::V2 { .. } => v2::create(&members[0], &self.root, limits, &mut made),
        };
        match result {
            Ok(unapplied) => Ok(self.vm_cgroup(members, unapplied)),
            Err(error) => {
                // Best effort: the error at hand is the one worth reporting.
                for dir in made {
                    let _ = fs::remove_dir(dir);
                }
                Err(error)
            }
        }
    }

    /// Moves this process into its leaf, once (v2 below a non-root cgroup).
    fn enter_leaf(&self) -> Result<(), CgroupError> {
        let Some((leaf, moved)) = &self.leaf else {
            return Ok(());
        };
        if moved.load(Ordering::Acquire) {
            return Ok(());
        }
        make_dir(leaf)?;
        // "0" is the writer: the whole process (every thread) moves.
        write_value(&leaf.join("cgroup.procs"), "0")?;
        moved.store(true, Ordering::Release);
        Ok(())
    }

    fn vm_cgroup(&self, members: Vec<Member>, unapplied: Vec<Unapplied>) -> VmCgroup {
        VmCgroup {
            v2: matches!(self.hierarchy, Hierarchy::V2 { .. }),
            dirs: members.iter().map(|m| m.dir.clone()).collect(),
            members,
            unapplied,
        }
    }

    /// The existing cgroup of `uuid` (after a daemon restart), without
    /// changing it; `None` unless its directory exists in every hierarchy.
    pub fn open(&self, uuid: Uuid) -> Option<VmCgroup> {
        let members = self.members(uuid);
        members
            .iter()
            .all(|m| m.dir.is_dir())
            .then(|| self.vm_cgroup(members, Vec::new()))
    }

    /// The existing cgroup of VM `uuid` that process `pid` is in, wherever
    /// it lies (`/proc/PID/cgroup`): for a QEMU started by a vmlet that had
    /// another ROOT or ran in another cgroup of its own (an upgrade that put
    /// vmlet under a systemd unit). In every hierarchy vmlet uses, the
    /// process's cgroup must be named for the VM (`…/UUID`); `None`
    /// otherwise, or when the process is gone.
    pub fn open_of_process(&self, uuid: Uuid, pid: i32) -> Option<VmCgroup> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        self.open_listed(uuid, &text)
    }

    /// [`Cgroups::open_of_process`] on the text of a `/proc/PID/cgroup`.
    pub(super) fn open_listed(&self, uuid: Uuid, proc_cgroup: &str) -> Option<VmCgroup> {
        let name = format!("/{}", uuid.hyphenated());
        let v2 = matches!(self.hierarchy, Hierarchy::V2 { .. });
        let members = self
            .bases
            .iter()
            .map(|base| {
                let wanted = (!v2).then_some(base.controllers.as_slice());
                let path = listed_path(proc_cgroup, wanted)?;
                if !path.ends_with(&name) {
                    return None;
                }
                let (dir, cgroup_path) = place(&base.mount, &base.mount_root, path).ok()?;
                dir.is_dir().then(|| Member {
                    top: base.top.clone(),
                    dir,
                    controllers: base.controllers.clone(),
                    cgroup_path,
                })
            })
            .collect::<Option<Vec<Member>>>()?;
        Some(self.vm_cgroup(members, Vec::new()))
    }

    /// Removes the cgroup of `uuid` in every hierarchy. A directory already
    /// gone is fine; one still holding a process is [`CgroupError::Busy`].
    /// Every directory is tried; the first error is returned.
    pub fn remove(&self, uuid: Uuid) -> Result<(), CgroupError> {
        let mut first = None;
        for member in self.members(uuid) {
            if let Err(error) = remove_dir(&member.dir) {
                first.get_or_insert(error);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// The path of one hierarchy's line in the text of a `/proc/PID/cgroup`
/// (`ID:CONTROLLERS:PATH` lines): the v1 line naming one of `controllers`,
/// or (`None`) the v2 line `0::PATH`.
fn listed_path<'a>(proc_cgroup: &'a str, controllers: Option<&[String]>) -> Option<&'a str> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let id = parts.next()?;
        let listed = parts.next()?;
        let path = parts.next()?;
        let matches = match controllers {
            None => id == "0" && listed.is_empty(),
            Some(wanted) => listed.split(',').any(|c| wanted.iter().any(|w| w == c)),
        };
        matches.then_some(path)
    })
}

/// The cgroup of this process in one hierarchy, from the text of
/// `/proc/self/cgroup` (`ID:CONTROLLERS:PATH` lines): the v1 line naming
/// one of `controllers`, or (`None`) the v2 line `0::PATH`.
fn own_cgroup(proc_cgroup: &str, controllers: Option<&[String]>) -> Result<String, CgroupError> {
    let found = listed_path(proc_cgroup, controllers);
    match found {
        Some(path) if path.starts_with('/') => Ok(path.to_owned()),
        Some(path) => Err(CgroupError::OwnCgroup {
            detail: format!("/proc/self/cgroup names {path:?}, not an absolute path"),
        }),
        None => Err(CgroupError::OwnCgroup {
            detail: match controllers {
                None => "/proc/self/cgroup has no cgroup v2 line (0::PATH)".to_owned(),
                Some(c) => format!("/proc/self/cgroup has no line for {}", c.join(",")),
            },
        }),
    }
}

/// The directory of cgroup `path` (as `/proc` names it) in a hierarchy
/// mounted at `mount` that shows cgroup `mount_root`, and its name without
/// a trailing `/`. A cgroup outside what the mount shows is an error.
fn place(mount: &Path, mount_root: &str, path: &str) -> Result<(PathBuf, String), CgroupError> {
    let shown = mount_root.trim_end_matches('/');
    let rest = path
        .strip_prefix(shown)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        .ok_or_else(|| CgroupError::OwnCgroup {
            detail: format!(
                "cgroup {path} is outside {mount_root}, the part of the hierarchy mounted at {}",
                mount.display()
            ),
        })?;
    let mut dir = mount.to_path_buf();
    for component in rest.split('/').filter(|c| !c.is_empty()) {
        if component == ".." || component == "." {
            return Err(CgroupError::OwnCgroup {
                detail: format!("cgroup {path} has a {component:?} component"),
            });
        }
        dir.push(component);
    }
    Ok((dir, path.trim_end_matches('/').to_owned()))
}

/// Removes one cgroup directory: missing is fine, EBUSY (processes or
/// children) is [`CgroupError::Busy`].
fn remove_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(CgroupError::Busy {
            path: dir.to_path_buf(),
        }),
        Err(source) => Err(CgroupError::Remove {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Checks ROOT: whether it is absolute, and its components.
fn validate_root(root: &str) -> Result<(bool, Vec<String>), CgroupError> {
    let refuse = |reason| CgroupError::InvalidRoot {
        root: root.to_owned(),
        reason,
    };
    if root.is_empty() {
        return Err(refuse("it is empty"));
    }
    if root.len() > 1024 {
        return Err(refuse("it is longer than 1024 bytes"));
    }
    let (absolute, relative) = match root.strip_prefix('/') {
        Some(rest) => (true, rest),
        None => (false, root),
    };
    if relative.is_empty() {
        return Err(refuse(
            "it names the top of the hierarchy (\"/\"); give a cgroup below it",
        ));
    }
    let components = relative
        .split('/')
        .map(|component| {
            if component.is_empty() {
                Err(refuse(
                    "it has an empty component (\"//\" or a trailing \"/\")",
                ))
            } else if component.starts_with('.') {
                Err(refuse(
                    "a component starts with \".\" (\".\", \"..\" and hidden names are refused)",
                ))
            } else if component.len() > 255 {
                Err(refuse("a component is longer than 255 bytes"))
            } else if !component
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                Err(refuse(
                    "a component has a character other than letters, digits, \"-\", \"_\", \".\"",
                ))
            } else {
                Ok(component.to_owned())
            }
        })
        .collect::<Result<_, _>>()?;
    Ok((absolute, components))
}

/// Writes `value` into the existing cgroup file `path` (never creating it).
fn write_value(path: &Path, value: &str) -> Result<(), CgroupError> {
    use std::io::Write;
    // O_TRUNC as a shell's `>` does: no effect on the cgroupfs, and a
    // plain file (a fake layout) then holds exactly the value.
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut file| file.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            path: path.to_path_buf(),
            value: value.to_owned(),
            source,
        })
}

/// Reads a cgroup file.
fn read_value(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Makes directory `dir` unless it exists; true when it was made.
fn make_dir(dir: &Path) -> Result<bool, CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
        Err(source) => Err(CgroupError::Create {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Fails with [`CgroupError::Busy`] when an existing cgroup holds a process.
fn ensure_empty(dir: &Path) -> Result<(), CgroupError> {
    if read_value(&dir.join("cgroup.procs"))?.trim().is_empty() {
        Ok(())
    } else {
        Err(CgroupError::Busy {
            path: dir.to_path_buf(),
        })
    }
}

/// A number from a one-number file; `None` when missing or not a number.
fn read_number(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file such as `cpu.stat`.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Space-separated words of a file such as `cgroup.controllers`.
fn words(text: &str) -> BTreeSet<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

#[cfg(test)]
use hierarchy::unescape;
#[cfg(test)]
mod tests;
