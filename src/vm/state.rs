//! VM power states, the operations that change them, and the two pure
//! functions that say what may happen next: [`decide`] (may this API action
//! run now?) and [`next`] (what does an observation do to the state?).
//!
//! Both are total over their inputs and tested over every pair.

use serde::{Deserialize, Serialize};

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
        }
    }
}

/// A power action the API asks for.
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
}

impl Action {
    /// Every action, for exhaustive tests.
    pub const ALL: [Action; 11] = [
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
    /// The action makes no sense in this state; the message says why.
    Refused(String),
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
    let refused =
        |what: &str| Decision::Refused(format!("cannot {what}: VM is {}", state.as_str()));
    match action {
        Action::Start => match state {
            S::Running => Decision::Satisfied,
            S::Stopped | S::Crashed | S::Error => Decision::Run(Task::Start),
            S::Paused => Decision::Refused("cannot start: VM is paused; resume it".into()),
            S::Starting | S::Stopping => refused("start"),
        },
        Action::Stop { .. } => match state {
            S::Stopped => Decision::Satisfied,
            // Crashed and error VMs may still hold a process or leftovers:
            // a stop cleans them up and settles on `stopped`.
            S::Running | S::Paused | S::Crashed | S::Error => Decision::Run(Task::Stop),
            S::Starting | S::Stopping => refused("stop"),
        },
        Action::Reboot => match state {
            S::Running | S::Paused => Decision::Run(Task::Reboot),
            _ => refused("reboot"),
        },
        Action::Pause => match state {
            S::Paused => Decision::Satisfied,
            S::Running => Decision::Run(Task::Pause),
            _ => refused("pause"),
        },
        Action::Resume => match state {
            S::Running => Decision::Satisfied,
            S::Paused => Decision::Run(Task::Resume),
            _ => refused("resume"),
        },
        Action::Delete { force } => match state {
            S::Stopped | S::Crashed | S::Error => Decision::Run(Task::Delete),
            S::Running | S::Paused if force => Decision::Run(Task::Delete),
            S::Running | S::Paused => Decision::Refused(format!(
                "cannot delete: VM is {}; stop it first or pass force=true",
                state.as_str()
            )),
            S::Starting | S::Stopping => refused("delete"),
        },
        // Live through QMP while QEMU runs, offline on the files otherwise;
        // not while QEMU comes or goes, nor while vmlet lost control of it.
        Action::Snapshot | Action::Disks | Action::Nics => match state {
            S::Stopped | S::Crashed | S::Running | S::Paused => Decision::Run(action.task()),
            _ => refused(match action {
                Action::Snapshot => "snapshot",
                Action::Disks => "change disks",
                _ => "change NICs",
            }),
        },
    }
}

/// Something vmlet observed or did that moves a VM's state.
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
}

impl Observation {
    /// Every observation, for exhaustive tests.
    pub const ALL: [Observation; 11] = [
        Observation::StartBegun,
        Observation::GuestStarted,
        Observation::StartFailed,
        Observation::VcpusStopped,
        Observation::VcpusResumed,
        Observation::StopBegun,
        Observation::ExitedCleanly,
        Observation::Crashed,
        Observation::ControlLost,
        Observation::RegainedRunning,
        Observation::RegainedPaused,
    ];
}

/// The state after `observation`, or `None` when the observation does not
/// apply in `state` (a stale or duplicate event, which is ignored).
pub fn next(state: PowerState, observation: Observation) -> Option<PowerState> {
    use Observation as O;
    use PowerState as S;
    match (observation, state) {
        (O::StartBegun, S::Stopped | S::Crashed | S::Error) => Some(S::Starting),
        (O::GuestStarted, S::Starting) => Some(S::Running),
        (O::StartFailed, S::Starting) => Some(S::Error),
        (O::VcpusStopped, S::Running) => Some(S::Paused),
        (O::VcpusResumed, S::Paused) => Some(S::Running),
        (O::StopBegun, S::Running | S::Paused | S::Crashed | S::Error) => Some(S::Stopping),
        (O::ExitedCleanly, S::Running | S::Paused | S::Stopping) => Some(S::Stopped),
        (O::Crashed, S::Starting | S::Running | S::Paused | S::Stopping) => Some(S::Crashed),
        (O::ControlLost, S::Starting | S::Running | S::Paused | S::Stopping) => Some(S::Error),
        (O::RegainedRunning, S::Error) => Some(S::Running),
        (O::RegainedPaused, S::Error) => Some(S::Paused),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PowerState as S;

    /// The whole transition table, written out: every (state, observation)
    /// pair not listed here must be ignored.
    const TABLE: &[(PowerState, Observation, PowerState)] = &[
        (S::Stopped, Observation::StartBegun, S::Starting),
        (S::Crashed, Observation::StartBegun, S::Starting),
        (S::Error, Observation::StartBegun, S::Starting),
        (S::Starting, Observation::GuestStarted, S::Running),
        (S::Starting, Observation::StartFailed, S::Error),
        (S::Running, Observation::VcpusStopped, S::Paused),
        (S::Paused, Observation::VcpusResumed, S::Running),
        (S::Running, Observation::StopBegun, S::Stopping),
        (S::Paused, Observation::StopBegun, S::Stopping),
        (S::Crashed, Observation::StopBegun, S::Stopping),
        (S::Error, Observation::StopBegun, S::Stopping),
        (S::Running, Observation::ExitedCleanly, S::Stopped),
        (S::Paused, Observation::ExitedCleanly, S::Stopped),
        (S::Stopping, Observation::ExitedCleanly, S::Stopped),
        (S::Starting, Observation::Crashed, S::Crashed),
        (S::Running, Observation::Crashed, S::Crashed),
        (S::Paused, Observation::Crashed, S::Crashed),
        (S::Stopping, Observation::Crashed, S::Crashed),
        (S::Starting, Observation::ControlLost, S::Error),
        (S::Running, Observation::ControlLost, S::Error),
        (S::Paused, Observation::ControlLost, S::Error),
        (S::Stopping, Observation::ControlLost, S::Error),
        (S::Error, Observation::RegainedRunning, S::Running),
        (S::Error, Observation::RegainedPaused, S::Paused),
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
    fn a_state_with_a_process_never_jumps_to_stopped_without_an_exit() {
        for state in PowerState::ALL {
            for obs in Observation::ALL {
                if next(state, obs) == Some(S::Stopped) {
                    assert_eq!(obs, Observation::ExitedCleanly, "{state:?} + {obs:?}");
                }
            }
        }
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
                    _ => None, // refused
                };
                match expected_kind {
                    Some(expected) => assert_eq!(got, expected, "{state:?} {action:?}"),
                    None => assert!(
                        matches!(got, D::Refused(ref m) if m.contains(state.as_str())),
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
