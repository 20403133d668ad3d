//! A launched QEMU: its process, its QMP link and its run directory, with the
//! sequences that combine them (launch, start the guest, stop).
//!
//! Launch never leaves anything half-made: if QEMU fails to start or QMP does
//! not answer, the process is killed and the run directory removed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::qemu::argv::{self, LaunchInputs, RunPaths};
use crate::qemu::nic::NicBackend;
use crate::qemu::process::{self, ExitStatus, ProcessError, QemuProcess};
use crate::qemu::qmp::{QmpClient, QmpError, QmpEvent};

/// How long QEMU gets to answer on its QMP socket after daemonizing.
pub const QMP_CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// How long QEMU gets to exit after `quit` or SIGTERM before SIGKILL.
pub const QUIT_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline of the QMP commands of a stop: a hung QEMU must not hold a stop
/// up for longer than this before the next step.
pub const STOP_COMMAND_DEADLINE: Duration = Duration::from_secs(5);

/// Why a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The run directory could not be prepared.
    #[error("preparing run directory {path}")]
    RunDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A socket path would not fit in a unix socket address.
    #[error("socket path {path} is longer than {max} bytes: choose a shorter run directory", max = argv::MAX_SOCKET_PATH)]
    SocketPathTooLong {
        /// The socket path.
        path: std::path::PathBuf,
    },
    /// QEMU did not start.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// QEMU started but its QMP socket did not work.
    #[error("QMP on the new QEMU")]
    Qmp(#[source] QmpError),
}

/// How to stop a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// ACPI power button, then after `grace` QMP `quit`, then SIGKILL.
    Graceful {
        /// How long the guest gets to power off by itself.
        grace: Duration,
    },
    /// SIGTERM (QEMU exits at once, flushing its disks), then SIGKILL.
    Force,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// QEMU had already exited.
    AlreadyExited,
    /// The guest powered off after the power button.
    GuestPoweredOff,
    /// QEMU exited on `quit` or SIGTERM.
    Quit,
    /// QEMU had to be killed.
    Killed,
}

/// A QEMU process vmlet launched or reattached to.
#[derive(Debug)]
pub struct QemuInstance {
    /// The process (shared with whoever watches for its exit).
    pub process: Arc<QemuProcess>,
    /// Its QMP link.
    pub qmp: QmpClient,
    /// Its runtime files.
    pub paths: RunPaths,
    /// QMP events from the moment QMP was connected (subscribed before any
    /// command could make QEMU emit one).
    pub events: tokio::sync::broadcast::Receiver<QmpEvent>,
}

/// Creates the run directory afresh (mode 0700: it holds control sockets).
/// The caller guarantees no QEMU of this VM is running.
pub fn prepare_run_dir(paths: &RunPaths) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::remove_dir_all(&paths.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = paths.dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(&paths.dir)
}

/// Removes a VM's run directory (after its QEMU has exited).
pub fn remove_run_dir(paths: &RunPaths) {
    if let Err(e) = std::fs::remove_dir_all(&paths.dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %paths.dir.display(), error = %e, "could not remove run directory");
        }
    }
}

/// Starts QEMU paused (`-S`) and connects QMP. The guest does not run until
/// [`QemuInstance::start_guest`].
pub async fn launch(binary: &Path, inputs: LaunchInputs<'_>) -> Result<QemuInstance, LaunchError> {
    launch_with_deadline(binary, inputs, process::SPAWN_DEADLINE).await
}

