//! The client subcommands of `vmlet` (`vmlet vm …`, `vmlet image …`,
//! `vmlet volume …`, `vmlet node`, `vmlet events`): parse options, call the
//! daemon through [`crate::client`], print tables or JSON.
//!
//! Rendering is pure (data in, `String` out) so every format is unit-tested;
//! the `run_*` functions only fetch and print.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

use crate::client::{Client, ClientError, Endpoint, DEFAULT_SOCKET};
use crate::events::{Event, EventBody};
use crate::node::NodeInfo;
use crate::storage::images::{Image, ImageImport, ImageStatus, ImportPhase, ImportProgress};
use crate::storage::volumes::{Volume, VolumeCreate};
use crate::vm::disk_ops::Snapshot;
use crate::vm::spec::{Boot, CacheMode, DiskBus, DiskFormat, DiskSpec, Firmware, IoLimits};
use crate::vm::Vm;

/// How often `image import` asks the daemon how the import is going.
const IMPORT_POLL: Duration = Duration::from_millis(200);
/// How often `image import` prints a progress line when stderr is not a
/// terminal (and at each phase change).
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Cells of the progress bar drawn on a terminal.
const BAR_WIDTH: usize = 30;

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

/// A byte count: digits with an optional `K`, `M`, `G` or `T` suffix
/// (powers of 1024; `KiB`, `k`, `MB`… are read the same).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a number of bytes"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{text:?}: unknown unit {suffix:?} (K, M, G, T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
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

/// `vmlet image …`: the daemon's image store.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum ImageCommand {
    /// List every image (failed imports too, until deleted).
    List,
    /// Show one image.
    Show {
        /// The image's name.
        name: String,
    },
    /// Import an image (raw, qcow2, vmdk, vdi or vhdx; stored as qcow2) and
    /// follow the import until it is ready. Ctrl-C stops following; the
    /// import goes on (`vmlet image delete` cancels it).
    #[command(group(clap::ArgGroup::new("source").required(true).args(["file", "from_url"])))]
    Import {
        /// The image's name.
        name: String,
        /// A file under the daemon's import directory (VMLET_IMPORT_DIR).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// An http(s) URL the daemon downloads (`--url` names the daemon).
        #[arg(long, value_name = "URL")]
        from_url: Option<String>,
        /// Expected SHA-256 of the source file (hex).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// Return once the import has started.
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete an image, or cancel its import (refused while a VM uses it).
    Delete {
        /// The image's name.
        name: String,
    },
}

