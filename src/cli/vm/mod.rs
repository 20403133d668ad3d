//! `vmlet vm …`: the VM subcommands and how VMs are rendered. The disk,
//! NIC and snapshot subcommands (and how those are rendered) live in
//! `disks`, `nics` and `snapshots`; their public items are re-exported
//! here.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use uuid::Uuid;

use super::{
    columns, key_values, mib, shown, shown_list, unless_json, write_flush, CliError, ClientOptions,
    Output,
};
use crate::spec::{Boot, CacheMode, DiskBus, Resources};
use crate::vm::Vm;

mod disks;
mod edit;
mod nics;
mod snapshots;

use disks::{cache_str, disk_command, disk_source_str, limits_str};
use nics::{nic_command, nic_str};
use snapshots::snapshot_command;

pub use disks::{BusArg, CacheArg, DiskCommand, LimitArgs};
pub use nics::{NicCommand, NicModelArg};
pub use snapshots::{render_snapshot_list, SnapshotCommand};

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
    /// Start a VM; with --wait-ready, wait until its serial console shows
    /// that the guest is up.
    Start {
        /// UUID or name.
        vm: String,
        /// Wait until the serial console of this boot printed the ready
        /// marker; fails (non-zero exit) when it does not within --timeout.
        #[arg(long)]
        wait_ready: bool,
        /// With --wait-ready: seconds to wait.
        #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_READY_TIMEOUT_S, requires = "wait_ready")]
        timeout: u64,
        /// With --wait-ready: the text that means ready.
        #[arg(long, value_name = "TEXT", default_value = DEFAULT_READY_MARKER, requires = "wait_ready", value_parser = clap::builder::NonEmptyStringValueParser::new())]
        ready_marker: String,
    },
    /// Stop a VM: press its ACPI power button and wait for the guest to
    /// power off, up to --timeout seconds (default: the daemon's
    /// `stop_grace_s`, 60 s unless configured); a guest that does not react
    /// in time has its QEMU quit.
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
    /// Reboot a VM's guest: press its ACPI power button and, once the guest
    /// has shut down, reset and start it again. A guest that does not shut
    /// down within --timeout seconds (default: the daemon's `stop_grace_s`)
    /// keeps running and the reboot fails.
    Reboot {
        /// UUID or name.
        vm: String,
        /// Reset the machine at once (like the reset button), without
        /// asking the guest.
        #[arg(long)]
        force: bool,
        /// Seconds the guest gets to shut down (the daemon's default if unset).
        #[arg(long, value_name = "SECONDS", conflicts_with = "force")]
        timeout: Option<u64>,
        /// Then wait until the serial console printed the ready marker
        /// again (after the reboot); fails (non-zero exit) when it does
        /// not within --ready-timeout.
        #[arg(long)]
        wait_ready: bool,
        /// With --wait-ready: seconds to wait for the marker.
        #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_READY_TIMEOUT_S, requires = "wait_ready")]
        ready_timeout: u64,
        /// With --wait-ready: the text that means ready.
        #[arg(long, value_name = "TEXT", default_value = DEFAULT_READY_MARKER, requires = "wait_ready", value_parser = clap::builder::NonEmptyStringValueParser::new())]
        ready_marker: String,
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
    /// Edit a VM's spec in $EDITOR (else vi) and apply what changed: live
    /// what the running VM can take, the rest at its next start.
    Edit {
        /// UUID or name.
        vm: String,
    },
    /// Change spec fields: `memory_mib=512 resources.cpu_quota_percent=50
    /// autostart=true` (values are JSON when they parse, else strings;
    /// `null` removes a field).
    Set {
        /// UUID or name.
        vm: String,
        /// `key=value` pairs; dotted keys reach into objects.
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
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
    /// Move a running VM to another vmlet host (live migration, with its
    /// disks): shows the progress and, at the end, the guest's downtime.
    Migrate(super::migration::MigrateArgs),
    /// Attach this terminal to a VM's serial console (raw mode; the escape
    /// key, Ctrl-] by default, detaches), print its log (--print-log), or
    /// print a one-time browser URL of its graphical console (--vnc).
    Console(super::console::ConsoleArgs),
}

/// The daemon's refusal to delete a running VM says `pass force=true`,
/// for API callers; on the command line the same is `--force`.
fn cli_delete_hint(error: crate::client::ClientError, vm: &str) -> crate::client::ClientError {
    match error {
        crate::client::ClientError::Api {
            status,
            code,
            message,
            field,
            task,
        } if message.contains("force=true") => crate::client::ClientError::Api {
            status,
            code,
            message: message.replace(
                "pass force=true",
                &format!("pass --force (`vmlet vm delete {vm} --force`)"),
            ),
            field,
            task,
        },
        other => other,
    }
}

/// Runs `vmlet vm CMD`, printing to `out`.
pub async fn run_vm(
    cmd: VmCommand,
    opts: &ClientOptions,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let cmd = match cmd {
        VmCommand::Console(args) => return super::console::run_console_args(args, opts, out).await,
        VmCommand::Migrate(args) => return super::migration::run_migrate(args, opts, out).await,
        cmd => cmd,
    };
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
            client
                .delete_vm_with(&vm, force, delete_volumes)
                .await
                .map_err(|e| cli_delete_hint(e, &vm))?;
            unless_json(json, || {
                if delete_volumes {
                    format!("deleted VM {vm} and its volumes\n")
                } else {
                    format!("deleted VM {vm}\n")
                }
            })
        }
        VmCommand::Edit { vm } => edit::edit(&client, &vm, json).await?,
        VmCommand::Set { vm, pairs } => edit::set(&client, &vm, &pairs, json).await?,
        VmCommand::Disk { cmd } => disk_command(&client, cmd, json).await?,
        VmCommand::Nic { cmd } => nic_command(&client, cmd, json).await?,
        VmCommand::Snapshot { cmd } => snapshot_command(&client, cmd, json).await?,
        VmCommand::Start {
            vm,
            wait_ready,
            timeout,
            ready_marker,
        } => {
            // A start of a running VM changes nothing (not even the
            // generation): that is how "already running" is told apart
            // from a start that just finished.
            let before = client.get_vm(&vm).await?;
            let started = client.start(&vm).await?;
            let already = before.generation == started.generation
                && started.state.get() == crate::vm::state::PowerState::Running;
            if already && !wait_ready {
                shown(json, &started, |vm| {
                    format!("{}\nalready running; nothing to do\n", vm_line(vm))
                })
            } else if wait_ready {
                if !json {
                    eprintln!(
                        "waiting up to {timeout}s for {ready_marker:?} on the serial console of {vm}"
                    );
                }
                wait_ready_marker(&client, &vm, &ready_marker, timeout).await?;
                let ready = client.get_vm(&vm).await?;
                shown(json, &ready, |vm| format!("{}\nready\n", vm_line(vm)))
            } else {
                action_output(started, json)
            }
        }
        VmCommand::Stop { vm, force, timeout } => {
            if !force && !json {
                let grace = match timeout {
                    Some(t) => t,
                    None => client.node().await?.stop_grace_s,
                };
                eprintln!("{}", stop_announcement(&vm, grace));
            }
            let stopped = client.stop(&vm, force, timeout).await?;
            shown(json, &stopped, |vm| {
                format!("{}\n{}\n", vm_line(vm), stop_result_str(vm))
            })
        }
        VmCommand::Reboot {
            vm,
            force,
            timeout,
            wait_ready,
            ready_timeout,
            ready_marker,
        } => {
            if !force && !json {
                let grace = match timeout {
                    Some(t) => t,
                    None => client.node().await?.stop_grace_s,
                };
                eprintln!(
                    "asking the guest of {vm} to reboot (ACPI power button); waiting up to {grace}s for it to shut down, then resetting it"
                );
            }
            // The end of the console log as it was: the marker must come
            // after it (the same boot's log still holds the old one).
            let before = if wait_ready {
                let log = client.console_log_of(&vm, None, true).await?;
                Some(log[log.len().saturating_sub(LOG_ANCHOR)..].to_vec())
            } else {
                None
            };
            let rebooted = client.reboot_with(&vm, force, timeout).await?;
            if wait_ready {
                if !json {
                    eprintln!(
                        "waiting up to {ready_timeout}s for {ready_marker:?} on the serial console of {vm}"
                    );
                }
                wait_ready_marker_after(&client, &vm, &ready_marker, ready_timeout, before).await?;
                let ready = client.get_vm(&vm).await?;
                shown(json, &ready, |vm| format!("{}\nready\n", vm_line(vm)))
            } else {
                action_output(rebooted, json)
            }
        }
        VmCommand::Pause { vm } => action_output(client.pause(&vm).await?, json),
        VmCommand::Resume { vm } => action_output(client.resume(&vm).await?, json),
        VmCommand::Console(_) | VmCommand::Migrate(_) => unreachable!("run above"),
    };
    write_flush(out, &text)
}

