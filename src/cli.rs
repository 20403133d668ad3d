//! The client subcommands of `vmlet` (`vmlet vm …`, `vmlet node`,
//! `vmlet events`): parse options, call the daemon through
//! [`crate::client`], print tables or JSON.
//!
//! Rendering is pure (data in, `String` out) so every format is unit-tested;
//! the `run_*` functions only fetch and print.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use uuid::Uuid;

use crate::client::{Client, ClientError, Endpoint, DEFAULT_SOCKET};
use crate::events::{Event, EventBody};
use crate::node::NodeInfo;
use crate::vm::spec::{Boot, Firmware};
use crate::vm::Vm;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns or `key: value` lines, for people.
    #[default]
    Table,
    /// The API's JSON, for scripts.
    Json,
}

/// How to reach the daemon, and how to print.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOptions {
    /// The daemon's unix socket.
    #[arg(long, global = true, env = "VMLET_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Talk to the daemon over TCP instead: `http://HOST:PORT`.
    #[arg(long, global = true, env = "VMLET_URL")]
    pub url: Option<String>,
    /// File holding the bearer token sent with `--url`.
    #[arg(long, global = true, env = "VMLET_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl ClientOptions {
    /// Options for the unix socket at `socket`, printing tables.
    pub fn unix(socket: impl Into<PathBuf>) -> ClientOptions {
        ClientOptions {
            socket: socket.into(),
            url: None,
            token_file: None,
            output: Output::Table,
        }
    }

    /// The endpoint these options name: `--url` (with the token from
    /// `--token-file`) when given, else `--socket`.
    pub fn endpoint(&self) -> Result<Endpoint, CliError> {
        let Some(url) = &self.url else {
            return Ok(Endpoint::Unix(self.socket.clone()));
        };
        let token = match &self.token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        let endpoint = Endpoint::Tcp {
            url: url.clone(),
            token,
        };
        endpoint.check()?;
        Ok(endpoint)
    }

    /// A client for [`ClientOptions::endpoint`].
    pub fn client(&self) -> Result<Client, CliError> {
        Ok(Client::new(self.endpoint()?))
    }
}

fn read_token(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::TokenFile {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CliError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
}

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
    /// Delete a stopped VM.
    Delete {
        /// UUID or name.
        vm: String,
        /// Delete a running VM too, stopping it first.
        #[arg(long)]
        force: bool,
    },
}

/// What a client subcommand could not do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The daemon could not be reached or refused the request.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The spec file could not be read.
    #[error("reading the spec {path}")]
    ReadSpec {
        /// The file (`-` for standard input).
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The spec file is not a JSON object.
    #[error("the spec {path} is not a JSON object: {reason}")]
    SpecNotJson {
        /// The file (`-` for standard input).
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// `--id` and the spec's `uuid` disagree.
    #[error("--id {id} differs from the spec's uuid {spec}")]
    UuidMismatch {
        /// `--id`.
        id: Uuid,
        /// The spec's `uuid`.
        spec: String,
    },
    /// The token file could not be read.
    #[error("reading the token file {path}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The token file holds no token.
    #[error("the token file {path} is empty")]
    EmptyToken {
        /// The file.
        path: PathBuf,
    },
    /// The output could not be written.
    #[error("writing the output")]
    Output(#[source] std::io::Error),
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
            if json {
                pretty(&serde_json::json!({ "vms": vms }))
            } else {
                render_vm_list(&vms)
            }
        }
        VmCommand::Show { vm } => {
            let vm = client.get_vm(&vm).await?;
            if json {
                pretty(&vm)
            } else {
                render_vm(&vm)
            }
        }
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
            if json {
                pretty(&vm)
            } else if created {
                format!("created VM {} ({})\n", vm.name, vm.id)
            } else {
                format!("VM {} ({}) already exists with this spec\n", vm.name, vm.id)
            }
        }
        VmCommand::Delete { vm, force } => {
            client.delete_vm(&vm, force).await?;
            if json {
                String::new()
            } else {
                format!("deleted VM {vm}\n")
            }
        }
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

/// Runs `vmlet node`, printing to `out`.
pub async fn run_node(opts: &ClientOptions, out: &mut impl Write) -> Result<(), CliError> {
    let node = opts.client()?.node().await?;
    let text = match opts.output {
        Output::Json => pretty(&node),
        Output::Table => render_node(&node),
    };
    write_flush(out, &text)
}

/// Runs `vmlet events`: prints each event as it arrives, one line each,
/// until the daemon ends the stream. `since` replays the buffered events
/// after that sequence number first. A closed output (`| head`) ends it
/// quietly.
pub async fn run_events(
    since: Option<u64>,
    opts: &ClientOptions,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let mut stream = opts.client()?.events(since).await?;
    while let Some(event) = stream.next().await {
        let event = event?;
        let mut line = match opts.output {
            Output::Json => serde_json::to_string(&event).unwrap_or_default(),
            Output::Table => render_event(&event),
        };
        line.push('\n');
        match write_flush(out, &line) {
            Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        }
    }
    Ok(())
}

fn write_flush(out: &mut impl Write, text: &str) -> Result<(), CliError> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CliError::Output)
}

