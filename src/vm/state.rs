//! VM power states, the operations that change them, and the two pure
//! functions that say what may happen next: [`decide`] (may this API action
//! run now?) and [`next`] (what does an observation do to the state?).
//!
//! Both are total over their inputs and tested over every pair.
//!
//! Why this file is long: its second half is the transition, decision and
//! reattach tables written out pair by pair; they are the specification.

use serde::{Deserialize, Serialize};

use crate::qemu::exit::Ending;

/// What vmlet last observed of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// No QEMU process.
    Stopped,
    /// QEMU is being launched and configured.
    Starting,
    /// The guest runs.
    Running,
    /// The guest's vCPUs are paused; QEMU holds its memory.
    Paused,
    /// A stop is in progress.
    Stopping,
    /// The guest panicked or QEMU exited without being asked to; `error`
    /// says why. No QEMU process remains.
    Crashed,
    /// vmlet could not start the VM or lost control of its QEMU; `error`
    /// says why. Start or stop recovers.
    Error,
}

impl PowerState {
    /// Every state, for exhaustive tests.
    pub const ALL: [PowerState; 7] = [
        PowerState::Stopped,
        PowerState::Starting,
        PowerState::Running,
        PowerState::Paused,
        PowerState::Stopping,
        PowerState::Crashed,
        PowerState::Error,
    ];

    /// True when a QEMU process may be alive in this state.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            PowerState::Starting | PowerState::Running | PowerState::Paused | PowerState::Stopping
        )
    }

    /// The state's name as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Stopped => "stopped",
            PowerState::Starting => "starting",
            PowerState::Running => "running",
            PowerState::Paused => "paused",
            PowerState::Stopping => "stopping",
            PowerState::Crashed => "crashed",
            PowerState::Error => "error",
        }
    }
}

/// A VM's power state as the VM holds it. It changes only through
/// [`apply`], so every change follows the table of [`next`]; reading it is
/// free (it derefs to [`PowerState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Observed(PowerState);

impl Observed {
    /// The state of a new VM: `stopped`.
    pub const NEW: Observed = Observed(PowerState::Stopped);

    /// The state.
    pub fn get(self) -> PowerState {
        self.0
    }
}

impl std::ops::Deref for Observed {
    type Target = PowerState;
    fn deref(&self) -> &PowerState {
        &self.0
    }
}

impl PartialEq<PowerState> for Observed {
    fn eq(&self, other: &PowerState) -> bool {
        self.0 == *other
    }
}

/// Applies `observation` to `state` through [`next`]; returns the new
/// state when it moved.
pub fn apply(state: &mut Observed, observation: Observation) -> Option<PowerState> {
    let to = next(state.0, observation)?;
    state.0 = to;
    Some(to)
}

/// Makes `state` that of a VM that has just arrived by live migration:
/// whatever its source recorded, it starts anew here as a new VM and takes
/// [`Observation::MigratedIn`] (its QEMU holds the guest paused until it
/// is resumed).
pub fn arrive(state: &mut Observed) {
    *state = Observed::NEW;
    apply(state, Observation::MigratedIn);
}

/// The power state the API last asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    /// Stopped (the state of a new VM).
    Stopped,
    /// Running.
    Running,
    /// Paused.
    Paused,
}

/// An operation in progress on a VM. At most one runs at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Launching QEMU and starting the guest.
    Start,
    /// Stopping QEMU.
    Stop,
    /// Resetting the guest.
    Reboot,
    /// Pausing the vCPUs.
    Pause,
    /// Resuming the vCPUs.
    Resume,
    /// Removing the VM.
    Delete,
    /// Taking, reverting to or deleting a snapshot.
    Snapshot,
    /// Changing disks: hot-plug, unplug, I/O limits, resize.
    Disks,
    /// Changing NICs: hot-plug, unplug.
    Nics,
    /// Changing the spec (`PATCH`): live what QEMU takes, the rest pending.
    Edit,
    /// Moving the running VM to another host (live migration); shown as
    /// `migrating`.
    #[serde(rename = "migrating")]
    Migrate,
}

impl Task {
    /// The task's name as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Start => "start",
            Task::Stop => "stop",
            Task::Reboot => "reboot",
            Task::Pause => "pause",
            Task::Resume => "resume",
            Task::Delete => "delete",
            Task::Snapshot => "snapshot",
            Task::Disks => "disks",
            Task::Nics => "nics",
            Task::Edit => "edit",
            Task::Migrate => "migrating",
        }
    }
}