/// [`launch`], giving QEMU `deadline` to set the VM up and daemonize.
pub async fn launch_with_deadline(
    binary: &Path,
    inputs: LaunchInputs<'_>,
    deadline: Duration,
) -> Result<QemuInstance, LaunchError> {
    let paths = inputs.paths.clone();
    if let Some(path) = paths.overlong_socket(inputs.spec) {
        return Err(LaunchError::SocketPathTooLong { path });
    }
    prepare_run_dir(&paths).map_err(|source| LaunchError::RunDir {
        path: paths.dir.clone(),
        source,
    })?;
    let argv = argv::build(inputs);
    tracing::debug!(uuid = %inputs.spec.uuid, ?argv, "launching QEMU");
    let inherit = inherited_fds(&inputs);
    let process = match process::spawn(
        binary,
        &argv,
        &paths.pidfile(),
        inputs.spec.uuid,
        deadline,
        &inherit,
    )
    .await
    {
        Ok(process) => process,
        Err(e) => {
            remove_run_dir(&paths);
            return Err(e.into());
        }
    };
    match QmpClient::connect(&paths.qmp_socket(), QMP_CONNECT_DEADLINE).await {
        Ok((qmp, events)) => Ok(QemuInstance {
            process: Arc::new(process),
            qmp,
            paths,
            events,
        }),
        Err(e) => {
            let _ = process.kill().await;
            remove_run_dir(&paths);
            Err(LaunchError::Qmp(e))
        }
    }
}

/// The fd numbers the argv names (the NICs' netdevs, `-add-fd`, and
/// `/proc/self/fd/N` for the kernel and initrd): QEMU inherits exactly
/// these.
fn inherited_fds(inputs: &LaunchInputs<'_>) -> Vec<std::os::fd::RawFd> {
    let nic_fds = inputs.nics.iter().flat_map(|nic| match &nic.backend {
        NicBackend::Tap { fds, vhost_fds } => fds.iter().chain(vhost_fds).cloned().collect(),
        NicBackend::User => vec![],
    });
    nic_fds
        .filter_map(|fd| fd.parse().ok())
        .chain(inputs.passed_fds.iter().map(|p| p.fd))
        .chain(inputs.boot_files.iter().flat_map(|b| b.fds()))
        .collect()
}

impl QemuInstance {
    /// Lets the paused guest run (`cont`).
    pub async fn start_guest(&self) -> Result<(), QmpError> {
        self.qmp.execute(qapi::qmp::cont {}).await.map(|_| ())
    }

    /// Stops QEMU as `mode` says and waits for the process to be gone.
    pub async fn stop(&self, mode: StopMode) -> Result<StopOutcome, ProcessError> {
        stop_process(&self.process, Some(&self.qmp), mode).await
    }

    /// Waits for QEMU to exit.
    pub async fn exited(&self) -> ExitStatus {
        self.process.exited().await
    }
}

/// Stops `process` as `mode` says and waits for it to be gone. Without a
/// working QMP link (`qmp` is `None`) a graceful stop becomes SIGTERM.
pub async fn stop_process(
    process: &QemuProcess,
    qmp: Option<&QmpClient>,
    mode: StopMode,
) -> Result<StopOutcome, ProcessError> {
    if !process.is_running() {
        process.exited().await;
        return Ok(StopOutcome::AlreadyExited);
    }
    match (mode, qmp) {
        (StopMode::Graceful { grace }, Some(qmp)) => {
            let powerdown = qmp
                .execute_with_deadline(qapi::qmp::system_powerdown {}, STOP_COMMAND_DEADLINE)
                .await;
            match powerdown {
                Ok(_) => match process.wait_exit(grace).await {
                    // Killed meanwhile (a forced stop overtaking this one).
                    Some(ExitStatus::Signal(_)) => return Ok(StopOutcome::Killed),
                    Some(_) => return Ok(StopOutcome::GuestPoweredOff),
                    None => {}
                },
                Err(e) => {
                    tracing::warn!(pid = process.pid(), error = %e, "system_powerdown failed")
                }
            }
            tracing::info!(
                pid = process.pid(),
                "guest did not power off in time: quitting QEMU"
            );
            let quit = qmp
                .execute_with_deadline(qapi::qmp::quit {}, STOP_COMMAND_DEADLINE)
                .await;
            if let Err(e) = quit {
                tracing::warn!(pid = process.pid(), error = %e, "quit failed");
            }
        }
        (StopMode::Force, _) | (StopMode::Graceful { .. }, None) => {
            process.signal(libc::SIGTERM)?
        }
    }
    if process.wait_exit(QUIT_DEADLINE).await.is_some() {
        return Ok(StopOutcome::Quit);
    }
    tracing::warn!(pid = process.pid(), "QEMU did not exit: killing it");
    process.kill().await?;
    Ok(StopOutcome::Killed)
}