fn pretty<T: serde::Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

fn action_output(vm: Vm, json: bool) -> String {
    if json {
        pretty(&vm)
    } else {
        format!("{}\n", vm_line(&vm))
    }
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

/// Lays out rows under a header, each column as wide as its widest cell,
/// two spaces apart, without trailing spaces.
fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(
                ' ',
                width.saturating_sub(cell.chars().count()),
            ));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
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
        if disk.bus != crate::vm::spec::DiskBus::VirtioBlk {
            flags.push("scsi".to_string());
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
        lines.push((
            format!("disk {}", disk.name_or_default(i)),
            if flags.is_empty() {
                disk_source_str(disk)
            } else {
                format!("{} ({})", disk_source_str(disk), flags.join(", "))
            },
        ));
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

/// `node` as `key: value` lines.
pub fn render_node(node: &NodeInfo) -> String {
    let vms = if node.vms_by_state.is_empty() {
        "none".to_string()
    } else {
        node.vms_by_state
            .iter()
            .map(|(state, n)| format!("{state}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let lines: Vec<(String, String)> = vec![
        ("hostname".into(), node.hostname.clone()),
        ("vmlet".into(), node.vmlet_version.clone()),
        ("cpus".into(), node.cpus.to_string()),
        ("memory".into(), mib(node.memory_mib)),
        (
            "qemu".into(),
            format!("{} {}", node.qemu_binary, node.qemu_version),
        ),
        (
            "accel".into(),
            if node.accel_reason.is_empty() {
                node.accel.clone()
            } else {
                format!("{} ({})", node.accel, node.accel_reason)
            },
        ),
        ("profiles".into(), node.profiles.join(", ")),
        ("vms".into(), vms),
    ];
    key_values(&lines)
}

/// Where a disk comes from, in words.
fn disk_source_str(disk: &crate::vm::spec::DiskSpec) -> String {
    use crate::vm::spec::DiskSource;
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

/// One event as one line (no newline): `SEQ TIME vm NAME state=… task=… gen=…`.
pub fn render_event(event: &Event) -> String {
    let what = match &event.body {
        EventBody::Vm { vm } => format!("vm {}", vm_line(vm)),
        EventBody::VmDeleted { id, name } => format!("vm_deleted {name} id={id}"),
        EventBody::Image { image } => format!("image {}", image_line(image)),
        EventBody::ImageDeleted { name } => format!("image_deleted {name}"),
        EventBody::Volume { volume } => format!(
            "volume {} size={} attached_to={}",
            volume.name,
            mib(volume.size_mib),
            volume
                .attached_to
                .as_ref()
                .map_or("-".to_string(), |a| format!("{}/{}", a.vm_name, a.disk))
        ),
        EventBody::VolumeDeleted { name } => format!("volume_deleted {name}"),
        EventBody::Resync { requested, oldest } => format!(
            "resync requested={requested} oldest={} (events were missed: list the VMs again)",
            oldest.map_or("-".to_string(), |o| o.to_string())
        ),
    };
    format!("{} {} {what}", event.seq, event.time)
}

/// `NAME status=… progress`, with the error when there is one.
fn image_line(image: &crate::storage::images::Image) -> String {
    let mut line = format!("{} status={}", image.name, image.status.as_str());
    if let Some(p) = &image.progress {
        line.push_str(&format!(
            " phase={} bytes={}",
            p.phase.as_str(),
            p.bytes_done
        ));
        if let Some(total) = p.bytes_total {
            line.push_str(&format!("/{total}"));
        }
    }
    if let Some(error) = &image.error {
        line.push_str(&format!(" error={error:?}"));
    }
    line
}

/// `NAME state=… task=… gen=…`, with the error when there is one.
fn vm_line(vm: &Vm) -> String {
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

fn key_values(lines: &[(String, String)]) -> String {
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    lines
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
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

/// A size in MiB, in GiB when it divides evenly.
fn mib(n: u64) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}GiB", n / 1024)
    } else {
        format!("{n}MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::spec::{DiskFormat, DiskSpec, VmSpec};
    use crate::vm::state::{Desired, PowerState, Task};
    use clap::Parser;

    fn vm(name: &str, uuid: u128) -> Vm {
        let spec: VmSpec = serde_json::from_value(serde_json::json!({
            "uuid": Uuid::from_u128(uuid),
            "name": name,
            "vcpus": 2,
            "memory_mib": 512,
            "boot": {"type": "kernel", "kernel": "/k/vmlinuz"},
        }))
        .unwrap();
        let mut vm = Vm::new(spec);
        vm.created_at = "2024-05-01T10:00:00.000Z".into();
        vm.updated_at = "2024-05-01T10:00:05.000Z".into();
        vm
    }

    #[test]
    fn vm_list_is_aligned_columns() {
        let a = vm("web", 1);
        let mut b = vm("database-primary", 2);
        b.state = PowerState::Stopping;
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
        v.state = PowerState::Error;
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
    fn node_is_key_values() {
        let node = NodeInfo {
            hostname: "h1".into(),
            vmlet_version: "0.1.0".into(),
            cpus: 8,
            memory_mib: 16384,
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_version: "8.2.2".into(),
            accel: "tcg".into(),
            accel_reason: "/dev/kvm missing".into(),
            profiles: vec!["microvm".into(), "q35".into()],
            vms_by_state: [("running".to_string(), 2), ("stopped".to_string(), 1)].into(),
        };
        let expected = "\
hostname: h1
vmlet:    0.1.0
cpus:     8
memory:   16GiB
qemu:     qemu-system-x86_64 8.2.2
accel:    tcg (/dev/kvm missing)
profiles: microvm, q35
vms:      running=2 stopped=1
";
        assert_eq!(render_node(&node), expected);
    }

    #[test]
    fn events_are_one_line_each() {
        let mut v = vm("web", 1);
        v.state = PowerState::Running;
        v.generation = 5;
        let time = "2024-05-01T10:00:00.000Z".to_string();
        let event = |seq, body| Event {
            seq,
            time: time.clone(),
            body,
        };
        assert_eq!(
            render_event(&event(7, EventBody::Vm { vm: Box::new(v) })),
            "7 2024-05-01T10:00:00.000Z vm web state=running task=- gen=5"
        );
        assert_eq!(
            render_event(&event(
                8,
                EventBody::VmDeleted {
                    id: Uuid::from_u128(1),
                    name: "web".into()
                }
            )),
            "8 2024-05-01T10:00:00.000Z vm_deleted web id=00000000-0000-0000-0000-000000000001"
        );
        assert!(render_event(&event(
            9,
            EventBody::Resync {
                requested: 3,
                oldest: Some(5)
            }
        ))
        .starts_with("9 2024-05-01T10:00:00.000Z resync requested=3 oldest=5"));
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

    /// The options as they parse on a command line, without the environment
    /// getting in the way of the defaults.
    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        opts: ClientOptions,
        #[command(subcommand)]
        cmd: VmCommand,
    }

    #[test]
    fn options_parse_before_or_after_the_subcommand() {
        let cli = TestCli::try_parse_from([
            "vm",
            "--socket",
            "/tmp/s.sock",
            "stop",
            "web",
            "--force",
            "--timeout",
            "5",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.opts.socket, Path::new("/tmp/s.sock"));
        assert_eq!(cli.opts.output, Output::Json);
        assert_eq!(
            cli.cmd,
            VmCommand::Stop {
                vm: "web".into(),
                force: true,
                timeout: Some(5)
            }
        );
        assert_eq!(
            cli.opts.endpoint().unwrap(),
            Endpoint::Unix("/tmp/s.sock".into())
        );
    }

    #[test]
    fn a_url_takes_its_token_from_the_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let mut opts = ClientOptions::unix("/nonexistent");
        opts.url = Some("http://127.0.0.1:8780".into());
        opts.token_file = Some(token.clone());
        assert_eq!(
            opts.endpoint().unwrap(),
            Endpoint::Tcp {
                url: "http://127.0.0.1:8780".into(),
                token: Some("s3cret".into())
            }
        );
        std::fs::write(&token, " \n").unwrap();
        assert!(matches!(opts.endpoint(), Err(CliError::EmptyToken { .. })));
        opts.token_file = Some(dir.path().join("missing"));
        assert!(matches!(opts.endpoint(), Err(CliError::TokenFile { .. })));
        opts.token_file = None;
        opts.url = Some("https://node1".into());
        let err = opts.endpoint().unwrap_err().to_string();
        assert!(err.contains("only http://"), "{err}");
    }
}
