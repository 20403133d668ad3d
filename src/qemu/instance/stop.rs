//! Stopping and rebooting a launched QEMU: `quit`, the power button, the
//! guest agent and signals, each with its deadline.

use super::*;

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