/// `vmlet volume …`: the daemon's named volumes.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum VolumeCommand {
    /// List every volume.
    List,
    /// Show one volume.
    Show {
        /// The volume's name.
        name: String,
    },
    /// Create a volume: blank (--size-mib), or a full copy of an image
    /// (--image, grown to --size-mib when given).
    Create {
        /// The volume's name.
        name: String,
        /// Size in MiB.
        #[arg(long, value_name = "N")]
        size_mib: Option<u64>,
        /// Copy this (ready) image.
        #[arg(long, value_name = "IMAGE")]
        image: Option<String>,
    },
    /// Grow a volume (online when its VM runs); it never shrinks.
    Resize {
        /// The volume's name.
        name: String,
        /// New size in MiB.
        #[arg(long, value_name = "N")]
        size_mib: u64,
    },
    /// Delete a volume (refused while a VM uses it).
    Delete {
        /// The volume's name.
        name: String,
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
    /// An image import ended `failed`.
    #[error("import of image {name} failed: {error}")]
    ImportFailed {
        /// The image.
        name: String,
        /// The image's error.
        error: String,
    },
    /// The image being followed was deleted (or deleted and imported
    /// again) meanwhile.
    #[error("image {name} was deleted while it was being imported")]
    ImageGone {
        /// The image.
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
        VmCommand::Delete {
            vm,
            force,
            delete_volumes,
        } => {
            client.delete_vm_with(&vm, force, delete_volumes).await?;
            if json {
                String::new()
            } else if delete_volumes {
                format!("deleted VM {vm} and its volumes\n")
            } else {
                format!("deleted VM {vm}\n")
            }
        }
        VmCommand::Disk { cmd } => disk_command(&client, cmd, json).await?,
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
            if json {
                pretty(&vm)
            } else {
                let disk = vm
                    .spec
                    .disks
                    .iter()
                    .enumerate()
                    .find(|(_, d)| d.volume.as_deref() == Some(volume.as_str()))
                    .map_or_else(|| "?".to_string(), |(i, d)| d.name_or_default(i));
                format!("attached volume {volume} to VM {} as {disk}\n", vm.name)
            }
        }
        DiskCommand::Detach { vm, disk } => {
            let vm = client.detach_disk(&vm, &disk).await?;
            if json {
                pretty(&vm)
            } else {
                format!("detached {disk} from VM {}\n", vm.name)
            }
        }
        DiskCommand::Limits { vm, disk, limits } => {
            let vm = client.set_disk_limits(&vm, &disk, &limits.into()).await?;
            if json {
                pretty(&vm)
            } else {
                let now = vm
                    .spec
                    .disks
                    .iter()
                    .enumerate()
                    .find(|(i, d)| d.name_or_default(*i) == disk)
                    .map_or(IoLimits::from(limits), |(_, d)| d.limits);
                format!("VM {} {disk}: {}\n", vm.name, limits_str(&now))
            }
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
            if json {
                pretty(&serde_json::json!({ "snapshots": snapshots }))
            } else {
                render_snapshot_list(&snapshots)
            }
        }
        SnapshotCommand::Create { vm, name } => {
            let snapshot = client.create_snapshot(&vm, &name).await?;
            if json {
                pretty(&snapshot)
            } else {
                format!(
                    "created snapshot {} of VM {vm} ({})\n",
                    snapshot.name,
                    snapshot_kind(&snapshot)
                )
            }
        }
        SnapshotCommand::Revert { vm, name } => {
            let vm = client.revert_snapshot(&vm, &name).await?;
            if json {
                pretty(&vm)
            } else {
                format!("reverted VM {} to snapshot {name}\n", vm.name)
            }
        }
        SnapshotCommand::Delete { vm, name } => {
            client.delete_snapshot(&vm, &name).await?;
            if json {
                String::new()
            } else {
                format!("deleted snapshot {name} of VM {vm}\n")
            }
        }
    })
}

/// Runs `vmlet image CMD`, printing to `out`. An import's progress goes to
/// standard error: a bar redrawn in place on a terminal, a line every few
/// seconds otherwise.
pub async fn run_image(
    cmd: ImageCommand,
    opts: &ClientOptions,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let client = opts.client()?;
    let json = opts.output == Output::Json;
    let text = match cmd {
        ImageCommand::List => {
            let images = client.list_images().await?;
            if json {
                pretty(&serde_json::json!({ "images": images }))
            } else {
                render_image_list(&images)
            }
        }
        ImageCommand::Show { name } => {
            let image = client.get_image(&name).await?;
            if json {
                pretty(&image)
            } else {
                render_image(&image)
            }
        }
        ImageCommand::Import {
            name,
            file,
            from_url,
            sha256,
            no_wait,
        } => {
            // The daemon wants an absolute path; a relative one is taken
            // from here.
            let path = file.map(|p| std::path::absolute(&p).unwrap_or(p));
            let request = ImageImport {
                name,
                path,
                url: from_url,
                sha256,
            };
            let image = client.import_image(&request).await?;
            let image = if no_wait {
                image
            } else {
                let stderr = std::io::stderr();
                let tty = stderr.is_terminal();
                let mut progress = ProgressView::new(stderr.lock(), tty);
                let result = follow_import(&client, image, &mut progress).await;
                progress.finish();
                result?
            };
            if json {
                pretty(&image)
            } else if image.status == ImageStatus::Importing {
                format!(
                    "importing image {} from {} (follow it with `vmlet image show {}`)\n",
                    image.name, image.source, image.name
                )
            } else {
                format!("imported image {}: {}\n", image.name, image_summary(&image))
            }
        }
        ImageCommand::Delete { name } => {
            client.delete_image(&name).await?;
            if json {
                String::new()
            } else {
                format!("deleted image {name}\n")
            }
        }
    };
    write_flush(out, &text)
}

