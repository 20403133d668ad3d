//! `vmlet vm …`: the VM subcommands, the disk, NIC and snapshot ones
//! included, and how VMs, their disks and their snapshots are rendered.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use uuid::Uuid;

use super::{
    bytes, columns, key_values, mib, parse_bytes, shown, shown_list, unless_json, write_flush,
    CliError, ClientOptions, Output,
};
use crate::client::Client;
use crate::spec::{
    Boot, CacheMode, DiskBus, DiskFormat, DiskSpec, Firmware, IoLimits, NicModel, NicSpec,
};
use crate::vm::disk_ops::Snapshot;
use crate::vm::Vm;

/// `vmlet vm …`: one VM operation. `VM` is a UUID or a name.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum VmCommand {
    /// List every VM.
    List,
    /// Show one VM.
    Show {
        /// UUID or name.
        vm: String,
    },
    /// Create a VM from a spec file. With a UUID (`--id` or the spec's
    /// `uuid`), the create is a PUT and safe to retry; without one the
    /// daemon picks it.
    Create {
        /// The VM spec (JSON); `-` reads standard input.
        #[arg(short, long)]
        file: PathBuf,
        /// The VM's UUID.
        #[arg(long)]
        id: Option<Uuid>,
    },
    /// Start a VM.
    Start {
        /// UUID or name.
        vm: String,
    },
    /// Stop a VM: ACPI power button, then quit after the timeout.
    Stop {
        /// UUID or name.
        vm: String,
        /// Stop at once, without asking the guest.
        #[arg(long)]
        force: bool,
        /// Seconds the guest gets to power off (the daemon's default if unset).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// Reset a VM's guest.
    Reboot {
        /// UUID or name.
        vm: String,
    },
    /// Pause a VM's vCPUs.
    Pause {
        /// UUID or name.
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        /// UUID or name.
        vm: String,
    },
    /// Delete a stopped VM with its own disks (overlays, blank disks, the
    /// cloud-init seed). Volumes are kept unless --delete-volumes.
    Delete {
        /// UUID or name.
        vm: String,
        /// Delete a running VM too, stopping it first.
        #[arg(long)]
        force: bool,
        /// Delete the volumes attached to it too.
        #[arg(long)]
        delete_volumes: bool,
    },
    /// Attach, detach and throttle a VM's disks.
    Disk {
        /// The disk operation.
        #[command(subcommand)]
        cmd: DiskCommand,
    },
    /// Attach and detach a VM's NICs.
    Nic {
        /// The NIC operation.
        #[command(subcommand)]
        cmd: NicCommand,
    },
    /// List, take, revert to and delete a VM's snapshots.
    Snapshot {
        /// The snapshot operation.
        #[command(subcommand)]
        cmd: SnapshotCommand,
    },
}

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

/// `vmlet vm nic …`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum NicCommand {
    /// Add a NIC on a network: hot-plugged into a running VM, or added to
    /// the spec of a stopped one.
    Attach {
        /// UUID or name.
        vm: String,
        /// The network to put it on.
        #[arg(long)]
        network: String,
        /// MAC address (default: derived from the VM's UUID).
        #[arg(long)]
        mac: Option<String>,
        /// Device model.
        #[arg(long, value_enum, default_value_t = NicModelArg::Virtio)]
        model: NicModelArg,
        /// Queue pairs (multi-queue virtio-net).
        #[arg(long, value_name = "N")]
        queues: Option<u32>,
    },
    /// Remove a NIC (unplugged from a running VM, its tap removed).
    Detach {
        /// UUID or name.
        vm: String,
        /// The NIC's MAC or index.
        nic: String,
    },
}

/// A NIC's device model, as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NicModelArg {
    /// virtio-net.
    Virtio,
    /// Intel e1000 (PCI), for guests without virtio drivers.
    E1000,
    /// Intel 82574 (PCIe).
    E1000e,
    /// Realtek RTL8139 (PCI).
    Rtl8139,
}

impl From<NicModelArg> for NicModel {
    fn from(m: NicModelArg) -> NicModel {
        match m {
            NicModelArg::Virtio => NicModel::Virtio,
            NicModelArg::E1000 => NicModel::E1000,
            NicModelArg::E1000e => NicModel::E1000e,
            NicModelArg::Rtl8139 => NicModel::Rtl8139,
        }
    }
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

/// `vmlet vm snapshot …`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum SnapshotCommand {
    /// List a VM's snapshots.
    List {
        /// UUID or name.
        vm: String,
    },
    /// Take a snapshot: memory and disks of a running VM, disks only of a
    /// stopped one. Every writable disk must be qcow2.
    Create {
        /// UUID or name.
        vm: String,
        /// The snapshot's name.
        name: String,
    },
    /// Go back to a snapshot (a running VM continues from that moment).
    Revert {
        /// UUID or name.
        vm: String,
        /// The snapshot's name.
        name: String,
    },
    /// Delete a snapshot.
    Delete {
        /// UUID or name.
        vm: String,
        /// The snapshot's name.
        name: String,
    },
}

