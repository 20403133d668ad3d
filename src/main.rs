//! The `vmlet` command.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use vmlet::cli::{ClientOptions, ImageCommand, NetworkCommand, VmCommand, VolumeCommand};
use vmlet::config::{LogFormat, Settings};
use vmlet::qemu::accel::{self, AccelChoice};
use vmlet::qemu::argv::{LaunchInputs, RunPaths};
use vmlet::qemu::exit::{self, Ending, ExitEvents};
use vmlet::qemu::instance::{self, StopMode, StopOutcome};
use vmlet::qemu::nic::{NicBackend, NicPlan};
use vmlet::qemu::process::{ExitStatus, ProcessError};
use vmlet::qemu::profile::Profiles;
use vmlet::spec::VmSpec;
use vmlet::vm::launch::LaunchFiles;

/// Exit code when the spec is invalid (nothing was started): the client
/// subcommands' "invalid", not 2, which means a usage error.
const EXIT_BAD_SPEC: u8 = vmlet::cli::EXIT_INVALID;
/// Exit code when the VM was stopped by Ctrl-C (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser)]
#[command(
    name = "vmlet",
    version,
    about = "QEMU node daemon: VMs without libvirt",
    after_help = vmlet::cli::EXIT_CODES_HELP
)]
struct Cli {
    /// Config file (default: /etc/vmlet/vmlet.toml when it exists).
    #[arg(long, global = true, help_heading = "Daemon options")]
    config: Option<PathBuf>,
    /// Log filter, e.g. `info`, `vmlet=debug`.
    #[arg(
        long,
        global = true,
        env = "VMLET_LOG",
        default_value = "info",
        help_heading = "Logging options"
    )]
    log: String,
    /// Log format: text or json (default: the settings' `log_format`).
    #[arg(long, global = true, help_heading = "Logging options")]
    log_format: Option<LogFormat>,
    /// How the client subcommands reach the daemon and print; accepted
    /// before or after the subcommand.
    #[command(flatten)]
    opts: ClientOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one VM in the foreground from a spec file, with its serial console
    /// on stdout. Ctrl-C or SIGTERM stops it gracefully (ACPI power button); a
    /// second one forces it off. Exits 0 when the guest powers itself off,
    /// 5 when the spec is invalid (nothing is started).
    Run {
        /// The VM spec (JSON). `uuid` may be left out; one is generated.
        spec: PathBuf,
        /// Accelerator: auto, kvm or tcg (default from the settings).
        #[arg(long)]
        accel: Option<AccelChoice>,
        /// Run directory root (sockets, pidfile, serial log).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Seconds the guest gets to power off after Ctrl-C before QEMU is quit.
        #[arg(long)]
        grace: Option<u64>,
    },
    /// Run the daemon: reattach to running VMs, then serve the API on a
    /// unix socket (and TCP when configured) until SIGTERM. Stopping the
    /// daemon never stops VMs.
    Serve {
        /// State directory (VM records).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Run directory (sockets, pidfiles; default socket RUN_DIR/vmlet.sock).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Where to listen: a unix socket path (`/run/vmlet/vmlet.sock`) or a
        /// TCP address (`127.0.0.1:8780`). Once each at most.
        #[arg(long, value_name = "PATH|ADDR")]
        listen: Vec<String>,
        /// Accelerator: auto, kvm or tcg.
        #[arg(long)]
        accel: Option<AccelChoice>,
    },
    /// Print the API's OpenAPI document (as in docs/openapi.json).
    Openapi,
    /// Check a spec file and print the QEMU command line it gives; exits 5
    /// when the spec is invalid (naming each bad field), 2 on a usage error.
    Argv {
        /// The VM spec (JSON).
        spec: PathBuf,
        /// Accelerator: auto, kvm or tcg.
        #[arg(long)]
        accel: Option<AccelChoice>,
    },
    /// Manage the VMs of a running daemon.
    Vm {
        #[command(subcommand)]
        cmd: VmCommand,
    },
    /// Manage the daemon's images: import (file or URL), list, show, delete.
    Image {
        #[command(subcommand)]
        cmd: ImageCommand,
    },
    /// Manage the daemon's volumes: create, list, show, resize, delete.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCommand,
    },
    /// Manage the daemon's networks: create (bridge, VLAN or user-mode),
    /// list, show, delete.
    Network {
        #[command(subcommand)]
        cmd: NetworkCommand,
    },
    /// List, show and cancel live migrations (start one with `vmlet vm
    /// migrate`).
    Migration {
        #[command(subcommand)]
        cmd: vmlet::cli::MigrationCommand,
    },
    /// Show the daemon's host: capacity, QEMU, accelerator, VM counts.
    Node,
    /// Same as `vmlet vm console`: attach this terminal to a VM's serial
    /// console, print its log (--print-log), or open it in a browser (--vnc).
    #[command(name = "console")]
    Console(vmlet::cli::ConsoleArgs),
    /// Follow the daemon's events, one line each, until interrupted. When
    /// the connection drops (a daemon restart), it reconnects and resumes
    /// after the last event it printed.
    Events {
        /// Replay the buffered events after this sequence number first.
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
    },
    /// Print a shell completion script: `vmlet completion bash >
    /// /etc/bash_completion.d/vmlet`, or source it from the shell's rc file.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Read once; client subcommands ignore a broken file (they need none).
    let settings = Settings::load(cli.config.as_deref());
    let format = cli
        .log_format
        .or_else(|| settings.as_ref().ok().map(|s| s.log_format))
        .unwrap_or_default();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logger = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter);
    match format {
        LogFormat::Text => logger.init(),
        LogFormat::Json => logger.json().flatten_event(true).init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmlet: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli, settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmlet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(
    cli: Cli,
    settings: Result<Settings, vmlet::config::ConfigError>,
) -> anyhow::Result<ExitCode> {
    // Client subcommands only talk to a daemon: they need no settings.
    let cli = match run_client(cli).await {
        Ok(outcome) => return outcome,
        Err(cli) => cli,
    };
    let mut settings = settings?;
    match cli.command {
        Command::Serve {
            state_dir,
            run_dir,
            listen,
            accel,
        } => {
            if let Some(dir) = state_dir {
                settings.state_dir = dir;
            }
            if let Some(dir) = run_dir {
                settings.run_dir = dir;
            }
            if let Some(a) = accel {
                settings.accel = a;
            }
            for addr in listen {
                if addr.starts_with('/') {
                    settings.socket = Some(addr.into());
                } else {
                    settings.tcp_listen = Some(addr.parse().with_context(|| {
                        format!("--listen {addr:?}: neither an absolute socket path nor an address like 127.0.0.1:8780")
                    })?);
                }
            }
            // Everything vmlet and its QEMUs create (records, images,
            // volumes, overlays, serial logs, sockets) is private unless
            // vmlet widens it on purpose (the API socket's 0660).
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            vmlet::daemon::serve(settings).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completion { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            // Into memory first: the generator panics when stdout fails
            // (`vmlet completion bash | head`).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "vmlet", &mut script);
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(e).context("writing the completion script")
                }
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Openapi => {
            print!("{}", vmlet::api::openapi_json());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            spec,
            accel,
            run_dir,
            grace,
        } => {
            if let Some(a) = accel {
                settings.accel = a;
            }
            if let Some(dir) = run_dir {
                settings.run_dir = dir;
            }
            if let Some(g) = grace {
                settings.stop_grace_s = g;
            }
            run(&settings, &spec).await
        }
        Command::Argv { spec, accel } => {
            if let Some(a) = accel {
                settings.accel = a;
            }
            let profiles = Profiles::load(Some(&settings.profile_dir))?;
            let Some(spec) = load_spec(&spec, &profiles)? else {
                return Ok(ExitCode::from(EXIT_BAD_SPEC));
            };
            let paths = RunPaths::new(&settings.run_dir, spec.uuid);
            // The daemon opens taps and passes their fds; shown as FDn here.
            let nics: Vec<NicPlan> = spec
                .nics
                .iter()
                .enumerate()
                .map(|(i, nic)| NicPlan {
                    spec: nic.clone(),
                    backend: NicBackend::Tap {
                        fds: (0..nic.queue_count())
                            .map(|q| format!("FD{i}.{q}"))
                            .collect(),
                        vhost_fds: vec![],
                    },
                })
                .collect();
            // The daemon opens every disk, kernel and initrd and passes
            // fds; here they are numbered from 100 without opening anything.
            let disks = vmlet::vm::launch::disk_plans(
                &vmlet::storage::Layout::new(&settings.state_dir),
                spec.uuid,
                &spec.disks,
                spec.cloud_init.is_some(),
            );
            // Jailed as the daemon would run it from this user.
            let jailed = nix::unistd::geteuid().is_root() && settings.qemu.jail;
            let n = vmlet::qemu::launch_files::numbered(&spec, &disks, 100, jailed);
            let profile = profiles.get(&spec.profile)?;
            let accel = accel::resolve_on_host(settings.accel);
            let machine = machine_pin(&settings, profile, accel, spec.cpu.as_ref()).await?;
            let argv = vmlet::qemu::argv::build(LaunchInputs {
                spec: &spec,
                profile,
                machine: &machine,
                accel,
                paths: &paths,
                jailed,
                run_fds: &n.run,
                disks: &disks,
                disk_sets: &n.sets,
                passed_fds: &n.passed,
                boot_files: n.boot.as_ref(),
                nics: &nics,
                pflash: n.pflash,
            });
            println!("{}", settings.qemu_binary.display());
            for arg in argv {
                println!("{arg}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Vm { .. }
        | Command::Image { .. }
        | Command::Volume { .. }
        | Command::Network { .. }
        | Command::Migration { .. }
        | Command::Node
        | Command::Console(_)
        | Command::Events { .. } => {
            unreachable!("run_client runs the client subcommands")
        }
    }
}

/// Runs a client subcommand (`vm`, `image`, `volume`, `network`, `node`,
/// `console`, `events`) and prints its error (as JSON with `-o json`);
/// hands any other command back. The exit code tells the error's class
/// (see [`vmlet::cli::EXIT_CODES_HELP`]).
async fn run_client(cli: Cli) -> Result<anyhow::Result<ExitCode>, Cli> {
    let mut stdout = std::io::stdout();
    let opts = &cli.opts;
    let result = match cli.command {
        Command::Vm { cmd } => vmlet::cli::run_vm(cmd, opts, &mut stdout).await,
        Command::Image { cmd } => vmlet::cli::run_image(cmd, opts, &mut stdout).await,
        Command::Volume { cmd } => vmlet::cli::run_volume(cmd, opts, &mut stdout).await,
        Command::Network { cmd } => vmlet::cli::run_network(cmd, opts, &mut stdout).await,
        Command::Migration { cmd } => vmlet::cli::run_migration(cmd, opts, &mut stdout).await,
        Command::Node => vmlet::cli::run_node(opts, &mut stdout).await,
        Command::Events { since } => vmlet::cli::run_events(since, opts, &mut stdout).await,
        Command::Console(args) => vmlet::cli::run_console_args(args, opts, &mut stdout).await,
        command => return Err(Cli { command, ..cli }),
    };
    Ok(Ok(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("{}", vmlet::cli::error_text(&e, opts.output));
            ExitCode::from(e.exit_code())
        }
    }))
}

/// Reads and validates a spec file. Prints every field error and returns
/// `None` when the spec is invalid. A missing `uuid` gets a fresh one.
fn load_spec(path: &Path, profiles: &Profiles) -> anyhow::Result<Option<VmSpec>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    if let Some(object) = value.as_object_mut() {
        object
            .entry("uuid")
            .or_insert_with(|| uuid::Uuid::new_v4().to_string().into());
    }
    let spec: VmSpec = match serde_json::from_value(value) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("vmlet: {}: {e}", path.display());
            return Ok(None);
        }
    };
    if let Err(e) = spec.validate(|p| profiles.caps(p)) {
        eprintln!("vmlet: {}: invalid spec", path.display());
        for error in &e.errors {
            eprintln!("  {}: {}", error.field, error.message);
        }
        return Ok(None);
    }
    Ok(Some(spec))
}

