//! `VmSpec`: what a VM is, as the API and `vmlet run` receive it, and its
//! validation. Pure: no I/O, so every rule is unit-tested.
//!
//! Validation collects every problem at once and names each field the way a
//! caller wrote it (`disks[1].path`), so a scheduler can show all errors.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Limits on a spec's sizes, so one request cannot ask for absurd resources or
/// build an argv QEMU would choke on.
pub mod limits {
    /// Most vCPUs a VM may have.
    pub const MAX_VCPUS: u32 = 288;
    /// Least guest memory, in MiB.
    pub const MIN_MEMORY_MIB: u64 = 16;
    /// Most guest memory, in MiB (16 TiB).
    pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;
    /// Longest VM name.
    pub const MAX_NAME_LEN: usize = 63;
    /// Longest disk or channel name. Disk names become QEMU node names
    /// (`NAME-file`, at most 31 characters in QEMU).
    pub const MAX_DEVICE_NAME_LEN: usize = 24;
    /// Most disks on one VM.
    pub const MAX_DISKS: usize = 24;
    /// Most virtio-serial channels on one VM.
    pub const MAX_CHANNELS: usize = 8;
    /// Longest host path.
    pub const MAX_PATH_LEN: usize = 4000;
    /// Longest kernel command line (x86 `COMMAND_LINE_SIZE`).
    pub const MAX_CMDLINE_LEN: usize = 2048;
    /// Longest disk serial (virtio-blk reports 20 bytes).
    pub const MAX_SERIAL_LEN: usize = 20;
    /// Largest disk made by vmlet, in MiB (64 TiB).
    pub const MAX_DISK_MIB: u64 = 64 * 1024 * 1024;
    /// Largest I/O limit (ops or bytes per second).
    pub const MAX_IO_LIMIT: u64 = 1 << 40;
    /// Most NICs on one VM.
    pub const MAX_NICS: usize = 16;
    /// Most queues of one NIC.
    pub const MAX_NIC_QUEUES: u32 = 16;
    /// Largest cloud-init file.
    pub const MAX_CLOUD_INIT_BYTES: usize = 256 * 1024;
}

/// The profile a spec gets when it names none.
pub const DEFAULT_PROFILE: &str = "q35";

/// A VM as the caller describes it. Unknown fields are refused so a typo never
/// silently means "default".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM's identity; also QEMU's `-uuid` and the name of its directories.
    pub uuid: Uuid,
    /// Human name: letters, digits, `.`, `_`, `-`; starts with a letter or digit.
    pub name: String,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Machine profile (a file in `qemu-profiles/`).
    #[serde(default = "default_profile")]
    pub profile: String,
    /// How the guest boots.
    pub boot: Boot,
    /// Block devices, in guest order.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// The serial console (ttyS0).
    #[serde(default)]
    pub serial: SerialSpec,
    /// Named virtio-serial ports, each backed by a unix socket on the host
    /// (like libvirt's `<channel>`; e.g. `org.qemu.guest_agent.0`).
    #[serde(default)]
    pub channels: Vec<ChannelSpec>,
    /// Network interfaces, in guest order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    /// A cloud-init NoCloud seed for the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// Start the VM when vmlet starts and finds it not running although its
    /// desired state is running (after a host reboot), like libvirt's
    /// autostart or Proxmox's `onboot`.
    #[serde(default)]
    pub autostart: bool,
}

fn default_profile() -> String {
    DEFAULT_PROFILE.to_string()
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Boot {
    /// Direct kernel boot: QEMU loads the kernel and initrd itself.
    Kernel {
        /// Host path of the kernel image.
        #[schema(value_type = String)]
        kernel: PathBuf,
        /// Host path of the initial ramdisk.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[serde(default)]
        cmdline: String,
    },
    /// Firmware boot from the disks, in `boot_order`.
    Firmware {
        /// Which firmware.
        #[serde(default)]
        firmware: Firmware,
    },
}

/// Guest firmware for [`Boot::Firmware`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS, shipped with QEMU).
    #[default]
    Bios,
}

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
    pub name: Option<String>,
    /// Absolute host path of an image file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub path: Option<PathBuf>,
    /// Format of `path`; never guessed (probing a raw image is a known escape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Image (of the image store) this disk is an overlay on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Named volume (of the volume store) this disk is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Size in MiB: of a blank disk, or of an overlay (at least the image's
    /// virtual size; default: that size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    pub iops_total: Option<u64>,
    /// Read operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_read: Option<u64>,
    /// Write operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_write: Option<u64>,
    /// Read + write bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_total: Option<u64>,
    /// Read bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_read: Option<u64>,
    /// Write bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

