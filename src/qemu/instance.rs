//! A launched QEMU: its process, its QMP link and its run directory, with the
//! sequences that combine them (launch, start the guest, stop).
//!
//! Launch never leaves anything half-made: if QEMU fails to start or QMP does
//! not answer, the process is killed and the run directory removed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::confine::cgroup::ProcsFiles;
use crate::confine::ids::Ids;
use crate::confine::jail::{self, JailError, JailSpec};
use crate::qemu::accel::Accel;
use crate::qemu::agent::GuestAgent;
use crate::qemu::argv::{self, LaunchInputs, RunPaths};
use crate::qemu::disk::{DiskPlan, DiskSets};
use crate::qemu::launch_files::{self, BootFile, BootFiles, PassedFd, RunFds};
use crate::qemu::nic::{NicBackend, NicPlan};
use crate::qemu::process::{
    self, Confinement, ExitStatus, ProcessError, QemuProcess, SpawnRequest,
};
use crate::qemu::profile::Profile;
use crate::qemu::qmp::{QmpClient, QmpError, QmpEvent};
use crate::spec::{MachinePin, VmSpec};

/// How long QEMU gets to exit after `quit` or SIGTERM before SIGKILL.
pub const QUIT_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline of the QMP commands of a stop: a hung QEMU must not hold a stop
/// up for longer than this before the next step.
pub const STOP_COMMAND_DEADLINE: Duration = Duration::from_secs(5);
/// Deadline of the guest agent's part in a graceful stop (the handshake
/// and `guest-shutdown`), within the grace time.
pub const AGENT_STOP_DEADLINE: Duration = Duration::from_secs(3);

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
    /// The jail could not be built.
    #[error("building the jail")]
    Jail(#[source] JailError),
    /// The VM's TPM emulator could not be started.
    #[error(transparent)]
    Tpm(#[from] crate::qemu::tpm::TpmError),
    /// The spec has a TPM but the launch was given nowhere to keep it.
    #[error("the VM has a TPM but no TPM state directory was given")]
    NoTpmPlan,
}

/// How to stop a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// ACPI power button; when the guest has not powered off after half of
    /// `grace` and the VM has a guest agent, `guest-shutdown` through it;
    /// after `grace`, QMP `quit`, then SIGKILL.
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
    /// The guest ignored the power button and powered off when its guest
    /// agent asked it to (`guest-shutdown`).
    AgentShutdown,
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
    /// The VM's `swtpm`, when it has a TPM (it exits when QEMU does).
    pub tpm: Option<Arc<QemuProcess>>,
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

/// How a VM's QEMU is confined (see `confine/`).
#[derive(Debug, Default, Clone, Copy)]
pub struct ConfinePlan<'a> {
    /// Run as this user (vmlet is root); `None`: as vmlet's own user.
    pub ids: Option<&'a Ids>,
    /// Run in a jail rooted at [`RunPaths::jail_root`] (needs `ids`).
    pub jail: bool,
    /// The jail holds `/dev/kvm`.
    pub kvm: bool,
    /// Join this cgroup before exec.
    pub cgroup: Option<&'a ProcsFiles>,
}

/// Everything a launch needs: what the argv is built from, where QEMU's
/// own files go, and how it is confined.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The QEMU binary.
    pub binary: &'a Path,
    /// How long QEMU gets to answer on QMP.
    pub deadline: Duration,
    /// The validated spec.
    pub spec: &'a VmSpec,
    /// Its profile.
    pub profile: &'a Profile,
    /// The machine type and CPU model the VM is pinned to.
    pub machine: &'a MachinePin,
    /// The accelerator.
    pub accel: Accel,
    /// Runtime file locations.
    pub paths: &'a RunPaths,
    /// The serial log vmlet opens for QEMU to append to.
    pub serial_log: &'a Path,
    /// Written into the serial log before QEMU gets it (vmlet's line that
    /// marks a new boot).
    pub serial_banner: Option<&'a str>,
    /// Where QEMU's own messages (stdout and stderr) are appended.
    pub qemu_log: &'a Path,
    /// The disks, resolved to their host files.
    pub disks: &'a [DiskPlan],
    /// Their fd sets.
    pub disk_sets: &'a [DiskSets],
    /// The disk files vmlet opened.
    pub passed_fds: &'a [PassedFd],
    /// The kernel and initrd vmlet opened, for direct kernel boot.
    pub boot_files: Option<&'a BootFiles>,
    /// The NICs.
    pub nics: &'a [NicPlan],
    /// The fd sets of a UEFI VM's firmware code and NVRAM (their fds are
    /// in `passed_fds`); None for BIOS.
    pub pflash: Option<crate::qemu::firmware::PflashSets>,
    /// The confinement.
    pub confine: ConfinePlan<'a>,
    /// Where the TPM's `swtpm` keeps its state, for a spec with `tpm`.
    pub tpm: Option<TpmPlan<'a>>,
}

