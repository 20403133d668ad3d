//! After a vmlet restart: finding the VM's QEMU again (pid, start time and
//! `-uuid` checked), reading what it is doing, and carrying out the pure
//! decision of `vm::state::reattach`; then autostart.

use super::*;

impl Actor {
    /// After a daemon restart: find the VM's QEMU again (or learn it is gone)
    /// and set the state from what QEMU says.
    pub(super) async fn reattach(&mut self) {
        let paths = RunPaths::new(&self.ctx.settings.run_dir, self.vm.id);
        // No process survives a host reboot: a recorded pid would be
        // someone else's.
        let pid = if self.host_rebooted {
            None
        } else {
            self.vm.pid
        };
        // A half-finished operation's task means nothing any more.
        self.vm.task = None;
        // The swtpm first: held by the confiner, it is ended whenever the
        // QEMU turns out to be gone (a stale swtpm never outlives it).
        self.reattach_tpm();
        let process = match pid.map(|pid| QemuProcess::adopt(pid, self.vm.id, self.vm.pid_start)) {
            Some(Ok(process)) => Arc::new(process),
            other => {
                if let Some(Err(e)) = other {
                    tracing::info!(vm = %self.vm.name, error = %e, "recorded QEMU is gone");
                }
                instance::remove_run_dir(&paths);
                // A cgroup and uid left by the QEMU that is gone.
                self.ctx.confiner.release(self.vm.id);
                self.settle_gone();
                return;
            }
        };
        let pid = process.pid();
        self.ctx.confiner.found(self.vm.id, pid);
        let serial = open_serial(&self.ctx, &self.vm.spec, &paths).await;
        match QmpClient::connect(&paths.qmp_socket(), REATTACH_QMP_DEADLINE).await {
            Ok((qmp, events)) => {
                if let Err(e) = instance::restore_shutdown_action(&qmp).await {
                    tracing::warn!(vm = %self.vm.name, error = %e, "could not restore the shutdown action");
                }
                let status = qmp
                    .execute_with_deadline(qapi::qmp::query_status {}, REATTACH_QMP_DEADLINE)
                    .await;
                // The kernel kept the threads' affinity; set again, it also
                // covers threads QEMU made while vmlet was down.
                if let Err(e) = super::lifecycle::pin_vcpus(&qmp, pid, &self.vm.spec).await {
                    tracing::warn!(vm = %self.vm.name, error = %error_chain(&e), "could not pin the vCPU threads again");
                }
                match status {
                    Ok(status) => self.reattach_with_status(
                        process,
                        (qmp, events),
                        paths,
                        serial,
                        status.status,
                    ),
                    Err(e) => {
                        self.attach(process, None, paths, None, serial);
                        self.lost_on_reattach(pid, error_chain(&e));
                    }
                }
            }
            Err(e) => {
                self.attach(process, None, paths, None, serial);
                self.lost_on_reattach(pid, error_chain(&e));
            }
        }
    }

    fn reattach_with_status(
        &mut self,
        process: Arc<QemuProcess>,
        (qmp, events): (QmpClient, tokio::sync::broadcast::Receiver<QmpEvent>),
        paths: RunPaths,
        serial: Option<Arc<SerialHub>>,
        status: qapi::qmp::RunState,
    ) {
        use qapi::qmp::RunState as R;
        let found = match status {
            R::prelaunch | R::inmigrate => FoundStatus::Unstarted,
            R::running => FoundStatus::Running,
            R::shutdown => FoundStatus::ShutDown,
            R::guest_panicked | R::internal_error | R::io_error => FoundStatus::Dead,
            _ => FoundStatus::Paused,
        };
        tracing::info!(vm = %self.vm.name, pid = process.pid(), ?status, "QEMU found");
        let held = FoundQemu {
            process,
            qmp,
            events,
            paths,
            serial,
        };
        self.settle_reattach(Found::Status(found), Some(held));
    }