/// What a command to a VM is, as far as deciding whether it may run now:
/// a power action, or a change of disks, NICs or snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start the VM.
    Start,
    /// Stop it (`force`: without asking the guest).
    Stop {
        /// Skip the ACPI power button.
        force: bool,
    },
    /// Reset the guest (`system_reset`).
    Reboot,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Delete the VM (`force`: even when it runs, stopping it first).
    Delete {
        /// Stop a VM that runs.
        force: bool,
    },
    /// Take, revert to or delete a snapshot (live or offline).
    Snapshot,
    /// Change the VM's disks (live or offline).
    Disks,
    /// Change the VM's NICs (live or offline).
    Nics,
    /// Change the VM's spec (live, pending or offline).
    Edit,
    /// Move the running VM to another host.
    Migrate,
}

impl Action {
    /// Every action, for exhaustive tests.
    pub const ALL: [Action; 13] = [
        Action::Start,
        Action::Stop { force: false },
        Action::Stop { force: true },
        Action::Reboot,
        Action::Pause,
        Action::Resume,
        Action::Delete { force: false },
        Action::Delete { force: true },
        Action::Snapshot,
        Action::Disks,
        Action::Nics,
        Action::Edit,
        Action::Migrate,
    ];

    /// The task this action runs as.
    pub fn task(self) -> Task {
        match self {
            Action::Start => Task::Start,
            Action::Stop { .. } => Task::Stop,
            Action::Reboot => Task::Reboot,
            Action::Pause => Task::Pause,
            Action::Resume => Task::Resume,
            Action::Delete { .. } => Task::Delete,
            Action::Snapshot => Task::Snapshot,
            Action::Disks => Task::Disks,
            Action::Nics => Task::Nics,
            Action::Edit => Task::Edit,
            Action::Migrate => Task::Migrate,
        }
    }
}

/// A power action the API asks for (the actions that are not changes of
/// devices or snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Start the VM.
    Start,
    /// Stop it (`force`: without asking the guest).
    Stop {
        /// Skip the ACPI power button.
        force: bool,
    },
    /// Reset the guest.
    Reboot,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Delete the VM (`force`: even when it runs).
    Delete {
        /// Stop a VM that runs.
        force: bool,
    },
}

impl From<PowerAction> for Action {
    fn from(action: PowerAction) -> Action {
        match action {
            PowerAction::Start => Action::Start,
            PowerAction::Stop { force } => Action::Stop { force },
            PowerAction::Reboot => Action::Reboot,
            PowerAction::Pause => Action::Pause,
            PowerAction::Resume => Action::Resume,
            PowerAction::Delete { force } => Action::Delete { force },
        }
    }
}

/// Whether an action may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The VM already is where the action would take it: succeed, do nothing.
    Satisfied,
    /// Run the action as its task.
    Run(Task),
    /// Another task runs; the action conflicts with it.
    Busy(Task),
    /// The action makes no sense in this state.
    Refused(Refusal),
}

/// Why an action may not run in a VM's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The action does not apply in this state.
    NotIn {
        /// The action refused.
        action: Action,
        /// The VM's state.
        state: PowerState,
    },
    /// A paused VM is resumed, not started.
    PausedNotStarted,
    /// A running or paused VM is deleted only with `force`.
    UpWithoutForce {
        /// The VM's state.
        state: PowerState,
    },
}

impl Action {
    /// The action as a verb (`start`, `change disks`).
    pub fn verb(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop { .. } => "stop",
            Action::Reboot => "reboot",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Delete { .. } => "delete",
            Action::Snapshot => "snapshot",
            Action::Disks => "change disks",
            Action::Nics => "change NICs",
            Action::Edit => "change the spec",
            Action::Migrate => "migrate",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotIn { action, state } => {
                write!(f, "cannot {}: VM is {}", action.verb(), state.as_str())
            }
            Refusal::PausedNotStarted => f.write_str("cannot start: VM is paused; resume it"),
            Refusal::UpWithoutForce { state } => write!(
                f,
                "cannot delete: VM is {}; stop it first or pass force=true",
                state.as_str()
            ),
        }
    }
}

