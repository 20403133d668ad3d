//! The jail: a private mount namespace whose root (`pivot_root`) is a
//! per-VM directory holding only what QEMU needs.
//!
//! Inside the jail the process sees:
//! - `/usr` read-only (the QEMU binary, its libraries, ROMs), and `bin`,
//!   `sbin`, `lib`, `lib32`, `lib64`, `libx32` as on the host: the same
//!   symlinks on a merged-`/usr` host, read-only binds where the host has
//!   real directories;
//! - `/dev/null`, `/dev/zero`, `/dev/urandom`, `/dev/random`, and
//!   `/dev/kvm` when asked for: binds of the host's device nodes (taps and
//!   the other files QEMU uses come as file descriptors, so nothing else);
//! - `/proc`: a proc mount with `hidepid=invisible,subset=pid`, so the
//!   process sees its own `/proc/self/fd/N` (how vmlet names the files it
//!   passes as descriptors) but no process of another uid and none of
//!   `/proc/sys`, `/proc/sysrq-trigger` and the like. A kernel that refuses
//!   these options (`EINVAL`, before Linux 5.8) gets a plain proc mount:
//!   the jail still works, with other processes visible;
//! - `/run` and `/tmp`: directories of the jail owned by the VM's uid:gid,
//!   mode 0700, writable (QEMU binds its VNC socket in `/run`; vmlet reaches
//!   it through [`PreparedJail::host_path`]);
//! - the caller's extra read-only binds (firmware files, say).
//!
//! Everything else is read-only: the jail's root itself is remounted
//! read-only at the end. Every mount is `nosuid`; all but the device binds
//! are `nodev`; all but `/usr` (and the host's lib/bin directories) are
//! `noexec`.
//!
//! The work is split in two: [`prepare`] runs in the parent (as root, before
//! `fork`) and does everything that allocates or may fail for reasons worth
//! a message; [`PreparedJail::enter_in_child`] runs in the child between
//! `fork` and `exec` and only makes system calls over strings prepared in
//! advance. The mounts exist only in the child's namespace: when the process
//! is gone, [`remove`] deletes the directory like any other.
//!
//! A leaf: it imports nothing from the rest of vmlet.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Paths inside the jail that the jail itself provides; extra binds may not
/// be placed on or under them.
pub const RESERVED: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/dev", "/proc", "/run", "/tmp",
];

/// The top-level host entries that merged-`/usr` hosts make symlinks into
/// `/usr` and older hosts keep as directories.
const HOST_TOP: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// The device nodes every jail holds.
const DEVICES: [&str; 4] = ["null", "zero", "urandom", "random"];

/// The proc mount options; see the module doc for the fallback.
const PROC_OPTIONS: &CStr = c"hidepid=invisible,subset=pid";

/// `remove` gives up below this many directory levels: each level holds a
/// file descriptor, and a jail has no business being this deep.
const MAX_DEPTH: usize = 256;

/// What a jail holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    /// The jail's directory on the host (e.g. `RUN_DIR/vms/UUID/root`);
    /// [`prepare`] creates it, replacing a stale one.
    pub root: PathBuf,
    /// The uid that owns `/run` and `/tmp` of the jail (the VM's QEMU).
    pub uid: u32,
    /// The gid that owns `/run` and `/tmp` of the jail.
    pub gid: u32,
    /// Whether `/dev/kvm` is bound into the jail.
    pub kvm: bool,
    /// Extra read-only binds: (absolute host path, absolute path inside the
    /// jail), each a regular file or a directory.
    pub extra_ro: Vec<(PathBuf, PathBuf)>,
    /// An executable bound read-only (and, unlike the extra binds, not
    /// `noexec`) at [`JAIL_BINARY`]: a QEMU binary that lives outside `/usr`.
    pub binary: Option<PathBuf>,
}

/// Where [`JailSpec::binary`] appears inside the jail.
pub const JAIL_BINARY: &str = "/opt/qemu/qemu-system";