/// Runs `vmlet vm CMD`, printing to `out`.
pub async fn run_vm(
    cmd: VmCommand,
    opts: &ClientOptions,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let client = opts.client()?;
    let json = opts.output == Output::Json;
    let text = match cmd {
        VmCommand::List => {
            let vms = client.list_vms().await?;
            shown_list(json, "vms", &vms, render_vm_list)
        }
        VmCommand::Show { vm } => shown(json, &client.get_vm(&vm).await?, render_vm),
        VmCommand::Create { file, id } => {
            let spec = read_spec(&file)?;
            let uuid = create_uuid(&spec, id)?;
            let (created, vm) = match uuid {
                Some(uuid) => {
                    let mut spec = spec;
                    spec["uuid"] = uuid.to_string().into();
                    client.put_vm(uuid, &spec).await?
                }
                None => (true, client.create_vm(&spec).await?),
            };
            shown(json, &vm, |vm| {
                if created {
                    format!("created VM {} ({})\n", vm.name, vm.id)
                } else {
                    format!("VM {} ({}) already exists with this spec\n", vm.name, vm.id)
                }
            })
        }
        VmCommand::Delete {
            vm,
            force,
            delete_volumes,
        } => {
            client.delete_vm_with(&vm, force, delete_volumes).await?;
            unless_json(json, || {
                if delete_volumes {
                    format!("deleted VM {vm} and its volumes\n")
                } else {
                    format!("deleted VM {vm}\n")
                }
            })
        }
        VmCommand::Disk { cmd } => disk_command(&client, cmd, json).await?,
        VmCommand::Nic { cmd } => nic_command(&client, cmd, json).await?,
        VmCommand::Snapshot { cmd } => snapshot_command(&client, cmd, json).await?,
        VmCommand::Start { vm } => action_output(client.start(&vm).await?, json),
        VmCommand::Stop { vm, force, timeout } => {
            action_output(client.stop(&vm, force, timeout).await?, json)
        }
        VmCommand::Reboot { vm } => action_output(client.reboot(&vm).await?, json),
        VmCommand::Pause { vm } => action_output(client.pause(&vm).await?, json),
        VmCommand::Resume { vm } => action_output(client.resume(&vm).await?, json),
    };
    write_flush(out, &text)
}

async fn disk_command(client: &Client, cmd: DiskCommand, json: bool) -> Result<String, CliError> {
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

async fn nic_command(client: &Client, cmd: NicCommand, json: bool) -> Result<String, CliError> {
    Ok(match cmd {
        NicCommand::Attach {
            vm,
            network,
            mac,
            model,
            queues,
        } => {
            let nic = NicSpec {
                network,
                mac,
                model: model.into(),
                queues,
            };
            let vm = client.attach_nic(&vm, &nic).await?;
            shown(json, &vm, |vm| {
                // The new NIC is the last one; its MAC may have been derived.
                let mac = vm
                    .spec
                    .nics
                    .last()
                    .and_then(|n| n.mac.clone())
                    .unwrap_or_else(|| "?".into());
                format!(
                    "attached NIC {mac} on network {} to VM {}\n",
                    nic.network, vm.name
                )
            })
        }
        NicCommand::Detach { vm, nic } => {
            let vm = client.detach_nic(&vm, &nic).await?;
            shown(json, &vm, |vm| {
                format!("detached NIC {nic} from VM {}\n", vm.name)
            })
        }
    })
}

async fn snapshot_command(
    client: &Client,
    cmd: SnapshotCommand,
    json: bool,
) -> Result<String, CliError> {
    Ok(match cmd {
        SnapshotCommand::List { vm } => {
            let snapshots = client.list_snapshots(&vm).await?;
            shown_list(json, "snapshots", &snapshots, render_snapshot_list)
        }
        SnapshotCommand::Create { vm, name } => {
            let snapshot = client.create_snapshot(&vm, &name).await?;
            shown(json, &snapshot, |snapshot| {
                format!(
                    "created snapshot {} of VM {vm} ({})\n",
                    snapshot.name,
                    snapshot_kind(snapshot)
                )
            })
        }
        SnapshotCommand::Revert { vm, name } => {
            let vm = client.revert_snapshot(&vm, &name).await?;
            shown(json, &vm, |vm| {
                format!("reverted VM {} to snapshot {name}\n", vm.name)
            })
        }
        SnapshotCommand::Delete { vm, name } => {
            client.delete_snapshot(&vm, &name).await?;
            unless_json(json, || format!("deleted snapshot {name} of VM {vm}\n"))
        }
    })
}

fn action_output(vm: Vm, json: bool) -> String {
    shown(json, &vm, |vm| format!("{}\n", vm_line(vm)))
}

/// Reads a spec file (`-`: standard input) as a JSON object.
fn read_spec(path: &Path) -> Result<Value, CliError> {
    let read_error = |source| CliError::ReadSpec {
        path: path.to_path_buf(),
        source,
    };
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(read_error)?;
        text
    } else {
        std::fs::read_to_string(path).map_err(read_error)?
    };
    parse_spec(path, &text)
}