/// May `action` run on a VM in `state` with `task` in progress?
///
/// One exception to "one task at a time": a forced stop may overtake a
/// graceful stop that is waiting for the guest, as `virsh destroy` may
/// overtake `virsh shutdown`.
pub fn decide(state: PowerState, task: Option<Task>, action: Action) -> Decision {
    if let Some(running) = task {
        return match (running, action) {
            (Task::Stop, Action::Stop { force: true }) => Decision::Run(Task::Stop),
            _ => Decision::Busy(running),
        };
    }
    use PowerState as S;
    let refused = Decision::Refused(Refusal::NotIn { action, state });
    match action {
        Action::Start => match state {
            S::Running => Decision::Satisfied,
            S::Stopped | S::Crashed | S::Error => Decision::Run(Task::Start),
            S::Paused => Decision::Refused(Refusal::PausedNotStarted),
            S::Starting | S::Stopping => refused,
        },
        Action::Stop { .. } => match state {
            S::Stopped => Decision::Satisfied,
            // Crashed and error VMs may still hold a process or leftovers:
            // a stop cleans them up and settles on `stopped`.
            S::Running | S::Paused | S::Crashed | S::Error => Decision::Run(Task::Stop),
            S::Starting | S::Stopping => refused,
        },
        Action::Reboot => match state {
            S::Running | S::Paused => Decision::Run(Task::Reboot),
            _ => refused,
        },
        Action::Pause => match state {
            S::Paused => Decision::Satisfied,
            S::Running => Decision::Run(Task::Pause),
            _ => refused,
        },
        Action::Resume => match state {
            S::Running => Decision::Satisfied,
            S::Paused => Decision::Run(Task::Resume),
            _ => refused,
        },
        Action::Delete { force } => match state {
            S::Stopped | S::Crashed | S::Error => Decision::Run(Task::Delete),
            S::Running | S::Paused if force => Decision::Run(Task::Delete),
            S::Running | S::Paused => Decision::Refused(Refusal::UpWithoutForce { state }),
            S::Starting | S::Stopping => refused,
        },
        // Live through QMP while QEMU runs, offline on the files otherwise;
        // not while QEMU comes or goes, nor while vmlet lost control of it.
        Action::Snapshot | Action::Disks | Action::Nics | Action::Edit => match state {
            S::Stopped | S::Crashed | S::Running | S::Paused => Decision::Run(action.task()),
            _ => refused,
        },
        // Live migration moves a guest in memory (a paused one too: a
        // migration that a restart interrupted at the switch is settled
        // with the vCPUs paused); a stopped VM has nothing to move.
        Action::Migrate => match state {
            S::Running | S::Paused => Decision::Run(Task::Migrate),
            _ => refused,
        },
    }
}

/// Something vmlet observed or did that moves a VM's state. Every change of
/// a VM's state is one of these, through [`next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// A start began (QEMU is being launched).
    StartBegun,
    /// The guest was let run (`cont` answered).
    GuestStarted,
    /// The start failed; no QEMU remains.
    StartFailed,
    /// QEMU reports the vCPUs stopped (QMP `STOP` or a pause).
    VcpusStopped,
    /// QEMU reports the vCPUs running (QMP `RESUME`).
    VcpusResumed,
    /// A stop began.
    StopBegun,
    /// A stop finished: QEMU is gone.
    StopFinished,
    /// A stop failed: QEMU may still run, out of vmlet's hands.
    StopFailed,
    /// QEMU exited after a stop or a guest-initiated shutdown.
    ExitedCleanly,
    /// QEMU exited when nobody asked it to, or the guest panicked.
    Crashed,
    /// QEMU still runs but no longer answers vmlet.
    ControlLost,
    /// QMP answers again, and QEMU says the vCPUs run.
    RegainedRunning,
    /// QMP answers again, and QEMU says the vCPUs are paused.
    RegainedPaused,
    /// A delete stopped the QEMU but could not remove the record.
    DeleteFailed,
    /// At vmlet's start: the VM's QEMU runs and its vCPUs run.
    FoundRunning,
    /// At vmlet's start: the VM's QEMU runs with its vCPUs paused.
    FoundPaused,
    /// At vmlet's start: QEMU was left in prelaunch by a start that never
    /// finished (vmlet kills it).
    FoundUnstarted,
    /// At vmlet's start: the guest had shut down, QEMU not yet exited
    /// (vmlet kills it).
    FoundShutDown,
    /// At vmlet's start: QEMU was dead in the water (panicked guest, I/O or
    /// internal error; vmlet kills it).
    FoundDead,
    /// At vmlet's start: QEMU runs but does not answer on QMP.
    FoundUnanswering,
    /// At vmlet's start: the QEMU exited while vmlet was not running.
    GoneWhileDown,
    /// At vmlet's start: the host rebooted since the record was written, so
    /// no QEMU of it can be running.
    GoneWithHostReboot,
    /// The VM arrived by live migration: its QEMU holds the guest, paused
    /// until vmlet lets it run on this host.
    MigratedIn,
}

