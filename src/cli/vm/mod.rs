//! `vmlet vm …`: the VM subcommands. How VMs are rendered lives in
//! `render`, the waits of start/stop/reboot in `wait`; the disk, NIC and
//! snapshot subcommands (and how those are rendered) in `disks`, `nics`
//! and `snapshots`. Their public items are re-exported here.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use uuid::Uuid;

use super::{shown, shown_list, unless_json, write_flush, CliError, ClientOptions, Output};
use crate::vm::Vm;

mod disks;
mod edit;
mod nics;
mod render;
mod snapshots;
mod wait;

use disks::{cache_str, disk_command, disk_source_str, limits_str};
use nics::{nic_command, nic_str};
use snapshots::snapshot_command;

pub use disks::{BusArg, CacheArg, DiskCommand, LimitArgs};
pub use nics::{NicCommand, NicModelArg};
pub(super) use render::vm_line;
pub use render::{render_vm, render_vm_list};
pub use snapshots::{render_snapshot_list, SnapshotCommand};
use wait::{
    ready_announcement, reboot_announcement, stop_announcement, stop_result_str,
    wait_ready_marker_after, AgentAnswer, LOG_ANCHOR,
};
pub use wait::{DEFAULT_READY_MARKER, DEFAULT_READY_TIMEOUT_S};

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
    /// Start a VM; with --wait-ready, wait until the guest shows that it
    /// is up: its serial console printed the ready marker, or its guest
    /// agent answered.
    Start {
        /// UUID or name.
        vm: String,
        /// Wait until the guest is up: the serial console of this boot
        /// printed the ready marker, or (for a VM with `guest_agent`, the
        /// default) the QEMU guest agent in the guest answered, whichever
        /// comes first; fails (non-zero exit) when neither did within
        /// --timeout.
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
    /// `stop_grace_s`, 60 s unless configured); with a guest agent, the
    /// agent is asked to shut the guest down halfway through the wait. A
    /// guest that does not react in time has its QEMU quit.
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
    /// has shut down, reset and start it again. When the guest ignores the
    /// button and its guest agent has answered, the agent is asked to
    /// reboot the guest halfway through the wait (`guest-shutdown` mode
    /// `reboot`). A guest that does not react within --timeout seconds
    /// (default: the daemon's `stop_grace_s`) keeps running and the reboot
    /// fails.
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
        /// Then wait until the guest is up again: the serial console
        /// printed the ready marker after the reboot, or the guest agent
        /// answered after it; fails (non-zero exit) when neither did within
        /// --ready-timeout.
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
                let agent = started.spec.guest_agent.then_some(AgentAnswer::Any);
                if !json {
                    eprintln!(
                        "{}",
                        ready_announcement(&vm, timeout, &ready_marker, agent.is_some())
                    );
                }
                let how =
                    wait_ready_marker_after(&client, &vm, &ready_marker, timeout, None, agent)
                        .await?;
                let ready = client.get_vm(&vm).await?;
                shown(json, &ready, |vm| {
                    format!("{}\n{}\n", vm_line(vm), how.as_str())
                })
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
                let agent = client.get_vm(&vm).await?.spec.guest_agent;
                eprintln!("{}", stop_announcement(&vm, grace, agent));
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
            let view = client.get_vm(&vm).await?;
            if !force && !json {
                let grace = match timeout {
                    Some(t) => t,
                    None => client.node().await?.stop_grace_s,
                };
                eprintln!("{}", reboot_announcement(&vm, grace, view.guest.is_some()));
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
                // Only an answer read after the reboot counts (the view
                // keeps the last boot's until the agent answers again).
                let agent = view
                    .spec
                    .guest_agent
                    .then(|| AgentAnswer::After(rebooted.updated_at.clone()));
                if !json {
                    eprintln!(
                        "{}",
                        ready_announcement(&vm, ready_timeout, &ready_marker, agent.is_some())
                    );
                }
                let how = wait_ready_marker_after(
                    &client,
                    &vm,
                    &ready_marker,
                    ready_timeout,
                    before,
                    agent,
                )
                .await?;
                let ready = client.get_vm(&vm).await?;
                shown(json, &ready, |vm| {
                    format!("{}\n{}\n", vm_line(vm), how.as_str())
                })
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