/// Polls `image` until its import ends: `Ok` with the ready image, or the
/// image's error. Progress is shown on `view`.
async fn follow_import(
    client: &Client,
    mut image: Image,
    view: &mut ProgressView<impl Write>,
) -> Result<Image, CliError> {
    let name = image.name.clone();
    let created_at = image.created_at.clone();
    loop {
        match image.status {
            ImageStatus::Ready => return Ok(image),
            ImageStatus::Failed => {
                return Err(CliError::ImportFailed {
                    name,
                    error: image.error.unwrap_or_else(|| "no reason given".into()),
                })
            }
            ImageStatus::Importing => view.update(&image),
        }
        tokio::time::sleep(IMPORT_POLL).await;
        image = match client.get_image(&name).await {
            Err(e) if e.status() == Some(404) => return Err(CliError::ImageGone { name }),
            other => other?,
        };
        // Deleted and imported again between two looks: not ours any more.
        if image.created_at != created_at {
            return Err(CliError::ImageGone { name });
        }
    }
}

/// What makes a plain progress line due at once when it changes: the
/// phase and the source size.
type PlainKey = Option<(ImportPhase, Option<u64>)>;

/// Shows an import's progress: a bar redrawn in place on a terminal, or a
/// plain line at each phase change and every few seconds.
struct ProgressView<W: Write> {
    out: W,
    tty: bool,
    /// When the last plain line was printed, with its phase and total.
    last_line: Option<(Instant, PlainKey)>,
    /// Whether a bar is on screen.
    drawn: bool,
}

impl<W: Write> ProgressView<W> {
    fn new(out: W, tty: bool) -> Self {
        ProgressView {
            out,
            tty,
            last_line: None,
            drawn: false,
        }
    }

    /// Shows `image`'s progress (write errors are ignored: progress is
    /// only a courtesy).
    fn update(&mut self, image: &Image) {
        let progress = image.progress.as_ref();
        if self.tty {
            let bar = progress_bar(&image.name, progress, BAR_WIDTH);
            let _ = write!(self.out, "\r{bar}\x1b[K");
            self.drawn = true;
        } else {
            // A new phase or a size now known is worth a line at once.
            let key = progress.map(|p| (p.phase, p.bytes_total));
            let due = match self.last_line {
                None => true,
                Some((at, last)) => last != key || at.elapsed() >= PLAIN_PROGRESS_EVERY,
            };
            if !due {
                return;
            }
            self.last_line = Some((Instant::now(), key));
            let _ = writeln!(self.out, "{}", progress_line(&image.name, progress));
        }
        let _ = self.out.flush();
    }

    /// Clears the bar, so what follows starts on a clean line.
    fn finish(&mut self) {
        if self.drawn {
            let _ = write!(self.out, "\r\x1b[K");
            let _ = self.out.flush();
            self.drawn = false;
        }
    }
}

/// Runs `vmlet volume CMD`, printing to `out`.
pub async fn run_volume(
    cmd: VolumeCommand,
    opts: &ClientOptions,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let client = opts.client()?;
    let json = opts.output == Output::Json;
    let text = match cmd {
        VolumeCommand::List => {
            let volumes = client.list_volumes().await?;
            if json {
                pretty(&serde_json::json!({ "volumes": volumes }))
            } else {
                render_volume_list(&volumes)
            }
        }
        VolumeCommand::Show { name } => {
            let volume = client.get_volume(&name).await?;
            if json {
                pretty(&volume)
            } else {
                render_volume(&volume)
            }
        }
        VolumeCommand::Create {
            name,
            size_mib,
            image,
        } => {
            let volume = client
                .create_volume(&VolumeCreate {
                    name,
                    size_mib,
                    image: image.clone(),
                })
                .await?;
            if json {
                pretty(&volume)
            } else {
                let from = image.map_or(String::new(), |i| format!(" from image {i}"));
                format!(
                    "created volume {}{from}: {}\n",
                    volume.name,
                    mib(volume.size_mib)
                )
            }
        }
        VolumeCommand::Resize { name, size_mib } => {
            let volume = client.resize_volume(&name, size_mib).await?;
            if json {
                pretty(&volume)
            } else {
                format!(
                    "resized volume {} to {}\n",
                    volume.name,
                    mib(volume.size_mib)
                )
            }
        }
        VolumeCommand::Delete { name } => {
            client.delete_volume(&name).await?;
            if json {
                String::new()
            } else {
                format!("deleted volume {name}\n")
            }
        }
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
        EventBody::Volume { volume } => format!("volume {}", volume_line(volume)),
        EventBody::VolumeDeleted { name } => format!("volume_deleted {name}"),
        EventBody::Resync { requested, oldest } => format!(
            "resync requested={requested} oldest={} (events were missed: list VMs, images and volumes again)",
            oldest.map_or("-".to_string(), |o| o.to_string())
        ),
    };
    format!("{} {} {what}", event.seq, event.time)
}