impl Observation {
    /// Every observation, for exhaustive tests.
    pub const ALL: [Observation; 23] = [
        Observation::StartBegun,
        Observation::GuestStarted,
        Observation::StartFailed,
        Observation::VcpusStopped,
        Observation::VcpusResumed,
        Observation::StopBegun,
        Observation::StopFinished,
        Observation::StopFailed,
        Observation::ExitedCleanly,
        Observation::Crashed,
        Observation::ControlLost,
        Observation::RegainedRunning,
        Observation::RegainedPaused,
        Observation::DeleteFailed,
        Observation::FoundRunning,
        Observation::FoundPaused,
        Observation::FoundUnstarted,
        Observation::FoundShutDown,
        Observation::FoundDead,
        Observation::FoundUnanswering,
        Observation::GoneWhileDown,
        Observation::GoneWithHostReboot,
        Observation::MigratedIn,
    ];

    /// Whether this observation means no QEMU of the VM remains.
    #[cfg(test)]
    pub fn leaves_no_process(self) -> bool {
        use Observation as O;
        matches!(
            self,
            O::StartFailed
                | O::StopFinished
                | O::ExitedCleanly
                | O::Crashed
                | O::DeleteFailed
                | O::FoundUnstarted
                | O::FoundShutDown
                | O::FoundDead
                | O::GoneWhileDown
                | O::GoneWithHostReboot
        )
    }
}

/// The state `observation` moves a VM in `state` to, or `None` when it
/// does not apply (the state stays).
pub fn next(state: PowerState, observation: Observation) -> Option<PowerState> {
    use Observation as O;
    use PowerState as S;
    let to = match (observation, state) {
        (O::StartBegun, S::Stopped | S::Crashed | S::Error) => S::Starting,
        (O::GuestStarted, S::Starting) => S::Running,
        (O::StartFailed, S::Starting) => S::Error,
        (O::VcpusStopped, S::Running) => S::Paused,
        (O::VcpusResumed, S::Paused) => S::Running,
        (O::StopBegun, S::Running | S::Paused | S::Crashed | S::Error) => S::Stopping,
        (O::StopFinished, S::Running | S::Paused | S::Stopping | S::Crashed | S::Error) => {
            S::Stopped
        }
        (O::StopFailed, S::Running | S::Paused | S::Stopping | S::Crashed) => S::Error,
        (O::ExitedCleanly, S::Running | S::Paused | S::Stopping) => S::Stopped,
        (O::Crashed, S::Starting | S::Running | S::Paused | S::Stopping) => S::Crashed,
        (O::ControlLost, S::Starting | S::Running | S::Paused | S::Stopping) => S::Error,
        (O::RegainedRunning, S::Error) => S::Running,
        (O::RegainedPaused, S::Error) => S::Paused,
        (O::DeleteFailed, S::Starting | S::Running | S::Paused | S::Stopping) => S::Stopped,
        // What vmlet finds at its start overrides whatever was recorded.
        (O::FoundRunning, _) => S::Running,
        (O::FoundPaused, _) => S::Paused,
        (O::FoundUnstarted | O::FoundShutDown, _) => S::Stopped,
        (O::FoundDead, _) => S::Crashed,
        (O::FoundUnanswering, _) => S::Error,
        (O::GoneWhileDown, S::Running | S::Paused) => S::Crashed,
        (O::GoneWhileDown, S::Starting | S::Stopping) => S::Stopped,
        (O::GoneWithHostReboot, S::Starting | S::Running | S::Paused | S::Stopping) => S::Stopped,
        (O::MigratedIn, S::Stopped) => S::Paused,
        _ => return None,
    };
    (to != state).then_some(to)
}

