//! Named volumes (`STATE_DIR/volumes/NAME.qcow2`), like node-local Cinder
//! volumes: created blank or from an image, attached to at most one VM,
//! grown (never shrunk), kept when the VM goes unless asked.
//!
//! The volume file is the only state: size and usage come from `qemu-img
//! info`, and which VM uses a volume from the VM specs (the manager fills
//! in `attached_to`).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::SystemTime;

use uuid::Uuid;

use crate::persist::timestamp;
use crate::spec::{validate_name, validate_size, SpecError};
pub use crate::spec::{Volume, VolumeAttachment, VolumeCreate, VolumeResize};
use crate::storage::images::ImageStore;
use crate::storage::qemu_img::QemuImg;
use crate::storage::{mib_up, Layout, MIB};
use crate::storage::{StorageError, StorageEvents};

/// The volume store.
#[derive(Debug)]
pub struct VolumeStore {
    layout: Layout,
    qemu_img: QemuImg,
    events: Arc<dyn StorageEvents>,
    /// Serializes creates and deletes, so a name is made once.
    lock: tokio::sync::Mutex<()>,
}

impl VolumeStore {
    /// Opens the store, removing temp files of creates interrupted by a
    /// restart.
    pub fn open(
        layout: Layout,
        qemu_img: QemuImg,
        events: Arc<dyn StorageEvents>,
    ) -> std::io::Result<VolumeStore> {
        let dir = layout.volumes_dir();
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(VolumeStore {
            layout,
            qemu_img,
            events,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Names of every volume, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.layout.volumes_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".qcow2")?.to_string();
                (!name.starts_with('.')).then_some(name)
            })
            .collect();
        names.sort();
        names
    }

    /// Whether volume `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        validate_name("volume", name).is_ok() && self.layout.volume_file(name).is_file()
    }

    /// Volume `name` (without `attached_to`).
    pub async fn get(&self, name: &str) -> Result<Volume, StorageError> {
        if !self.exists(name) {
            return Err(StorageError::NotFound(format!("volume {name}")));
        }
        let file = self.layout.volume_file(name);
        // -U: a running VM holds the image's lock.
        let info = self.qemu_img.info(&file, Some("qcow2"), true).await?;
        let created = std::fs::metadata(&file)
            .and_then(|m| m.created().or_else(|_| m.modified()))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(Volume {
            name: name.to_string(),
            size_mib: info.virtual_size / MIB,
            virtual_size: info.virtual_size,
            actual_size: info.actual_size,
            format: "qcow2".into(),
            attached_to: None,
            created_at: timestamp(created),
        })
    }

    /// Creates a volume, blank or as a copy of an image. Nothing is left
    /// behind when it fails (a full disk gives [`StorageError::NoSpace`]).
    pub async fn create(
        &self,
        request: &VolumeCreate,
        images: &ImageStore,
    ) -> Result<Volume, StorageError> {
        let mut errors = Vec::new();
        if let Err(e) = validate_name("name", &request.name) {
            errors.extend(e.errors);
        }
        if let Some(size) = request.size_mib {
            if let Err(e) = validate_size("size_mib", size) {
                errors.extend(e.errors);
            }
        } else if request.image.is_none() {
            errors.push(crate::spec::FieldError {
                field: "size_mib".into(),
                message: "give size_mib (a blank volume) or image (a copy of it)".into(),
            });
        }
        let source = match &request.image {
            Some(image) => match images.ready_file(image, "image") {
                Ok(found) => Some(found),
                Err(StorageError::Invalid(e)) => {
                    errors.extend(e.errors);
                    None
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        if !errors.is_empty() {
            return Err(StorageError::Invalid(SpecError { errors }));
        }
        let size = match (&source, request.size_mib) {
            (Some((_, image_size)), Some(mib)) if mib * MIB < *image_size => {
                return Err(StorageError::Invalid(SpecError::field(
                    "size_mib",
                    format!(
                        "{mib} MiB is smaller than the image ({} MiB)",
                        mib_up(*image_size)
                    ),
                )))
            }
            (Some((_, image_size)), None) => *image_size,
            (_, Some(mib)) => mib * MIB,
            (None, None) => unreachable!("checked above"),
        };
        let _guard = self.lock.lock().await;
        let target = self.layout.volume_file(&request.name);
        if target.exists() {
            return Err(StorageError::Conflict(format!(
                "volume {} already exists",
                request.name
            )));
        }
        let tmp =
            self.layout
                .volumes_dir()
                .join(format!(".{}.{}.qcow2", request.name, Uuid::new_v4()));
        let made = async {
            match &source {
                Some((image_file, image_size)) => {
                    self.qemu_img
                        .convert_to_qcow2(image_file, "qcow2", &tmp)
                        .await?;
                    if size > *image_size {
                        self.qemu_img.resize(&tmp, size).await?;
                    }
                }
                None => self.qemu_img.create(&tmp, size).await?,
            }
            // qemu-img creates files by the umask and does not sync them:
            // the volume is private and on disk before its name appears,
            // and the name is on disk before the volume is reported made.
            std::fs::File::open(&tmp)
                .and_then(|f| {
                    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                    f.sync_all()
                })
                .map_err(|e| StorageError::io("syncing", &tmp, e))?;
            std::fs::rename(&tmp, &target)
                .map_err(|e| StorageError::io("renaming into place", &target, e))?;
            crate::persist::sync_dir(&self.layout.volumes_dir())
                .map_err(|e| StorageError::io("syncing", &self.layout.volumes_dir(), e.source))
        }
        .await;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        tracing::info!(volume = %request.name, size, "volume created");
        let volume = self.get(&request.name).await?;
        self.publish(&volume);
        Ok(volume)
    }

    /// Grows a volume no running VM uses (`qemu-img resize`).
    pub async fn resize_offline(&self, name: &str, size_mib: u64) -> Result<Volume, StorageError> {
        let current = self.check_resize(name, size_mib).await?;
        if size_mib * MIB > current.virtual_size {
            self.qemu_img
                .resize(&self.layout.volume_file(name), size_mib * MIB)
                .await?;
        }
        let volume = self.get(name).await?;
        self.publish(&volume);
        Ok(volume)
    }

    /// Checks a resize request against volume `name`; returns the volume.
    pub async fn check_resize(&self, name: &str, size_mib: u64) -> Result<Volume, StorageError> {
        validate_size("size_mib", size_mib)?;
        let current = self.get(name).await?;
        if size_mib * MIB < current.virtual_size {
            return Err(StorageError::Invalid(SpecError::field(
                "size_mib",
                format!(
                    "volumes only grow: {size_mib} MiB is smaller than the current {} MiB",
                    mib_up(current.virtual_size)
                ),
            )));
        }
        Ok(current)
    }

    /// Deletes a volume no VM uses (the caller checks).
    pub async fn delete(&self, name: &str) -> Result<(), StorageError> {
        let _guard = self.lock.lock().await;
        if !self.exists(name) {
            return Err(StorageError::NotFound(format!("volume {name}")));
        }
        let file = self.layout.volume_file(name);
        std::fs::remove_file(&file).map_err(|e| StorageError::io("removing", &file, e))?;
        tracing::info!(volume = %name, "volume deleted");
        self.events.volume_deleted(name);
        Ok(())
    }

    /// Publishes a volume's new view.
    pub fn publish(&self, volume: &Volume) {
        self.events.volume_changed(volume);
    }

    /// The file of volume `name`.
    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.layout.volume_file(name)
    }
}
