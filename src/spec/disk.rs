//! A VM's disks: where each comes from (host file, image, volume, blank),
//! its bus, cache mode, format and I/O limits.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::limits;

/// One disk. Its contents come from exactly one source:
///
/// - `path` + `format`: a host file (under the allowed host paths);
/// - `image` (+ optional `size_mib`): a qcow2 overlay on an image of the
///   image store, made when the VM is created (the image is never written);
/// - `volume`: a named volume of the volume store;
/// - `size_mib` alone: a blank qcow2 disk made when the VM is created.
///
/// Overlays and blank disks belong to the VM and go when it is deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Name unique within the VM (QEMU ids derive from it); defaults to `diskN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z][A-Za-z0-9_-]*$", min_length = 1, max_length = 24)]
    pub name: Option<String>,
    /// Absolute host path of an image file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, pattern = "^/", max_length = 4000)]
    pub path: Option<PathBuf>,
    /// Format of `path`; never guessed (probing a raw image is a known escape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Image (of the image store) this disk is an overlay on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        min_length = 1,
        max_length = 63
    )]
    pub image: Option<String>,
    /// Named volume (of the volume store) this disk is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        min_length = 1,
        max_length = 63
    )]
    pub volume: Option<String>,
    /// Size in MiB: of a blank disk, or of an overlay (at least the image's
    /// virtual size; default: that size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 67_108_864)]
    pub size_mib: Option<u64>,
    /// Guest bus.
    #[serde(default)]
    pub bus: DiskBus,
    /// Host cache mode (as libvirt's `cache=`).
    #[serde(default)]
    pub cache: CacheMode,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Firmware boot priority; lower boots first. Unset: not bootable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<u32>,
    /// Serial number the guest sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z0-9._-]+$", max_length = 20)]
    pub serial: Option<String>,
    /// I/O limits (unset: unlimited). Changeable while the VM runs.
    #[serde(default, skip_serializing_if = "IoLimits::is_unlimited")]
    pub limits: IoLimits,
}

/// Where a disk's contents come from (see [`DiskSpec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSource<'a> {
    /// A host file.
    File {
        /// Its path.
        path: &'a Path,
        /// Its format.
        format: DiskFormat,
    },
    /// An overlay on a store image.
    Image {
        /// The image's name.
        image: &'a str,
        /// Requested size in MiB.
        size_mib: Option<u64>,
    },
    /// A store volume.
    Volume {
        /// The volume's name.
        volume: &'a str,
    },
    /// A blank disk.
    Blank {
        /// Its size in MiB.
        size_mib: u64,
    },
}

impl DiskSpec {
    /// A disk on host file `path`, with every other field at its default.
    pub fn file(path: impl Into<PathBuf>, format: DiskFormat) -> DiskSpec {
        DiskSpec {
            name: None,
            path: Some(path.into()),
            format: Some(format),
            image: None,
            volume: None,
            size_mib: None,
            bus: DiskBus::default(),
            cache: CacheMode::default(),
            read_only: false,
            boot_order: None,
            serial: None,
            limits: IoLimits::default(),
        }
    }

    /// The disk's name: the given one, or `disk{index}`.
    pub fn name_or_default(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("disk{index}"))
    }

    /// The disk's source, or why the fields name none or several.
    pub fn source(&self) -> Result<DiskSource<'_>, (&'static str, &'static str)> {
        const ONE: &str = "give exactly one of path (+ format), image, volume, or size_mib alone";
        match (&self.path, &self.image, &self.volume) {
            (Some(path), None, None) => {
                if self.size_mib.is_some() {
                    return Err(("size_mib", "not allowed with path"));
                }
                match self.format {
                    Some(format) => Ok(DiskSource::File { path, format }),
                    None => Err(("format", "required with path (raw or qcow2)")),
                }
            }
            (None, Some(image), None) => Ok(DiskSource::Image {
                image,
                size_mib: self.size_mib,
            }),
            (None, None, Some(volume)) => {
                if self.size_mib.is_some() {
                    return Err(("size_mib", "not allowed with volume (resize the volume)"));
                }
                Ok(DiskSource::Volume { volume })
            }
            (None, None, None) => match self.size_mib {
                Some(size_mib) => Ok(DiskSource::Blank { size_mib }),
                None => Err(("path", ONE)),
            },
            _ => Err(("path", ONE)),
        }
    }

    /// True when vmlet made this disk for the VM (an overlay or a blank
    /// disk): it lives in the VM's directory and goes with the VM.
    pub fn owned_by_vm(&self) -> bool {
        matches!(
            self.source(),
            Ok(DiskSource::Image { .. } | DiskSource::Blank { .. })
        )
    }
}

