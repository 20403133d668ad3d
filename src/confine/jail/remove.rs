//! Removing a jail directory without following symlinks or crossing mounts.

use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use super::MAX_DEPTH;

/// Removes the jail directory `root` once its process is gone (the mounts
/// lived only in the child's namespace, so this is a plain recursive
/// remove). Symlinks are removed, never followed (`/run` and `/tmp` were
/// writable by the VM's uid); a mount point found under `root` stops the
/// removal with an error rather than deleting through it. A missing `root`
/// is not an error.
pub fn remove(root: &Path) -> io::Result<()> {
    let context =
        |path: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let fd = match open_dir(libc::AT_FDCWD, &c_path(root)?) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(context(root, e)),
    };
    let mnt_id =
        mount_id(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH).map_err(|e| context(root, e))?;
    // ".." from the directory itself: the parent it really has, whatever
    // symlinks the path went through, and across a mount on the root.
    let parent_id = mount_id(fd.as_raw_fd(), c"..", 0).map_err(|e| context(root, e))?;
    if parent_id != mnt_id {
        return Err(io::Error::other(format!(
            "{} is a mount point; not removing it",
            root.display()
        )));
    }
    remove_contents(&fd, root, mnt_id, 0)?;
    drop(fd);
    std::fs::remove_dir(root).map_err(|e| context(root, e))
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: contains a NUL byte", path.display()),
        )
    })
}

/// Opens the directory `name` under `dirfd`, refusing a symlink.
fn open_dir(dirfd: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call on a valid C string.
    let fd = unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The mount id and file type of `name` under `dirfd` (not following a
/// final symlink).
fn stat_entry(dirfd: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<(u64, u32)> {
    // SAFETY: statx fills the zeroed buffer it is given.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            dirfd,
            name.as_ptr(),
            flags | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_TYPE | libc::STATX_MNT_ID,
            &mut buf,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if buf.stx_mask & libc::STATX_MNT_ID == 0 {
        // Linux before 5.8: no mount ids, so mount points cannot be told.
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel does not report mount ids (statx STATX_MNT_ID)",
        ));
    }
    Ok((buf.stx_mnt_id, u32::from(buf.stx_mode) & libc::S_IFMT))
}

fn mount_id(dirfd: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<u64> {
    stat_entry(dirfd, name, flags).map(|(id, _)| id)
}

/// The names in the directory `dir` (without `.` and `..`).
fn list(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    // fdopendir takes the descriptor it is given: give it a duplicate.
    let dup = dir.try_clone()?;
    // SAFETY: fdopendir takes ownership of a valid descriptor; on success it
    // is closed by closedir below.
    let stream = unsafe { libc::fdopendir(dup.as_raw_fd()) };
    if stream.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dup);
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is reset so the end of the stream and an error differ.
        unsafe { *libc::__errno_location() = 0 };
        let entry = unsafe { libc::readdir64(stream) };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: readdir returned a valid entry with a NUL-terminated name.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: the stream from fdopendir, closed once.
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

fn remove_contents(dir: &OwnedFd, path: &Path, mnt_id: u64, depth: usize) -> io::Result<()> {
    if depth >= MAX_DEPTH {
        return Err(io::Error::other(format!(
            "{}: deeper than {MAX_DEPTH} levels; not removing it",
            path.display()
        )));
    }
    let context =
        |p: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
    for name in list(dir).map_err(|e| context(path, e))? {
        let child = path.join(OsString::from_vec(name.as_bytes().to_vec()));
        let (id, kind) = stat_entry(dir.as_raw_fd(), &name, 0).map_err(|e| context(&child, e))?;
        if id != mnt_id {
            return Err(io::Error::other(format!(
                "{} is a mount point; not removing it",
                child.display()
            )));
        }
        let flags = if kind == libc::S_IFDIR {
            let sub = open_dir(dir.as_raw_fd(), &name).map_err(|e| context(&child, e))?;
            // Checked again on the open directory: it may have been swapped.
            let sub_id = mount_id(sub.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
                .map_err(|e| context(&child, e))?;
            if sub_id != mnt_id {
                return Err(io::Error::other(format!(
                    "{} is a mount point; not removing it",
                    child.display()
                )));
            }
            remove_contents(&sub, &child, mnt_id, depth + 1)?;
            libc::AT_REMOVEDIR
        } else {
            0
        };
        // SAFETY: a plain system call on a valid descriptor and C string.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) } != 0 {
            return Err(context(&child, io::Error::last_os_error()));
        }
    }
    Ok(())
}