/// The machine type and CPU model `profile` gives under `accel` (with the
/// spec's `cpu`, if any), resolved through the QEMU binary as the daemon
/// resolves them.
async fn machine_pin(
    settings: &Settings,
    profile: &vmlet::qemu::profile::Profile,
    accel: accel::Accel,
    cpu: Option<&vmlet::spec::CpuSpec>,
) -> anyhow::Result<vmlet::spec::MachinePin> {
    let qemu = vmlet::qemu::capabilities::probe(
        &settings.qemu_binary,
        accel,
        vmlet::qemu::capabilities::PROBE_DEADLINE,
    )
    .await?;
    qemu.pin_vm(profile, accel, cpu)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

async fn run(settings: &Settings, spec_path: &Path) -> anyhow::Result<ExitCode> {
    let profiles = Profiles::load(Some(&settings.profile_dir))?;
    let Some(spec) = load_spec(spec_path, &profiles)? else {
        return Ok(ExitCode::from(EXIT_BAD_SPEC));
    };
    // Images, volumes, blank disks and seeds are made by the daemon.
    let daemon_only = spec.cloud_init.is_some()
        || !spec.nics.is_empty()
        || spec
            .disks
            .iter()
            .any(|d| !matches!(d.source(), Ok(vmlet::spec::DiskSource::File { .. })));
    if daemon_only {
        eprintln!("vmlet run: takes disks with path + format only, and no NICs; image, volume and blank disks, cloud_init and NICs need `vmlet serve`");
        return Ok(ExitCode::from(EXIT_BAD_SPEC));
    }
    let accel = accel::resolve_on_host(settings.accel);
    let profile = profiles.get(&spec.profile)?;
    // Pinned like the daemon pins a new VM (a run keeps no record, so the
    // pin lasts this run only).
    let machine = machine_pin(settings, profile, accel, spec.cpu.as_ref()).await?;
    let paths = RunPaths::new(&settings.run_dir, spec.uuid);
    let layout = vmlet::storage::Layout::new(&settings.state_dir);
    // The spec is the operator's own: its paths are resolved here, then
    // opened like the daemon opens them (no symlink on the resolved path)
    // and passed to QEMU as fds.
    let spec = canonical_host_paths(spec)?;
    // A UEFI VM's NVRAM is per-VM state that a run, which keeps nothing,
    // has nowhere to keep.
    if spec.boot.firmware().is_uefi() {
        anyhow::bail!(
            "boot.firmware: {} needs the daemon (the VM's NVRAM lives in its state directory); `vmlet run` boots bios only",
            spec.boot.firmware().as_str()
        );
    }
    let files = LaunchFiles::open(&spec, &layout, &[PathBuf::from("/")])?;
    // Confined like the daemon's VMs (as root), or as this user.
    let confiner =
        vmlet::vm::confinement::Confiner::new(&settings.qemu).map_err(anyhow::Error::msg)?;
    let confined = confiner.prepare(&spec, accel == accel::Accel::Kvm)?;
    eprintln!(
        "vmlet: starting {} ({}) under {}; Ctrl-C stops it",
        spec.name,
        spec.uuid,
        accel.as_str()
    );
    let qemu_log = paths.dir.join("qemu.log");
    let serial_log = paths.serial_log();
    // A foreground run keeps no state: its TPM lives in the run directory
    // and goes with it.
    let tpm_dir = paths.dir.join("tpm");
    let tpm_log = paths.dir.join("swtpm.log");
    let launched = instance::launch(instance::Launch {
        binary: &settings.qemu_binary,
        deadline: Duration::from_secs(settings.start_timeout_s),
        spec: &spec,
        profile,
        machine: &machine,
        accel,
        paths: &paths,
        serial_log: &serial_log,
        serial_banner: None,
        qemu_log: &qemu_log,
        disks: &files.disks,
        disk_sets: &files.sets,
        passed_fds: &files.passed,
        boot_files: files.boot.as_ref(),
        nics: &[],
        pflash: files.pflash,
        confine: confined.plan(),
        tpm: spec.tpm.map(|_| instance::TpmPlan {
            binary: &settings.swtpm_binary,
            state_dir: &tpm_dir,
            log: &tpm_log,
        }),
    })
    .await;
    drop(files);
    let vm = match launched {
        Ok(vm) => vm,
        Err(e) => {
            confiner.release(spec.uuid);
            return Err(e.into());
        }
    };
    if let Some(tpm) = &vm.tpm {
        confiner.hold_tpm(spec.uuid, tpm.clone());
    }
    eprintln!(
        "vmlet: QEMU {} running as pid {}, run directory {}",
        vm.qmp.qemu_version(),
        vm.process.pid(),
        paths.dir.display()
    );
    let outcome = drive(settings, &spec, &vm).await;
    if outcome.is_err() {
        // Whatever went wrong, a foreground run never leaves its QEMU behind.
        let _ = vm.stop(StopMode::Force).await;
    }
    instance::remove_run_dir(&paths);
    confiner.release(spec.uuid);
    outcome
}

/// `spec` with its kernel, initrd and disk paths resolved (symlinks
/// followed) for `vmlet run`.
fn canonical_host_paths(mut spec: VmSpec) -> anyhow::Result<VmSpec> {
    let resolve = |path: &mut PathBuf| -> anyhow::Result<()> {
        *path = std::fs::canonicalize(&*path).with_context(|| format!("{}", path.display()))?;
        Ok(())
    };
    if let vmlet::spec::Boot::Kernel { kernel, initrd, .. } = &mut spec.boot {
        resolve(kernel)?;
        if let Some(initrd) = initrd {
            resolve(initrd)?;
        }
    }
    for disk in &mut spec.disks {
        if let Some(path) = &mut disk.path {
            resolve(path)?;
        }
    }
    Ok(spec)
}

/// Runs the launched VM until QEMU exits, streaming the serial console and
/// turning Ctrl-C into a stop.
async fn drive(
    settings: &Settings,
    spec: &VmSpec,
    vm: &instance::QemuInstance,
) -> anyhow::Result<ExitCode> {
    // Attach the console before the guest runs, so no output is missed.
    let console = if spec.serial.enabled {
        let stream = tokio::net::UnixStream::connect(vm.paths.serial_socket())
            .await
            .context("connecting to the serial console")?;
        Some(tokio::spawn(stream_console(stream)))
    } else {
        None
    };
    let mut events = vm.events.resubscribe();
    vm.start_guest().await.context("starting the guest")?;

    let grace = Duration::from_secs(settings.stop_grace_s);
    let mut interrupted = false;
    let mut forced = false;
    // The daemon's reading of the events, so a run ends as a daemon VM would.
    let mut seen = ExitEvents::default();
    let mut graceful: Option<tokio::task::JoinHandle<Result<StopOutcome, ProcessError>>> = None;
    // SIGTERM (a service manager, `kill`) stops the VM like Ctrl-C does.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let exit_status = {
        let watch = exit::watch(
            &vm.process,
            Some(&mut events),
            |event| {
                seen.note(&event);
            },
            || tracing::warn!("lost the QMP link to QEMU: a stop cannot press the power button"),
        );
        tokio::pin!(watch);
        loop {
            tokio::select! {
                status = &mut watch => break status,
                _ = stop_requested(&mut sigterm) => {
                    if !interrupted {
                        interrupted = true;
                        eprintln!("\nvmlet: stopping {} (ACPI power button, up to {}s); Ctrl-C again to force", spec.name, grace.as_secs());
                        // The daemon's stop sequence, in the background so a
                        // second Ctrl-C can overtake it.
                        let (process, qmp) = (vm.process.clone(), vm.qmp.clone());
                        let agent = spec
                            .guest_agent
                            .then(|| vmlet::qemu::agent::GuestAgent::new(vm.paths.agent_socket()));
                        graceful = Some(tokio::spawn(async move {
                            instance::stop_process(&process, Some(&qmp), agent.as_ref(), StopMode::Graceful { grace }).await
                        }));
                    } else {
                        forced = true;
                        eprintln!("\nvmlet: forcing {} off", spec.name);
                        if vm.stop(StopMode::Force).await? == StopOutcome::Killed {
                            eprintln!("vmlet: QEMU had to be killed");
                        }
                    }
                }
            }
        }
    };
    if let Some(task) = graceful {
        report_graceful_stop(task, grace, forced).await;
    }
    if let Some(console) = console {
        // The socket closes with QEMU; give the last bytes a moment to drain.
        let _ = tokio::time::timeout(Duration::from_secs(1), console).await;
    }
    let _ = std::io::stdout().flush();
    eprintln!("vmlet: QEMU exited ({})", exit::describe(exit_status));
    let ending = seen.ending(exit_status);
    if ending == Ending::Panicked {
        eprintln!("vmlet: the guest panicked");
    }
    Ok(ExitCode::from(run_exit_code(
        &ending,
        exit_status,
        interrupted,
    )))
}