/// `vm start --wait-ready`'s default marker: a login prompt.
pub const DEFAULT_READY_MARKER: &str = "login:";
/// `vm start --wait-ready`'s default timeout, in seconds.
pub const DEFAULT_READY_TIMEOUT_S: u64 = 300;
/// How often `--wait-ready` reads the console log.
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// What `vm stop` says before it waits.
fn stop_announcement(vm: &str, grace: u64) -> String {
    format!(
        "asking the guest of {vm} to shut down (ACPI power button); waiting up to {grace}s, then QEMU is quit"
    )
}

/// How the last stop ended, in words.
fn stop_result_str(vm: &Vm) -> &'static str {
    use crate::vm::record::StopResult;
    match vm.last_stop {
        Some(StopResult::GuestPoweredOff) => "the guest powered off",
        Some(StopResult::GuestAgentShutdown) => {
            "the guest ignored the power button and powered off when its guest agent asked"
        }
        Some(StopResult::Quit) => {
            "QEMU was quit (the guest did not power off in time, or the stop was forced)"
        }
        Some(StopResult::Killed) => "QEMU did not quit and was killed",
        Some(StopResult::AlreadyExited) => "QEMU had already exited",
        None => "the VM was not running",
    }
}

/// How many bytes of the log's end `vm reboot --wait-ready` remembers to
/// find where the output after the reboot starts.
const LOG_ANCHOR: usize = 256;