/// A cloud-init NoCloud seed: vmlet writes these files to a small read-only
/// vfat disk labelled `cidata` (the disk named `cidata`, last on the VM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// `user-data` (e.g. `#cloud-config …`).
    #[serde(default)]
    pub user_data: String,
    /// `meta-data`. Default: `instance-id` = the VM's UUID and
    /// `local-hostname` = its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<String>,
    /// `network-config` (version 1 or 2), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
}

/// One network interface: a NIC on a network (`POST /v1/networks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// The network's name.
    pub network: String,
    /// MAC address (`52:54:00:12:34:56`): unicast, not all zero. Unset: one
    /// is derived from the VM's UUID and the NIC's index (locally
    /// administered, unique on the host) and written into the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Device model.
    #[serde(default)]
    pub model: NicModel,
    /// Queue pairs (multi-queue virtio-net; one tap fd per queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u32>,
}

impl NicSpec {
    /// The number of queues (1 when unset).
    pub fn queue_count(&self) -> u32 {
        self.queues.unwrap_or(1).max(1)
    }
}

/// A NIC's device model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NicModel {
    /// virtio-net (the profile's `devices.net`).
    #[default]
    Virtio,
    /// Intel e1000 (PCI), for guests without virtio drivers.
    E1000,
    /// Intel 82574 (e1000e, PCIe).
    E1000e,
    /// Realtek RTL8139 (PCI).
    Rtl8139,
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff` (hex, either case).
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut out = [0u8; 6];
    for (byte, part) in out.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    Some(out)
}

/// Formats a MAC address in lower case.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MAC vmlet derives for NIC `index` of VM `uuid` (`attempt` > 0 after
/// a collision): `52:54` (locally administered, unicast, as QEMU's own
/// default) and four bytes of SHA-256 over the UUID, index and attempt.
pub fn derived_mac(uuid: Uuid, index: usize, attempt: u32) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(uuid.as_bytes());
    hasher.update((index as u32).to_le_bytes());
    hasher.update(attempt.to_le_bytes());
    let hash = hasher.finalize();
    format_mac([0x52, 0x54, hash[0], hash[1], hash[2], hash[3]])
}

/// The name of the cloud-init seed disk (reserved).
pub const SEED_DISK: &str = "cidata";

/// The serial console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SerialSpec {
    /// Give the guest a serial port (ttyS0) backed by a socket and a log file.
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for SerialSpec {
    fn default() -> Self {
        SerialSpec { enabled: true }
    }
}

fn yes() -> bool {
    true
}

/// A named virtio-serial port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    /// Port name the guest sees (`/sys/class/virtio-ports/*/name`).
    pub name: String,
}

/// One problem with a spec, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The field, as the caller wrote it: `name`, `disks[1].path`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// The problems, in field order.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
        write!(f, "invalid spec: {}", parts.join("; "))
    }
}

impl SpecError {
    /// An error naming one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError {
            errors: vec![FieldError {
                field: field.into(),
                message: message.into(),
            }],
        }
    }

    /// The first field named, for APIs that report one.
    pub fn first_field(&self) -> Option<&str> {
        self.errors.first().map(|e| e.field.as_str())
    }
}

/// What a profile offers, as far as validation needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileCaps {
    /// Direct kernel boot is possible.
    pub kernel_boot: bool,
    /// Firmware boot from a disk is possible.
    pub firmware_boot: bool,
    /// Disks may use `bus: virtio_scsi`.
    pub scsi: bool,
    /// Devices sit on PCI (other NIC models than virtio exist).
    pub pci: bool,
}

struct Collector(Vec<FieldError>);

impl Collector {
    fn into_result(self) -> Result<(), SpecError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(SpecError { errors: self.0 })
        }
    }

    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

impl VmSpec {
    /// Checks every field. `profile_caps` looks up a profile by name (`None`:
    /// unknown profile).
    pub fn validate(
        &self,
        profile_caps: impl Fn(&str) -> Option<ProfileCaps>,
    ) -> Result<(), SpecError> {
        let mut c = Collector(Vec::new());
        if self.uuid.is_nil() {
            c.add("uuid", "must not be the nil UUID");
        }
        check_name(&mut c, "name", &self.name, limits::MAX_NAME_LEN);
        if self.vcpus == 0 || self.vcpus > limits::MAX_VCPUS {
            c.add("vcpus", format!("must be 1..={}", limits::MAX_VCPUS));
        }
        if !(limits::MIN_MEMORY_MIB..=limits::MAX_MEMORY_MIB).contains(&self.memory_mib) {
            c.add(
                "memory_mib",
                format!(
                    "must be {}..={}",
                    limits::MIN_MEMORY_MIB,
                    limits::MAX_MEMORY_MIB
                ),
            );
        }
        let caps = profile_caps(&self.profile);
        if caps.is_none() {
            c.add("profile", format!("unknown profile {:?}", self.profile));
        }
        self.check_boot(&mut c, caps);
        self.check_disks(&mut c);
        if caps.is_some_and(|p| !p.scsi) {
            for (i, disk) in self.disks.iter().enumerate() {
                if disk.bus == DiskBus::VirtioScsi {
                    c.add(
                        format!("disks[{i}].bus"),
                        "this profile has no SCSI controller",
                    );
                }
            }
        }
        self.check_cloud_init(&mut c);
        self.check_nics(&mut c, caps);
        self.check_channels(&mut c);
        c.into_result()
    }

    fn check_boot(&self, c: &mut Collector, caps: Option<ProfileCaps>) {
        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                if caps.is_some_and(|p| !p.kernel_boot) {
                    c.add("boot.type", "this profile cannot boot a kernel directly");
                }
                check_path(c, "boot.kernel", kernel);
                if let Some(initrd) = initrd {
                    check_path(c, "boot.initrd", initrd);
                }
                if cmdline.len() > limits::MAX_CMDLINE_LEN {
                    c.add(
                        "boot.cmdline",
                        format!("longer than {} bytes", limits::MAX_CMDLINE_LEN),
                    );
                }
                if cmdline.chars().any(char::is_control) {
                    c.add("boot.cmdline", "contains control characters");
                }
            }
            Boot::Firmware { .. } => {
                if caps.is_some_and(|p| !p.firmware_boot) {
                    c.add("boot.type", "this profile cannot boot from firmware");
                }
                if !self.disks.iter().any(|d| d.boot_order.is_some()) {
                    c.add("disks", "firmware boot needs a disk with boot_order set");
                }
            }
        }
    }

    fn check_disks(&self, c: &mut Collector) {
        if self.disks.len() > limits::MAX_DISKS {
            c.add("disks", format!("more than {} disks", limits::MAX_DISKS));
        }
        let mut names = HashSet::new();
        let mut orders = HashSet::new();
        let mut volumes = HashSet::new();
        for (i, disk) in self.disks.iter().enumerate() {
            let field = |f: &str| format!("disks[{i}].{f}");
            check_disk(c, &field(""), disk);
            if !names.insert(disk.name_or_default(i)) {
                c.add(field("name"), "duplicate disk name");
            }
            if disk.name_or_default(i) == SEED_DISK {
                c.add(field("name"), "`cidata` is the cloud-init seed's name");
            }
            if let Some(order) = disk.boot_order {
                if !orders.insert(order) {
                    c.add(field("boot_order"), "another disk has this boot_order");
                }
            }
            if let Ok(DiskSource::Volume { volume }) = disk.source() {
                if !volumes.insert(volume) {
                    c.add(field("volume"), "another disk uses this volume");
                }
            }
        }
    }

    fn check_nics(&self, c: &mut Collector, caps: Option<ProfileCaps>) {
        if self.nics.len() > limits::MAX_NICS {
            c.add("nics", format!("more than {} NICs", limits::MAX_NICS));
        }
        let mut macs = HashSet::new();
        for (i, nic) in self.nics.iter().enumerate() {
            check_nic(c, &format!("nics[{i}]."), nic, caps);
            if let Some(mac) = nic.mac.as_deref().and_then(parse_mac) {
                if !macs.insert(mac) {
                    c.add(format!("nics[{i}].mac"), "another NIC has this MAC");
                }
            }
        }
    }

    fn check_cloud_init(&self, c: &mut Collector) {
        let Some(ci) = &self.cloud_init else { return };
        let files = [
            ("cloud_init.user_data", Some(&ci.user_data)),
            ("cloud_init.meta_data", ci.meta_data.as_ref()),
            ("cloud_init.network_config", ci.network_config.as_ref()),
        ];
        for (field, text) in files {
            if text.is_some_and(|t| t.len() > limits::MAX_CLOUD_INIT_BYTES) {
                c.add(
                    field,
                    format!("longer than {} bytes", limits::MAX_CLOUD_INIT_BYTES),
                );
            }
        }
    }

    fn check_channels(&self, c: &mut Collector) {
        if self.channels.len() > limits::MAX_CHANNELS {
            c.add(
                "channels",
                format!("more than {} channels", limits::MAX_CHANNELS),
            );
        }
        let mut names = HashSet::new();
        for (i, ch) in self.channels.iter().enumerate() {
            let field = format!("channels[{i}].name");
            check_name(c, &field, &ch.name, limits::MAX_NAME_LEN);
            if !names.insert(&ch.name) {
                c.add(field, "duplicate channel name");
            }
        }
    }
}

/// Checks one disk; `prefix` is `disks[i].` (or empty for a disk given on
/// its own, as in a hot-plug request).
fn check_disk(c: &mut Collector, prefix: &str, disk: &DiskSpec) {
    let field = |f: &str| format!("{prefix}{f}");
    if let Some(name) = &disk.name {
        check_device_name(c, &field("name"), name);
    }
    match disk.source() {
        Err((f, message)) => c.add(field(f), message),
        Ok(DiskSource::File { path, .. }) => check_path(c, &field("path"), path),
        Ok(DiskSource::Image { image, size_mib }) => {
            check_name(c, &field("image"), image, limits::MAX_NAME_LEN);
            if let Some(size) = size_mib {
                check_size(c, &field("size_mib"), size);
            }
        }
        Ok(DiskSource::Volume { volume }) => {
            check_name(c, &field("volume"), volume, limits::MAX_NAME_LEN)
        }
        Ok(DiskSource::Blank { size_mib }) => check_size(c, &field("size_mib"), size_mib),
    }
    if disk.format.is_some() && disk.path.is_none() {
        c.add(field("format"), "only with path");
    }
    if let Some(serial) = &disk.serial {
        let ok = !serial.is_empty()
            && serial.len() <= limits::MAX_SERIAL_LEN
            && serial
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
        if !ok {
            c.add(
                field("serial"),
                format!(
                    "1..={} characters of A-Z a-z 0-9 . _ -",
                    limits::MAX_SERIAL_LEN
                ),
            );
        }
    }
    for (f, message) in disk.limits.problems() {
        c.add(field(&format!("limits.{f}")), message);
    }
}

fn check_nic(c: &mut Collector, prefix: &str, nic: &NicSpec, caps: Option<ProfileCaps>) {
    let field = |f: &str| format!("{prefix}{f}");
    check_name(c, &field("network"), &nic.network, limits::MAX_NAME_LEN);
    if let Some(mac) = &nic.mac {
        match parse_mac(mac) {
            None => c.add(
                field("mac"),
                "must be six hex octets like 52:54:00:12:34:56",
            ),
            Some(bytes) if bytes[0] & 1 == 1 => c.add(
                field("mac"),
                "is a multicast address (the first octet is odd)",
            ),
            Some([0, 0, 0, 0, 0, 0]) => c.add(field("mac"), "must not be all zero"),
            Some(_) => {}
        }
    }
    let queues = nic.queues.unwrap_or(1);
    if queues == 0 || queues > limits::MAX_NIC_QUEUES {
        c.add(
            field("queues"),
            format!("must be 1..={}", limits::MAX_NIC_QUEUES),
        );
    } else if queues > 1 && nic.model != NicModel::Virtio {
        c.add(field("queues"), "multi-queue needs model virtio");
    }
    if nic.model != NicModel::Virtio && caps.is_some_and(|p| !p.pci) {
        c.add(field("model"), "this profile has no PCI bus: only virtio");
    }
}

/// Validates a NIC given on its own (a hot-plug request).
pub fn validate_nic(nic: &NicSpec, caps: Option<ProfileCaps>) -> Result<(), SpecError> {
    let mut c = Collector(Vec::new());
    check_nic(&mut c, "", nic, caps);
    c.into_result()
}

fn check_size(c: &mut Collector, field: &str, size_mib: u64) {
    if size_mib == 0 || size_mib > limits::MAX_DISK_MIB {
        c.add(field, format!("must be 1..={} MiB", limits::MAX_DISK_MIB));
    }
}

/// Validates a disk given on its own (a hot-plug request): field names have
/// no `disks[i].` prefix.
pub fn validate_disk(disk: &DiskSpec) -> Result<(), SpecError> {
    let mut c = Collector(Vec::new());
    check_disk(&mut c, "", disk);
    c.into_result()
}

/// Validates I/O limits given on their own.
pub fn validate_limits(limits: &IoLimits) -> Result<(), SpecError> {
    let mut c = Collector(Vec::new());
    for (f, message) in limits.problems() {
        c.add(f, message);
    }
    c.into_result()
}

/// Validates the name of an image, volume or snapshot (`field` names it).
pub fn validate_name(field: &str, name: &str) -> Result<(), SpecError> {
    let mut c = Collector(Vec::new());
    check_name(&mut c, field, name, limits::MAX_NAME_LEN);
    c.into_result()
}

/// Validates a disk size in MiB (`field` names it).
pub fn validate_size(field: &str, size_mib: u64) -> Result<(), SpecError> {
    let mut c = Collector(Vec::new());
    check_size(&mut c, field, size_mib);
    c.into_result()
}

/// Names: `[A-Za-z0-9][A-Za-z0-9._-]*`. They reach QEMU options and logs, so
/// nothing that could be an option separator, a path, or a shell word.
fn check_name(c: &mut Collector, field: &str, name: &str, max: usize) {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_alphanumeric());
    let rest_ok = name
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch));
    if name.is_empty() || name.len() > max || !first_ok || !rest_ok {
        c.add(
            field,
            format!(
                "must be 1..={max} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
            ),
        );
    }
}

/// Device names become QEMU ids and node names, which must start with a letter.
fn check_device_name(c: &mut Collector, field: &str, name: &str) {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_alphabetic());
    let rest_ok = name
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
    if name.is_empty() || name.len() > limits::MAX_DEVICE_NAME_LEN || !first_ok || !rest_ok {
        c.add(
            field,
            format!(
                "must be 1..={} characters of A-Z a-z 0-9 _ -, starting with a letter",
                limits::MAX_DEVICE_NAME_LEN
            ),
        );
    }
}

/// Host paths must be absolute and normal: no `..`, no `.`, no control
/// characters, so a path means what it says and cannot walk out of the
/// directory it names.
fn check_path(c: &mut Collector, field: &str, path: &Path) {
    let Some(s) = path.to_str() else {
        c.add(field, "must be valid UTF-8");
        return;
    };
    if s.is_empty() {
        c.add(field, "must not be empty");
        return;
    }
    if s.len() > limits::MAX_PATH_LEN {
        c.add(field, format!("longer than {} bytes", limits::MAX_PATH_LEN));
    }
    if !path.is_absolute() {
        c.add(field, "must be an absolute path");
    }
    if s.chars().any(char::is_control) {
        c.add(field, "contains control characters");
    }
    // By segment, not Path::components(), which silently drops `.` and `//`.
    let inner: Vec<&str> = s.split('/').skip(1).collect();
    if inner.iter().any(|seg| *seg == "." || *seg == "..") {
        c.add(field, "must not contain `.` or `..` components");
    } else if s.ends_with('/') {
        c.add(field, "must name a file, not a directory");
    } else if inner.iter().any(|seg| seg.is_empty()) {
        c.add(field, "must not contain `//`");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn caps(name: &str) -> Option<ProfileCaps> {
        match name {
            "q35" => Some(ProfileCaps {
                kernel_boot: true,
                firmware_boot: true,
                scsi: true,
                pci: true,
            }),
            "microvm" => Some(ProfileCaps {
                kernel_boot: true,
                firmware_boot: false,
                scsi: false,
                pci: false,
            }),
            _ => None,
        }
    }

    fn base() -> serde_json::Value {
        json!({
            "uuid": "5b0c2d4e-8a51-4f3e-9b1c-2a7f4d6e8c10",
            "name": "web-1",
            "vcpus": 2,
            "memory_mib": 512,
            "boot": {"type": "kernel", "kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img", "cmdline": "console=ttyS0"},
            "disks": [{"path": "/var/lib/vmlet/a.qcow2", "format": "qcow2"}]
        })
    }

    fn parse(v: serde_json::Value) -> VmSpec {
        serde_json::from_value(v).expect("spec parses")
    }

    fn fields(v: serde_json::Value) -> Vec<String> {
        match parse(v).validate(caps) {
            Ok(()) => vec![],
            Err(e) => e.errors.into_iter().map(|e| e.field).collect(),
        }
    }

    #[test]
    fn good_spec_is_valid_and_gets_defaults() {
        let spec = parse(base());
        assert_eq!(spec.validate(caps), Ok(()));
        assert_eq!(spec.profile, "q35");
        assert!(spec.serial.enabled);
        assert_eq!(spec.disks[0].name_or_default(0), "disk0");
    }

    #[test]
    fn unknown_fields_are_refused_at_every_level() {
        let mut v = base();
        v["colour"] = json!("red");
        assert!(serde_json::from_value::<VmSpec>(v).is_err());
        let mut v = base();
        v["disks"][0]["colour"] = json!("none");
        assert!(serde_json::from_value::<VmSpec>(v).is_err());
        let mut v = base();
        v["boot"]["firmware"] = json!("bios");
        assert!(serde_json::from_value::<VmSpec>(v).is_err());
    }

    #[test]
    fn bad_values_name_their_field() {
        let mut v = base();
        v["name"] = json!("../etc");
        v["vcpus"] = json!(0);
        v["memory_mib"] = json!(1);
        v["profile"] = json!("nope");
        assert_eq!(fields(v), ["name", "vcpus", "memory_mib", "profile"]);
    }

    #[test]
    fn paths_must_be_absolute_and_normal() {
        for bad in [
            "relative.qcow2",
            "/var/../etc/shadow",
            "/a/./b",
            "/a/b/",
            "/a//b",
            "/a\nb",
            "",
        ] {
            let mut v = base();
            v["disks"] = json!([
                {"path": "/ok.qcow2", "format": "qcow2"},
                {"path": bad, "format": "raw"}
            ]);
            assert_eq!(fields(v), ["disks[1].path"], "path {bad:?}");
        }
        let mut v = base();
        v["boot"]["kernel"] = json!("vmlinuz");
        v["boot"]["initrd"] = json!("/x/../y");
        assert_eq!(fields(v), ["boot.kernel", "boot.initrd"]);
    }

    #[test]
    fn commas_and_spaces_in_paths_are_allowed() {
        let mut v = base();
        v["disks"][0]["path"] = json!("/srv/my disks/a,b.qcow2");
        assert_eq!(fields(v), Vec::<String>::new());
    }

    #[test]
    fn disk_names_orders_and_serials() {
        let mut v = base();
        v["disks"] = json!([
            {"name": "root", "path": "/a", "format": "raw", "boot_order": 1},
            {"name": "root", "path": "/b", "format": "raw", "boot_order": 1},
            {"name": "9lives", "path": "/c", "format": "raw", "serial": "has space"},
        ]);
        assert_eq!(
            fields(v),
            [
                "disks[1].name",
                "disks[1].boot_order",
                "disks[2].name",
                "disks[2].serial"
            ]
        );
        // A default name colliding with an explicit one is a duplicate too.
        let mut v = base();
        v["disks"] = json!([
            {"path": "/a", "format": "raw"},
            {"name": "disk0", "path": "/b", "format": "raw"},
        ]);
        assert_eq!(fields(v), ["disks[1].name"]);
    }

    #[test]
    fn firmware_boot_needs_a_boot_disk_and_a_capable_profile() {
        let mut v = base();
        v["boot"] = json!({"type": "firmware"});
        assert_eq!(fields(v.clone()), ["disks"]);
        v["disks"][0]["boot_order"] = json!(1);
        assert_eq!(fields(v.clone()), Vec::<String>::new());
        v["profile"] = json!("microvm");
        assert_eq!(fields(v), ["boot.type"]);
    }

    #[test]
    fn cmdline_limits() {
        let mut v = base();
        v["boot"]["cmdline"] = json!("a".repeat(limits::MAX_CMDLINE_LEN + 1));
        assert_eq!(fields(v), ["boot.cmdline"]);
        let mut v = base();
        v["boot"]["cmdline"] = json!("console=ttyS0\nrm");
        assert_eq!(fields(v), ["boot.cmdline"]);
    }

    #[test]
    fn channels_are_checked() {
        let mut v = base();
        v["channels"] =
            json!([{"name": "org.vmlet.guest.0"}, {"name": "org.vmlet.guest.0"}, {"name": "a,b"}]);
        assert_eq!(fields(v), ["channels[1].name", "channels[2].name"]);
    }

    #[test]
    fn disk_sources_are_exactly_one() {
        let cases = [
            (json!({"image": "debian", "size_mib": 10240}), vec![]),
            (json!({"volume": "data"}), vec![]),
            (json!({"size_mib": 64}), vec![]),
            (json!({"path": "/a"}), vec!["disks[0].format"]),
            (
                json!({"format": "raw"}),
                vec!["disks[0].path", "disks[0].format"],
            ),
            (json!({}), vec!["disks[0].path"]),
            (json!({"image": "a", "volume": "b"}), vec!["disks[0].path"]),
            (
                json!({"path": "/a", "format": "raw", "image": "x"}),
                vec!["disks[0].path"],
            ),
            (
                json!({"volume": "v", "size_mib": 5}),
                vec!["disks[0].size_mib"],
            ),
            (
                json!({"path": "/a", "format": "raw", "size_mib": 5}),
                vec!["disks[0].size_mib"],
            ),
            (json!({"size_mib": 0}), vec!["disks[0].size_mib"]),
            (json!({"image": "../etc"}), vec!["disks[0].image"]),
            (json!({"volume": "a/b"}), vec!["disks[0].volume"]),
        ];
        for (disk, expected) in cases {
            let mut v = base();
            v["disks"] = json!([disk.clone()]);
            assert_eq!(fields(v), expected, "{disk}");
        }
    }

    #[test]
    fn a_volume_is_used_once_and_cidata_is_reserved() {
        let mut v = base();
        v["disks"] = json!([
            {"volume": "data"},
            {"volume": "data"},
            {"name": "cidata", "size_mib": 1},
        ]);
        assert_eq!(fields(v), ["disks[1].volume", "disks[2].name"]);
    }

    #[test]
    fn io_limits_and_buses_are_checked() {
        let mut v = base();
        v["disks"][0]["limits"] = json!({"iops_total": 100, "iops_read": 5, "bps_write": 1});
        assert_eq!(fields(v), ["disks[0].limits.iops_total"]);
        let mut v = base();
        v["disks"][0]["limits"] = json!({"bps_total": 0, "bps_read": 5});
        assert_eq!(fields(v.clone()), Vec::<String>::new());
        let spec = parse(v);
        assert!(!spec.disks[0].limits.is_unlimited());
        assert!(IoLimits::default().is_unlimited());
        let mut v = base();
        v["disks"][0]["bus"] = json!("virtio_scsi");
        assert_eq!(fields(v.clone()), Vec::<String>::new());
        v["profile"] = json!("microvm");
        assert_eq!(fields(v), ["disks[0].bus"]);
        assert!(validate_limits(&IoLimits {
            bps_total: Some(1),
            bps_write: Some(1),
            ..IoLimits::default()
        })
        .is_err());
    }

    #[test]
    fn cloud_init_sizes_are_capped() {
        let mut v = base();
        v["cloud_init"] = json!({"user_data": "#cloud-config\n"});
        assert_eq!(fields(v.clone()), Vec::<String>::new());
        v["cloud_init"]["network_config"] = json!("x".repeat(limits::MAX_CLOUD_INIT_BYTES + 1));
        assert_eq!(fields(v), ["cloud_init.network_config"]);
    }

    #[test]
    fn cache_modes_map_like_libvirt() {
        // (direct, no-flush, write-cache)
        assert_eq!(CacheMode::None.qemu_flags(), (true, false, true));
        assert_eq!(CacheMode::Writeback.qemu_flags(), (false, false, true));
        assert_eq!(CacheMode::Writethrough.qemu_flags(), (false, false, false));
        assert_eq!(CacheMode::Directsync.qemu_flags(), (true, false, false));
        assert_eq!(CacheMode::Unsafe.qemu_flags(), (false, true, true));
        assert_eq!(CacheMode::default(), CacheMode::Writeback);
    }

    #[test]
    fn owned_disks_are_overlays_and_blank_ones() {
        let disk = |v: serde_json::Value| serde_json::from_value::<DiskSpec>(v).unwrap();
        assert!(disk(json!({"image": "a"})).owned_by_vm());
        assert!(disk(json!({"size_mib": 1})).owned_by_vm());
        assert!(!disk(json!({"volume": "a"})).owned_by_vm());
        assert!(!disk(json!({"path": "/a", "format": "raw"})).owned_by_vm());
    }

    #[test]
    fn nics_are_checked() {
        let mut v = base();
        v["nics"] = json!([
            {"network": "lan"},
            {"network": "lan", "mac": "52:54:00:AB:cd:ef", "queues": 4},
            {"network": "lan", "mac": "01:00:5e:00:00:01"},
            {"network": "lan", "mac": "00:00:00:00:00:00"},
            {"network": "lan", "mac": "52:54:00:ab:cd"},
            {"network": "lan", "mac": "52:54:00:ab:cd:ef"},
            {"network": "a b"},
            {"network": "lan", "queues": 0},
            {"network": "lan", "model": "e1000", "queues": 2},
        ]);
        assert_eq!(
            fields(v.clone()),
            [
                "nics[2].mac",
                "nics[3].mac",
                "nics[4].mac",
                "nics[5].mac",
                "nics[6].network",
                "nics[7].queues",
                "nics[8].queues"
            ]
        );
        let mut v = base();
        v["profile"] = json!("microvm");
        v["nics"] = json!([{"network": "lan", "model": "rtl8139"}]);
        assert_eq!(fields(v), ["nics[0].model"]);
    }

    #[test]
    fn derived_macs_are_stable_local_unicast_and_distinct() {
        let uuid = Uuid::parse_str("5b0c2d4e-8a51-4f3e-9b1c-2a7f4d6e8c10").unwrap();
        let a = derived_mac(uuid, 0, 0);
        assert_eq!(a, derived_mac(uuid, 0, 0));
        assert_ne!(a, derived_mac(uuid, 1, 0));
        assert_ne!(a, derived_mac(uuid, 0, 1));
        let bytes = parse_mac(&a).unwrap();
        assert_eq!(bytes[0] & 0b11, 0b10, "locally administered unicast: {a}");
        assert!(a.starts_with("52:54:"), "{a}");
        assert_eq!(format_mac(bytes), a);
    }

    #[test]
    fn nil_uuid_is_refused() {
        let mut v = base();
        v["uuid"] = json!("00000000-0000-0000-0000-000000000000");
        assert_eq!(fields(v), ["uuid"]);
    }
}
