//! `vmlet vm migrate` (move a running VM to another vmlet host, with a
//! progress line and the final downtime) and `vmlet migration list|show|
//! cancel`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{
    bytes, columns, key_values, read_token, shown, shown_list, CliError, ClientOptions, Output,
};
use crate::client::Client;
use crate::spec::{MigrateRequest, Migration, MigrationTarget, Phase, Role};

/// How often `vm migrate` asks how far the migration got.
const POLL: Duration = Duration::from_millis(300);

/// `vmlet vm migrate`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct MigrateArgs {
    /// UUID or name of the running VM.
    pub vm: String,
    /// The target daemon's TCP API: `http://HOST:PORT` or `https://HOST:PORT`.
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// File holding the target daemon's bearer token. When this daemon is
    /// reached over its unix socket (which needs no token of its own),
    /// `--token-file FILE` names it as well: `vmlet vm migrate VM --to URL
    /// --token-file FILE`. With `--url`, `--token-file` is this daemon's
    /// token, and the target's needs this option.
    #[arg(long, value_name = "FILE")]
    pub target_token_file: Option<PathBuf>,
    /// The longest pause of the guest at the switch, in milliseconds
    /// (raised stepwise when memory does not converge).
    #[arg(long, default_value_t = crate::spec::DEFAULT_MAX_DOWNTIME_MS)]
    pub max_downtime_ms: u64,
    /// Bandwidth cap for memory and disks, in MiB/s (default: none).
    #[arg(long)]
    pub max_bandwidth_mib_s: Option<u64>,
    /// Print the migration once it started and return; do not follow it.
    #[arg(long)]
    pub no_wait: bool,
}

/// `vmlet migration …`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum MigrationCommand {
    /// List the daemon's migrations (in progress and recently finished).
    List,
    /// Show one migration.
    Show {
        /// The migration's id.
        id: Uuid,
    },
    /// Cancel a migration before its switch: the guest stays on the source.
    Cancel {
        /// The migration's id.
        id: Uuid,
    },
}

/// Runs `vmlet vm migrate`.
pub async fn run_migrate(
    args: MigrateArgs,
    opts: &ClientOptions,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let client = opts.client()?;
    let token_file = match (&args.target_token_file, &opts.url, &opts.token_file) {
        (Some(file), _, _) => file.clone(),
        (None, None, Some(file)) => file.clone(),
        _ => {
            return Err(CliError::Edit(
                match opts.url {
                    None => "give the target daemon's token: --token-file FILE (or --target-token-file FILE)",
                    Some(_) => "give the target daemon's token: --target-token-file FILE (--token-file is this daemon's with --url)",
                }
                .into(),
            ))
        }
    };
    let request = MigrateRequest {
        target: MigrationTarget {
            url: args.to.clone(),
            token: read_token(&token_file)?,
        },
        max_downtime_ms: args.max_downtime_ms,
        max_bandwidth_mib_s: args.max_bandwidth_mib_s,
    };
    let json = opts.output == Output::Json;
    let started = client.migrate_vm(&args.vm, &request).await?;
    if args.no_wait {
        let text = shown(json, &started, |m| {
            format!(
                "migration {} of VM {} to {} started\n",
                m.id, m.vm_name, m.target
            )
        });
        return out.write_all(text.as_bytes()).map_err(CliError::Output);
    }
    let done = follow(&client, started.id, !json).await?;
    let text = shown(json, &done, |m| match m.phase {
        Phase::Completed => format!(
            "migrated VM {} to {} in {} (downtime {})\n",
            m.vm_name,
            m.target,
            m.total_ms
                .map_or("-".to_string(), |t| format!("{:.1} s", t as f64 / 1000.0)),
            m.downtime_ms.map_or("-".to_string(), |d| format!("{d} ms"))
        ),
        _ => String::new(),
    });
    out.write_all(text.as_bytes()).map_err(CliError::Output)?;
    match done.phase {
        Phase::Completed => Ok(()),
        phase => Err(CliError::MigrationFailed {
            vm: done.vm_name.clone(),
            phase: phase.as_str().to_string(),
            error: done.error.clone().unwrap_or_default(),
        }),
    }
}

