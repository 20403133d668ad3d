//! The actor's hold on a QEMU: watching its QMP events and its exit,
//! reconnecting a QMP link that was lost, and letting go.

use super::*;

impl Actor {
    /// Takes hold of a QEMU: forwards its QMP events and its exit into the
    /// inbox.
    pub(super) fn attach(
        &mut self,
        process: Arc<QemuProcess>,
        qmp: Option<QmpClient>,
        paths: RunPaths,
        events: Option<tokio::sync::broadcast::Receiver<QmpEvent>>,
        serial: Option<Arc<SerialHub>>,
    ) {
        self.incarnations += 1;
        let incarnation = self.incarnations;
        // One task forwards both the events and the exit, so the exit always
        // comes after every event QEMU sent before it (a `SHUTDOWN` must be
        // seen before the exit it explains).
        let inbox = self.inbox.clone();
        let watched = process.clone();
        let forwarders = vec![tokio::spawn(async move {
            let mut events = events;
            let status = exit::watch(
                &watched,
                events.as_mut(),
                |event| {
                    let _ = inbox.send(Input::Qmp { incarnation, event });
                },
                || {
                    let _ = inbox.send(Input::LinkLost { incarnation });
                },
            )
            .await;
            let _ = inbox.send(Input::Exited {
                incarnation,
                status,
            });
        })];
        let agent = self
            .vm
            .spec
            .guest_agent
            .then(|| Arc::new(GuestAgent::new(paths.agent_socket())));
        let guest = Arc::new(std::sync::Mutex::new(None));
        let mut forwarders = forwarders;
        if let Some(agent) = &agent {
            forwarders.push(tokio::spawn(refresh_guest_info(
                agent.clone(),
                guest.clone(),
            )));
        }
        self.runtime = Some(Runtime {
            incarnation,
            process,
            qmp,
            paths,
            forwarders,
            exit_events: ExitEvents::default(),
            reconnecting: false,
            serial,
            display: self
                .ctx
                .profiles
                .get(&self.vm.spec.profile)
                .is_ok_and(|p| p.devices.display.is_some()),
            gone: watch::channel(()).0,
            agent,
            guest,
        });
    }

    /// Keeps trying to reach a QEMU whose QMP link was lost (a QEMU that was
    /// stopped or starved may answer again) until it answers or exits.
    pub(super) fn reconnect(&mut self) {
        let Some(rt) = &mut self.runtime else { return };
        if std::mem::replace(&mut rt.reconnecting, true) {
            return;
        }
        let incarnation = rt.incarnation;
        let process = rt.process.clone();
        let socket = rt.paths.qmp_socket();
        let inbox = self.inbox.clone();
        let name = self.vm.name.clone();
        rt.forwarders.push(tokio::spawn(async move {
            while process.is_running() {
                tokio::time::sleep(RECONNECT_INTERVAL).await;
                let Ok((qmp, events)) = QmpClient::connect(&socket, REATTACH_QMP_DEADLINE).await
                else {
                    continue;
                };
                let status = qmp
                    .execute_with_deadline(qapi::qmp::query_status {}, REATTACH_QMP_DEADLINE)
                    .await;
                if let Ok(status) = status {
                    tracing::info!(vm = %name, "QMP answers again");
                    let _ = inbox.send(Input::Regained {
                        incarnation,
                        qmp,
                        events,
                        status: status.status,
                    });
                    return;
                }
            }
        }));
    }

    pub(super) fn on_regained(
        &mut self,
        qmp: QmpClient,
        events: tokio::sync::broadcast::Receiver<QmpEvent>,
        status: qapi::qmp::RunState,
    ) {
        if self.vm.state != PowerState::Error || self.op.is_some() {
            return;
        }
        let Some(incarnation) = self.runtime.as_ref().map(|rt| rt.incarnation) else {
            return;
        };
        let inbox = self.inbox.clone();
        let mut events = events;
        let forwarder = tokio::spawn(async move {
            exit::read_events(&mut events, |event| {
                let _ = inbox.send(Input::Qmp { incarnation, event });
            })
            .await
        });
        if let Some(rt) = &mut self.runtime {
            rt.qmp = Some(qmp);
            rt.forwarders.push(forwarder);
            rt.reconnecting = false;
        }
        let observation = if status == qapi::qmp::RunState::running {
            Observation::RegainedRunning
        } else {
            Observation::RegainedPaused
        };
        self.observe(observation);
        self.commit(|vm| vm.error = None);
    }