/// Why a jail could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The jail root is not a usable path.
    #[error("jail root {path}: {reason}")]
    InvalidRoot {
        /// The root given.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An extra bind's target (the path inside the jail) is not allowed.
    #[error("extra_ro[{index}] target {path}: {reason}")]
    InvalidTarget {
        /// Position in [`JailSpec::extra_ro`].
        index: usize,
        /// The target given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An extra bind's source (the host path) is not usable.
    #[error("extra_ro[{index}] source {path}: {reason}")]
    InvalidSource {
        /// Position in [`JailSpec::extra_ro`].
        index: usize,
        /// The source given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A host path the jail needs (`/usr`, a device node) is missing or of
    /// the wrong kind.
    #[error("host path {path}: {reason}")]
    Host {
        /// The host path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file operation while building the jail directory failed.
    #[error("{what} {path}")]
    Io {
        /// The operation ("creating", "removing the stale jail", ...).
        what: &'static str,
        /// The path it was on.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// One system call of [`PreparedJail::enter_in_child`], with its arguments
/// prepared so that the child allocates nothing.
#[derive(Debug)]
enum Step {
    /// `unshare(CLONE_NEWNS)`.
    Unshare,
    /// `mount(NULL, "/", NULL, MS_REC|MS_PRIVATE)`: nothing the child mounts
    /// propagates to the host, nor the other way.
    MakePrivate,
    /// `mount(source, target, NULL, MS_BIND)` (not recursive: mounts below
    /// the source stay out of the jail).
    Bind { source: CString, target: CString },
    /// `mount(NULL, target, NULL, MS_REMOUNT|MS_BIND|flags)`: a bind takes
    /// its flags only from a remount.
    Remount {
        target: CString,
        flags: libc::c_ulong,
    },
    /// A proc mount with [`PROC_OPTIONS`], plain on `EINVAL`.
    Proc { target: CString },
    /// `chdir(path)`.
    Chdir { path: CString },
    /// `pivot_root(".", ".")`: the old root ends up stacked on the new one.
    PivotRoot,
    /// `umount2(".", MNT_DETACH)`: drops the old root stacked by
    /// [`Step::PivotRoot`], so no directory for it is needed.
    DetachOldRoot,
}

impl Step {
    fn describe(&self) -> String {
        let show = |c: &CString| String::from_utf8_lossy(c.as_bytes()).into_owned();
        match self {
            Step::Unshare => "unshare(CLONE_NEWNS)".to_string(),
            Step::MakePrivate => "making / private (MS_REC|MS_PRIVATE)".to_string(),
            Step::Bind { source, target } => {
                format!("bind-mounting {} on {}", show(source), show(target))
            }
            Step::Remount { target, flags } => {
                format!("remounting {} (flags {flags:#x})", show(target))
            }
            Step::Proc { target } => format!("mounting proc on {}", show(target)),
            Step::Chdir { path } => format!("chdir {}", show(path)),
            Step::PivotRoot => "pivot_root(\".\", \".\")".to_string(),
            Step::DetachOldRoot => "detaching the old root (umount2 MNT_DETACH)".to_string(),
        }
    }

    /// Runs the step. Async-signal-safe: system calls only, no allocation.
    ///
    /// # Safety
    /// As for [`PreparedJail::enter_in_child`].
    unsafe fn run(&self) -> Result<(), i32> {
        let rc = match self {
            Step::Unshare => libc::unshare(libc::CLONE_NEWNS),
            Step::MakePrivate => libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            Step::Bind { source, target } => libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ),
            Step::Remount { target, flags } => libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | flags,
                std::ptr::null(),
            ),
            Step::Proc { target } => {
                let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                let mount = |data: *const libc::c_void| {
                    libc::mount(
                        c"proc".as_ptr(),
                        target.as_ptr(),
                        c"proc".as_ptr(),
                        flags,
                        data,
                    )
                };
                let rc = mount(PROC_OPTIONS.as_ptr().cast());
                if rc != 0 && errno() == libc::EINVAL {
                    // A kernel without per-mount proc options (before 5.8).
                    mount(std::ptr::null())
                } else {
                    rc
                }
            }
            Step::Chdir { path } => libc::chdir(path.as_ptr()),
            Step::PivotRoot => {
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int
            }
            Step::DetachOldRoot => libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(errno())
        }
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A jail directory built by [`prepare`], ready for a child to enter.
#[derive(Debug)]
pub struct PreparedJail {
    root: PathBuf,
    steps: Vec<Step>,
}

/// Which step of [`PreparedJail::enter`] failed, and its errno. `Copy` and
/// allocation-free, so a child can report it (e.g. write it to a pipe)
/// before it exits; [`PreparedJail::describe`] turns it into words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnterError {
    /// The index of the failed step.
    pub step: usize,
    /// The errno it failed with.
    pub errno: i32,
}

impl PreparedJail {
    /// The jail's directory on the host.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host path of `inside`, a path inside the jail (e.g.
    /// `/run/vnc.sock` → `ROOT/run/vnc.sock`), so vmlet can reach sockets
    /// QEMU binds there. `..` stops at the jail's root, as it does inside;
    /// symlinks are not resolved (the writable parts hold none of vmlet's).
    pub fn host_path(&self, inside: &Path) -> PathBuf {
        host_path(&self.root, inside)
    }

    /// Enters the jail; for `std::os::unix::process::CommandExt::pre_exec`.
    /// The errno of the failed step is kept; [`PreparedJail::enter`] says
    /// which step it was.
    ///
    /// # Safety
    /// Call only in a single-threaded child between `fork` and `exec`, as
    /// root (`CAP_SYS_ADMIN`): it changes the process's mount namespace and
    /// root. It is async-signal-safe: system calls over strings prepared by
    /// [`prepare`], no allocation.
    pub unsafe fn enter_in_child(&self) -> io::Result<()> {
        self.enter()
            .map_err(|e| io::Error::from_raw_os_error(e.errno))
    }

    /// [`PreparedJail::enter_in_child`] telling which step failed.
    ///
    /// # Safety
    /// As for [`PreparedJail::enter_in_child`].
    pub unsafe fn enter(&self) -> Result<(), EnterError> {
        for (step, s) in self.steps.iter().enumerate() {
            s.run().map_err(|errno| EnterError { step, errno })?;
        }
        Ok(())
    }

    /// Words for `err` (in the parent, after the child reported it).
    pub fn describe(&self, err: EnterError) -> String {
        let what = self
            .steps
            .get(err.step)
            .map(Step::describe)
            .unwrap_or_else(|| format!("step {}", err.step));
        format!(
            "entering the jail {}: {what}: {}",
            self.root.display(),
            io::Error::from_raw_os_error(err.errno)
        )
    }
}

/// The host path of `inside` under `root`: `..` stops at `root`.
fn host_path(root: &Path, inside: &Path) -> PathBuf {
    let mut rel = PathBuf::new();
    for c in inside.components() {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::ParentDir => {
                rel.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    root.join(rel)
}

/// A checked extra bind target: its path relative to the jail root.
fn check_target(index: usize, target: &Path) -> Result<PathBuf, JailError> {
    let bad = |reason: &str| JailError::InvalidTarget {
        index,
        path: target.to_path_buf(),
        reason: reason.to_string(),
    };
    if !target.is_absolute() {
        return Err(bad("must be an absolute path"));
    }
    if target.as_os_str().as_bytes().contains(&0) {
        return Err(bad("contains a NUL byte"));
    }
    let mut rel = PathBuf::new();
    for c in target.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => rel.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(bad("must not contain \"..\""));
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(bad("must not be the jail's root"));
    }
    let absolute = Path::new("/").join(&rel);
    if let Some(r) = RESERVED.iter().find(|r| absolute.starts_with(r)) {
        return Err(bad(&format!(
            "{r} is provided by the jail itself (reserved: {})",
            RESERVED.join(", ")
        )));
    }
    Ok(rel)
}

/// Checks every extra bind: targets valid, no two on or under one another;
/// sources absolute, existing, regular files or directories. Returns
/// (canonical source, relative target, is a directory).
fn check_extras(extras: &[(PathBuf, PathBuf)]) -> Result<Vec<(PathBuf, PathBuf, bool)>, JailError> {
    let mut out: Vec<(PathBuf, PathBuf, bool)> = Vec::with_capacity(extras.len());
    for (index, (source, target)) in extras.iter().enumerate() {
        let rel = check_target(index, target)?;
        // `out` holds one entry per earlier extra, so positions match.
        if let Some(other) = out
            .iter()
            .position(|(_, t, _)| rel.starts_with(t) || t.starts_with(&rel))
        {
            return Err(JailError::InvalidTarget {
                index,
                path: target.clone(),
                reason: format!(
                    "is on or under extra_ro[{other}] target {}, or the other way",
                    extras[other].1.display()
                ),
            });
        }
        let bad = |reason: String| JailError::InvalidSource {
            index,
            path: source.clone(),
            reason,
        };
        if !source.is_absolute() {
            return Err(bad("must be an absolute path".into()));
        }
        let canonical = std::fs::canonicalize(source).map_err(|e| bad(e.to_string()))?;
        let meta = std::fs::metadata(&canonical).map_err(|e| bad(e.to_string()))?;
        let is_dir = if meta.is_dir() {
            true
        } else if meta.is_file() {
            false
        } else {
            return Err(bad("is neither a regular file nor a directory".into()));
        };
        out.push((canonical, rel, is_dir));
    }
    Ok(out)
}

/// A top-level host entry as the jail reproduces it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TopEntry {
    /// A symlink with this target (merged `/usr`).
    Symlink(PathBuf),
    /// A real directory: bound read-only.
    Dir,
}

/// How `host_root` (the host's `/`) holds [`HOST_TOP`]; absent ones are
/// left out.
fn host_layout(host_root: &Path) -> Result<Vec<(&'static str, TopEntry)>, JailError> {
    let mut out = Vec::new();
    for name in HOST_TOP {
        let path = host_root.join(name);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(JailError::Io {
                    what: "inspecting",
                    path,
                    source: e,
                })
            }
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).map_err(|e| JailError::Io {
                what: "reading the symlink",
                path: path.clone(),
                source: e,
            })?;
            out.push((name, TopEntry::Symlink(target)));
        } else if meta.is_dir() {
            out.push((name, TopEntry::Dir));
        } else {
            return Err(JailError::Host {
                path,
                reason: "is neither a symlink nor a directory".into(),
            });
        }
    }
    Ok(out)
}

fn cstring(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::InvalidRoot {
        path: path.to_path_buf(),
        reason: "contains a NUL byte",
    })
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JailError + 'a {
    move |source| JailError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the directory `path` (parents must exist) with `mode`, whatever
/// the umask.
fn make_dir(path: &Path, mode: u32) -> Result<(), JailError> {
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(io_err("creating", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("setting the mode of", path))
}

/// Creates the directory `path` and its missing parents inside the jail
/// (all mode 0755).
fn make_dirs(path: &Path) -> Result<(), JailError> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        make_dirs(parent)?;
    }
    make_dir(path, 0o755)
}