/// The `swtpm` of a VM with a TPM.
#[derive(Debug, Clone, Copy)]
pub struct TpmPlan<'a> {
    /// The `swtpm` binary.
    pub binary: &'a Path,
    /// Its state directory (kept across starts).
    pub state_dir: &'a Path,
    /// Where its messages are appended.
    pub log: &'a Path,
}

/// Starts QEMU paused (`-S`), confined as `launch.confine` says, and
/// connects QMP. The guest does not run until [`QemuInstance::start_guest`].
///
/// vmlet binds the QMP, serial and channel sockets and opens the serial log
/// itself, so QEMU needs no path to them; QEMU is ready when it answers on
/// QMP. If it exits first, or does not answer within `launch.deadline`, the
/// start fails with what QEMU printed, and nothing is left behind.
pub async fn launch(launch: Launch<'_>) -> Result<QemuInstance, LaunchError> {
    launch_as(launch, false).await
}

/// Like [`launch`], for the target of a live migration: QEMU also waits
/// for an incoming migration (`-incoming defer`), which vmlet starts over
/// QMP once it has exported the disks; the guest runs only after the
/// migration completed and vmlet says so (`cont`).
pub async fn launch_incoming(launch: Launch<'_>) -> Result<QemuInstance, LaunchError> {
    launch_as(launch, true).await
}

async fn launch_as(launch: Launch<'_>, incoming: bool) -> Result<QemuInstance, LaunchError> {
    let paths = launch.paths.clone();
    if let Some(path) = paths.overlong_socket(launch.spec) {
        return Err(LaunchError::SocketPathTooLong { path });
    }
    prepare_run_dir(&paths).map_err(|source| LaunchError::RunDir {
        path: paths.dir.clone(),
        source,
    })?;
    match spawn_confined(&launch, incoming).await {
        Ok(instance) => Ok(instance),
        Err(e) => {
            remove_run_dir(&paths);
            Err(e)
        }
    }
}

/// What [`launch`] holds open until QEMU has inherited it.
struct Handover {
    _sockets: Vec<std::os::unix::net::UnixListener>,
    _serial_log: Option<std::fs::File>,
    run_fds: RunFds,
    passed: Vec<PassedFd>,
}