    /// Lets go of the QEMU (which has exited or is being abandoned) and
    /// removes its run directory.
    pub(super) fn teardown(&mut self) {
        if let Some(rt) = self.runtime.take() {
            instance::remove_run_dir(&rt.paths);
            self.ctx.confiner.release(self.vm.id);
        }
    }

    pub(super) fn on_qmp_event(&mut self, event: QmpEvent) {
        tracing::debug!(vm = %self.vm.name, event = %event.name, data = %event.data, "QMP event");
        let task = self.op.as_ref().map(|op| op.task);
        let Some(rt) = &mut self.runtime else { return };
        match rt.exit_events.note(&event) {
            RunEvent::Panicked => {
                // Like libvirt's default on_crash=destroy: a panicked guest
                // holds nothing worth keeping running.
                let _ = rt.process.signal(libc::SIGKILL);
            }
            // A pause vmlet did not ask for (guest I/O error, a panic
            // action): follow it. Pauses of our own are settled by their op.
            // Snapshot jobs pause the vCPUs while they run; their op reads
            // the state afterwards.
            // A reboot stops and resumes the vCPUs around the reset, and a
            // migration pauses them for the switch; their ops settle the
            // state afterwards.
            RunEvent::VcpusStopped
                if !matches!(
                    task,
                    Some(Task::Pause | Task::Snapshot | Task::Reboot | Task::Migrate)
                ) =>
            {
                self.observe(Observation::VcpusStopped);
            }
            RunEvent::VcpusResumed
                if !matches!(
                    task,
                    Some(Task::Resume | Task::Snapshot | Task::Reboot | Task::Migrate)
                ) =>
            {
                self.observe(Observation::VcpusResumed);
            }
            RunEvent::Reset => tracing::info!(vm = %self.vm.name, "guest reset"),
            _ => {}
        }
    }

    pub(super) fn on_exit(&mut self, status: ExitStatus) {
        let task = self.op.as_ref().map(|op| op.task);
        if matches!(task, Some(Task::Stop | Task::Delete)) {
            // The stop or delete in progress settles the state.
            return;
        }
        let Some(rt) = &self.runtime else { return };
        let ending = rt.exit_events.ending(status);
        let observation = state::exit_observation(&ending);
        let clean = observation == Observation::ExitedCleanly;
        let reason = ending.error().unwrap_or_default();
        let shutdown_reason = rt.exit_events.shutdown_reason().map(str::to_string);
        self.teardown();
        if clean {
            tracing::info!(vm = %self.vm.name, reason = ?shutdown_reason, "guest powered off");
            self.observe(Observation::ExitedCleanly);
            self.commit(|vm| {
                vm.pid = None;
                vm.pid_start = None;
                vm.tpm_pid = None;
                vm.tpm_pid_start = None;
                vm.desired = Desired::Stopped;
                vm.error = None;
            });
        } else {
            tracing::warn!(vm = %self.vm.name, %reason, "VM crashed");
            let crashed = self.observe(observation);
            self.commit(|vm| {
                vm.pid = None;
                vm.pid_start = None;
                vm.tpm_pid = None;
                vm.tpm_pid_start = None;
                if crashed || vm.state == PowerState::Error {
                    vm.error = Some(reason);
                }
            });
        }
    }
}

/// Reads the guest agent's view of the guest into `guest`, often until the
/// agent first answers, then now and then, each read bounded by
/// [`AGENT_INFO_DEADLINE`]; a VM without an answering agent keeps `None`
/// (or the last answer, with its `read_at`). Ends with the runtime (it is
/// one of its forwarders, aborted when the runtime goes).
async fn refresh_guest_info(
    agent: Arc<GuestAgent>,
    guest: Arc<std::sync::Mutex<Option<GuestInfo>>>,
) {
    let mut answered = false;
    loop {
        tokio::time::sleep(if answered {
            AGENT_REFRESH_INTERVAL
        } else {
            AGENT_FIRST_INTERVAL
        })
        .await;
        match agent.info(AGENT_INFO_DEADLINE).await {
            Ok(info) => {
                answered = true;
                if let Ok(mut slot) = guest.lock() {
                    *slot = Some(info);
                }
            }
            Err(e) => {
                tracing::debug!(socket = %agent.path().display(), error = %crate::error_chain(&e), "guest agent did not answer");
            }
        }
    }
}