/// What QEMU's `query-status` said, as far as reattaching cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundStatus {
    /// `prelaunch` or `inmigrate`: the guest never ran.
    Unstarted,
    /// `running`.
    Running,
    /// `shutdown`: the guest powered off, QEMU has not exited.
    ShutDown,
    /// `guest-panicked`, `internal-error`, `io-error`.
    Dead,
    /// Any other status (paused, suspended, debug, …): vCPUs not running.
    Paused,
}

/// What vmlet found of a VM's QEMU when it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No QEMU of the VM runs.
    Gone {
        /// The host rebooted since the record was written.
        host_rebooted: bool,
    },
    /// QEMU runs and answered `query-status`.
    Status(FoundStatus),
    /// QEMU runs but QMP does not answer.
    Unanswering,
}

/// What happens to a VM's recorded error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorNote {
    /// Left as it was.
    Keep,
    /// Cleared.
    Clear,
    /// Replaced by this.
    Set(String),
}

/// What to do about a VM at vmlet's start, decided without I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reattach {
    /// The observation to apply.
    pub observation: Observation,
    /// Kill the QEMU found (it can never be of use).
    pub kill: bool,
    /// Take hold of the QEMU (watch it, keep its QMP link).
    pub attach: bool,
    /// The recorded error.
    pub error: ErrorNote,
    /// The guest powered itself off: the desired state follows.
    pub desired_stopped: bool,
}

/// Decides what a VM recorded in `recorded` becomes when vmlet finds
/// `found` at its start.
pub fn reattach(recorded: PowerState, found: Found) -> Reattach {
    let plan = |observation, kill, attach, error| Reattach {
        observation,
        kill,
        attach,
        error,
        desired_stopped: false,
    };
    use ErrorNote as E;
    use Observation as O;
    match found {
        Found::Gone { host_rebooted } => {
            let was_up = recorded.has_process();
            match recorded {
                _ if host_rebooted && was_up => plan(
                    O::GoneWithHostReboot,
                    false,
                    false,
                    E::Set("the host rebooted while the VM was up".into()),
                ),
                PowerState::Stopping => plan(O::GoneWhileDown, false, false, E::Clear),
                PowerState::Starting => plan(
                    O::GoneWhileDown,
                    false,
                    false,
                    E::Set("a start did not finish before vmlet restarted".into()),
                ),
                PowerState::Running | PowerState::Paused => plan(
                    O::GoneWhileDown,
                    false,
                    false,
                    E::Set("QEMU exited while vmlet was not running".into()),
                ),
                PowerState::Stopped | PowerState::Crashed | PowerState::Error => {
                    plan(O::GoneWhileDown, false, false, E::Keep)
                }
            }
        }
        Found::Status(FoundStatus::Unstarted) => plan(
            O::FoundUnstarted,
            true,
            false,
            E::Set("a start did not finish before vmlet restarted; its QEMU was killed".into()),
        ),
        Found::Status(FoundStatus::ShutDown) => Reattach {
            desired_stopped: true,
            ..plan(O::FoundShutDown, true, false, E::Clear)
        },
        Found::Status(FoundStatus::Dead) => plan(
            O::FoundDead,
            true,
            false,
            E::Set("QEMU was dead in the water (guest panic, I/O or internal error) when vmlet restarted".into()),
        ),
        Found::Status(FoundStatus::Running) => plan(O::FoundRunning, false, true, E::Keep),
        Found::Status(FoundStatus::Paused) => plan(O::FoundPaused, false, true, E::Keep),
        Found::Unanswering => plan(O::FoundUnanswering, false, true, E::Keep),
    }
}