fn parse_spec(path: &Path, text: &str) -> Result<Value, CliError> {
    let not_json = |reason: String| CliError::SpecNotJson {
        path: path.to_path_buf(),
        reason,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| not_json(e.to_string()))?;
    if !value.is_object() {
        return Err(not_json("expected an object".into()));
    }
    Ok(value)
}

/// The UUID a create uses: `--id`, else the spec's `uuid` when it is one
/// (a malformed one is left for the daemon to report, naming the field).
fn create_uuid(spec: &Value, id: Option<Uuid>) -> Result<Option<Uuid>, CliError> {
    let in_spec = spec.get("uuid").and_then(Value::as_str);
    match (id, in_spec) {
        (Some(id), Some(text)) if text.parse::<Uuid>().ok() != Some(id) => {
            Err(CliError::UuidMismatch {
                id,
                spec: text.to_string(),
            })
        }
        (Some(id), _) => Ok(Some(id)),
        (None, text) => Ok(text.and_then(|t| t.parse().ok())),
    }
}

/// `vm list` as aligned columns.
pub fn render_vm_list(vms: &[Vm]) -> String {
    let header = [
        "ID", "NAME", "STATE", "TASK", "DESIRED", "VCPUS", "MEMORY", "PID",
    ];
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            vec![
                vm.id.to_string(),
                vm.name.clone(),
                vm.state.as_str().to_string(),
                task_str(vm),
                desired_str(vm).to_string(),
                vm.spec.vcpus.to_string(),
                mib(vm.spec.memory_mib),
                vm.pid.map_or("-".to_string(), |p| p.to_string()),
            ]
        })
        .collect();
    columns(&header, &rows)
}

/// `vm show` as `key: value` lines.
pub fn render_vm(vm: &Vm) -> String {
    let spec = &vm.spec;
    let mut lines: Vec<(String, String)> = vec![
        ("id".into(), vm.id.to_string()),
        ("name".into(), vm.name.clone()),
        ("state".into(), vm.state.as_str().into()),
        ("task".into(), task_str(vm)),
        ("desired".into(), desired_str(vm).into()),
        ("generation".into(), vm.generation.to_string()),
        (
            "pid".into(),
            vm.pid.map_or("-".to_string(), |p| p.to_string()),
        ),
    ];
    if let Some(error) = &vm.error {
        lines.push(("error".into(), error.clone()));
    }
    lines.push(("vcpus".into(), spec.vcpus.to_string()));
    lines.push(("memory".into(), mib(spec.memory_mib)));
    lines.push(("profile".into(), spec.profile.clone()));
    lines.push(("boot".into(), boot_str(&spec.boot)));
    for (i, disk) in spec.disks.iter().enumerate() {
        let mut flags = vec![];
        if disk.bus != DiskBus::VirtioBlk {
            flags.push("scsi".to_string());
        }
        if disk.cache != CacheMode::Writeback {
            flags.push(format!("cache {}", cache_str(disk.cache)));
        }
        if disk.read_only {
            flags.push("read-only".into());
        }
        if let Some(order) = disk.boot_order {
            flags.push(format!("boot {order}"));
        }
        if let Some(serial) = &disk.serial {
            flags.push(format!("serial {serial}"));
        }
        if !disk.limits.is_unlimited() {
            flags.push(limits_str(&disk.limits));
        }
        lines.push((
            format!("disk {}", disk.name_or_default(i)),
            if flags.is_empty() {
                disk_source_str(disk)
            } else {
                format!("{} ({})", disk_source_str(disk), flags.join(", "))
            },
        ));
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        lines.push((format!("nic {i}"), nic_str(nic)));
    }
    lines.push((
        "serial".into(),
        if spec.serial.enabled { "yes" } else { "no" }.into(),
    ));
    for channel in &spec.channels {
        lines.push(("channel".into(), channel.name.clone()));
    }
    lines.push((
        "autostart".into(),
        if spec.autostart { "yes" } else { "no" }.into(),
    ));
    lines.push(("created".into(), vm.created_at.clone()));
    lines.push(("updated".into(), vm.updated_at.clone()));
    key_values(&lines)
}

