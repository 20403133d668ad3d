//! The client subcommands of `vmlet` (`vmlet vm …`, `vmlet image …`,
//! `vmlet volume …`, `vmlet network …`, `vmlet node`, `vmlet events`): parse options, call the
//! daemon through [`crate::client`], print tables or JSON.
//!
//! Rendering is pure (data in, `String` out) so every format is unit-tested;
//! the `run_*` functions only fetch and print.
//!
//! This file owns what every subcommand shares: how to reach the daemon
//! ([`ClientOptions`]) and how to print ([`Output`]), the error
//! ([`CliError`]), and the formatting helpers (byte counts, sizes, aligned
//! columns, `key: value` lines). The subcommands live in:
//!
//! - `vm`: `vmlet vm …`, its disks, NICs and snapshots included, and how
//!   VMs and snapshots are rendered;
//! - `storage`: `vmlet image …` and `vmlet volume …`, the import progress
//!   bar, and how images and volumes are rendered;
//! - `network`: `vmlet network …`, and how networks are rendered;
//! - `node`: `vmlet node` and `vmlet events`, and their rendering;
//! - `console`: `vmlet console VM` (the serial console in the terminal).
//!
//! Their public items are re-exported here: callers name them `cli::…`.

use std::io::Write;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::client::{Client, ClientError, Endpoint, DEFAULT_SOCKET};

mod console;
#[cfg(test)]
mod fixtures;
mod migration;
mod network;
mod node;
mod storage;
mod vm;

pub use console::{
    parse_escape, run_console, run_console_args, run_console_log, run_console_vnc, split_at_escape,
    vnc_message, ConsoleArgs, DEFAULT_ESCAPE,
};
pub use migration::{run_migrate, run_migration, MigrateArgs, MigrationCommand};
pub use network::{render_network, render_network_list, run_network, NetworkCommand};
pub use node::{render_event, render_node, run_events, run_node};
pub use storage::{
    progress_bar, progress_detail, progress_line, render_image, render_image_list, render_volume,
    render_volume_list, run_image, run_volume, ImageCommand, VolumeCommand,
};
pub use vm::{
    render_snapshot_list, render_vm, render_vm_list, run_vm, BusArg, CacheArg, DiskCommand,
    LimitArgs, NicCommand, NicModelArg, SnapshotCommand, VmCommand,
};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns or `key: value` lines, for people.
    #[default]
    Table,
    /// The API's JSON, for scripts.
    Json,
}

/// The help section of the options every client subcommand takes.
const CONNECTION_HEADING: &str = "Client options (before or after the subcommand)";

/// The exit codes of the client subcommands, as `vmlet --help` lists them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes (client subcommands):
  0  success
  1  any other error (e.g. a rejected token, an import that failed)
  2  usage: unknown subcommand or option, missing argument
  3  not found: no such VM, image, volume, network or snapshot
  4  conflict: the object is busy, in the wrong state, changed meanwhile,
     or the name is taken
  5  invalid: the spec, a field or an argument is not acceptable (also
     `vmlet run` and `vmlet argv` with a bad spec file)
  6  unavailable: the daemon cannot be reached, QEMU failed, a timeout,
     or no space left";

/// Exit code: any other error.
pub const EXIT_OTHER: u8 = 1;
/// Exit code: the object does not exist.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit code: busy, wrong state, or taken.
pub const EXIT_CONFLICT: u8 = 4;
/// Exit code: the input is not acceptable.
pub const EXIT_INVALID: u8 = 5;
/// Exit code: the daemon or the host could not do it now.
pub const EXIT_UNAVAILABLE: u8 = 6;

/// How to reach the daemon, and how to print.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOptions {
    /// The daemon's unix socket.
    #[arg(long, global = true, env = "VMLET_SOCKET", default_value = DEFAULT_SOCKET, help_heading = CONNECTION_HEADING)]
    pub socket: PathBuf,
    /// Talk to the daemon over TCP instead: `http://HOST:PORT`, or
    /// `https://HOST:PORT` when it serves TLS.
    #[arg(long, global = true, env = "VMLET_URL", help_heading = CONNECTION_HEADING)]
    pub url: Option<String>,
    /// File holding the bearer token sent with `--url`. Default: the
    /// daemon's token file on this host (`auth_token_file` in
    /// /etc/vmlet/vmlet.toml or `VMLET_AUTH_TOKEN_FILE`, else
    /// STATE_DIR/api-token), when it exists.
    #[arg(long, global = true, env = "VMLET_TOKEN_FILE", help_heading = CONNECTION_HEADING)]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA (or self-signed certificate) that signed the
    /// daemon's certificate, trusted for `https://` URLs besides the
    /// system's roots.
    #[arg(long, global = true, env = "VMLET_CA_FILE", help_heading = CONNECTION_HEADING)]
    pub ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table, help_heading = CONNECTION_HEADING)]
    pub output: Output,
}