/// Waits until the serial console of the VM's current boot shows `marker`
/// (read through the console-log endpoint), for at most `timeout_s`.
async fn wait_ready_marker(
    client: &crate::client::Client,
    vm: &str,
    marker: &str,
    timeout_s: u64,
) -> Result<(), CliError> {
    wait_ready_marker_after(client, vm, marker, timeout_s, None).await
}

/// The part of `log` after the last place `anchor` (the log's end as it
/// was) appears; all of it when the anchor is gone from the tail (more was
/// printed since than the tail holds).
fn after_anchor<'a>(log: &'a [u8], anchor: Option<&[u8]>) -> &'a [u8] {
    match anchor {
        Some(anchor) if !anchor.is_empty() && anchor.len() <= log.len() => log
            .windows(anchor.len())
            .rposition(|w| w == anchor)
            .map_or(log, |at| &log[at + anchor.len()..]),
        _ => log,
    }
}

/// [`wait_ready_marker`], counting only output after `anchor` (see
/// [`after_anchor`]).
async fn wait_ready_marker_after(
    client: &crate::client::Client,
    vm: &str,
    marker: &str,
    timeout_s: u64,
    anchor: Option<Vec<u8>>,
) -> Result<(), CliError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
    let needle = marker.as_bytes();
    loop {
        let log = client.console_log_of(vm, None, true).await?;
        let fresh = after_anchor(&log, anchor.as_deref());
        if !needle.is_empty() && fresh.windows(needle.len()).any(|w| w == needle) {
            return Ok(());
        }
        let view = client.get_vm(vm).await?;
        let state = view.state.as_str();
        if !matches!(state, "running" | "starting" | "paused") {
            return Err(CliError::StoppedWhileWaiting {
                vm: vm.to_string(),
                state: state.to_string(),
                marker: marker.to_string(),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::NotReady {
                vm: vm.to_string(),
                marker: marker.to_string(),
                timeout_s,
            });
        }
        tokio::time::sleep(READY_POLL).await;
    }
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
    lines.push(("boots".into(), vm.boots.to_string()));
    if let Some(stop) = vm.last_stop {
        lines.push(("last stop".into(), stop.as_str().into()));
    }
    if let Some(since) = &vm.console_silent_since {
        lines.push((
            "hint".into(),
            format!("the serial console has printed nothing since {since}: the guest may hang, or print its console elsewhere (vmlet console {} --print-log --boot current)", vm.name),
        ));
    }
    if let Some(pending) = &vm.pending {
        lines.push((
            "pending".into(),
            format!("{} (at the next start)", pending.fields.join(", ")),
        ));
    }
    lines.push(("vcpus".into(), spec.vcpus.to_string()));
    lines.push(("memory".into(), mib(spec.memory_mib)));
    // The CPU the VM is pinned to (model and flags); before a pin, what
    // the spec asks for.
    let cpu = match (&vm.machine, &spec.cpu) {
        (Some(pin), _) => Some(pin.cpu.clone()),
        (None, Some(cpu)) => Some(crate::spec::cpu_value(
            cpu.model.as_deref().unwrap_or("(profile's)"),
            &cpu.features,
        )),
        (None, None) => None,
    };
    if let Some(cpu) = cpu {
        lines.push(("cpu".into(), cpu));
    }
    if let Some(t) = &spec.topology {
        lines.push((
            "topology".into(),
            format!(
                "{} sockets × {} cores × {} threads",
                t.sockets, t.cores, t.threads
            ),
        ));
    }
    for (i, node) in spec.numa.iter().enumerate() {
        lines.push((
            format!("numa {i}"),
            format!("cpus {}, {}", node.cpus, mib(node.memory_mib)),
        ));
    }
    if let Some(size) = spec.memory.hugepages {
        lines.push(("hugepages".into(), size.as_str().into()));
    }
    if !spec.resources.is_default() {
        lines.push(("resources".into(), resources_str(&spec.resources)));
    }
    lines.push(("profile".into(), spec.profile.clone()));
    lines.push(("boot".into(), boot_str(&spec.boot)));
    lines.push(("firmware".into(), spec.boot.firmware().as_str().into()));
    if let Some(tpm) = &spec.tpm {
        let version = serde_json::to_value(tpm.version)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let value = match vm.tpm_pid {
            Some(pid) => format!("{version} (swtpm pid {pid})"),
            None => version,
        };
        lines.push(("tpm".into(), value));
    }
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
        "agent".into(),
        if spec.guest_agent { "yes" } else { "no" }.into(),
    ));
    if let Some(guest) = &vm.guest {
        lines.extend(guest_lines(guest));
    }
    lines.push((
        "autostart".into(),
        if spec.autostart { "yes" } else { "no" }.into(),
    ));
    lines.push(("created".into(), vm.created_at.clone()));
    lines.push(("updated".into(), vm.updated_at.clone()));
    key_values(&lines)
}