/// `NAME status=…` and the progress, the sizes or the error.
fn image_line(image: &Image) -> String {
    let mut line = format!("{} status={}", image.name, image.status.as_str());
    match image.status {
        ImageStatus::Importing => {
            line.push(' ');
            line.push_str(&progress_detail(image.progress.as_ref()));
        }
        ImageStatus::Ready => {
            line.push_str(&format!(
                " size={} allocated={}",
                opt_bytes(image.virtual_size),
                opt_bytes(image.actual_size)
            ));
        }
        ImageStatus::Failed => {}
    }
    if let Some(error) = &image.error {
        line.push_str(&format!(" error={error:?}"));
    }
    line
}

/// `NAME size=… allocated=… attached_to=VM/DISK`.
fn volume_line(volume: &Volume) -> String {
    format!(
        "{} size={} allocated={} attached_to={}",
        volume.name,
        mib(volume.size_mib),
        opt_bytes(volume.actual_size),
        attachment_str(volume)
    )
}

fn attachment_str(volume: &Volume) -> String {
    volume
        .attached_to
        .as_ref()
        .map_or("-".to_string(), |a| format!("{}/{}", a.vm_name, a.disk))
}

/// Where an import is: `fetch 45% 12.5MiB/27.8MiB`, `fetch 12.5MiB` (size
/// unknown), `convert 100% 27.8MiB/27.8MiB`.
pub fn progress_detail(progress: Option<&ImportProgress>) -> String {
    let Some(p) = progress else {
        return "starting".to_string();
    };
    match p.bytes_total {
        Some(total) => format!(
            "{} {}% {}/{}",
            p.phase.as_str(),
            percent(p.bytes_done, total),
            bytes(p.bytes_done),
            bytes(total)
        ),
        None => format!("{} {}", p.phase.as_str(), bytes(p.bytes_done)),
    }
}

/// `done` of `total` in whole percent, 0 to 100 (an empty source is done).
fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        100
    } else {
        (u128::from(done.min(total)) * 100 / u128::from(total)) as u64
    }
}

/// One frame of the import progress bar (no `\r`, no newline):
/// `NAME [#########---------]  45%  12.5MiB/27.8MiB  fetch`. The bar has
/// `width` cells; with the size unknown it stays empty and the percentage
/// is `--`.
pub fn progress_bar(name: &str, progress: Option<&ImportProgress>, width: usize) -> String {
    let (filled, pct, amount, phase) = match progress {
        None => (0, "--".to_string(), String::new(), "starting"),
        Some(p) => match p.bytes_total {
            Some(total) => {
                let pct = percent(p.bytes_done, total);
                (
                    (pct as usize * width) / 100,
                    format!("{pct}%"),
                    format!("{}/{}", bytes(p.bytes_done), bytes(total)),
                    p.phase.as_str(),
                )
            }
            None => (0, "--".to_string(), bytes(p.bytes_done), p.phase.as_str()),
        },
    };
    let bar: String = std::iter::repeat_n('#', filled)
        .chain(std::iter::repeat_n('-', width - filled))
        .collect();
    let mut line = format!("{name} [{bar}] {pct:>4}");
    if !amount.is_empty() {
        line.push_str("  ");
        line.push_str(&amount);
    }
    line.push_str("  ");
    line.push_str(phase);
    line
}

/// One line of import progress for a log: `importing NAME: fetch 45% …`.
pub fn progress_line(name: &str, progress: Option<&ImportProgress>) -> String {
    format!("importing {name}: {}", progress_detail(progress))
}

/// A ready image in a few words: `64MiB (raw, 196KiB allocated)`.
fn image_summary(image: &Image) -> String {
    format!(
        "{} ({}, {} allocated)",
        opt_bytes(image.virtual_size),
        image.source_format.as_deref().unwrap_or("?"),
        opt_bytes(image.actual_size)
    )
}

