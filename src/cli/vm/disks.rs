//! `vmlet vm disk …`: attaching and detaching volumes and setting a disk's
//! I/O limits; the command-line spellings of buses, cache modes and limits;
//! and how a disk is described in `vm show`.

use crate::cli::{bytes, mib, parse_bytes, shown, CliError};
use crate::client::Client;
use crate::spec::{CacheMode, DiskBus, DiskFormat, DiskSpec, IoLimits};

/// `vmlet vm disk …`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum DiskCommand {
    /// Attach a volume: hot-plugged into a running VM (q35), or added to
    /// the spec of a stopped one.
    Attach {
        /// UUID or name.
        vm: String,
        /// The volume to attach.
        #[arg(long)]
        volume: String,
        /// The disk's name in the VM (default: the next `diskN`).
        #[arg(long)]
        name: Option<String>,
        /// Guest bus.
        #[arg(long, value_enum, default_value_t = BusArg::VirtioBlk)]
        bus: BusArg,
        /// Host cache mode.
        #[arg(long, value_enum, default_value_t = CacheArg::Writeback)]
        cache: CacheArg,
        /// Attach read-only.
        #[arg(long)]
        read_only: bool,
        /// Serial number the guest sees.
        #[arg(long)]
        serial: Option<String>,
    },
    /// Detach a volume or host-file disk (the guest is asked to release it
    /// first when the VM runs).
    Detach {
        /// UUID or name.
        vm: String,
        /// The disk's name.
        disk: String,
    },
    /// Set a disk's I/O limits, replacing the old ones (none given: no
    /// limits). Applied at once when the VM runs.
    Limits {
        /// UUID or name.
        vm: String,
        /// The disk's name.
        disk: String,
        /// The new limits.
        #[command(flatten)]
        limits: LimitArgs,
    },
}

/// The six I/O limits; a total and the read/write limits of the same kind
/// exclude each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::Args)]
#[command(next_help_heading = "I/O limits (unset or 0: unlimited)")]
pub struct LimitArgs {
    /// Read + write operations per second.
    #[arg(long, value_name = "N")]
    pub iops_total: Option<u64>,
    /// Read operations per second.
    #[arg(long, value_name = "N")]
    pub iops_read: Option<u64>,
    /// Write operations per second.
    #[arg(long, value_name = "N")]
    pub iops_write: Option<u64>,
    /// Read + write bytes per second (K, M, G suffixes: powers of 1024).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub bps_total: Option<u64>,
    /// Read bytes per second.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub bps_read: Option<u64>,
    /// Write bytes per second.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub bps_write: Option<u64>,
}

impl From<LimitArgs> for IoLimits {
    fn from(a: LimitArgs) -> IoLimits {
        IoLimits {
            iops_total: a.iops_total,
            iops_read: a.iops_read,
            iops_write: a.iops_write,
            bps_total: a.bps_total,
            bps_read: a.bps_read,
            bps_write: a.bps_write,
        }
    }
}

/// A disk's guest bus, as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusArg {
    /// A virtio-blk device (`/dev/vdX`).
    #[value(name = "virtio_blk", alias = "virtio-blk")]
    VirtioBlk,
    /// A disk on the virtio-scsi controller (`/dev/sdX`).
    #[value(name = "virtio_scsi", alias = "virtio-scsi")]
    VirtioScsi,
}

impl From<BusArg> for DiskBus {
    fn from(b: BusArg) -> DiskBus {
        match b {
            BusArg::VirtioBlk => DiskBus::VirtioBlk,
            BusArg::VirtioScsi => DiskBus::VirtioScsi,
        }
    }
}

/// A disk's host cache mode, as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheArg {
    /// Host page cache, guest flushes honoured.
    Writeback,
    /// O_DIRECT, guest flushes honoured.
    None,
    /// Host page cache, every write flushed.
    Writethrough,
    /// O_DIRECT, every write flushed.
    Directsync,
    /// Flushes ignored: fast, loses data on a host crash.
    Unsafe,
}