impl ClientOptions {
    /// Options for the unix socket at `socket`, printing tables.
    pub fn unix(socket: impl Into<PathBuf>) -> ClientOptions {
        ClientOptions {
            socket: socket.into(),
            url: None,
            token_file: None,
            ca_file: None,
            output: Output::Table,
        }
    }

    /// The endpoint these options name: `--url` (with the token from
    /// `--token-file`, else from [`default_token_file`] when it exists) when
    /// given, else `--socket`.
    pub fn endpoint(&self) -> Result<Endpoint, CliError> {
        let Some(url) = &self.url else {
            return Ok(Endpoint::Unix(self.socket.clone()));
        };
        let token = match &self.token_file {
            Some(path) => Some(read_token(path)?),
            None => {
                let path = default_token_file();
                // None there (another host's daemon): the daemon's 401 says
                // what is missing.
                path.exists().then(|| read_token(&path)).transpose()?
            }
        };
        let endpoint = Endpoint::Tcp {
            url: url.clone(),
            token,
        };
        endpoint.check()?;
        Ok(endpoint)
    }

    /// A client for [`ClientOptions::endpoint`], trusting `--ca-file` too
    /// for an `https://` URL.
    pub fn client(&self) -> Result<Client, CliError> {
        Ok(Client::with_ca_file(
            self.endpoint()?,
            self.ca_file.as_deref(),
        )?)
    }
}

/// Where a daemon on this host keeps its bearer token: the settings'
/// [`crate::config::Settings::auth_token_path`] (config file and `VMLET_*`
/// variables, as `vmlet serve` reads them), or `STATE_DIR/api-token` under
/// the default state directory when the settings cannot be read.
pub fn default_token_file() -> PathBuf {
    crate::config::Settings::load(None)
        .unwrap_or_default()
        .auth_token_path()
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
    /// `vm start --wait-ready`: the marker did not appear in time.
    #[error("VM {vm} started, but its serial console did not print {marker:?} within {timeout_s}s{} (see `vmlet vm console {vm} --print-log --boot current`)", if *.agent { " and its guest agent did not answer" } else { "" })]
    NotReady {
        /// The VM.
        vm: String,
        /// The text waited for.
        marker: String,
        /// The wait, in seconds.
        timeout_s: u64,
        /// Whether an answer of the guest agent would have done too.
        agent: bool,
    },
    /// `vm start --wait-ready`: the VM stopped while vmlet waited for it.
    #[error("VM {vm} is {state} while waiting for {marker:?} on its serial console")]
    StoppedWhileWaiting {
        /// The VM.
        vm: String,
        /// Its state.
        state: String,
        /// The text waited for.
        marker: String,
    },
    /// `vm migrate`: the migration ended without completing (the VM runs
    /// on the source as before).
    #[error("migration of VM {vm} {phase}: {error} (the VM still runs here)")]
    MigrationFailed {
        /// The VM.
        vm: String,
        /// `failed` or `cancelled`.
        phase: String,
        /// Why.
        error: String,
    },
    /// `vm edit` or `vm set` could not make a change (the editor failed,
    /// the edited file is not a spec, a `key=value` is malformed).
    #[error("{0}")]
    Edit(String),
}

impl CliError {
    /// The error's code: the API's own for an answer of the daemon
    /// (`not_found`, `conflict`, `invalid_spec`…), else one of the same
    /// family for what failed on this side.
    pub fn code(&self) -> String {
        match self {
            CliError::Client(ClientError::Api { code, .. }) => code.clone(),
            CliError::Client(ClientError::Connect { .. } | ClientError::Http { .. }) => {
                "unavailable".into()
            }
            CliError::Client(
                ClientError::BadEndpoint { .. }
                | ClientError::BadSegment { .. }
                | ClientError::BadPath { .. },
            )
            | CliError::SpecNotJson { .. }
            | CliError::UuidMismatch { .. } => "invalid_argument".into(),
            CliError::Client(ClientError::Websocket { .. }) => "console".into(),
            CliError::Client(ClientError::Tls { .. }) => "tls".into(),
            CliError::Client(ClientError::CaFile { .. }) => "unreadable_file".into(),
            CliError::Client(ClientError::Decode { .. }) => "bad_response".into(),
            CliError::ReadSpec { .. }
            | CliError::TokenFile { .. }
            | CliError::EmptyToken { .. } => "unreadable_file".into(),
            CliError::Output(_) => "output".into(),
            CliError::ImportFailed { .. } => "import_failed".into(),
            CliError::ImageGone { .. } => "not_found".into(),
            CliError::NotReady { .. } => "timeout".into(),
            CliError::StoppedWhileWaiting { .. } => "conflict".into(),
            CliError::Edit(_) => "invalid_argument".into(),
            CliError::MigrationFailed { .. } => "migration_failed".into(),
        }
    }