/// `image list` as aligned columns: importing images show their
/// progress, failed ones their error.
pub fn render_image_list(images: &[Image]) -> String {
    let header = ["NAME", "STATUS", "SIZE", "ALLOCATED", "FORMAT", "DETAIL"];
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|image| {
            vec![
                image.name.clone(),
                image.status.as_str().to_string(),
                opt_bytes(image.virtual_size),
                opt_bytes(image.actual_size),
                image.source_format.clone().unwrap_or_else(|| "-".into()),
                match image.status {
                    ImageStatus::Importing => progress_detail(image.progress.as_ref()),
                    _ => image.error.clone().unwrap_or_default(),
                },
            ]
        })
        .collect();
    columns(&header, &rows)
}

/// `image show` as `key: value` lines.
pub fn render_image(image: &Image) -> String {
    let mut lines: Vec<(String, String)> = vec![
        ("name".into(), image.name.clone()),
        ("status".into(), image.status.as_str().into()),
    ];
    if let Some(error) = &image.error {
        lines.push(("error".into(), error.clone()));
    }
    if image.status == ImageStatus::Importing {
        lines.push(("progress".into(), progress_detail(image.progress.as_ref())));
    }
    lines.push(("source".into(), image.source.clone()));
    lines.push((
        "format".into(),
        match &image.source_format {
            Some(from) => format!("{} (imported from {from})", image.format),
            None => image.format.clone(),
        },
    ));
    lines.push(("size".into(), size_with_bytes(image.virtual_size)));
    lines.push(("allocated".into(), size_with_bytes(image.actual_size)));
    lines.push((
        "sha256".into(),
        image.sha256.clone().unwrap_or_else(|| "-".into()),
    ));
    lines.push((
        "source sha256".into(),
        image.source_sha256.clone().unwrap_or_else(|| "-".into()),
    ));
    lines.push(("created".into(), image.created_at.clone()));
    key_values(&lines)
}

/// `volume list` as aligned columns.
pub fn render_volume_list(volumes: &[Volume]) -> String {
    let header = ["NAME", "SIZE", "ALLOCATED", "ATTACHED TO"];
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                mib(v.size_mib),
                opt_bytes(v.actual_size),
                attachment_str(v),
            ]
        })
        .collect();
    columns(&header, &rows)
}

/// `volume show` as `key: value` lines.
pub fn render_volume(volume: &Volume) -> String {
    let lines: Vec<(String, String)> = vec![
        ("name".into(), volume.name.clone()),
        (
            "size".into(),
            format!("{} ({} bytes)", mib(volume.size_mib), volume.virtual_size),
        ),
        ("allocated".into(), size_with_bytes(volume.actual_size)),
        ("format".into(), volume.format.clone()),
        (
            "attached to".into(),
            match &volume.attached_to {
                Some(a) => format!("VM {} ({}) as {}", a.vm_name, a.vm, a.disk),
                None => "-".into(),
            },
        ),
        ("created".into(), volume.created_at.clone()),
    ];
    key_values(&lines)
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

fn cache_str(cache: CacheMode) -> &'static str {
    match cache {
        CacheMode::None => "none",
        CacheMode::Writeback => "writeback",
        CacheMode::Writethrough => "writethrough",
        CacheMode::Directsync => "directsync",
        CacheMode::Unsafe => "unsafe",
    }
}

/// A byte count for people: `512B`, `1.5KiB`, `64MiB`, `2.3GiB` (one
/// decimal at most, none when it is 0).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut value = n as f64;
    // Move up while the value would print as 1024 or more.
    while unit + 1 < UNITS.len() && (value * 10.0).round() >= 10240.0 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{n}B");
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{}", UNITS[unit])
}

fn opt_bytes(n: Option<u64>) -> String {
    n.map_or("-".to_string(), bytes)
}

