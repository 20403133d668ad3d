//! Cloud-init NoCloud seed images (`STATE_DIR/vms/UUID/cidata.img`).
//!
//! A seed is a small disk image that vmlet attaches to a VM as a read-only
//! drive at every start; cloud-init's NoCloud datasource finds it by its
//! filesystem label `cidata` and reads `user-data`, `meta-data` and, when
//! present, `network-config` from its root directory.
//!
//! The image is VFAT rather than ISO 9660: cloud-init accepts either, and a
//! FAT filesystem can be made in pure Rust (the `fatfs` crate) with no
//! external tool (`mkfs.fat`, `genisoimage`, `xorriso`) on the node. The
//! label is written both into the boot sector and as a volume-label entry in
//! the root directory, as `mkfs.fat -n CIDATA` does, so `blkid` reports
//! `LABEL="CIDATA"`, which cloud-init matches case-insensitively. File
//! names are stored as FAT long file names, so the guest sees them exactly.
//!
//! Image size: `max(1 MiB, 2 × content + 512 KiB)` rounded up to a whole MiB,
//! where `content` is the total byte length of the three files. The factor
//! two and the 512 KiB cover FAT tables, the root directory and cluster
//! slack with room to spare. Images under 4 MiB are FAT12, larger ones
//! FAT16. The content is limited to [`MAX_CONTENT_BYTES`] (so an image is
//! at most 65 MiB); the image is assembled in memory and then written out.
//! Timestamps in the image are the FAT epoch (1980-01-01 00:00) and the
//! volume serial number is fixed, so the same content gives the same bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Cursor, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What goes on the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedContent<'a> {
    /// The `user-data` file (for example a `#cloud-config` document).
    pub user_data: &'a str,
    /// The `meta-data` file (see [`default_meta_data`]).
    pub meta_data: &'a str,
    /// The `network-config` file; the file is left out when `None`.
    pub network_config: Option<&'a str>,
}

/// Why a seed could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The target path has no file name or no parent directory.
    #[error("invalid seed path {}", path.display())]
    InvalidPath {
        /// The path given.
        path: PathBuf,
    },
    /// The content is larger than [`MAX_CONTENT_BYTES`].
    #[error("seed content is {size} bytes, more than the {max} bytes allowed")]
    TooLarge {
        /// Total bytes of user-data, meta-data and network-config.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Building the FAT image in memory failed (a bug, not a host problem).
    #[error("building the seed image failed")]
    Image {
        /// The error from the FAT library.
        #[source]
        source: io::Error,
    },
    /// A file operation on the host failed (for example the disk is full:
    /// the source then has kind [`io::ErrorKind::StorageFull`]).
    #[error("{op} {} failed", path.display())]
    Io {
        /// What was being done ("create", "write", "rename to", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// The most content (user-data + meta-data + network-config, in bytes) a
/// seed may hold: 32 MiB.
pub const MAX_CONTENT_BYTES: u64 = 32 * MIB;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The FAT volume label cloud-init looks for (11 bytes, space padded).
const LABEL: [u8; 11] = *b"CIDATA     ";

/// Writes the seed image to `path` atomically: a temp file in the same
/// directory, then rename; on any error nothing is left at `path` nor the
/// temp file. Mode 0600.
///
/// An existing file at `path` is replaced; on error it is left as it was.
/// The image is fsynced before the rename and the directory after it.
pub fn write_seed(path: &Path, content: &SeedContent<'_>) -> Result<(), SeedError> {
    let (dir, file_name) = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => (dir, name),
        _ => {
            return Err(SeedError::InvalidPath {
                path: path.to_path_buf(),
            })
        }
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let image = build_image(content)?;

    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    let tmp = dir.join(tmp_name);
    let io_err = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| SeedError::Io { op, path, source }
    };

    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    let guard = RemoveOnDrop(Some(&tmp));
    // The mode given to open() is masked by the umask; make it exact.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err("chmod", &tmp))?;
    file.write_all(&image).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("rename to", path))?;
    guard.disarm();
    // The seed is complete at `path` now; a failed directory fsync only
    // weakens durability across a host crash, so it is not an error.
    if let Err(err) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %err, "fsync of seed directory failed");
    }
    Ok(())
}