/// Where a disk comes from, in words.
fn disk_source_str(disk: &crate::spec::DiskSpec) -> String {
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

/// A NIC in words: `network lan, 52:54:00:12:34:56, virtio, 4 queues`.
fn nic_str(nic: &NicSpec) -> String {
    let mut parts = vec![
        format!("network {}", nic.network),
        nic.mac.clone().unwrap_or_else(|| "-".into()),
        nic_model_str(nic.model).into(),
    ];
    if nic.queue_count() > 1 {
        parts.push(format!("{} queues", nic.queue_count()));
    }
    parts.join(", ")
}

fn nic_model_str(model: NicModel) -> &'static str {
    match model {
        NicModel::Virtio => "virtio",
        NicModel::E1000 => "e1000",
        NicModel::E1000e => "e1000e",
        NicModel::Rtl8139 => "rtl8139",
    }
}

/// `vm snapshot list` as aligned columns.
pub fn render_snapshot_list(snapshots: &[Snapshot]) -> String {
    let header = ["NAME", "CONTENTS", "STATE SIZE", "CREATED"];
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                snapshot_kind(s).to_string(),
                if s.vm_state {
                    bytes(s.vm_state_size)
                } else {
                    "-".into()
                },
                s.created_at.clone(),
            ]
        })
        .collect();
    columns(&header, &rows)
}

fn snapshot_kind(snapshot: &Snapshot) -> &'static str {
    if snapshot.vm_state {
        "memory+disks"
    } else {
        "disks"
    }
}

/// A disk's limits: `iops_total=500 bps_read=10MiB/s`, or `unlimited`.
fn limits_str(limits: &IoLimits) -> String {
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

/// `NAME state=… task=… gen=…`, with the error when there is one.
pub(super) fn vm_line(vm: &Vm) -> String {
    let mut line = format!(
        "{} state={} task={} gen={}",
        vm.name,
        vm.state.as_str(),
        task_str(vm),
        vm.generation
    );
    if let Some(error) = &vm.error {
        line.push_str(&format!(" error={error:?}"));
    }
    line
}

fn task_str(vm: &Vm) -> String {
    vm.task.map_or("-", |t| t.as_str()).to_string()
}

fn desired_str(vm: &Vm) -> &'static str {
    use crate::vm::state::Desired;
    match vm.desired {
        Desired::Stopped => "stopped",
        Desired::Running => "running",
        Desired::Paused => "paused",
    }
}

fn boot_str(boot: &Boot) -> String {
    match boot {
        Boot::Kernel { kernel, .. } => format!("kernel {}", kernel.display()),
        Boot::Firmware { firmware } => match firmware {
            Firmware::Bios => "firmware bios".to_string(),
        },
    }
}

