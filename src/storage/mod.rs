//! Disk images, volumes, VM disks and cloud-init seeds: everything vmlet
//! keeps under `STATE_DIR` besides the VM records, and the `qemu-img` runs
//! that make them.
//!
//! ```text
//! STATE_DIR/images/NAME.qcow2       an imported image (never written again)
//! STATE_DIR/images/NAME.json        its metadata (source, checksums)
//! STATE_DIR/images/.tmp/            imports in progress (emptied at start)
//! STATE_DIR/volumes/NAME.qcow2      a named volume
//! STATE_DIR/vms/UUID/disks/D.qcow2  a VM's own disk: an overlay on an image, or blank
//! STATE_DIR/vms/UUID/cidata.img     its cloud-init seed (written at every start)
//! ```
//!
//! Every file name comes from a validated name (`[A-Za-z0-9][A-Za-z0-9._-]*`)
//! or a UUID, so no request can name a path outside these directories.

pub mod disks;
pub mod fetch;
pub mod files;
pub mod images;
pub mod qemu_img;
pub mod seed;
pub mod volumes;

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::spec::{Image, SpecError, Volume};

/// Where the image and volume stores report their changes: the daemon's
/// event bus, which lives above storage and hands itself down.
pub trait StorageEvents: Send + Sync + std::fmt::Debug {
    /// An image was added or changed (import progress, ready, failed).
    fn image_changed(&self, image: &Image);
    /// An image was deleted (or its import cancelled).
    fn image_deleted(&self, name: &str);
    /// A volume was created or changed.
    fn volume_changed(&self, volume: &Volume);
    /// A volume was deleted.
    fn volume_deleted(&self, name: &str);
}

/// A sink that drops every change, for the stores' unit tests.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct Unobserved;

#[cfg(test)]
impl StorageEvents for Unobserved {
    fn image_changed(&self, _: &Image) {}
    fn image_deleted(&self, _: &str) {}
    fn volume_changed(&self, _: &Volume) {}
    fn volume_deleted(&self, _: &str) {}
}

/// Why a storage operation failed. The VM layer maps these to API errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// No such image, volume or snapshot (the message names it).
    #[error("{0} not found")]
    NotFound(String),
    /// The name is taken, or the thing is in use.
    #[error("{0}")]
    Conflict(String),
    /// The request names a bad field.
    #[error(transparent)]
    Invalid(#[from] SpecError),
    /// The content is refused (a backing file, an unknown format).
    #[error("{0}")]
    Refused(String),
    /// The host's disk is full; nothing was left half-made.
    #[error("{0}")]
    NoSpace(String),
    /// `qemu-img` or the file system failed; the message says how.
    #[error("{0}")]
    Failed(String),
}

impl StorageError {
    /// An invalid request naming one field.
    pub fn field(field: &str, message: impl Into<String>) -> StorageError {
        StorageError::Invalid(SpecError::field(field, message))
    }

    /// An I/O error on `path`: a full disk is [`StorageError::NoSpace`].
    pub fn io(op: &str, path: &Path, e: std::io::Error) -> StorageError {
        let message = format!("{op} {}: {e}", path.display());
        if is_no_space(&e) {
            StorageError::NoSpace(message)
        } else {
            StorageError::Failed(message)
        }
    }
}

/// Where storage files live under the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    state_dir: PathBuf,
}

impl Layout {
    /// The layout under `state_dir`.
    pub fn new(state_dir: &Path) -> Layout {
        Layout {
            state_dir: state_dir.to_path_buf(),
        }
    }

    /// `STATE_DIR/images`.
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    /// An image's qcow2 file.
    pub fn image_file(&self, name: &str) -> PathBuf {
        self.images_dir().join(format!("{name}.qcow2"))
    }

    /// An image's metadata.
    pub fn image_meta(&self, name: &str) -> PathBuf {
        self.images_dir().join(format!("{name}.json"))
    }

    /// Where imports are assembled before they become visible.
    pub fn import_tmp_dir(&self) -> PathBuf {
        self.images_dir().join(".tmp")
    }

    /// `STATE_DIR/volumes`.
    pub fn volumes_dir(&self) -> PathBuf {
        self.state_dir.join("volumes")
    }

    /// A volume's qcow2 file.
    pub fn volume_file(&self, name: &str) -> PathBuf {
        self.volumes_dir().join(format!("{name}.qcow2"))
    }

    /// A VM's directory (its record lives there too).
    pub fn vm_dir(&self, vm: Uuid) -> PathBuf {
        self.state_dir.join("vms").join(vm.to_string())
    }

    /// The directory of a VM's own disks.
    pub fn vm_disks_dir(&self, vm: Uuid) -> PathBuf {
        self.vm_dir(vm).join("disks")
    }

    /// A VM's own disk (overlay or blank).
    pub fn vm_disk(&self, vm: Uuid, disk: &str) -> PathBuf {
        self.vm_disks_dir(vm).join(format!("{disk}.qcow2"))
    }

    /// A VM's serial console log (QEMU appends to it; vmlet rotates it).
    pub fn console_log(&self, vm: Uuid) -> PathBuf {
        self.vm_dir(vm).join("console.log")
    }

    /// QEMU's own messages for a VM (its stdout and stderr, across starts).
    pub fn qemu_log(&self, vm: Uuid) -> PathBuf {
        self.vm_dir(vm).join("qemu.log")
    }

    /// A VM's TPM state (`swtpm --tpmstate`): kept across starts, removed
    /// with the VM.
    pub fn vm_tpm_dir(&self, vm: Uuid) -> PathBuf {
        self.vm_dir(vm).join("tpm")
    }

    /// The messages of a VM's `swtpm` (across starts).
    pub fn tpm_log(&self, vm: Uuid) -> PathBuf {
        self.vm_dir(vm).join("swtpm.log")
    }

    /// A VM's cloud-init seed.
    pub fn seed(&self, vm: Uuid) -> PathBuf {
        self.vm_dir(vm).join("cidata.img")
    }

    /// A UEFI VM's NVRAM (its firmware's variable store), qcow2 so that
    /// internal snapshots can include it.
    pub fn nvram(&self, vm: Uuid) -> PathBuf {
        self.vm_dir(vm).join("nvram.qcow2")
    }
}

/// Bytes in a MiB.
pub const MIB: u64 = 1024 * 1024;

/// `bytes` as whole MiB, rounded up: the smallest `size_mib` that holds
/// them, which is what a message about a too-small `size_mib` should name.
pub fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

/// True when `err` (or a message from a tool) says the disk is full.
pub fn is_no_space(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::StorageFull || err.raw_os_error() == Some(libc::ENOSPC)
}