/// `vmlet run`'s exit code: 1 when the guest panicked, 130 after Ctrl-C or
/// SIGTERM, 0 when the guest powered itself off or QEMU exited 0, 1
/// otherwise.
fn run_exit_code(ending: &Ending, status: ExitStatus, interrupted: bool) -> u8 {
    match ending {
        Ending::Panicked => 1,
        _ if interrupted => EXIT_INTERRUPTED,
        Ending::ShutDown { by_guest: true, .. } => 0,
        _ if status == ExitStatus::Code(0) => 0,
        _ => 1,
    }
}

/// Says how the graceful stop begun by the first Ctrl-C ended, once QEMU is
/// gone (so it has finished or is about to). After a forced stop its
/// outcome says nothing: the force overtook it.
async fn report_graceful_stop(
    mut task: tokio::task::JoinHandle<Result<StopOutcome, ProcessError>>,
    grace: Duration,
    forced: bool,
) {
    let outcome = tokio::time::timeout(instance::STOP_COMMAND_DEADLINE, &mut task).await;
    task.abort();
    if forced {
        return;
    }
    match outcome {
        Ok(Ok(Ok(StopOutcome::Quit))) => eprintln!(
            "vmlet: guest did not power off within {}s: QEMU was quit",
            grace.as_secs()
        ),
        Ok(Ok(Ok(StopOutcome::Killed))) => eprintln!("vmlet: QEMU had to be killed"),
        Ok(Ok(Ok(StopOutcome::AgentShutdown))) => {
            eprintln!("vmlet: the guest ignored the power button; its guest agent shut it down")
        }
        Ok(Ok(Ok(StopOutcome::GuestPoweredOff | StopOutcome::AlreadyExited))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "stopping QEMU"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the stop task failed"),
        Err(_) => tracing::warn!("the stop did not finish after QEMU exited"),
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn stop_requested(sigterm: &mut tokio::signal::unix::Signal) {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
}

/// Copies the serial console to stdout until QEMU closes it.
async fn stream_console(mut stream: tokio::net::UnixStream) {
    let mut stdout = tokio::io::stdout();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stdout.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                let _ = stdout.flush().await;
            }
        }
    }
}

#[cfg(test)]
#[path = "main_tests.rs"]
mod tests;
