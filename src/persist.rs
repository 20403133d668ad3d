//! Plain files as vmlet's only database: atomic writes (temp file in the
//! same directory, fsync, rename, fsync the directory), so a crash at any
//! moment leaves the old content or the new, never a mix; and the
//! timestamps records carry. Below every layer: it uses nothing of vmlet.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A file that could not be written or synced.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}")]
pub struct PersistError {
    /// What was being done.
    pub op: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

fn fail<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PersistError + 'a {
    move |source| PersistError {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old or the
/// new content, never a mix. The file is mode 0600 whatever the umask:
/// records hold cloud-init user data, network settings and image sources.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), PersistError> {
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(fail("creating", &tmp))?;
        // A temp file left by a crash keeps its old mode through `open`.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(fail("setting the mode of", &tmp))?;
        file.write_all(bytes).map_err(fail("writing", &tmp))?;
        file.sync_all().map_err(fail("syncing", &tmp))?;
        fs::rename(&tmp, &target).map_err(fail("renaming into place", &target))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes `dir`'s entries (a rename, a new or removed file) durable.
pub fn sync_dir(dir: &Path) -> Result<(), PersistError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail("syncing", dir))
}

/// RFC 3339 UTC with millisecond precision.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_replace_whole_files_privately() {
        let dir = tempfile::tempdir().unwrap();
        write_atomically(dir.path(), "a.json", b"one").unwrap();
        write_atomically(dir.path(), "a.json", b"two").unwrap();
        let path = dir.path().join("a.json");
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join(".a.json.tmp").exists());
        let err = write_atomically(&dir.path().join("missing"), "a.json", b"x").unwrap_err();
        assert!(err.to_string().contains("creating"), "{err}");
    }

    #[test]
    fn timestamps_are_rfc3339_millis() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_500);
        assert_eq!(timestamp(t), "1970-01-01T00:00:01.500Z");
    }
}
