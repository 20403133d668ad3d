//! A launched QEMU: its process, its QMP link and its run directory, with the
//! sequences that combine them (launch, start the guest, stop).
//!
//! Launch never leaves anything half-made: if QEMU fails to start or QMP does
//! not answer, the process is killed and the run directory removed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::confine::cgroup::JoinFiles;
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

mod launch;
mod stop;

pub use launch::{launch, launch_incoming};
pub use stop::{reboot_guest, restore_shutdown_action, stop_process, RebootError};

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
    pub cgroup: Option<&'a JoinFiles>,
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
