//! The shared vocabulary every layer speaks: what a VM is (`VmSpec`), its
//! disks and NICs, the images and volumes the API shows, and the field
//! errors validation reports. Pure: no I/O, so
//! every rule is unit-tested. It sits below everything and uses nothing of
//! vmlet above it.
//!
//! Validation collects every problem at once and names each field the way a
//! caller wrote it (`disks[1].path`), so a scheduler can show all errors.

mod cpu;
mod disk;
mod errors;
mod image;
mod machine;
mod migration;
mod nic;
mod patch;
mod resources;
mod validation;
mod vm;
mod volume;

pub use cpu::{
    check_cpu_feature, check_cpu_model, cpu_value, feature_name, CpuSpec, HugePageSize, MemorySpec,
    NumaNode, Topology,
};
pub use disk::{CacheMode, DiskBus, DiskFormat, DiskSource, DiskSpec, IoLimits, SEED_DISK};
pub use errors::{FieldError, SpecError};
pub use image::{Image, ImageImport, ImageStatus, ImportPhase, ImportProgress};
pub use machine::MachinePin;
pub use migration::{
    DiskProgress, FinishRequest, MigrateRequest, Migration, MigrationTarget, Phase, Progress, Role,
    DEFAULT_MAX_DOWNTIME_MS, MAX_MAX_DOWNTIME_MS,
};
pub use nic::{derived_mac, format_mac, parse_mac, NicModel, NicSpec};
pub use patch::{
    adopt_disk_names, changed_fields, check_disk_changes, diff, merge_patch, name_disks,
    same_source, split, LiveCaps, LiveChange, Split,
};
pub use resources::{format_cpu_list, host_cpus, parse_cpu_list, Resources, MAX_HOST_CPU};
pub use validation::{validate_disk, validate_limits, validate_name, validate_nic, validate_size};
pub use vm::{
    Boot, ChannelSpec, CloudInit, Firmware, ProfileCaps, SerialSpec, TpmSpec, TpmVersion, VmSpec,
    DEFAULT_PROFILE, GUEST_AGENT_PORT, UEFI_NODES,
};
pub use volume::{Volume, VolumeAttachment, VolumeCreate, VolumeResize};

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