async fn spawn_confined(launch: &Launch<'_>, incoming: bool) -> Result<QemuInstance, LaunchError> {
    let paths = launch.paths;
    let run_dir_error = |source| LaunchError::RunDir {
        path: paths.dir.clone(),
        source,
    };
    let mut handover = hand_over(launch).map_err(run_dir_error)?;
    // The TPM emulator first: QEMU's tpm-emulator talks to it at once.
    let tpm = match (&launch.spec.tpm, launch.tpm) {
        (None, _) => None,
        (Some(_), None) => return Err(LaunchError::NoTpmPlan),
        (Some(_), Some(plan)) => {
            let bind = binary_bind(plan.binary);
            let started = crate::qemu::tpm::start(crate::qemu::tpm::TpmLaunch {
                binary: plan.binary,
                uuid: launch.spec.uuid,
                state_dir: plan.state_dir,
                log: plan.log,
                run_dir: &paths.dir,
                ids: launch.confine.ids,
                jail: launch.confine.jail,
                cgroup: launch.confine.cgroup,
                binary_bind: bind.as_deref(),
            })?;
            handover.run_fds.tpm = Some(std::os::fd::AsRawFd::as_raw_fd(&started.qemu_end));
            Some(started)
        }
    };
    let (tpm, tpm_end) = match tpm {
        Some(started) => (Some(started.process), Some(started.qemu_end)),
        None => (None, None),
    };
    // Whatever fails from here on, the swtpm goes too.
    let tpm_guard = TpmGuard(tpm.as_ref());
    let tpm_log_start = launch
        .tpm
        .and_then(|p| std::fs::metadata(p.log).ok())
        .map_or(0, |m| m.len());
    let jail = match (launch.confine.jail, launch.confine.ids) {
        (true, Some(ids)) => Some(
            jail::prepare(&JailSpec {
                root: paths.jail_root(),
                uid: ids.uid,
                gid: ids.gid,
                kvm: launch.confine.kvm,
                extra_ro: vec![],
                binary: binary_bind(launch.binary),
            })
            .map_err(LaunchError::Jail)?,
        ),
        (_, Some(ids)) => {
            make_qemu_run_dir(paths, ids).map_err(run_dir_error)?;
            None
        }
        (_, None) => None,
    };
    let boot = match (launch.boot_files, launch.confine.ids) {
        (Some(files), Some(ids)) => {
            Some(copy_boot_files(files, paths, ids, jail.is_some()).map_err(run_dir_error)?)
        }
        (files, _) => files.cloned(),
    };
    let inputs = LaunchInputs {
        spec: launch.spec,
        profile: launch.profile,
        machine: launch.machine,
        accel: launch.accel,
        paths,
        jailed: jail.is_some(),
        run_fds: &handover.run_fds,
        disks: launch.disks,
        disk_sets: launch.disk_sets,
        passed_fds: &handover.passed,
        boot_files: boot.as_ref(),
        nics: launch.nics,
        pflash: launch.pflash,
    };
    let mut argv = argv::build(inputs);
    if incoming {
        argv.extend(["-incoming".to_string(), "defer".to_string()]);
    }
    tracing::debug!(uuid = %launch.spec.uuid, ?argv, "launching QEMU");
    let inherit = inherited_fds(&inputs);
    let log = open_qemu_log(launch.qemu_log).map_err(|source| LaunchError::RunDir {
        path: launch.qemu_log.to_path_buf(),
        source,
    })?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let binary = match (&jail, binary_bind(launch.binary)) {
        (Some(_), Some(_)) => Path::new(jail::JAIL_BINARY),
        _ => launch.binary,
    };
    let process = process::spawn(
        SpawnRequest {
            binary,
            argv: &argv,
            uuid: launch.spec.uuid,
            inherit: &inherit,
            log: &log,
            dir: &paths.dir,
        },
        Confinement {
            ids: launch.confine.ids,
            jail: jail.as_ref(),
            cgroup: launch.confine.cgroup,
        },
    )?;
    // QEMU holds its own copies now; vmlet's must go, so that a QEMU that
    // dies makes the QMP connection fail at once instead of hanging (and
    // the swtpm sees QEMU's end close when QEMU exits).
    drop(handover);
    drop(tpm_end);
    let failed = |process: &QemuProcess, why: String| {
        let printed = read_from(launch.qemu_log, log_start);
        let printed = printed.trim();
        let mut message = if printed.is_empty() {
            why
        } else {
            format!("{why}; it printed: {printed}")
        };
        if let Some(plan) = launch.tpm {
            let printed = read_from(plan.log, tpm_log_start);
            if !printed.trim().is_empty() {
                message = format!("{message}; swtpm printed: {}", printed.trim());
            }
        }
        let _ = process.kill_blocking(QUIT_DEADLINE);
        LaunchError::Process(ProcessError::StartFailed { message })
    };
    enum First {
        Connected(Result<(QmpClient, tokio::sync::broadcast::Receiver<QmpEvent>), QmpError>),
        Exited(ExitStatus),
    }
    let socket = paths.qmp_socket();
    let first = tokio::select! {
        connected = QmpClient::connect(&socket, launch.deadline) => First::Connected(connected),
        status = process.exited() => First::Exited(status),
    };
    match first {
        First::Connected(Ok((qmp, events))) => {
            tpm_guard.disarm();
            Ok(QemuInstance {
                process: Arc::new(process),
                qmp,
                paths: paths.clone(),
                tpm: tpm.map(Arc::new),
                events,
            })
        }
        First::Connected(Err(QmpError::ConnectTimeout { after })) => Err(failed(
            &process,
            format!("QEMU did not finish starting within {after:?} (no answer on QMP)"),
        )),
        First::Connected(Err(e)) => {
            // QEMU closing the socket is mostly QEMU exiting: give it a
            // moment, so its own message is what the caller reads.
            let why = match process.wait_exit(QUIT_DEADLINE).await {
                Some(status) => format!("QEMU exited ({status:?}) before answering on QMP: {e}"),
                None => format!("QMP on the new QEMU: {}", crate::error_chain(&e)),
            };
            Err(failed(&process, why))
        }
        First::Exited(status) => Err(failed(
            &process,
            format!("QEMU exited ({status:?}) before answering on QMP"),
        )),
    }
}