/// The bus a disk is attached to in the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskBus {
    /// A virtio-blk device per disk (`/dev/vdX`).
    #[default]
    VirtioBlk,
    /// A disk on the VM's virtio-scsi controller (`/dev/sdX`).
    VirtioScsi,
}

/// Host cache mode, with libvirt's names and meanings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// O_DIRECT, guest flushes honoured (needs a file system with O_DIRECT).
    None,
    /// Host page cache, guest flushes honoured (QEMU's default).
    #[default]
    Writeback,
    /// Host page cache, every write flushed.
    Writethrough,
    /// O_DIRECT, every write flushed.
    Directsync,
    /// Host page cache, flushes ignored: fast, loses data on a host crash.
    Unsafe,
}

impl CacheMode {
    /// (`cache.direct`, `cache.no-flush`, the device's `write-cache`).
    pub fn qemu_flags(self) -> (bool, bool, bool) {
        match self {
            CacheMode::None => (true, false, true),
            CacheMode::Writeback => (false, false, true),
            CacheMode::Writethrough => (false, false, false),
            CacheMode::Directsync => (true, false, false),
            CacheMode::Unsafe => (false, true, true),
        }
    }
}

/// Per-disk I/O limits; unset or 0 means unlimited. A total limit and the
/// read/write limits of the same kind exclude each other (as in QEMU).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IoLimits {
    /// Read + write operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub iops_total: Option<u64>,
    /// Read operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub iops_read: Option<u64>,
    /// Write operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub iops_write: Option<u64>,
    /// Read + write bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub bps_total: Option<u64>,
    /// Read bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub bps_read: Option<u64>,
    /// Write bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1_099_511_627_776_u64)]
    pub bps_write: Option<u64>,
}

impl IoLimits {
    /// No limit set.
    pub fn is_unlimited(&self) -> bool {
        self.pairs().iter().all(|(_, v)| v.unwrap_or(0) == 0)
    }

    /// QEMU's property names (`ThrottleLimits`) with the values.
    pub fn pairs(&self) -> [(&'static str, Option<u64>); 6] {
        [
            ("iops-total", self.iops_total),
            ("iops-read", self.iops_read),
            ("iops-write", self.iops_write),
            ("bps-total", self.bps_total),
            ("bps-read", self.bps_read),
            ("bps-write", self.bps_write),
        ]
    }

    /// The problems, as (field suffix, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let set = |v: Option<u64>| v.unwrap_or(0) > 0;
        if set(self.iops_total) && (set(self.iops_read) || set(self.iops_write)) {
            out.push((
                "iops_total",
                "cannot be combined with iops_read or iops_write".to_string(),
            ));
        }
        if set(self.bps_total) && (set(self.bps_read) || set(self.bps_write)) {
            out.push((
                "bps_total",
                "cannot be combined with bps_read or bps_write".to_string(),
            ));
        }
        for (name, value) in self.pairs() {
            if value.unwrap_or(0) > limits::MAX_IO_LIMIT {
                out.push((field_of(name), format!("at most {}", limits::MAX_IO_LIMIT)));
            }
        }
        out
    }
}

fn field_of(qemu_name: &str) -> &'static str {
    match qemu_name {
        "iops-total" => "iops_total",
        "iops-read" => "iops_read",
        "iops-write" => "iops_write",
        "bps-total" => "bps_total",
        "bps-read" => "bps_read",
        _ => "bps_write",
    }
}

/// Disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    /// Raw image.
    Raw,
    /// qcow2 image.
    Qcow2,
}

impl DiskFormat {
    /// QEMU's block driver name.
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// The name of the cloud-init seed disk (reserved).
pub const SEED_DISK: &str = "cidata";