    /// The process exit code for this error (see [`EXIT_CODES_HELP`]).
    pub fn exit_code(&self) -> u8 {
        exit_code_for(&self.code())
    }

    /// The message with its causes, `: `-separated.
    pub fn message(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            // `#[error(transparent)]` repeats the message as its source.
            if !text.ends_with(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        text
    }
}

/// The exit code of an error code (the API's or [`CliError::code`]'s).
pub fn exit_code_for(code: &str) -> u8 {
    match code {
        "not_found" => EXIT_NOT_FOUND,
        "conflict" | "busy" | "stale_generation" => EXIT_CONFLICT,
        "invalid_spec"
        | "invalid_request"
        | "invalid_argument"
        | "bad_request"
        | "payload_too_large"
        | "unsupported_media_type"
        | "method_not_allowed" => EXIT_INVALID,
        "unavailable" | "timeout" | "no_space" => EXIT_UNAVAILABLE,
        _ => EXIT_OTHER,
    }
}

/// How a failed client subcommand reports `error` on standard error: a
/// `vmlet: …` line, or with `-o json` the API's error body
/// `{"error":{"code":"…","message":"…"}}` (with `field`/`fields` when the
/// daemon named them), one line.
pub fn error_text(error: &CliError, output: Output) -> String {
    match output {
        Output::Table => format!("vmlet: {}\n", error.message()),
        Output::Json => {
            let mut detail = serde_json::json!({
                "code": error.code(),
                "message": match error {
                    CliError::Client(ClientError::Api { message, .. }) => message.clone(),
                    other => other.message(),
                },
            });
            if let CliError::Client(ClientError::Api { field, task, .. }) = error {
                if let Some(field) = field {
                    detail["field"] = field.clone().into();
                }
                if let Some(task) = task {
                    detail["task"] = task.clone().into();
                }
            }
            let mut text = serde_json::json!({ "error": detail }).to_string();
            text.push('\n');
            text
        }
    }
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

/// `value` as pretty JSON (`-o json`), or as `render` shows it.
fn shown<T: serde::Serialize>(json: bool, value: &T, render: impl FnOnce(&T) -> String) -> String {
    if json {
        pretty(value)
    } else {
        render(value)
    }
}

/// `items` as pretty JSON under `key` (`{"vms": [...]}`), or as `render`
/// shows them.
fn shown_list<T: serde::Serialize>(
    json: bool,
    key: &str,
    items: &[T],
    render: impl FnOnce(&[T]) -> String,
) -> String {
    if json {
        pretty(&serde_json::json!({ key: items }))
    } else {
        render(items)
    }
}

/// What a command with nothing to show prints: `message` for people,
/// nothing with `-o json`.
fn unless_json(json: bool, message: impl FnOnce() -> String) -> String {
    if json {
        String::new()
    } else {
        message()
    }
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

fn key_values(lines: &[(String, String)]) -> String {
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    lines
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
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

/// A progress bar `width` characters wide, `filled` of them done.
fn bar(filled: usize, width: usize) -> String {
    let filled = filled.min(width);
    std::iter::repeat_n('#', filled)
        .chain(std::iter::repeat_n('-', width - filled))
        .collect()
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
    use crate::spec::IoLimits;
    use clap::Parser;

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
        #[command(subcommand)]
        Network(NetworkCommand),
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

    #[test]
    fn network_and_nic_commands_parse() {
        let Ok(StorageCmd::Network(cmd)) = parse(&[
            "network",
            "create",
            "lan",
            "--bridge",
            "br0",
            "--mtu",
            "9000",
            "--vlan-uplink",
            "eth0",
            "--vlan-id",
            "100",
        ]) else {
            panic!("no parse");
        };
        assert_eq!(
            cmd,
            NetworkCommand::Create {
                name: "lan".into(),
                bridge: Some("br0".into()),
                mtu: Some(9000),
                vlan_uplink: Some("eth0".into()),
                vlan_id: Some(100),
                user: false
            }
        );
        assert!(parse(&["network", "create", "nat", "--user"]).is_ok());
        // A VLAN needs both halves; user networks take no bridge options.
        assert!(parse(&["network", "create", "lan", "--vlan-id", "100"]).is_err());
        assert!(parse(&["network", "create", "lan", "--vlan-uplink", "eth0"]).is_err());
        assert!(parse(&["network", "create", "nat", "--user", "--mtu", "1400"]).is_err());

        let Ok(StorageCmd::Vm(cmd)) = parse(&[
            "vm",
            "nic",
            "attach",
            "web",
            "--network",
            "lan",
            "--model",
            "e1000e",
            "--mac",
            "52:54:00:12:34:56",
        ]) else {
            panic!("no parse");
        };
        assert_eq!(
            cmd,
            VmCommand::Nic {
                cmd: NicCommand::Attach {
                    vm: "web".into(),
                    network: "lan".into(),
                    mac: Some("52:54:00:12:34:56".into()),
                    model: NicModelArg::E1000e,
                    queues: None
                }
            }
        );
        assert!(parse(&["vm", "nic", "attach", "web"]).is_err());
        let Ok(StorageCmd::Vm(cmd)) = parse(&["vm", "nic", "detach", "web", "1"]) else {
            panic!("no parse");
        };
        assert_eq!(
            cmd,
            VmCommand::Nic {
                cmd: NicCommand::Detach {
                    vm: "web".into(),
                    nic: "1".into()
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
    fn errors_have_a_code_an_exit_code_and_a_json_form() {
        let api = |status, code: &str, field: Option<&str>| {
            CliError::Client(ClientError::Api {
                status,
                code: code.into(),
                message: "it went wrong".into(),
                field: field.map(Into::into),
                task: None,
            })
        };
        for (status, code, exit) in [
            (404, "not_found", EXIT_NOT_FOUND),
            (409, "conflict", EXIT_CONFLICT),
            (409, "busy", EXIT_CONFLICT),
            (412, "stale_generation", EXIT_CONFLICT),
            (422, "invalid_spec", EXIT_INVALID),
            (422, "invalid_request", EXIT_INVALID),
            (400, "bad_request", EXIT_INVALID),
            (503, "unavailable", EXIT_UNAVAILABLE),
            (503, "timeout", EXIT_UNAVAILABLE),
            (507, "no_space", EXIT_UNAVAILABLE),
            (401, "unauthorized", EXIT_OTHER),
        ] {
            assert_eq!(api(status, code, None).exit_code(), exit, "{code}");
        }
        let err = api(422, "invalid_spec", Some("vcpus"));
        assert_eq!(
            error_text(&err, Output::Json),
            "{\"error\":{\"code\":\"invalid_spec\",\"field\":\"vcpus\",\"message\":\"it went wrong\"}}\n"
        );
        assert_eq!(
            error_text(&err, Output::Table),
            "vmlet: 422 invalid_spec: it went wrong (field vcpus)\n"
        );
        // Errors of this side: their own codes, the message with its cause.
        let unreadable = CliError::TokenFile {
            path: "/x/token".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(unreadable.exit_code(), EXIT_OTHER);
        assert_eq!(
            error_text(&unreadable, Output::Table),
            "vmlet: reading the token file /x/token: entity not found\n"
        );
        let mismatch = CliError::UuidMismatch {
            id: Uuid::nil(),
            spec: "x".into(),
        };
        assert_eq!(mismatch.exit_code(), EXIT_INVALID);
        let json: serde_json::Value =
            serde_json::from_str(&error_text(&mismatch, Output::Json)).unwrap();
        assert_eq!(json["error"]["code"], "invalid_argument");
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
        opts.token_file = Some(token.clone());
        std::fs::write(&token, "s3cret\n").unwrap();
        opts.url = Some("ftp://node1".into());
        let err = opts.endpoint().unwrap_err().to_string();
        assert!(err.contains("only http:// and https://"), "{err}");
        // `--ca-file` is read when the client is made for an https URL.
        opts.url = Some("https://node1".into());
        assert!(opts.client().unwrap().endpoint().is_https());
        opts.ca_file = Some(dir.path().join("missing-ca.pem"));
        let err = opts.client().unwrap_err();
        assert_eq!(err.code(), "unreadable_file");
        assert!(err.to_string().contains("missing-ca.pem"), "{err}");
        opts.url = Some("http://node1".into());
        assert!(opts.client().is_ok(), "not used over plain http");
    }
}