/// Kills the swtpm of a launch that failed (dropped armed).
struct TpmGuard<'a>(Option<&'a QemuProcess>);

impl TpmGuard<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TpmGuard<'_> {
    fn drop(&mut self) {
        if let Some(process) = self.0 {
            let _ = process.kill_blocking(QUIT_DEADLINE);
        }
    }
}

/// A QEMU binary outside `/usr` (a build of its own, a wrapper) is bound
/// into the jail at [`jail::JAIL_BINARY`], and run from there.
pub(crate) fn binary_bind(binary: &Path) -> Option<std::path::PathBuf> {
    if !binary.is_absolute() {
        return None;
    }
    match std::fs::canonicalize(binary) {
        Ok(real) if !real.starts_with("/usr") => Some(real),
        _ => None,
    }
}

/// Binds the sockets and opens the serial log QEMU is handed.
fn hand_over(launch: &Launch<'_>) -> std::io::Result<Handover> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let paths = launch.paths;
    let bind = |path: &Path| -> std::io::Result<std::os::unix::net::UnixListener> {
        let listener = std::os::unix::net::UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(listener)
    };
    let qmp = bind(&paths.qmp_socket())?;
    let mut run_fds = RunFds {
        qmp: qmp.as_raw_fd(),
        ..RunFds::default()
    };
    let mut sockets = vec![qmp];
    let mut passed = launch.passed_fds.to_vec();
    let mut serial_log = None;
    if launch.spec.serial.enabled {
        let serial = bind(&paths.serial_socket())?;
        run_fds.serial = Some(serial.as_raw_fd());
        sockets.push(serial);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(launch.serial_log)?;
        if let Some(banner) = launch.serial_banner {
            write_banner(&log, banner)?;
        }
        let set = launch_files::next_set(launch.disk_sets);
        run_fds.serial_log_set = Some(set);
        passed.push(PassedFd {
            fd: log.as_raw_fd(),
            set,
            opaque: launch_files::SERIAL_LOG_TAG.into(),
        });
        serial_log = Some(log);
    }
    for index in 0..launch.spec.channels.len() {
        let channel = bind(&paths.channel_socket(index))?;
        run_fds.channels.push(channel.as_raw_fd());
        sockets.push(channel);
    }
    if launch.spec.guest_agent {
        let agent = bind(&paths.agent_socket())?;
        run_fds.agent = Some(agent.as_raw_fd());
        sockets.push(agent);
    }
    Ok(Handover {
        _sockets: sockets,
        _serial_log: serial_log,
        run_fds,
        passed,
    })
}