/// What the guest agent told of the guest, as `vm show` lines. The
/// strings come from the guest: vmlet already dropped their control
/// characters.
fn guest_lines(guest: &crate::qemu::agent::GuestInfo) -> Vec<(String, String)> {
    let mut lines = vec![(
        "hostname".to_string(),
        guest.hostname.clone().unwrap_or_else(|| "-".into()),
    )];
    if let Some(os) = &guest.os {
        let name = os
            .pretty_name
            .clone()
            .or_else(|| os.name.clone())
            .or_else(|| os.id.clone())
            .unwrap_or_else(|| "-".into());
        let kernel = os
            .kernel_release
            .as_deref()
            .map_or(String::new(), |k| format!(" (kernel {k})"));
        lines.push(("guest os".into(), format!("{name}{kernel}")));
    }
    for iface in &guest.interfaces {
        // The name goes into the value: a long one must not widen the
        // key column.
        let mut value = format!("{} {}", iface.name, iface.mac.as_deref().unwrap_or("-"));
        for address in &iface.addresses {
            value.push(' ');
            value.push_str(address);
        }
        lines.push(("guest if".into(), value));
    }
    lines.push(("guest at".into(), guest.read_at.clone()));
    lines
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

/// The set fields of a spec's `resources`, as `key=value` pairs named like
/// the spec's fields (unset ones take the daemon's `[qemu]` defaults and
/// are left out).
fn resources_str(r: &Resources) -> String {
    let mut parts = Vec::new();
    if let Some(weight) = r.cpu_weight {
        parts.push(format!("cpu_weight={weight}"));
    }
    if let Some(quota) = r.cpu_quota_percent {
        parts.push(format!("cpu_quota={quota}%"));
    }
    if let Some(overhead) = r.memory_overhead_mib {
        parts.push(format!("memory_overhead={}", mib(overhead)));
    }
    if let Some(pids) = r.pids_max {
        parts.push(format!("pids_max={pids}"));
    }
    if let Some(weight) = r.io_weight {
        parts.push(format!("io_weight={weight}"));
    }
    if let Some(cpus) = &r.cpu_set {
        parts.push(format!("cpu_set={cpus}"));
    }
    parts.join(" ")
}

fn boot_str(boot: &Boot) -> String {
    match boot {
        Boot::Kernel { kernel, .. } => format!("kernel {}", kernel.display()),
        Boot::Firmware { firmware } => format!("firmware {}", firmware.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_after_the_anchor_is_what_a_reboot_wait_reads() {
        let before = b"boot\nGUEST-READY\nlast line\n";
        let anchor = &before[before.len() - 12..];
        let now = b"boot\nGUEST-READY\nlast line\nreset\nGUEST-READY\n";
        assert_eq!(after_anchor(now, Some(anchor)), b"reset\nGUEST-READY\n");
        // Nothing new yet: the old marker does not count.
        assert_eq!(after_anchor(before, Some(anchor)), b"");
        // The anchor scrolled out of the tail: everything is new.
        assert_eq!(
            after_anchor(b"GUEST-READY\n", Some(anchor)),
            b"GUEST-READY\n"
        );
        assert_eq!(after_anchor(now, None), &now[..]);
    }
    use crate::cli::fixtures::{as_received, vm};
    use crate::spec::{DiskFormat, DiskSpec, IoLimits, NicModel, NicSpec};
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
    fn vm_show_lists_what_the_guest_agent_told() {
        use crate::qemu::agent::{GuestInfo, GuestInterface, GuestOs};
        let mut v = vm("web", 1);
        v.guest = Some(GuestInfo {
            hostname: Some("web-1".into()),
            os: Some(GuestOs {
                pretty_name: Some("Debian GNU/Linux 12 (bookworm)".into()),
                kernel_release: Some("6.1.0-1-cloud-amd64".into()),
                ..GuestOs::default()
            }),
            interfaces: vec![GuestInterface {
                name: "eth0".into(),
                mac: Some("52:54:00:12:34:56".into()),
                addresses: vec!["10.0.0.2/24".into(), "fe80::1/64".into()],
            }],
            read_at: "2024-05-01T10:00:01Z".into(),
        });
        let text = render_vm(&v);
        for line in [
            "\nagent:      yes\n",
            "\nhostname:   web-1\n",
            "\nguest os:   Debian GNU/Linux 12 (bookworm) (kernel 6.1.0-1-cloud-amd64)\n",
            "\nguest if:   eth0 52:54:00:12:34:56 10.0.0.2/24 fe80::1/64\n",
            "\nguest at:   2024-05-01T10:00:01Z\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        v.spec.guest_agent = false;
        v.guest = None;
        let text = render_vm(&v);
        assert!(
            text.contains("\nagent:      no\n") && !text.contains("hostname"),
            "{text}"
        );
    }

    #[test]
    fn vm_show_lists_fields_and_the_error() {
        let mut v = vm("web", 1);
        v.state = as_received(PowerState::Error);
        v.error = Some("qemu exited: bad disk".into());
        v.boots = 3;
        v.last_stop = Some(crate::vm::record::StopResult::Quit);
        v.console_silent_since = Some("2024-05-01T10:00:01Z".into());
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
boots:      3
last stop:  quit
hint:       the serial console has printed nothing since 2024-05-01T10:00:01Z: the guest may hang, or print its console elsewhere (vmlet console web --print-log --boot current)
vcpus:      2
memory:     512MiB
profile:    q35
boot:       kernel /k/vmlinuz
firmware:   bios
disk disk0: qcow2 /var/lib/vmlet/web.qcow2 (read-only, boot 1)
serial:     yes
agent:      yes
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
    fn vm_show_prints_the_tpm_and_its_swtpm() {
        let mut v = vm("web", 1);
        assert!(!render_vm(&v).contains("\ntpm:"), "no TPM: no line");
        v.spec.tpm = Some(vmlet_spec_tpm());
        assert!(
            render_vm(&v).contains("\ntpm:        2.0\n"),
            "{}",
            render_vm(&v)
        );
        v.tpm_pid = Some(4242);
        assert!(
            render_vm(&v).contains("\ntpm:        2.0 (swtpm pid 4242)\n"),
            "{}",
            render_vm(&v)
        );
    }

    fn vmlet_spec_tpm() -> crate::spec::TpmSpec {
        crate::spec::TpmSpec {
            version: crate::spec::TpmVersion::V2_0,
        }
    }

    #[test]
    fn vm_show_prints_cpu_topology_numa_and_huge_pages() {
        let mut v = vm("web", 1);
        let text = render_vm(&v);
        for absent in ["topology", "numa", "hugepages"] {
            assert!(!text.contains(absent), "unset: no {absent} line: {text}");
        }
        v.spec.cpu = Some(crate::spec::CpuSpec {
            model: Some("max".into()),
            features: vec!["+aes".into()],
        });
        v.spec.topology = Some(crate::spec::Topology {
            sockets: 2,
            cores: 1,
            threads: 2,
        });
        v.spec.numa = vec![
            crate::spec::NumaNode {
                cpus: "0-1".into(),
                memory_mib: 256,
            },
            crate::spec::NumaNode {
                cpus: "2-3".into(),
                memory_mib: 256,
            },
        ];
        v.spec.memory.hugepages = Some(crate::spec::HugePageSize::Size2M);
        v.machine = None;
        let text = render_vm(&v);
        let expected = "\
memory:     512MiB
cpu:        max,+aes
topology:   2 sockets × 1 cores × 2 threads
numa 0:     cpus 0-1, 256MiB
numa 1:     cpus 2-3, 256MiB
hugepages:  2M
";
        assert!(text.contains(expected), "{text}");
        // Once pinned, the pin is what runs.
        v.machine = Some(crate::spec::MachinePin {
            machine_type: "pc-q35-10.0".into(),
            cpu: "max,+aes".into(),
        });
        assert!(render_vm(&v).contains("\ncpu:        max,+aes\n"));
    }

    #[test]
    fn vm_show_prints_the_resources_that_are_set() {
        let mut v = vm("web", 1);
        assert!(!render_vm(&v).contains("resources"), "unset: no line");
        v.spec.resources = Resources {
            cpu_weight: Some(200),
            cpu_quota_percent: Some(50),
            memory_overhead_mib: Some(1536),
            pids_max: Some(256),
            io_weight: Some(300),
            cpu_set: Some("0-3,6".into()),
            vcpu_affinity: None,
        };
        let text = render_vm(&v);
        let expected = "\
memory:     512MiB
resources:  cpu_weight=200 cpu_quota=50% memory_overhead=1536MiB pids_max=256 io_weight=300 cpu_set=0-3,6
profile:    q35
";
        assert!(text.contains(expected), "{text}");
        v.spec.resources = Resources {
            memory_overhead_mib: Some(64),
            ..Resources::default()
        };
        assert!(
            render_vm(&v).contains("\nresources:  memory_overhead=64MiB\n"),
            "{}",
            render_vm(&v)
        );
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