/// Default meta-data for a VM: `"instance-id: <uuid>\nlocal-hostname: <name>\n"`.
pub fn default_meta_data(uuid: uuid::Uuid, name: &str) -> String {
    format!("instance-id: {uuid}\nlocal-hostname: {name}\n")
}

/// Stamps every directory entry 1980-01-01 00:00, the FAT epoch (fatfs
/// without its `chrono` feature would write the invalid date 1980-00-00).
#[derive(Debug)]
struct FatEpoch;

impl fatfs::TimeProvider for FatEpoch {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date {
            year: 1980,
            month: 1,
            day: 1,
        }
    }

    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: self.get_current_date(),
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static FAT_EPOCH: FatEpoch = FatEpoch;

/// Removes a temp file when dropped, unless disarmed.
struct RemoveOnDrop<'p>(Option<&'p Path>);

impl RemoveOnDrop<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

/// The files of `content`, in the order they are written.
fn files<'a>(content: &SeedContent<'a>) -> impl Iterator<Item = (&'static str, &'a str)> {
    [
        Some(("user-data", content.user_data)),
        Some(("meta-data", content.meta_data)),
        content.network_config.map(|n| ("network-config", n)),
    ]
    .into_iter()
    .flatten()
}

/// The image size for `content_bytes` of content (see the module doc).
fn image_size(content_bytes: u64) -> u64 {
    let wanted = (2 * content_bytes + 512 * KIB).max(MIB);
    wanted.div_ceil(MIB) * MIB
}