/// Appends `banner` to the serial log as its own line: after a newline
/// when the guest's last line was left unfinished.
fn write_banner(log: &std::fs::File, banner: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let len = log.metadata()?.len();
    let mut last = [b'\n'];
    if len > 0 {
        // The log is open for appending only (QEMU gets this very fd): its
        // end is read through a read-only handle on the same file.
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(log));
        std::fs::File::open(path)?.read_at(&mut last, len - 1)?;
    }
    let mut text = String::with_capacity(banner.len() + 2);
    if last[0] != b'\n' {
        text.push('\n');
    }
    text.push_str(banner.trim_end_matches('\n'));
    text.push('\n');
    (&mut &*log).write_all(text.as_bytes())
}

/// The writable directory of a QEMU running unjailed as a user of its own,
/// owned by that user.
/// It reaches its kernel copy and VNC socket by host path, so the run
/// directories on the way must let others pass (mode `o+x`, never `o+r`).
fn make_qemu_run_dir(paths: &RunPaths, ids: &Ids) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().create(paths.jail_root())?;
    let dir = paths.qemu_run_dir();
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    std::os::unix::fs::chown(&dir, Some(ids.uid), Some(ids.gid))?;
    for passage in paths.jail_root().ancestors().take(4) {
        let mode = std::fs::metadata(passage)?.permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(
                passage,
                std::fs::Permissions::from_mode((mode & 0o7777) | 0o001),
            )?;
        }
    }
    Ok(())
}

/// A QEMU running as another user cannot reopen the files vmlet opened
/// (`/proc/self/fd/N` checks the file's permissions again), so it gets
/// copies of the kernel and initrd, readable by it alone, in `boot/` of its
/// jail root.
fn copy_boot_files(
    files: &BootFiles,
    paths: &RunPaths,
    ids: &Ids,
    jailed: bool,
) -> std::io::Result<BootFiles> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = paths.jail_root().join("boot");
    std::fs::DirBuilder::new().create(&dir)?;
    // Set apart from the umask (vmlet's is 077): QEMU must pass through.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    let copy = |file: &BootFile, name: &str, inside: &str| -> std::io::Result<BootFile> {
        let BootFile::Fd(fd) = file else {
            return Ok(file.clone());
        };
        let target = dir.join(name);
        let mut to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&target)?;
        // SAFETY: `fd` is open for as long as the launch holds its files;
        // the File made from the dup owns only the dup.
        let dup = unsafe { libc::dup(*fd) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut from = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        std::io::Seek::seek(&mut from, std::io::SeekFrom::Start(0))?;
        std::io::copy(&mut from, &mut to)?;
        std::os::unix::fs::fchown(&to, Some(ids.uid), Some(ids.gid))?;
        Ok(BootFile::Copy(if jailed {
            inside.to_string()
        } else {
            target.to_string_lossy().into_owned()
        }))
    };
    Ok(BootFiles {
        kernel: copy(&files.kernel, "kernel", launch_files::JAIL_KERNEL)?,
        initrd: files
            .initrd
            .as_ref()
            .map(|i| copy(i, "initrd", launch_files::JAIL_INITRD))
            .transpose()?,
    })
}

/// Opens QEMU's log for appending (never through a symlink).
fn open_qemu_log(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// What was appended to `path` after byte `from` (at most 4 KiB, the end).
fn read_from(path: &Path, from: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = (from as usize).min(text.len());
    let tail = &text[start..];
    let tail = &tail[tail.len().saturating_sub(4096)..];
    String::from_utf8_lossy(tail).into_owned()
}

/// The fd numbers the argv names (the NICs' netdevs, `-add-fd`, the
/// sockets, and `/proc/self/fd/N` for the kernel and initrd): QEMU inherits
/// exactly these.
fn inherited_fds(inputs: &LaunchInputs<'_>) -> Vec<std::os::fd::RawFd> {
    let nic_fds = inputs.nics.iter().flat_map(|nic| match &nic.backend {
        NicBackend::Tap { fds, vhost_fds } => fds.iter().chain(vhost_fds).cloned().collect(),
        NicBackend::User => vec![],
    });
    nic_fds
        .filter_map(|fd| fd.parse().ok())
        .chain(inputs.passed_fds.iter().map(|p| p.fd))
        .chain(inputs.run_fds.fds())
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
        stop_process(&self.process, Some(&self.qmp), None, mode).await
    }

    /// Waits for QEMU to exit.
    pub async fn exited(&self) -> ExitStatus {
        self.process.exited().await
    }
}

