//! A VM's own disks: overlays on images and blank disks, made when the VM
//! is created (`STATE_DIR/vms/UUID/disks/`), and its cloud-init seed,
//! written before every start. They go when the VM is deleted; images never
//! change and volumes stay unless asked.

use crate::error_chain;
use crate::spec::{DiskSource, FieldError, SpecError, VmSpec};
use crate::storage::images::ImageStore;
use crate::storage::qemu_img::QemuImg;
use crate::storage::seed::{self, SeedContent};
use crate::storage::volumes::VolumeStore;
use crate::storage::StorageError;
use crate::storage::{Layout, MIB};

/// Checks that every image and volume `spec` names exists (and images are
/// ready), naming the field of each that does not.
pub fn check_references(
    spec: &VmSpec,
    images: &ImageStore,
    volumes: &VolumeStore,
) -> Result<(), StorageError> {
    let mut errors = Vec::new();
    for (i, disk) in spec.disks.iter().enumerate() {
        match disk.source() {
            Ok(DiskSource::Image { image, size_mib }) => {
                let field = format!("disks[{i}].image");
                match images.ready_file(image, &field) {
                    Ok((_, image_size)) => {
                        if size_mib.is_some_and(|mib| mib * MIB < image_size) {
                            errors.push(FieldError {
                                field: format!("disks[{i}].size_mib"),
                                message: format!(
                                    "{} MiB is smaller than image {image:?} ({} MiB)",
                                    size_mib.unwrap_or_default(),
                                    crate::storage::mib_up(image_size)
                                ),
                            });
                        }
                    }
                    Err(StorageError::Invalid(e)) => errors.extend(e.errors),
                    Err(e) => return Err(e),
                }
            }
            Ok(DiskSource::Volume { volume }) if !volumes.exists(volume) => {
                errors.push(FieldError {
                    field: format!("disks[{i}].volume"),
                    message: format!("no volume {volume:?}"),
                });
            }
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(StorageError::Invalid(SpecError { errors }))
    }
}

/// Makes the overlays and blank disks of a new VM. On failure, removes
/// every file it made (a full disk gives [`StorageError::NoSpace`]).
pub async fn provision(
    layout: &Layout,
    qemu_img: &QemuImg,
    images: &ImageStore,
    spec: &VmSpec,
) -> Result<(), StorageError> {
    let dir = layout.vm_disks_dir(spec.uuid);
    let mut made = Vec::new();
    let result = async {
        for (i, disk) in spec.disks.iter().enumerate() {
            let name = disk.name_or_default(i);
            let file = layout.vm_disk(spec.uuid, &name);
            match disk.source() {
                Ok(DiskSource::Image { image, size_mib }) => {
                    let (backing, image_size) =
                        images.ready_file(image, &format!("disks[{i}].image"))?;
                    let size = size_mib.map_or(image_size, |mib| (mib * MIB).max(image_size));
                    create_dir(&dir)?;
                    made.push(file.clone());
                    qemu_img.create_overlay(&file, &backing, size).await?;
                }
                Ok(DiskSource::Blank { size_mib }) => {
                    create_dir(&dir)?;
                    made.push(file.clone());
                    qemu_img.create(&file, size_mib * MIB).await?;
                }
                _ => {}
            }
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        for file in made {
            let _ = std::fs::remove_file(file);
        }
        // Only empty directories go: remove_dir refuses anything else.
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_dir(layout.vm_dir(spec.uuid));
    }
    result
}

/// Makes VM `vm`'s NVRAM from the firmware's raw variable store
/// `template` unless it exists (a VM keeps its variables across starts and
/// firmware updates). Written to a temporary name and renamed, so a failed
/// copy never leaves a half NVRAM. True when it was made now.
pub async fn provision_nvram(
    layout: &Layout,
    qemu_img: &QemuImg,
    vm: uuid::Uuid,
    template: &std::path::Path,
) -> Result<bool, StorageError> {
    let nvram = layout.nvram(vm);
    match std::fs::symlink_metadata(&nvram) {
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StorageError::io("checking", &nvram, e)),
    }
    create_dir(&layout.vm_dir(vm))?;
    let partial = nvram.with_extension("qcow2.partial");
    let _ = std::fs::remove_file(&partial);
    let made = async {
        qemu_img.convert_to_qcow2(template, "raw", &partial).await?;
        std::fs::rename(&partial, &nvram).map_err(|e| StorageError::io("renaming", &partial, e))
    }
    .await;
    if made.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    made.map(|()| true)
}

fn create_dir(dir: &std::path::Path) -> Result<(), StorageError> {
    std::fs::create_dir_all(dir).map_err(|e| StorageError::io("creating", dir, e))
}

/// Writes the VM's cloud-init seed, when its spec has one.
pub fn write_seed(layout: &Layout, spec: &VmSpec) -> Result<(), StorageError> {
    let Some(ci) = &spec.cloud_init else {
        return Ok(());
    };
    let default_meta = seed::default_meta_data(spec.uuid, &spec.name);
    let content = SeedContent {
        user_data: &ci.user_data,
        meta_data: ci.meta_data.as_deref().unwrap_or(&default_meta),
        network_config: ci.network_config.as_deref(),
    };
    let path = layout.seed(spec.uuid);
    seed::write_seed(&path, &content).map_err(|e| {
        let no_space = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(crate::storage::is_no_space);
        let message = format!("writing the cloud-init seed: {}", error_chain(&e));
        if no_space {
            StorageError::NoSpace(message)
        } else {
            StorageError::Failed(message)
        }
    })
}