fn cache_str(cache: CacheMode) -> &'static str {
    match cache {
        CacheMode::None => "none",
        CacheMode::Writeback => "writeback",
        CacheMode::Writethrough => "writethrough",
        CacheMode::Directsync => "directsync",
        CacheMode::Unsafe => "unsafe",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::fixtures::{as_received, vm};
    use crate::vm::state::{Desired, PowerState, Task};

    #[test]
    fn vm_list_is_aligned_columns() {
        let a = vm("web", 1);
        let mut b = vm("database-primary", 2);
        b.state = as_received(PowerState::Stopping);
        b.task = Some(Task::Stop);
        b.desired = Desired::Stopped;
        b.pid = Some(4242);
        b.spec.memory_mib = 4096;
        let text = render_vm_list(&[a, b]);
        let expected = "\
ID                                    NAME              STATE     TASK  DESIRED  VCPUS  MEMORY  PID
00000000-0000-0000-0000-000000000001  web               stopped   -     stopped  2      512MiB  -
00000000-0000-0000-0000-000000000002  database-primary  stopping  stop  stopped  2      4GiB    4242
";
        assert_eq!(text, expected);
        assert_eq!(
            render_vm_list(&[]),
            "ID  NAME  STATE  TASK  DESIRED  VCPUS  MEMORY  PID\n"
        );
    }

    #[test]
    fn vm_show_lists_fields_and_the_error() {
        let mut v = vm("web", 1);
        v.state = as_received(PowerState::Error);
        v.error = Some("qemu exited: bad disk".into());
        v.spec.disks.push(DiskSpec {
            read_only: true,
            boot_order: Some(1),
            ..DiskSpec::file("/var/lib/vmlet/web.qcow2", DiskFormat::Qcow2)
        });
        let text = render_vm(&v);
        let expected = "\
id:         00000000-0000-0000-0000-000000000001
name:       web
state:      error
task:       -
desired:    stopped
generation: 1
pid:        -
error:      qemu exited: bad disk
vcpus:      2
memory:     512MiB
profile:    q35
boot:       kernel /k/vmlinuz
disk disk0: qcow2 /var/lib/vmlet/web.qcow2 (read-only, boot 1)
serial:     yes
autostart:  no
created:    2024-05-01T10:00:00.000Z
updated:    2024-05-01T10:00:05.000Z
";
        assert_eq!(text, expected);
    }

    #[test]
    fn vm_show_lists_nics_after_the_disks() {
        let mut v = vm("web", 1);
        v.spec
            .disks
            .push(DiskSpec::file("/d/web.raw", DiskFormat::Raw));
        v.spec.nics = vec![
            NicSpec {
                network: "lan".into(),
                mac: Some("52:54:00:12:34:56".into()),
                model: NicModel::Virtio,
                queues: Some(4),
            },
            NicSpec {
                network: "nat".into(),
                mac: Some("52:54:00:ab:cd:ef".into()),
                model: NicModel::E1000,
                queues: None,
            },
        ];
        let text = render_vm(&v);
        let expected = "\
disk disk0: raw /d/web.raw
nic 0:      network lan, 52:54:00:12:34:56, virtio, 4 queues
nic 1:      network nat, 52:54:00:ab:cd:ef, e1000
serial:     yes
";
        assert!(text.contains(expected), "{text}");
    }

    #[test]
    fn create_uses_the_id_or_the_specs_uuid() {
        let id = Uuid::from_u128(7);
        let none = serde_json::json!({"name": "a"});
        let same = serde_json::json!({"uuid": id.to_string()});
        let other = serde_json::json!({"uuid": Uuid::from_u128(8).to_string()});
        let junk = serde_json::json!({"uuid": "nope"});
        assert_eq!(create_uuid(&none, None).unwrap(), None);
        assert_eq!(create_uuid(&none, Some(id)).unwrap(), Some(id));
        assert_eq!(create_uuid(&same, None).unwrap(), Some(id));
        assert_eq!(create_uuid(&same, Some(id)).unwrap(), Some(id));
        assert_eq!(create_uuid(&junk, None).unwrap(), None);
        assert!(matches!(
            create_uuid(&other, Some(id)),
            Err(CliError::UuidMismatch { .. })
        ));
        assert!(parse_spec(Path::new("s.json"), "[1]").is_err());
        assert!(parse_spec(Path::new("s.json"), "{").is_err());
    }

    #[test]
    fn snapshot_list_is_aligned_columns() {
        let snapshots = [
            Snapshot {
                name: "before-upgrade".into(),
                vm_state: true,
                vm_state_size: 210 << 20,
                created_at: "2024-05-01T10:00:00.000Z".into(),
            },
            Snapshot {
                name: "cold".into(),
                vm_state: false,
                vm_state_size: 0,
                created_at: "2024-05-02T10:00:00.000Z".into(),
            },
        ];
        let expected = "\
NAME            CONTENTS      STATE SIZE  CREATED
before-upgrade  memory+disks  210MiB      2024-05-01T10:00:00.000Z
cold            disks         -           2024-05-02T10:00:00.000Z
";
        assert_eq!(render_snapshot_list(&snapshots), expected);
    }

    #[test]
    fn vm_show_names_volume_disks_with_their_cache_and_limits() {
        let mut v = vm("web", 1);
        v.spec.disks.push(DiskSpec {
            path: None,
            format: None,
            volume: Some("data".into()),
            name: Some("data0".into()),
            cache: CacheMode::None,
            limits: IoLimits {
                iops_total: Some(500),
                bps_read: Some(10 << 20),
                ..IoLimits::default()
            },
            ..DiskSpec::file("", DiskFormat::Raw)
        });
        let text = render_vm(&v);
        assert!(
            text.contains(
                "disk data0: volume data (cache none, iops_total=500 bps_read=10MiB/s)\n"
            ),
            "{text}"
        );
        assert_eq!(limits_str(&IoLimits::default()), "unlimited");
    }
}
