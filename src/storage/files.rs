//! Opening the files QEMU reads and writes. vmlet opens every disk, kernel
//! and initrd itself and hands QEMU the file descriptor, so QEMU never
//! resolves a host path:
//!
//! - host files named by a spec (`disks[].path`, `boot.kernel`,
//!   `boot.initrd`) are opened with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` below one of the allowed
//!   host directories, at every start, so a symlink swapped in after the VM
//!   was created (or any `..`) cannot lead outside;
//! - vmlet's own files (overlays, volumes, images, the seed) are opened
//!   with `O_NOFOLLOW`: their paths come from validated names and UUIDs.
//!
//! A qcow2 host file is opened only when its header names neither a backing
//! file nor an external data file: QEMU is told its backing chain
//! explicitly, but it has no way to refuse a data file the header names.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Why a file could not be opened for a VM.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The path is not below any allowed host directory.
    #[error(
        "{path} is outside the directories VMs may use ({roots}); \
         `allowed_host_paths` in the daemon's settings (VMLET_ALLOWED_HOST_PATHS) lists them"
    )]
    Outside {
        /// The path asked for.
        path: PathBuf,
        /// The allowed directories.
        roots: String,
    },
    /// Opening failed (`ELOOP`/`EXDEV`: a symlink or an escape on the way).
    #[error("{path}: {reason}")]
    Open {
        /// The path asked for.
        path: PathBuf,
        /// What went wrong, in words.
        reason: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file.
    #[error("{path} is not a regular file")]
    NotRegular {
        /// The path.
        path: PathBuf,
    },
    /// The qcow2 header is refused (a backing file or an external data file).
    #[error("{path}: {reason}")]
    Header {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenMode {
    /// Read and write (else read only).
    pub write: bool,
    /// `O_DIRECT` (QEMU matches fd-set members on it for `cache.direct`).
    pub direct: bool,
}

impl OpenMode {
    /// Read only, through the page cache.
    pub const READ: OpenMode = OpenMode {
        write: false,
        direct: false,
    };

    fn flags(self) -> libc::c_int {
        let mut flags = libc::O_CLOEXEC | libc::O_NOCTTY;
        flags |= if self.write {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        if self.direct {
            flags |= libc::O_DIRECT;
        }
        flags
    }
}

/// Opens `path` for a VM, which must lie below one of `roots` (absolute,
/// canonical directories) with no symlink, `..` escape or magic link on
/// the way. `/proc`, `/sys` and `/dev` paths are refused outright.
pub fn open_beneath(roots: &[PathBuf], path: &Path, mode: OpenMode) -> Result<OwnedFd, OpenError> {
    let outside = || OpenError::Outside {
        path: path.to_path_buf(),
        roots: roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    if is_pseudo_fs(path) {
        return Err(outside());
    }
    let (root, rest) = roots
        .iter()
        .filter(|root| !is_pseudo_fs(root))
        .find_map(|root| {
            path.strip_prefix(root)
                .ok()
                .filter(|rest| !rest.as_os_str().is_empty())
                .map(|rest| (root, rest))
        })
        .ok_or_else(outside)?;
    if rest
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(outside());
    }
    let open_err = |source: std::io::Error| {
        let reason = match source.raw_os_error() {
            Some(libc::ELOOP) => {
                "a symlink on the way (host files are opened without following symlinks)"
                    .to_string()
            }
            Some(libc::EXDEV) => "leads outside the directory VMs may use".to_string(),
            _ => source.to_string(),
        };
        OpenError::Open {
            path: path.to_path_buf(),
            reason,
            source,
        }
    };
    let dir =
        open_plain(root, libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC).map_err(open_err)?;
    let fd = openat2(
        &dir,
        rest,
        mode.flags(),
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    )
    .map_err(open_err)?;
    ensure_regular(&fd, path)?;
    Ok(fd)
}

/// Opens one of vmlet's own files (never through a symlink).
pub fn open_managed(path: &Path, mode: OpenMode) -> Result<OwnedFd, OpenError> {
    let fd =
        open_plain(path, mode.flags() | libc::O_NOFOLLOW).map_err(|source| OpenError::Open {
            path: path.to_path_buf(),
            reason: source.to_string(),
            source,
        })?;
    ensure_regular(&fd, path)?;
    Ok(fd)
}

/// Refuses a qcow2 file whose header names a backing file or an external
/// data file (read through `fd`, which is not moved).
pub fn check_qcow2_header(fd: &OwnedFd, path: &Path) -> Result<(), OpenError> {
    use std::io::Read;
    // Through a second open file description of the same inode: `fd` may
    // be O_DIRECT, which refuses an unaligned read.
    let read = || -> std::io::Result<Vec<u8>> {
        let file = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let mut header = Vec::with_capacity(104);
        file.take(104).read_to_end(&mut header)?;
        Ok(header)
    };
    let header = read().map_err(|source| OpenError::Open {
        path: path.to_path_buf(),
        reason: format!("reading the qcow2 header: {source}"),
        source,
    })?;
    qcow2_header_refusal(&header).map_or(Ok(()), |reason| {
        Err(OpenError::Header {
            path: path.to_path_buf(),
            reason,
        })
    })
}

/// What a file's first bytes say about the other files a qcow2 image
/// would make its reader open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qcow2Header {
    /// Not a qcow2 file (no `QFI\xfb` magic).
    NotQcow2,
    /// A qcow2 header too short to read.
    Truncated,
    /// It names a backing file.
    BackingFile,
    /// It names an external data file (version 3, incompatible feature
    /// bit 2).
    DataFile,
    /// A qcow2 file that names no other file.
    SelfContained,
}

/// Reads a qcow2 header from a file's first bytes (104 are enough for
/// version 3). Pure.
pub fn read_qcow2_header(header: &[u8]) -> Qcow2Header {
    let be32 = |at: usize| {
        header
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    };
    let be64 = |at: usize| {
        header
            .get(at..at + 8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    };
    if header.len() < 4 || be32(0) != Some(0x5146_49fb) {
        return Qcow2Header::NotQcow2;
    }
    let (Some(version), Some(backing_offset)) = (be32(4), be64(8)) else {
        return Qcow2Header::Truncated;
    };
    if backing_offset != 0 {
        return Qcow2Header::BackingFile;
    }
    if version >= 3 {
        match be64(72) {
            Some(features) if features & (1 << 2) != 0 => return Qcow2Header::DataFile,
            Some(_) => {}
            None => return Qcow2Header::Truncated,
        }
    }
    Qcow2Header::SelfContained
}

/// Why a host file named as qcow2 is refused, if it is. Pure: `header` is
/// the file's first bytes.
pub fn qcow2_header_refusal(header: &[u8]) -> Option<String> {
    match read_qcow2_header(header) {
        Qcow2Header::SelfContained => None,
        Qcow2Header::NotQcow2 => Some("not a qcow2 file (no QFI magic)".into()),
        Qcow2Header::Truncated => Some("truncated qcow2 header".into()),
        Qcow2Header::BackingFile => Some(
            "its qcow2 header names a backing file; vmlet never follows backing files of host files (flatten it with qemu-img convert)"
                .into(),
        ),
        Qcow2Header::DataFile => {
            Some("its qcow2 header names an external data file, which vmlet refuses".into())
        }
    }
}

fn is_pseudo_fs(path: &Path) -> bool {
    ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| path.starts_with(p))
}

fn ensure_regular(fd: &OwnedFd, path: &Path) -> Result<(), OpenError> {
    let file = std::fs::File::from(fd.try_clone().map_err(|source| OpenError::Open {
        path: path.to_path_buf(),
        reason: source.to_string(),
        source,
    })?);
    match file.metadata() {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(OpenError::NotRegular {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(OpenError::Open {
            path: path.to_path_buf(),
            reason: source.to_string(),
            source,
        }),
    }
}

fn open_plain(path: &Path, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path and plain flags.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat2(
    dir: &OwnedFd,
    path: &Path,
    flags: libc::c_int,
    resolve: u64,
) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = resolve;
    // SAFETY: openat2 with a valid dirfd, a NUL-terminated path and the
    // open_how struct with its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(dir: &Path) -> Vec<PathBuf> {
        vec![std::fs::canonicalize(dir).unwrap()]
    }

    #[test]
    fn files_open_only_beneath_a_root_without_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let roots = roots(root.path());
        let base = &roots[0];
        std::fs::create_dir(base.join("sub")).unwrap();
        std::fs::write(base.join("sub/ok.img"), b"x").unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, b"s").unwrap();
        std::os::unix::fs::symlink(&secret, base.join("link.img")).unwrap();
        std::os::unix::fs::symlink(base.join("sub"), base.join("dirlink")).unwrap();

        assert!(open_beneath(&roots, &base.join("sub/ok.img"), OpenMode::READ).is_ok());
        for bad in [
            base.join("link.img"),
            base.join("dirlink/ok.img"),
            base.join("sub/../../etc/passwd"),
            secret.clone(),
            base.join("sub"),
            PathBuf::from("/proc/self/root/etc/passwd"),
            base.clone(),
        ] {
            assert!(
                open_beneath(&roots, &bad, OpenMode::READ).is_err(),
                "{} opened",
                bad.display()
            );
        }
        let err = open_beneath(&roots, &base.join("link.img"), OpenMode::READ).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        // A root under /proc is never used.
        let proc_root = vec![PathBuf::from("/proc/self")];
        assert!(open_beneath(&proc_root, Path::new("/proc/self/status"), OpenMode::READ).is_err());
    }

    #[test]
    fn managed_files_are_never_opened_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("v.qcow2");
        std::fs::write(&file, b"x").unwrap();
        let link = dir.path().join("l.qcow2");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_managed(&file, OpenMode::READ).is_ok());
        assert!(open_managed(&link, OpenMode::READ).is_err());
    }

    fn header(version: u32, backing_offset: u64, incompatible: u64) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[0..4].copy_from_slice(&0x5146_49fbu32.to_be_bytes());
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[8..16].copy_from_slice(&backing_offset.to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h
    }

    #[test]
    fn qcow2_headers_with_backing_or_data_files_are_refused() {
        assert_eq!(qcow2_header_refusal(&header(3, 0, 0)), None);
        assert_eq!(qcow2_header_refusal(&header(2, 0, 0)[..72]), None);
        assert!(qcow2_header_refusal(&header(3, 0x200, 0))
            .unwrap()
            .contains("backing"));
        assert!(qcow2_header_refusal(&header(3, 0, 1 << 2))
            .unwrap()
            .contains("data file"));
        // Other incompatible bits (dirty, corrupt, compression type) are
        // QEMU's business.
        assert_eq!(qcow2_header_refusal(&header(3, 0, 0b1011)), None);
        assert!(qcow2_header_refusal(b"RAW DATA").is_some());
        assert!(qcow2_header_refusal(&header(3, 0, 0)[..60]).is_some());
    }
}