/// How QEMU's exit reads: a clean power-off when QEMU announced it
/// (`SHUTDOWN`) and the guest did not panic; a crash otherwise.
pub fn exit_observation(ending: &Ending) -> Observation {
    if ending.is_clean() {
        Observation::ExitedCleanly
    } else {
        Observation::Crashed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observation as O;
    use PowerState as S;

    /// The whole transition table, written out: every (state, observation)
    /// pair not listed here must be ignored.
    const TABLE: &[(PowerState, Observation, PowerState)] = &[
        (S::Stopped, O::StartBegun, S::Starting),
        (S::Crashed, O::StartBegun, S::Starting),
        (S::Error, O::StartBegun, S::Starting),
        (S::Starting, O::GuestStarted, S::Running),
        (S::Starting, O::StartFailed, S::Error),
        (S::Running, O::VcpusStopped, S::Paused),
        (S::Paused, O::VcpusResumed, S::Running),
        (S::Running, O::StopBegun, S::Stopping),
        (S::Paused, O::StopBegun, S::Stopping),
        (S::Crashed, O::StopBegun, S::Stopping),
        (S::Error, O::StopBegun, S::Stopping),
        (S::Running, O::StopFinished, S::Stopped),
        (S::Paused, O::StopFinished, S::Stopped),
        (S::Stopping, O::StopFinished, S::Stopped),
        (S::Crashed, O::StopFinished, S::Stopped),
        (S::Error, O::StopFinished, S::Stopped),
        (S::Running, O::StopFailed, S::Error),
        (S::Paused, O::StopFailed, S::Error),
        (S::Stopping, O::StopFailed, S::Error),
        (S::Crashed, O::StopFailed, S::Error),
        (S::Running, O::ExitedCleanly, S::Stopped),
        (S::Paused, O::ExitedCleanly, S::Stopped),
        (S::Stopping, O::ExitedCleanly, S::Stopped),
        (S::Starting, O::Crashed, S::Crashed),
        (S::Running, O::Crashed, S::Crashed),
        (S::Paused, O::Crashed, S::Crashed),
        (S::Stopping, O::Crashed, S::Crashed),
        (S::Starting, O::ControlLost, S::Error),
        (S::Running, O::ControlLost, S::Error),
        (S::Paused, O::ControlLost, S::Error),
        (S::Stopping, O::ControlLost, S::Error),
        (S::Error, O::RegainedRunning, S::Running),
        (S::Error, O::RegainedPaused, S::Paused),
        (S::Starting, O::DeleteFailed, S::Stopped),
        (S::Running, O::DeleteFailed, S::Stopped),
        (S::Paused, O::DeleteFailed, S::Stopped),
        (S::Stopping, O::DeleteFailed, S::Stopped),
        (S::Stopped, O::FoundRunning, S::Running),
        (S::Starting, O::FoundRunning, S::Running),
        (S::Paused, O::FoundRunning, S::Running),
        (S::Stopping, O::FoundRunning, S::Running),
        (S::Crashed, O::FoundRunning, S::Running),
        (S::Error, O::FoundRunning, S::Running),
        (S::Stopped, O::FoundPaused, S::Paused),
        (S::Starting, O::FoundPaused, S::Paused),
        (S::Running, O::FoundPaused, S::Paused),
        (S::Stopping, O::FoundPaused, S::Paused),
        (S::Crashed, O::FoundPaused, S::Paused),
        (S::Error, O::FoundPaused, S::Paused),
        (S::Starting, O::FoundUnstarted, S::Stopped),
        (S::Running, O::FoundUnstarted, S::Stopped),
        (S::Paused, O::FoundUnstarted, S::Stopped),
        (S::Stopping, O::FoundUnstarted, S::Stopped),
        (S::Crashed, O::FoundUnstarted, S::Stopped),
        (S::Error, O::FoundUnstarted, S::Stopped),
        (S::Starting, O::FoundShutDown, S::Stopped),
        (S::Running, O::FoundShutDown, S::Stopped),
        (S::Paused, O::FoundShutDown, S::Stopped),
        (S::Stopping, O::FoundShutDown, S::Stopped),
        (S::Crashed, O::FoundShutDown, S::Stopped),
        (S::Error, O::FoundShutDown, S::Stopped),
        (S::Stopped, O::FoundDead, S::Crashed),
        (S::Starting, O::FoundDead, S::Crashed),
        (S::Running, O::FoundDead, S::Crashed),
        (S::Paused, O::FoundDead, S::Crashed),
        (S::Stopping, O::FoundDead, S::Crashed),
        (S::Error, O::FoundDead, S::Crashed),
        (S::Stopped, O::FoundUnanswering, S::Error),
        (S::Starting, O::FoundUnanswering, S::Error),
        (S::Running, O::FoundUnanswering, S::Error),
        (S::Paused, O::FoundUnanswering, S::Error),
        (S::Stopping, O::FoundUnanswering, S::Error),
        (S::Crashed, O::FoundUnanswering, S::Error),
        (S::Running, O::GoneWhileDown, S::Crashed),
        (S::Paused, O::GoneWhileDown, S::Crashed),
        (S::Starting, O::GoneWhileDown, S::Stopped),
        (S::Stopping, O::GoneWhileDown, S::Stopped),
        (S::Starting, O::GoneWithHostReboot, S::Stopped),
        (S::Running, O::GoneWithHostReboot, S::Stopped),
        (S::Paused, O::GoneWithHostReboot, S::Stopped),
        (S::Stopping, O::GoneWithHostReboot, S::Stopped),
        (S::Stopped, O::MigratedIn, S::Paused),
    ];

    #[test]
    fn every_state_observation_pair_follows_the_table() {
        for state in PowerState::ALL {
            for obs in Observation::ALL {
                let expected = TABLE
                    .iter()
                    .find(|(s, o, _)| *s == state && *o == obs)
                    .map(|(_, _, to)| *to);
                assert_eq!(next(state, obs), expected, "{state:?} + {obs:?}");
            }
        }
    }

    #[test]
    fn a_state_with_a_process_never_becomes_one_without_unless_the_process_went() {
        for state in PowerState::ALL {
            for obs in Observation::ALL {
                if let Some(to) = next(state, obs) {
                    if state.has_process() && !to.has_process() && to != S::Error {
                        assert!(obs.leaves_no_process(), "{state:?} + {obs:?} → {to:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn an_arrived_vm_is_paused_whatever_its_source_recorded() {
        for recorded in PowerState::ALL {
            let mut state = Observed(recorded);
            arrive(&mut state);
            assert_eq!(state, S::Paused, "arrived with {recorded:?} recorded");
        }
    }

    #[test]
    fn reattach_decisions() {
        use ErrorNote as E;
        let gone = Found::Gone {
            host_rebooted: false,
        };
        let rebooted = Found::Gone {
            host_rebooted: true,
        };
        // (recorded, found) → (resulting state, kill, attach, error kind, desired stopped)
        #[allow(clippy::type_complexity)]
        let cases: &[(PowerState, Found, PowerState, bool, bool, &str, bool)] = &[
            (S::Running, gone, S::Crashed, false, false, "set", false),
            (S::Paused, gone, S::Crashed, false, false, "set", false),
            (S::Starting, gone, S::Stopped, false, false, "set", false),
            (S::Stopping, gone, S::Stopped, false, false, "clear", false),
            (S::Stopped, gone, S::Stopped, false, false, "keep", false),
            (S::Crashed, gone, S::Crashed, false, false, "keep", false),
            (S::Error, gone, S::Error, false, false, "keep", false),
            (S::Running, rebooted, S::Stopped, false, false, "set", false),
            (
                S::Stopping,
                rebooted,
                S::Stopped,
                false,
                false,
                "set",
                false,
            ),
            (
                S::Crashed,
                rebooted,
                S::Crashed,
                false,
                false,
                "keep",
                false,
            ),
            (
                S::Running,
                Found::Status(FoundStatus::Running),
                S::Running,
                false,
                true,
                "keep",
                false,
            ),
            (
                S::Running,
                Found::Status(FoundStatus::Paused),
                S::Paused,
                false,
                true,
                "keep",
                false,
            ),
            (
                S::Error,
                Found::Status(FoundStatus::Running),
                S::Running,
                false,
                true,
                "keep",
                false,
            ),
            (
                S::Starting,
                Found::Status(FoundStatus::Unstarted),
                S::Stopped,
                true,
                false,
                "set",
                false,
            ),
            (
                S::Running,
                Found::Status(FoundStatus::ShutDown),
                S::Stopped,
                true,
                false,
                "clear",
                true,
            ),
            (
                S::Running,
                Found::Status(FoundStatus::Dead),
                S::Crashed,
                true,
                false,
                "set",
                false,
            ),
            (
                S::Running,
                Found::Unanswering,
                S::Error,
                false,
                true,
                "keep",
                false,
            ),
        ];
        for &(recorded, found, to, kill, attach, error, desired_stopped) in cases {
            let plan = reattach(recorded, found);
            let got = next(recorded, plan.observation).unwrap_or(recorded);
            assert_eq!(got, to, "{recorded:?} {found:?}");
            assert_eq!(
                (plan.kill, plan.attach),
                (kill, attach),
                "{recorded:?} {found:?}"
            );
            let kind = match plan.error {
                E::Keep => "keep",
                E::Clear => "clear",
                E::Set(_) => "set",
            };
            assert_eq!(kind, error, "{recorded:?} {found:?}");
            assert_eq!(
                plan.desired_stopped, desired_stopped,
                "{recorded:?} {found:?}"
            );
        }
    }

    #[test]
    fn exits_read_as_power_off_only_after_a_shutdown_without_panic() {
        use crate::qemu::process::ExitStatus;
        let shut_down = Ending::ShutDown {
            reason: "guest-shutdown".into(),
            by_guest: true,
        };
        assert_eq!(exit_observation(&shut_down), O::ExitedCleanly);
        assert_eq!(exit_observation(&Ending::Panicked), O::Crashed);
        assert_eq!(
            exit_observation(&Ending::Unannounced(ExitStatus::Code(1))),
            O::Crashed
        );
    }

    #[test]
    fn every_state_action_pair_is_decided() {
        use Decision as D;
        let run = D::Run;
        for state in PowerState::ALL {
            for action in Action::ALL {
                let got = decide(state, None, action);
                let expected_kind = match (action, state) {
                    (Action::Start, S::Running) => Some(D::Satisfied),
                    (Action::Start, S::Stopped | S::Crashed | S::Error) => Some(run(Task::Start)),
                    (Action::Stop { .. }, S::Stopped) => Some(D::Satisfied),
                    (Action::Stop { .. }, S::Running | S::Paused | S::Crashed | S::Error) => {
                        Some(run(Task::Stop))
                    }
                    (Action::Reboot, S::Running | S::Paused) => Some(run(Task::Reboot)),
                    (Action::Pause, S::Paused) => Some(D::Satisfied),
                    (Action::Pause, S::Running) => Some(run(Task::Pause)),
                    (Action::Resume, S::Running) => Some(D::Satisfied),
                    (Action::Resume, S::Paused) => Some(run(Task::Resume)),
                    (Action::Delete { .. }, S::Stopped | S::Crashed | S::Error) => {
                        Some(run(Task::Delete))
                    }
                    (Action::Delete { force: true }, S::Running | S::Paused) => {
                        Some(run(Task::Delete))
                    }
                    (Action::Snapshot, S::Stopped | S::Crashed | S::Running | S::Paused) => {
                        Some(run(Task::Snapshot))
                    }
                    (Action::Disks, S::Stopped | S::Crashed | S::Running | S::Paused) => {
                        Some(run(Task::Disks))
                    }
                    (Action::Nics, S::Stopped | S::Crashed | S::Running | S::Paused) => {
                        Some(run(Task::Nics))
                    }
                    (Action::Edit, S::Stopped | S::Crashed | S::Running | S::Paused) => {
                        Some(run(Task::Edit))
                    }
                    (Action::Migrate, S::Running | S::Paused) => Some(run(Task::Migrate)),
                    _ => None, // refused
                };
                match expected_kind {
                    Some(expected) => assert_eq!(got, expected, "{state:?} {action:?}"),
                    None => assert!(
                        matches!(got, D::Refused(ref r) if r.to_string().contains(state.as_str())),
                        "{state:?} {action:?}: {got:?}"
                    ),
                }
            }
        }
    }

    #[test]
    fn a_task_in_progress_blocks_every_action_but_a_forced_stop_over_a_stop() {
        let tasks = [
            Task::Start,
            Task::Stop,
            Task::Reboot,
            Task::Pause,
            Task::Resume,
            Task::Delete,
            Task::Snapshot,
            Task::Disks,
            Task::Nics,
            Task::Edit,
            Task::Migrate,
        ];
        for state in PowerState::ALL {
            for task in tasks {
                for action in Action::ALL {
                    let got = decide(state, Some(task), action);
                    if task == Task::Stop && action == (Action::Stop { force: true }) {
                        assert_eq!(got, Decision::Run(Task::Stop));
                    } else {
                        assert_eq!(got, Decision::Busy(task), "{state:?} {task:?} {action:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn decided_tasks_are_the_actions_tasks() {
        for state in PowerState::ALL {
            for action in Action::ALL {
                if let Decision::Run(task) = decide(state, None, action) {
                    assert_eq!(task, action.task());
                }
            }
        }
    }
}