/// Polls migration `id` until it ends, drawing its progress on stderr
/// (one line redrawn on a terminal, a line per phase otherwise).
async fn follow(client: &Client, id: Uuid, draw: bool) -> Result<Migration, CliError> {
    let tty = std::io::stderr().is_terminal();
    let mut last_phase = None;
    let started = Instant::now();
    loop {
        let m = client.get_migration(id).await?;
        if draw {
            let line = progress_line(&m, started.elapsed());
            let mut err = std::io::stderr();
            if tty {
                let _ = write!(err, "\r\x1b[K{line}");
            } else if last_phase != Some(m.phase) {
                let _ = writeln!(err, "{line}");
            }
            let _ = err.flush();
        }
        last_phase = Some(m.phase);
        if m.phase.is_final() {
            if draw && tty {
                let _ = writeln!(std::io::stderr());
            }
            return Ok(m);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One line of progress: phase, a bar, the memory and disks copied.
pub fn progress_line(m: &Migration, elapsed: Duration) -> String {
    let p = &m.progress;
    let disk_total: u64 = p.disks.iter().map(|d| d.total).sum();
    let disk_done: u64 = p.disks.iter().map(|d| d.done).sum();
    let ram_done = p.ram_total.saturating_sub(p.ram_remaining);
    let (done, total) = match m.phase {
        Phase::Preparing => (0, 1),
        Phase::Mirroring => (disk_done, disk_total.max(1)),
        _ if p.ram_total == 0 => (0, 1),
        _ => (ram_done, p.ram_total),
    };
    let percent = (done.min(total) * 100) / total.max(1);
    let bar = super::bar((percent / 5) as usize, 20);
    let mut line = format!(
        "{:<10} [{bar}] {percent:>3}%  memory {}/{}",
        m.phase.as_str(),
        bytes(ram_done),
        bytes(p.ram_total)
    );
    if !p.disks.is_empty() {
        line.push_str(&format!(
            "  disks {}/{}",
            bytes(disk_done),
            bytes(disk_total)
        ));
    }
    if p.dirty_rate > 0 {
        line.push_str(&format!("  dirty {}/s", bytes(p.dirty_rate)));
    }
    line.push_str(&format!("  {:.0}s", elapsed.as_secs_f64()));
    line
}

/// Runs `vmlet migration CMD`.
pub async fn run_migration(
    cmd: MigrationCommand,
    opts: &ClientOptions,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let client = opts.client()?;
    let json = opts.output == Output::Json;
    let text = match cmd {
        MigrationCommand::List => {
            let list = client.list_migrations().await?;
            shown_list(json, "migrations", &list, render_list)
        }
        MigrationCommand::Show { id } => shown(json, &client.get_migration(id).await?, render),
        MigrationCommand::Cancel { id } => shown(json, &client.cancel_migration(id).await?, render),
    };
    out.write_all(text.as_bytes()).map_err(CliError::Output)
}

fn role(m: &Migration) -> &'static str {
    match m.role {
        Role::Source => "out",
        Role::Target => "in",
    }
}

/// Migrations as a table.
pub fn render_list(list: &[Migration]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.vm_name.clone(),
                role(m).to_string(),
                match m.role {
                    Role::Source => m.target.clone(),
                    Role::Target => m.source.clone(),
                },
                m.phase.as_str().to_string(),
                m.downtime_ms.map_or("-".into(), |d| format!("{d}ms")),
                m.started_at.clone(),
            ]
        })
        .collect();
    columns(
        &["ID", "VM", "DIR", "PEER", "PHASE", "DOWNTIME", "STARTED"],
        &rows,
    )
}

/// One migration as key-value lines.
pub fn render(m: &Migration) -> String {
    let p = &m.progress;
    let mut lines = vec![
        ("id".to_string(), m.id.to_string()),
        ("vm".into(), format!("{} ({})", m.vm_name, m.vm)),
        ("role".into(), format!("{:?}", m.role).to_lowercase()),
        ("source".into(), m.source.clone()),
        ("target".into(), m.target.clone()),
        ("phase".into(), m.phase.as_str().into()),
        ("started".into(), m.started_at.clone()),
        (
            "finished".into(),
            m.finished_at.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "memory".into(),
            format!(
                "{} sent, {} of {} left",
                bytes(p.ram_transferred),
                bytes(p.ram_remaining),
                bytes(p.ram_total)
            ),
        ),
    ];
    for d in &p.disks {
        lines.push((
            format!("disk {}", d.name),
            format!("{}/{}", bytes(d.done), bytes(d.total)),
        ));
    }
    lines.push((
        "downtime".into(),
        m.downtime_ms.map_or("-".into(), |d| format!("{d} ms")),
    ));
    lines.push((
        "total".into(),
        m.total_ms.map_or("-".into(), |t| format!("{t} ms")),
    ));
    if let Some(e) = &m.error {
        lines.push(("error".into(), e.clone()));
    }
    key_values(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskProgress, Progress};

    fn migration(phase: Phase) -> Migration {
        Migration {
            id: Uuid::nil(),
            vm: Uuid::nil(),
            vm_name: "web1".into(),
            role: Role::Source,
            source: "node1".into(),
            target: "http://10.0.0.2:8780".into(),
            phase,
            started_at: "2026-11-26T04:00:00.000Z".into(),
            finished_at: None,
            max_downtime_ms: 300,
            max_bandwidth_mib_s: None,
            progress: Progress {
                ram_total: 256 << 20,
                ram_remaining: 64 << 20,
                ram_transferred: 200 << 20,
                dirty_rate: 1 << 20,
                disks: vec![DiskProgress {
                    name: "root".into(),
                    total: 64 << 20,
                    done: 32 << 20,
                }],
            },
            downtime_ms: None,
            total_ms: None,
            error: None,
        }
    }

    #[test]
    fn the_progress_line_follows_the_phase() {
        let ram = progress_line(&migration(Phase::Ram), Duration::from_secs(3));
        assert!(ram.starts_with("ram"), "{ram}");
        assert!(ram.contains("[###############-----]  75%"), "{ram}");
        assert!(ram.contains("memory 192MiB/256MiB"), "{ram}");
        assert!(ram.contains("disks 32MiB/64MiB"), "{ram}");
        assert!(ram.contains("dirty 1MiB/s"), "{ram}");
        let disks = progress_line(&migration(Phase::Mirroring), Duration::ZERO);
        assert!(disks.contains(" 50%"), "{disks}");
    }

    #[test]
    fn a_finished_migration_shows_its_downtime() {
        let mut m = migration(Phase::Completed);
        m.downtime_ms = Some(42);
        m.total_ms = Some(3100);
        let text = render(&m);
        assert!(text.contains("downtime:"), "{text}");
        assert!(text.contains("42 ms"), "{text}");
        let table = render_list(&[m]);
        assert!(
            table.contains("completed") && table.contains("42ms"),
            "{table}"
        );
    }
}