    fn lost_on_reattach(&mut self, pid: i32, why: String) {
        tracing::warn!(vm = %self.vm.name, pid, error = %why, "QEMU runs but QMP does not answer");
        self.settle_reattach(Found::Unanswering, None);
        self.commit(|vm| {
            vm.pid = Some(pid);
            vm.error = Some(format!("QEMU (pid {pid}) does not answer on QMP: {why}"));
        });
        self.reconnect();
    }

    /// Finds the recorded `swtpm` again (pid, start time and its `--log`
    /// naming the VM) and hands it to the confiner, which ends it with the
    /// QEMU; one that is gone is forgotten.
    fn reattach_tpm(&mut self) {
        let Some(pid) = self.vm.tpm_pid else { return };
        let found = if self.host_rebooted {
            None
        } else {
            match crate::qemu::tpm::adopt(pid, self.vm.id, self.vm.tpm_pid_start) {
                Ok(process) => Some(process),
                Err(e) => {
                    tracing::info!(vm = %self.vm.name, error = %e, "recorded swtpm is gone");
                    None
                }
            }
        };
        match found {
            Some(process) => {
                tracing::info!(vm = %self.vm.name, pid, "swtpm found");
                self.ctx.confiner.hold_tpm(self.vm.id, Arc::new(process));
            }
            None => self.commit(|vm| {
                vm.tpm_pid = None;
                vm.tpm_pid_start = None;
            }),
        }
    }

    /// The VM's QEMU is gone: record how that looks from here.
    fn settle_gone(&mut self) {
        let found = Found::Gone {
            host_rebooted: self.host_rebooted,
        };
        self.settle_reattach(found, None);
    }

    /// Carries out what [`state::reattach`] decides for what was found;
    /// `held` is the QEMU found alive, with its QMP link.
    fn settle_reattach(&mut self, found: Found, held: Option<FoundQemu>) {
        let plan = state::reattach(self.vm.state.get(), found);
        let mut pid = None;
        let mut start = None;
        if let Some(FoundQemu {
            process,
            qmp,
            events,
            paths,
            serial,
        }) = held
        {
            if plan.kill {
                tracing::warn!(vm = %self.vm.name, pid = process.pid(), ?found, "the QEMU found can never run again: killing it");
                let _ = process.signal(libc::SIGKILL);
                instance::remove_run_dir(&paths);
                // The cgroup can go once the process has.
                let ctx = self.ctx.clone();
                let id = self.vm.id;
                tokio::spawn(async move {
                    process.exited().await;
                    ctx.confiner.release(id);
                });
            } else if plan.attach {
                pid = Some(process.pid());
                start = process.start_time();
                self.attach(process, Some(qmp), paths, Some(events), serial);
            }
        }
        self.observe(plan.observation);
        self.commit(|vm| {
            if pid.is_some() || !plan.attach {
                vm.pid = pid;
                vm.pid_start = start;
            }
            if pid.is_none() && !plan.attach {
                vm.tpm_pid = None;
                vm.tpm_pid_start = None;
            }
            match plan.error {
                ErrorNote::Keep => {}
                ErrorNote::Clear => vm.error = None,
                ErrorNote::Set(message) => vm.error = Some(message),
            }
            if plan.desired_stopped {
                vm.desired = Desired::Stopped;
            }
        });
    }

    /// Starts a VM marked `autostart` whose desired state is running but
    /// which does not run (its QEMU vanished, as after a host reboot).
    pub(super) fn autostart(&mut self) {
        let down = matches!(
            self.vm.state.get(),
            PowerState::Stopped | PowerState::Crashed | PowerState::Error
        );
        if self.vm.spec.autostart
            && self.vm.desired == Desired::Running
            && down
            && self.runtime.is_none()
        {
            tracing::info!(vm = %self.vm.name, "autostart: starting");
            self.on_command(
                Command::Power {
                    action: PowerAction::Start,
                    options: ActOptions::default(),
                },
                None,
            );
        }
    }
}

/// A QEMU found alive at vmlet's start, with its QMP link.
struct FoundQemu {
    process: Arc<QemuProcess>,
    qmp: QmpClient,
    events: tokio::sync::broadcast::Receiver<QmpEvent>,
    paths: RunPaths,
    serial: Option<Arc<SerialHub>>,
}