/// Formats a FAT image holding `content` and returns its bytes.
fn build_image(content: &SeedContent<'_>) -> Result<Vec<u8>, SeedError> {
    let total: u64 = files(content).map(|(_, data)| data.len() as u64).sum();
    if total > MAX_CONTENT_BYTES {
        return Err(SeedError::TooLarge {
            size: total,
            max: MAX_CONTENT_BYTES,
        });
    }
    let size = image_size(total);
    let mut disk = Cursor::new(vec![0u8; size as usize]);
    let image_err = |source| SeedError::Image { source };
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new().volume_label(LABEL),
    )
    .map_err(image_err)?;
    {
        let fs =
            fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new().time_provider(&FAT_EPOCH))
                .map_err(image_err)?;
        {
            let root = fs.root_dir();
            for (name, data) in files(content) {
                let mut file = root.create_file(name).map_err(image_err)?;
                file.write_all(data.as_bytes()).map_err(image_err)?;
                file.flush().map_err(image_err)?;
            }
        }
        fs.unmount().map_err(image_err)?;
    }
    Ok(disk.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    type Fs = fatfs::FileSystem<Cursor<Vec<u8>>>;

    fn open(path: &Path) -> Fs {
        let bytes = fs::read(path).unwrap();
        fatfs::FileSystem::new(Cursor::new(bytes), fatfs::FsOptions::new()).unwrap()
    }

    fn read(fs: &Fs, name: &str) -> Option<Vec<u8>> {
        let mut file = match fs.root_dir().open_file(name) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return None,
            Err(err) => panic!("open {name}: {err}"),
        };
        let mut out = Vec::new();
        file.read_to_end(&mut out).unwrap();
        Some(out)
    }

    fn names(fs: &Fs) -> Vec<String> {
        let mut names: Vec<String> = fs
            .root_dir()
            .iter()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    const USER: &str = "#cloud-config\npassword: secret\nchpasswd: { expire: false }\n";
    const NET: &str = "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n";

    #[test]
    fn writes_label_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cidata.img");
        let meta = default_meta_data(uuid::Uuid::new_v4(), "web-1");
        let content = SeedContent {
            user_data: USER,
            meta_data: &meta,
            network_config: Some(NET),
        };
        write_seed(&path, &content).unwrap();

        let md = fs::metadata(&path).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(md.len(), MIB);
        let fs = open(&path);
        assert_eq!(fs.volume_label(), "CIDATA");
        // The padded 11 bytes, in the boot sector (BS_VolLab, FAT12/16)
        // and in the root directory's volume-label entry.
        assert_eq!(&fs::read(&path).unwrap()[43..54], b"CIDATA     ");
        assert_eq!(
            fs.read_volume_label_from_root_dir_as_bytes().unwrap(),
            Some(*b"CIDATA     ")
        );
        assert_eq!(
            fs.read_volume_label_from_root_dir().unwrap().as_deref(),
            Some("CIDATA")
        );
        assert_eq!(names(&fs), ["meta-data", "network-config", "user-data"]);
        for entry in fs.root_dir().iter() {
            let date = entry.unwrap().modified().date;
            assert_eq!((date.year, date.month, date.day), (1980, 1, 1));
        }
        assert_eq!(read(&fs, "user-data").unwrap(), USER.as_bytes());
        assert_eq!(read(&fs, "meta-data").unwrap(), meta.as_bytes());
        assert_eq!(read(&fs, "network-config").unwrap(), NET.as_bytes());
        assert!(leftovers(dir.path()).is_empty());

        // Deterministic: the same content gives the same bytes.
        let first = fs::read(&path).unwrap();
        write_seed(&path, &content).unwrap();
        assert_eq!(fs::read(&path).unwrap(), first);
    }

    #[test]
    fn network_config_absent_when_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cidata.img");
        let content = SeedContent {
            user_data: "",
            meta_data: "instance-id: x\n",
            network_config: None,
        };
        write_seed(&path, &content).unwrap();
        let fs = open(&path);
        assert_eq!(names(&fs), ["meta-data", "user-data"]);
        assert_eq!(read(&fs, "network-config"), None);
        assert_eq!(read(&fs, "user-data").unwrap(), b"");
    }

    #[test]
    fn large_user_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cidata.img");
        let user: String = (0..600 * 1024)
            .map(|i| (b'a' + (i % 26) as u8) as char)
            .collect();
        write_seed(
            &path,
            &SeedContent {
                user_data: &user,
                meta_data: "instance-id: big\n",
                network_config: Some(NET),
            },
        )
        .unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 2 * MIB);
        let fs = open(&path);
        assert_eq!(read(&fs, "user-data").unwrap(), user.as_bytes());
        assert_eq!(read(&fs, "network-config").unwrap(), NET.as_bytes());
    }

    #[test]
    fn replaces_existing_seed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cidata.img");
        fs::write(&path, b"old").unwrap();
        let content = SeedContent {
            user_data: "new",
            meta_data: "m",
            network_config: None,
        };
        write_seed(&path, &content).unwrap();
        assert_eq!(read(&open(&path), "user-data").unwrap(), b"new");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn image_sizes_fit_content() {
        assert_eq!(image_size(0), MIB);
        assert_eq!(image_size(256 * KIB), MIB);
        assert_eq!(image_size(256 * KIB + 1), 2 * MIB);
        assert_eq!(image_size(MAX_CONTENT_BYTES), 65 * MIB);
        // Every size class (FAT12 and FAT16, each cluster size) holds its
        // worst-case content: just under the next size step.
        for mib in [1u64, 2, 3, 4, 5, 8, 16, 17, 33, 64] {
            let content = (mib * MIB - 512 * KIB) / 2;
            assert_eq!(image_size(content), mib * MIB);
            let a = "a".repeat((content / 3) as usize);
            let b = "b".repeat((content / 3) as usize);
            let c = "c".repeat((content - 2 * (content / 3)) as usize);
            let seed = SeedContent {
                user_data: &a,
                meta_data: &b,
                network_config: Some(&c),
            };
            let image = build_image(&seed).unwrap();
            assert_eq!(image.len() as u64, mib * MIB);
            let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).unwrap();
            assert_eq!(fs.volume_label(), "CIDATA");
            assert_eq!(read(&fs, "network-config").unwrap(), c.as_bytes());
        }
    }

    #[test]
    fn too_large_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cidata.img");
        let big = "x".repeat(MAX_CONTENT_BYTES as usize);
        let err = write_seed(
            &path,
            &SeedContent {
                user_data: &big,
                meta_data: "m",
                network_config: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, SeedError::TooLarge { .. }), "{err:?}");
        assert!(!path.exists());
    }

    fn simple() -> SeedContent<'static> {
        SeedContent {
            user_data: USER,
            meta_data: "instance-id: i\n",
            network_config: None,
        }
    }

    #[test]
    fn missing_directory_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("cidata.img");
        let err = write_seed(&path, &simple()).unwrap_err();
        let source = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .expect("io::Error source");
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        assert!(!path.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn unwritable_directory_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("ro");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o500)).unwrap();
        let path = sub.join("cidata.img");
        let result = write_seed(&path, &simple());
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
        // root ignores directory permissions; the check only means something
        // for other users.
        if unsafe { libc::geteuid() } != 0 {
            let err = result.unwrap_err();
            assert!(matches!(err, SeedError::Io { op: "create", .. }), "{err:?}");
            assert_eq!(fs::read_dir(&sub).unwrap().count(), 0);
        }
    }

    #[test]
    fn failed_rename_removes_temp_file() {
        // A non-empty directory at the target makes the rename fail after
        // the temp file was written: it must be cleaned up (root included).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cidata.img");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), b"k").unwrap();
        let err = write_seed(&path, &simple()).unwrap_err();
        assert!(
            matches!(
                err,
                SeedError::Io {
                    op: "rename to",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(leftovers(dir.path()).is_empty());
        assert_eq!(fs::read(path.join("keep")).unwrap(), b"k");
    }

    #[test]
    fn invalid_path() {
        let err = write_seed(Path::new("/"), &simple()).unwrap_err();
        assert!(matches!(err, SeedError::InvalidPath { .. }), "{err:?}");
    }

    #[test]
    fn default_meta_data_format() {
        let id = uuid::Uuid::parse_str("6f9619ff-8b86-d011-b42d-00c04fc964ff").unwrap();
        assert_eq!(
            default_meta_data(id, "db-2"),
            "instance-id: 6f9619ff-8b86-d011-b42d-00c04fc964ff\nlocal-hostname: db-2\n"
        );
    }

    /// Cross-checks with dosfstools and blkid when the host has them (it
    /// need not: the test passes without them).
    #[test]
    fn host_tools_accept_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cidata.img");
        write_seed(
            &path,
            &SeedContent {
                user_data: USER,
                meta_data: "instance-id: i\n",
                network_config: Some(NET),
            },
        )
        .unwrap();
        let tool = |names: &[&str]| {
            names
                .iter()
                .map(Path::new)
                .find(|p| p.exists())
                .map(Path::to_path_buf)
        };
        if let Some(fsck) = tool(&["/usr/sbin/fsck.fat", "/sbin/fsck.fat"]) {
            let out = std::process::Command::new(fsck)
                .arg("-n")
                .arg(&path)
                .output()
                .unwrap();
            assert!(out.status.success(), "fsck.fat: {out:?}");
        }
        if let Some(blkid) = tool(&["/usr/sbin/blkid", "/sbin/blkid"]) {
            let out = std::process::Command::new(blkid)
                .args(["-p", "-o", "export"])
                .arg(&path)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.lines().any(|l| l == "LABEL=CIDATA"), "blkid: {text}");
            assert!(text.lines().any(|l| l == "TYPE=vfat"), "blkid: {text}");
        }
    }
}