/// Stops `process` as `mode` says and waits for it to be gone. Without a
/// working QMP link (`qmp` is `None`) a graceful stop becomes SIGTERM.
/// `agent`: the VM's guest agent, asked to shut the guest down when it
/// ignores the power button for half the grace time.
pub async fn stop_process(
    process: &QemuProcess,
    qmp: Option<&QmpClient>,
    agent: Option<&GuestAgent>,
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
            let started = tokio::time::Instant::now();
            // With an agent, the button gets half the grace time and the
            // agent the rest.
            let button_time = if agent.is_some() { grace / 2 } else { grace };
            match powerdown {
                Ok(_) => match process.wait_exit(button_time).await {
                    // Killed meanwhile (a forced stop overtaking this one).
                    Some(ExitStatus::Signal(_)) => return Ok(StopOutcome::Killed),
                    Some(_) => return Ok(StopOutcome::GuestPoweredOff),
                    None => {}
                },
                Err(e) => {
                    tracing::warn!(pid = process.pid(), error = %e, "system_powerdown failed")
                }
            }
            if let Some(agent) = agent {
                let left = grace.saturating_sub(started.elapsed());
                match agent.shutdown(left.min(AGENT_STOP_DEADLINE)).await {
                    Ok(()) => {
                        tracing::info!(
                            pid = process.pid(),
                            "guest ignored the power button: asked its guest agent to shut it down"
                        );
                        let left = grace.saturating_sub(started.elapsed());
                        match process.wait_exit(left).await {
                            Some(ExitStatus::Signal(_)) => return Ok(StopOutcome::Killed),
                            Some(_) => return Ok(StopOutcome::AgentShutdown),
                            None => {}
                        }
                    }
                    Err(e) => tracing::info!(
                        pid = process.pid(),
                        error = %crate::error_chain(&e),
                        "guest agent could not shut the guest down"
                    ),
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

/// Why a guest reboot ([`reboot_guest`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum RebootError {
    /// A QMP command of the sequence failed.
    #[error("{step}")]
    Qmp {
        /// What vmlet was doing.
        step: &'static str,
        /// Cause.
        #[source]
        source: QmpError,
    },
    /// The guest did not shut down within the grace time after the ACPI
    /// power button; it keeps running.
    #[error(
        "the guest did not react to the ACPI power button within {}s; it keeps running (a forced reboot resets it at once)",
        grace.as_secs()
    )]
    NoReaction {
        /// The grace time.
        grace: Duration,
    },
    /// Neither the ACPI power button nor the guest agent's reboot request
    /// made the guest reboot within the grace time; it keeps running.
    #[error(
        "the guest did not react to the ACPI power button nor reboot when its guest agent was asked, within {}s; it keeps running (a forced reboot resets it at once)",
        grace.as_secs()
    )]
    NoReactionNorAgent {
        /// The grace time.
        grace: Duration,
    },
}

impl RebootError {
    fn qmp(step: &'static str) -> impl FnOnce(QmpError) -> RebootError {
        move |source| RebootError::Qmp { step, source }
    }

    /// The QMP link timed out or closed: vmlet cannot command QEMU.
    pub fn qmp_error(&self) -> Option<&QmpError> {
        match self {
            RebootError::Qmp { source, .. } => Some(source),
            RebootError::NoReaction { .. } | RebootError::NoReactionNorAgent { .. } => None,
        }
    }
}

/// Puts back QEMU's default reaction to a guest shutdown (exit), which a
/// graceful reboot changes for its duration: after a daemon restart, a
/// reboot that was under way is over.
pub async fn restore_shutdown_action(qmp: &QmpClient) -> Result<(), QmpError> {
    set_shutdown_action(qmp, "poweroff").await
}

/// QMP `set-action` for the guest's shutdown: `pause` or `poweroff`.
async fn set_shutdown_action(qmp: &QmpClient, action: &str) -> Result<(), QmpError> {
    qmp.execute_raw(
        "set-action",
        Some(serde_json::json!({ "shutdown": action })),
        STOP_COMMAND_DEADLINE,
    )
    .await
    .map(drop)
}