impl From<CacheArg> for CacheMode {
    fn from(c: CacheArg) -> CacheMode {
        match c {
            CacheArg::Writeback => CacheMode::Writeback,
            CacheArg::None => CacheMode::None,
            CacheArg::Writethrough => CacheMode::Writethrough,
            CacheArg::Directsync => CacheMode::Directsync,
            CacheArg::Unsafe => CacheMode::Unsafe,
        }
    }
}

pub(super) async fn disk_command(
    client: &Client,
    cmd: DiskCommand,
    json: bool,
) -> Result<String, CliError> {
    Ok(match cmd {
        DiskCommand::Attach {
            vm,
            volume,
            name,
            bus,
            cache,
            read_only,
            serial,
        } => {
            let disk = DiskSpec {
                name,
                path: None,
                format: None,
                volume: Some(volume.clone()),
                bus: bus.into(),
                cache: cache.into(),
                read_only,
                serial,
                ..DiskSpec::file("", DiskFormat::Raw)
            };
            let vm = client.attach_disk(&vm, &disk).await?;
            shown(json, &vm, |vm| {
                let disk = vm
                    .spec
                    .disks
                    .iter()
                    .enumerate()
                    .find(|(_, d)| d.volume.as_deref() == Some(volume.as_str()))
                    .map_or_else(|| "?".to_string(), |(i, d)| d.name_or_default(i));
                format!("attached volume {volume} to VM {} as {disk}\n", vm.name)
            })
        }
        DiskCommand::Detach { vm, disk } => {
            let vm = client.detach_disk(&vm, &disk).await?;
            shown(json, &vm, |vm| {
                format!("detached {disk} from VM {}\n", vm.name)
            })
        }
        DiskCommand::Limits { vm, disk, limits } => {
            let vm = client.set_disk_limits(&vm, &disk, &limits.into()).await?;
            shown(json, &vm, |vm| {
                let now = vm
                    .spec
                    .disks
                    .iter()
                    .enumerate()
                    .find(|(i, d)| d.name_or_default(*i) == disk)
                    .map_or(IoLimits::from(limits), |(_, d)| d.limits);
                format!("VM {} {disk}: {}\n", vm.name, limits_str(&now))
            })
        }
    })
}

/// Where a disk comes from, in words.
pub(super) fn disk_source_str(disk: &crate::spec::DiskSpec) -> String {
    use crate::spec::DiskSource;
    match disk.source() {
        Ok(DiskSource::File { path, format }) => format!("{} {}", format.driver(), path.display()),
        Ok(DiskSource::Image { image, size_mib }) => match size_mib {
            Some(size) => format!("overlay on image {image}, {}", mib(size)),
            None => format!("overlay on image {image}"),
        },
        Ok(DiskSource::Volume { volume }) => format!("volume {volume}"),
        Ok(DiskSource::Blank { size_mib }) => format!("blank, {}", mib(size_mib)),
        Err((field, message)) => format!("invalid: {field}: {message}"),
    }
}

/// A disk's limits: `iops_total=500 bps_read=10MiB/s`, or `unlimited`.
pub(super) fn limits_str(limits: &IoLimits) -> String {
    let set: Vec<String> = limits
        .pairs()
        .iter()
        .filter_map(|(key, value)| {
            let value = value.filter(|v| *v > 0)?;
            let key = key.replace('-', "_");
            Some(if key.starts_with("bps") {
                format!("{key}={}/s", bytes(value))
            } else {
                format!("{key}={value}")
            })
        })
        .collect();
    if set.is_empty() {
        "unlimited".to_string()
    } else {
        set.join(" ")
    }
}

pub(super) fn cache_str(cache: CacheMode) -> &'static str {
    match cache {
        CacheMode::None => "none",
        CacheMode::Writeback => "writeback",
        CacheMode::Writethrough => "writethrough",
        CacheMode::Directsync => "directsync",
        CacheMode::Unsafe => "unsafe",
    }
}
