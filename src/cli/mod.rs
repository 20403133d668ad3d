//! The client subcommands of `vmlet` (`vmlet vm …`, `vmlet image …`,
//! `vmlet volume …`, `vmlet network …`, `vmlet node`, `vmlet events`): parse options, call the
//! daemon through [`crate::client`], print tables or JSON.
//!
//! Rendering is pure (data in, `String` out) so every format is unit-tested;
//! the `run_*` functions only fetch and print.
//!
//! This file owns what every subcommand shares: how to reach the daemon
//! ([`ClientOptions`]) and how to print ([`Output`]), and the formatting
//! helpers (byte counts, sizes, aligned columns, `key: value` lines). The
//! error ([`CliError`]) and the exit codes live in `error`, the parse tests
//! of every subcommand in `parse_tests`. The subcommands live in:
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

use crate::client::{Client, Endpoint, DEFAULT_SOCKET};

mod console;
mod error;
#[cfg(test)]
mod fixtures;
mod migration;
mod network;
mod node;
#[cfg(test)]
mod parse_tests;
mod storage;
mod vm;

pub use console::{
    parse_escape, run_console, run_console_args, run_console_log, run_console_vnc, split_at_escape,
    vnc_message, ConsoleArgs, DEFAULT_ESCAPE,
};
pub use error::{
    error_text, exit_code_for, CliError, EXIT_CODES_HELP, EXIT_CONFLICT, EXIT_INVALID,
    EXIT_NOT_FOUND, EXIT_OTHER, EXIT_UNAVAILABLE,
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