/// An empty regular file as the mount point of a file bind.
fn make_file(path: &Path) -> Result<(), JailError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map(drop)
        .map_err(io_err("creating", path))
}

/// Parent side, as root, before `fork`: builds the jail directory (removing
/// a stale one first; the caller guarantees no process of this VM runs),
/// its empty mount points and symlinks, gives `/run` and `/tmp` to the VM's
/// uid:gid, and prepares everything the child needs.
pub fn prepare(spec: &JailSpec) -> Result<PreparedJail, JailError> {
    let root = &spec.root;
    let bad_root = |reason| JailError::InvalidRoot {
        path: root.clone(),
        reason,
    };
    if !root.is_absolute() {
        return Err(bad_root("must be an absolute path"));
    }
    if root.components().any(|c| c == Component::ParentDir) {
        return Err(bad_root("must not contain \"..\""));
    }
    if root.parent().is_none() {
        return Err(bad_root("must not be /"));
    }
    let root_c = cstring(root)?;
    let extras = check_extras(&spec.extra_ro)?;
    let binary = match &spec.binary {
        None => None,
        Some(path) => {
            let real = std::fs::canonicalize(path).map_err(|e| JailError::Host {
                path: path.clone(),
                reason: format!("the QEMU binary cannot be resolved: {e}"),
            })?;
            if !real.is_file() {
                return Err(JailError::Host {
                    path: path.clone(),
                    reason: "the QEMU binary is not a regular file".into(),
                });
            }
            Some(real)
        }
    };
    let layout = host_layout(Path::new("/"))?;
    let usr = Path::new("/usr");
    if !usr.is_dir() {
        return Err(JailError::Host {
            path: usr.to_path_buf(),
            reason: "is not a directory".into(),
        });
    }
    let mut devices: Vec<&str> = DEVICES.to_vec();
    if spec.kvm {
        devices.push("kvm");
    }
    for d in &devices {
        let path = Path::new("/dev").join(d);
        match std::fs::metadata(&path) {
            Ok(m) if m.file_type().is_char_device() => {}
            Ok(_) => {
                return Err(JailError::Host {
                    path,
                    reason: "is not a character device".into(),
                })
            }
            Err(e) => {
                return Err(JailError::Host {
                    path,
                    reason: e.to_string(),
                })
            }
        }
    }

    match std::fs::symlink_metadata(root) {
        Ok(_) => remove(root).map_err(io_err("removing the stale jail", root))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspecting", root)(e)),
    }
    if let Some(parent) = root.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    }
    make_dir(root, 0o755)?;

    // Read-only binds mark their mount points; nodev everywhere but /dev.
    const RO: libc::c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    let mut steps = vec![
        Step::Unshare,
        Step::MakePrivate,
        // pivot_root needs the new root to be a mount point.
        Step::Bind {
            source: root_c.clone(),
            target: root_c.clone(),
        },
    ];
    let mut bind = |source: &Path, inside: &Path, flags: libc::c_ulong| -> Result<(), JailError> {
        let target = cstring(&root.join(inside))?;
        steps.push(Step::Bind {
            source: cstring(source)?,
            target: target.clone(),
        });
        steps.push(Step::Remount { target, flags });
        Ok(())
    };

    make_dir(&root.join("usr"), 0o755)?;
    bind(usr, Path::new("usr"), RO)?;
    for (name, entry) in &layout {
        let path = root.join(name);
        match entry {
            TopEntry::Symlink(target) => {
                std::os::unix::fs::symlink(target, &path).map_err(io_err("creating", &path))?
            }
            TopEntry::Dir => {
                make_dir(&path, 0o755)?;
                bind(&Path::new("/").join(name), Path::new(name), RO)?;
            }
        }
    }

    make_dir(&root.join("dev"), 0o755)?;
    for d in &devices {
        let inside = Path::new("dev").join(d);
        make_file(&root.join(&inside))?;
        // Device nodes work on a read-only mount; noexec as nothing runs there.
        bind(
            &Path::new("/dev").join(d),
            &inside,
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        )?;
    }

    for (source, rel, is_dir) in &extras {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            make_dirs(parent)?;
        }
        if *is_dir {
            make_dir(&path, 0o755)?;
        } else {
            make_file(&path)?;
        }
        // Firmware and the like are data: noexec.
        bind(source, rel, RO | libc::MS_NOEXEC)?;
    }
    if let Some(source) = &binary {
        let rel = Path::new(JAIL_BINARY.trim_start_matches('/'));
        make_dirs(root.join(rel).parent().unwrap_or(root))?;
        make_file(&root.join(rel))?;
        bind(source, rel, RO)?;
    }

    for name in ["run", "tmp"] {
        let path = root.join(name);
        make_dir(&path, 0o700)?;
        std::os::unix::fs::chown(&path, Some(spec.uid), Some(spec.gid))
            .map_err(io_err("changing the owner of", &path))?;
        // A bind onto itself keeps it writable when the root goes read-only.
        bind(
            &path,
            Path::new(name),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        )?;
    }

    let proc_dir = root.join("proc");
    make_dir(&proc_dir, 0o555)?;
    steps.push(Step::Proc {
        target: cstring(&proc_dir)?,
    });
    steps.push(Step::Chdir { path: root_c });
    steps.push(Step::PivotRoot);
    steps.push(Step::DetachOldRoot);
    steps.push(Step::Chdir {
        path: c"/".to_owned(),
    });
    steps.push(Step::Remount {
        target: c"/".to_owned(),
        flags: RO | libc::MS_NOEXEC,
    });
    Ok(PreparedJail {
        root: root.clone(),
        steps,
    })
}

mod remove;
pub use remove::remove;

#[cfg(test)]
mod tests;