/// `2GiB (2147483648 bytes)`, or `-`.
fn size_with_bytes(n: Option<u64>) -> String {
    match n {
        Some(n) if n >= 1024 => format!("{} ({n} bytes)", bytes(n)),
        Some(n) => bytes(n),
        None => "-".to_string(),
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

    fn image(name: &str, status: ImageStatus) -> Image {
        Image {
            name: name.into(),
            status,
            source: format!("/srv/import/{name}.raw"),
            source_format: None,
            format: "qcow2".into(),
            virtual_size: None,
            actual_size: None,
            sha256: None,
            source_sha256: None,
            progress: None,
            error: None,
            created_at: "2024-05-01T10:00:00.000Z".into(),
        }
    }

    fn ready_image(name: &str) -> Image {
        Image {
            source_format: Some("raw".into()),
            virtual_size: Some(64 << 20),
            actual_size: Some(200_704),
            sha256: Some("ab".repeat(32)),
            source_sha256: Some("cd".repeat(32)),
            ..image(name, ImageStatus::Ready)
        }
    }

    fn fetch(done: u64, total: Option<u64>) -> ImportProgress {
        ImportProgress {
            phase: ImportPhase::Fetch,
            bytes_done: done,
            bytes_total: total,
        }
    }

    fn volume(name: &str, size_mib: u64) -> Volume {
        Volume {
            name: name.into(),
            size_mib,
            virtual_size: size_mib << 20,
            actual_size: Some(196_608),
            format: "qcow2".into(),
            attached_to: None,
            created_at: "2024-05-01T10:00:00.000Z".into(),
        }
    }

    #[test]
    fn byte_counts_read_like_people_write_them() {
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(1023), "1023B");
        assert_eq!(bytes(1024), "1KiB");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(64 << 20), "64MiB");
        assert_eq!(bytes((5 << 30) / 2), "2.5GiB");
        // Just under a unit rounds up into it, not to "1024.0MiB".
        assert_eq!(bytes((1 << 30) - 1), "1GiB");
        assert_eq!(bytes(u64::MAX), "16384PiB");
        assert_eq!(mib(512), "512MiB");
        assert_eq!(mib(2048), "2GiB");
        assert_eq!(parse_bytes("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("10M").unwrap(), 10 << 20);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("4k").unwrap(), 4096);
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("10X").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }

    #[test]
    fn progress_bar_frames() {
        let p = fetch(12 << 20, Some(40 << 20));
        assert_eq!(
            progress_bar("debian", Some(&p), 20),
            "debian [######--------------]  30%  12MiB/40MiB  fetch"
        );
        let done = ImportProgress {
            phase: ImportPhase::Convert,
            ..fetch(40 << 20, Some(40 << 20))
        };
        assert_eq!(
            progress_bar("debian", Some(&done), 10),
            "debian [##########] 100%  40MiB/40MiB  convert"
        );
        // A download of unknown size: an empty bar and the bytes so far.
        assert_eq!(
            progress_bar("web", Some(&fetch(1536, None)), 4),
            "web [----]   --  1.5KiB  fetch"
        );
        assert_eq!(progress_bar("web", None, 4), "web [----]   --  starting");
        // An empty source is complete; more than the total does not overflow.
        assert_eq!(
            progress_bar("e", Some(&fetch(0, Some(0))), 4),
            "e [####] 100%  0B/0B  fetch"
        );
        assert_eq!(
            progress_bar("e", Some(&fetch(9, Some(3))), 4),
            "e [####] 100%  9B/3B  fetch"
        );
        assert_eq!(
            progress_line("debian", Some(&p)),
            "importing debian: fetch 30% 12MiB/40MiB"
        );
        assert_eq!(
            progress_line("web", Some(&fetch(5 << 20, None))),
            "importing web: fetch 5MiB"
        );
    }

    #[test]
    fn progress_view_draws_in_place_on_a_terminal_and_lines_otherwise() {
        let mut importing = image("deb", ImageStatus::Importing);
        importing.progress = Some(fetch(1 << 20, Some(2 << 20)));
        let mut view = ProgressView::new(Vec::new(), true);
        view.update(&importing);
        view.update(&importing);
        view.finish();
        let text = String::from_utf8(view.out).unwrap();
        let frame = format!(
            "\r{}\x1b[K",
            progress_bar("deb", importing.progress.as_ref(), BAR_WIDTH)
        );
        assert_eq!(text, format!("{frame}{frame}\r\x1b[K"));

        let mut view = ProgressView::new(Vec::new(), false);
        importing.progress = Some(fetch(0, None));
        view.update(&importing);
        // Within the interval, same phase and size: nothing new.
        importing.progress = Some(fetch(1024, None));
        view.update(&importing);
        // The size became known: a line at once.
        importing.progress = Some(fetch(1 << 20, Some(2 << 20)));
        view.update(&importing);
        view.update(&importing);
        importing.progress.as_mut().unwrap().phase = ImportPhase::Convert;
        view.update(&importing);
        view.finish();
        assert_eq!(
            String::from_utf8(view.out).unwrap(),
            "importing deb: fetch 0B\n\
             importing deb: fetch 50% 1MiB/2MiB\n\
             importing deb: convert 50% 1MiB/2MiB\n"
        );
    }

    #[test]
    fn image_list_shows_progress_and_errors() {
        let mut importing = image("fedora", ImageStatus::Importing);
        importing.progress = Some(fetch(300 << 20, Some(1200 << 20)));
        let mut failed = image("broken", ImageStatus::Failed);
        failed.error = Some("sha256: checksum mismatch".into());
        let text = render_image_list(&[ready_image("debian"), importing, failed]);
        let expected = "\
NAME    STATUS     SIZE   ALLOCATED  FORMAT  DETAIL
debian  ready      64MiB  196KiB     raw
fedora  importing  -      -          -       fetch 25% 300MiB/1.2GiB
broken  failed     -      -          -       sha256: checksum mismatch
";
        assert_eq!(text, expected);
        assert_eq!(
            render_image_list(&[]),
            "NAME  STATUS  SIZE  ALLOCATED  FORMAT  DETAIL\n"
        );
    }

    #[test]
    fn image_show_is_key_values() {
        let expected = format!(
            "\
name:          debian
status:        ready
source:        /srv/import/debian.raw
format:        qcow2 (imported from raw)
size:          64MiB (67108864 bytes)
allocated:     196KiB (200704 bytes)
sha256:        {}
source sha256: {}
created:       2024-05-01T10:00:00.000Z
",
            "ab".repeat(32),
            "cd".repeat(32)
        );
        assert_eq!(render_image(&ready_image("debian")), expected);
        let mut importing = image("fedora", ImageStatus::Importing);
        importing.progress = Some(fetch(0, None));
        let text = render_image(&importing);
        assert!(text.contains("progress:      fetch 0B\n"), "{text}");
        assert!(text.contains("size:          -\n"), "{text}");
    }

    #[test]
    fn volume_list_and_show() {
        let mut attached = volume("data", 2048);
        attached.attached_to = Some(crate::storage::volumes::VolumeAttachment {
            vm: Uuid::from_u128(1),
            vm_name: "web".into(),
            disk: "disk1".into(),
        });
        let text = render_volume_list(&[attached.clone(), volume("scratch", 100)]);
        let expected = "\
NAME     SIZE    ALLOCATED  ATTACHED TO
data     2GiB    192KiB     web/disk1
scratch  100MiB  192KiB     -
";
        assert_eq!(text, expected);
        let expected = "\
name:        data
size:        2GiB (2147483648 bytes)
allocated:   192KiB (196608 bytes)
format:      qcow2
attached to: VM web (00000000-0000-0000-0000-000000000001) as disk1
created:     2024-05-01T10:00:00.000Z
";
        assert_eq!(render_volume(&attached), expected);
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
    fn storage_events_are_one_line_each() {
        let time = "2024-05-01T10:00:00.000Z".to_string();
        let event = |seq, body| Event {
            seq,
            time: time.clone(),
            body,
        };
        let mut importing = image("deb", ImageStatus::Importing);
        importing.progress = Some(fetch(1 << 20, Some(4 << 20)));
        assert_eq!(
            render_event(&event(
                1,
                EventBody::Image {
                    image: Box::new(importing)
                }
            )),
            "1 2024-05-01T10:00:00.000Z image deb status=importing fetch 25% 1MiB/4MiB"
        );
        assert_eq!(
            render_event(&event(
                2,
                EventBody::Image {
                    image: Box::new(ready_image("deb"))
                }
            )),
            "2 2024-05-01T10:00:00.000Z image deb status=ready size=64MiB allocated=196KiB"
        );
        let mut failed = image("deb", ImageStatus::Failed);
        failed.error = Some("checksum mismatch".into());
        assert_eq!(
            render_event(&event(
                3,
                EventBody::Image {
                    image: Box::new(failed)
                }
            )),
            "3 2024-05-01T10:00:00.000Z image deb status=failed error=\"checksum mismatch\""
        );
        assert_eq!(
            render_event(&event(4, EventBody::ImageDeleted { name: "deb".into() })),
            "4 2024-05-01T10:00:00.000Z image_deleted deb"
        );
        assert_eq!(
            render_event(&event(
                5,
                EventBody::Volume {
                    volume: Box::new(volume("data", 1024))
                }
            )),
            "5 2024-05-01T10:00:00.000Z volume data size=1GiB allocated=192KiB attached_to=-"
        );
        assert_eq!(
            render_event(&event(
                6,
                EventBody::VolumeDeleted {
                    name: "data".into()
                }
            )),
            "6 2024-05-01T10:00:00.000Z volume_deleted data"
        );
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

    /// The storage commands as they parse.
    #[derive(Parser)]
    struct StorageCli {
        #[command(flatten)]
        opts: ClientOptions,
        #[command(subcommand)]
        cmd: StorageCmd,
    }

    #[derive(clap::Subcommand)]
    enum StorageCmd {
        #[command(subcommand)]
        Image(ImageCommand),
        #[command(subcommand)]
        Volume(VolumeCommand),
        #[command(subcommand)]
        Vm(VmCommand),
    }

    fn parse(args: &[&str]) -> Result<StorageCmd, clap::Error> {
        StorageCli::try_parse_from(std::iter::once("vmlet").chain(args.iter().copied()))
            .map(|c| c.cmd)
    }

    #[test]
    fn storage_commands_parse() {
        let Ok(StorageCmd::Image(cmd)) = parse(&[
            "image",
            "import",
            "deb",
            "--file",
            "/i/deb.raw",
            "--sha256",
            "ab",
            "--no-wait",
        ]) else {
            panic!("no parse");
        };
        assert_eq!(
            cmd,
            ImageCommand::Import {
                name: "deb".into(),
                file: Some("/i/deb.raw".into()),
                from_url: None,
                sha256: Some("ab".into()),
                no_wait: true
            }
        );
        // Exactly one source.
        assert!(parse(&["image", "import", "deb"]).is_err());
        assert!(parse(&[
            "image",
            "import",
            "deb",
            "--file",
            "a",
            "--from-url",
            "http://x/"
        ])
        .is_err());
        // `--url` still names the daemon.
        let cli = StorageCli::try_parse_from([
            "vmlet",
            "image",
            "import",
            "deb",
            "--from-url",
            "http://x/d.img",
            "--url",
            "http://node1:8780",
        ])
        .unwrap();
        assert_eq!(cli.opts.url.as_deref(), Some("http://node1:8780"));

        let Ok(StorageCmd::Volume(cmd)) =
            parse(&["volume", "resize", "data", "--size-mib", "2048"])
        else {
            panic!("no parse");
        };
        assert_eq!(
            cmd,
            VolumeCommand::Resize {
                name: "data".into(),
                size_mib: 2048
            }
        );
        assert!(parse(&["volume", "resize", "data"]).is_err());

        let Ok(StorageCmd::Vm(cmd)) = parse(&[
            "vm",
            "disk",
            "attach",
            "web",
            "--volume",
            "data",
            "--bus",
            "virtio_scsi",
            "--cache",
            "none",
            "--read-only",
            "--serial",
            "S1",
        ]) else {
            panic!("no parse");
        };
        assert_eq!(
            cmd,
            VmCommand::Disk {
                cmd: DiskCommand::Attach {
                    vm: "web".into(),
                    volume: "data".into(),
                    name: None,
                    bus: BusArg::VirtioScsi,
                    cache: CacheArg::None,
                    read_only: true,
                    serial: Some("S1".into())
                }
            }
        );
        let Ok(StorageCmd::Vm(VmCommand::Disk {
            cmd: DiskCommand::Limits { limits, .. },
        })) = parse(&[
            "vm",
            "disk",
            "limits",
            "web",
            "disk1",
            "--iops-total",
            "100",
            "--bps-write",
            "8M",
        ])
        else {
            panic!("no parse");
        };
        assert_eq!(
            IoLimits::from(limits),
            IoLimits {
                iops_total: Some(100),
                bps_write: Some(8 << 20),
                ..IoLimits::default()
            }
        );
        let Ok(StorageCmd::Vm(cmd)) = parse(&["vm", "delete", "web", "--delete-volumes"]) else {
            panic!("no parse");
        };
        assert_eq!(
            cmd,
            VmCommand::Delete {
                vm: "web".into(),
                force: false,
                delete_volumes: true
            }
        );
        let Ok(StorageCmd::Vm(cmd)) = parse(&["vm", "snapshot", "revert", "web", "s1"]) else {
            panic!("no parse");
        };
        assert_eq!(
            cmd,
            VmCommand::Snapshot {
                cmd: SnapshotCommand::Revert {
                    vm: "web".into(),
                    name: "s1".into()
                }
            }
        );
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