/// Waits up to `deadline` for an event `matches` accepts; false when it
/// did not come (or the link closed).
async fn wait_event(
    events: &mut tokio::sync::broadcast::Receiver<QmpEvent>,
    deadline: Duration,
    matches: impl Fn(&QmpEvent) -> bool,
) -> bool {
    use tokio::sync::broadcast::error::RecvError;
    let wait = async {
        loop {
            match events.recv().await {
                Ok(event) if matches(&event) => return true,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return false,
            }
        }
    };
    tokio::time::timeout(deadline, wait).await.unwrap_or(false)
}

/// Reboots the guest by asking it, as libvirt's ACPI reboot does: QEMU is
/// told to pause instead of exiting when the guest shuts down
/// (`set-action shutdown=pause`), the ACPI power button is pressed, and
/// once the guest has shut down (`SHUTDOWN` from the guest, the vCPUs
/// stopped) the machine is reset, the action restored (`poweroff`) and the
/// vCPUs started again: a new boot in the same QEMU.
///
/// A guest that does not shut down within `grace` keeps running: the
/// reboot fails with [`RebootError::NoReaction`] and the action is restored
/// (unless the guest shut down in that very moment: then the reboot goes
/// on). Whatever fails, vmlet tries to restore the action, so a later
/// power-off of the guest still ends QEMU.
pub async fn reboot_guest(qmp: &QmpClient, grace: Duration) -> Result<(), RebootError> {
    // Subscribed before the power button, so the guest's SHUTDOWN is seen.
    let mut events = qmp.subscribe();
    set_shutdown_action(qmp, "pause")
        .await
        .map_err(RebootError::qmp("telling QEMU to pause on shutdown"))?;
    let asked = async {
        qmp.execute_with_deadline(qapi::qmp::system_powerdown {}, STOP_COMMAND_DEADLINE)
            .await
            .map_err(RebootError::qmp("pressing the ACPI power button"))?;
        let shut_down = wait_event(&mut events, grace, |e| {
            e.name == "SHUTDOWN" && e.data.get("guest").and_then(|g| g.as_bool()) == Some(true)
        })
        .await;
        Ok::<bool, RebootError>(shut_down)
    }
    .await;
    let shut_down = match asked {
        Ok(true) => true,
        failed => {
            let restored = set_shutdown_action(qmp, "poweroff").await;
            // The guest may have shut down between the deadline and the
            // restore: it is paused now, and the reboot goes on.
            let status = qmp
                .execute_with_deadline(qapi::qmp::query_status {}, STOP_COMMAND_DEADLINE)
                .await;
            let paused_by_shutdown =
                matches!(&status, Ok(s) if s.status == qapi::qmp::RunState::shutdown);
            if !paused_by_shutdown {
                failed?;
                restored.map_err(RebootError::qmp("restoring QEMU's shutdown action"))?;
                return Err(RebootError::NoReaction { grace });
            }
            false
        }
    };
    if shut_down {
        // QEMU stops the vCPUs right after it reports the shutdown.
        wait_event(&mut events, STOP_COMMAND_DEADLINE, |e| e.name == "STOP").await;
    }
    qmp.execute_with_deadline(qapi::qmp::system_reset {}, STOP_COMMAND_DEADLINE)
        .await
        .map_err(RebootError::qmp("resetting the machine"))?;
    // The reset is carried out by QEMU's main loop after the command
    // returns; `cont` before it is refused ("resetting … is required").
    wait_event(&mut events, STOP_COMMAND_DEADLINE, |e| e.name == "RESET").await;
    let restored = set_shutdown_action(qmp, "poweroff").await;
    qmp.execute_with_deadline(qapi::qmp::cont {}, STOP_COMMAND_DEADLINE)
        .await
        .map_err(RebootError::qmp("starting the vCPUs after the reset"))?;
    restored.map_err(RebootError::qmp("restoring QEMU's shutdown action"))
}
