//! The power operations of a VM's actor, each run as its own task: start
//! (launch QEMU paused, configure, `cont`), stop, reboot, pause, resume
//! and delete, and what their results do to the VM.

use super::*;

impl Actor {
    pub(super) fn begin_start(&mut self) {
        self.observe(Observation::StartBegun);
        let ctx = self.ctx.clone();
        let mut unpinned = None;
        self.commit(|vm| {
            // A change the last QEMU could not take becomes the spec now.
            if let Some(pending) = vm.pending.take() {
                if pending.spec.profile != vm.spec.profile || pending.spec.cpu != vm.spec.cpu {
                    // Another profile is another machine, another CPU
                    // another model: pinned anew.
                    vm.machine = None;
                }
                vm.spec = pending.spec;
            }
            // A VM from before pinning (or with a new profile) is pinned
            // now, from the same resolution as a create, and keeps it.
            if vm.machine.is_none() {
                match ctx.vm_pin(&vm.spec) {
                    Ok(pin) => vm.machine = Some(pin),
                    Err(reason) => unpinned = Some(reason.to_string()),
                }
            }
            vm.task = Some(Task::Start);
            vm.desired = Desired::Running;
            vm.error = None;
            vm.boots += 1;
            vm.last_stop = None;
        });
        let boot_banner = boot_banner(self.vm.boots, SystemTime::now());
        // A VM in `error` may still hold a QEMU that stopped answering.
        let leftover = self.runtime.take();
        let spec = self.vm.spec.clone();
        let machine = self.vm.machine.clone();
        self.spawn_op(async move {
            if let Some(rt) = leftover {
                let _ = rt.process.kill().await;
                instance::remove_run_dir(&rt.paths);
                ctx.confiner.release(spec.uuid);
            }
            let result = async {
                let machine = machine.ok_or_else(|| {
                    VmError::Failed(unpinned.unwrap_or_else(|| "the VM has no machine type".into()))
                })?;
                // Recorded before it is written: `?boot=current` looks for
                // this very line.
                if spec.serial.enabled {
                    if let Err(e) = serial_log(&ctx, &spec).record_boot(&boot_banner) {
                        tracing::warn!(vm = %spec.name, error = %e, "cannot record the boot banner");
                    }
                }
                let qemu = launch_qemu(&ctx, &spec, &machine, Some(&boot_banner), false).await?;
                // Attached before the guest runs, so the live stream has
                // every byte of this boot.
                let serial = open_serial(&ctx, &spec, &qemu.paths).await;
                if let Err(e) = qemu.start_guest().await {
                    let _ = qemu.process.kill().await;
                    instance::remove_run_dir(&qemu.paths);
                    ctx.confiner.release(spec.uuid);
                    return Err(crate::vm::disk_ops::qmp_error("starting the guest", e));
                }
                Ok((qemu, serial))
            }
            .await;
            OpResult::Started(result)
        });
    }

    pub(super) fn begin_stop(&mut self, force: bool, timeout: Option<Duration>) {
        self.observe(Observation::StopBegun);
        self.commit(|vm| {
            vm.task = Some(Task::Stop);
            vm.desired = Desired::Stopped;
        });
        let Some(rt) = &self.runtime else {
            self.spawn_op(async { OpResult::Stopped(Ok(StopOutcome::AlreadyExited)) });
            return;
        };
        let mode = if force {
            StopMode::Force
        } else {
            StopMode::Graceful {
                grace: timeout.unwrap_or(Duration::from_secs(self.ctx.settings.stop_grace_s)),
            }
        };
        let process = rt.process.clone();
        let qmp = rt.qmp.clone();
        let agent = rt.agent.clone();
        self.spawn_op(async move {
            OpResult::Stopped(
                instance::stop_process(&process, qmp.as_ref(), agent.as_deref(), mode).await,
            )
        });
    }

    /// A reboot that asks the guest (see [`instance::reboot_guest`]), and
    /// its guest agent when it ignores the ACPI power button (see
    /// [`reboot_by_agent`]); a paused guest cannot react, so it is refused
    /// at once.
    pub(super) fn begin_reboot(&mut self, timeout: Option<Duration>) {
        self.commit(|vm| vm.task = Some(Task::Reboot));
        if self.vm.state == PowerState::Paused {
            self.finish_op(Err(VmError::Refused(
                "the VM is paused: its guest cannot react to the ACPI power button; resume it first, or force the reboot".into(),
            )));
            return;
        }
        let grace = timeout.unwrap_or(Duration::from_secs(self.ctx.settings.stop_grace_s));
        let qmp = self.runtime.as_ref().and_then(|rt| rt.qmp.clone());
        // The agent gets its turn only when it has answered in this QEMU:
        // a guest without one keeps the whole grace time for the button.
        let agent = self
            .runtime
            .as_ref()
            .filter(|rt| rt.guest.lock().is_ok_and(|g| g.is_some()))
            .and_then(|rt| rt.agent.clone());
        let name = self.vm.name.clone();
        self.spawn_op(async move {
            let Some(qmp) = qmp else {
                return OpResult::Qmp {
                    task: Task::Reboot,
                    result: Err(QmpError::Protocol("no QMP link to this QEMU".into())),
                };
            };
            // As for a stop: with an agent, the button gets half the grace
            // time and the agent the rest.
            let started = tokio::time::Instant::now();
            let button = if agent.is_some() { grace / 2 } else { grace };
            let mut result = instance::reboot_guest(&qmp, button).await;
            if let (Err(instance::RebootError::NoReaction { .. }), Some(agent)) = (&result, &agent)
            {
                let left = grace.saturating_sub(started.elapsed());
                result = reboot_by_agent(&qmp, agent, left, &name)
                    .await
                    .map_err(|()| instance::RebootError::NoReactionNorAgent { grace });
            }
            let status = qmp
                .execute_with_deadline(qapi::qmp::query_status {}, instance::STOP_COMMAND_DEADLINE)
                .await
                .ok()
                .map(|s| s.status);
            OpResult::Rebooted { result, status }
        });
    }

    pub(super) fn begin_qmp(&mut self, task: Task) {
        self.commit(|vm| vm.task = Some(task));
        let qmp = self.runtime.as_ref().and_then(|rt| rt.qmp.clone());
        self.spawn_op(async move {
            let Some(qmp) = qmp else {
                return OpResult::Qmp {
                    task,
                    result: Err(QmpError::Protocol("no QMP link to this QEMU".into())),
                };
            };
            let result = match task {
                Task::Reboot => qmp.execute(qapi::qmp::system_reset {}).await.map(drop),
                Task::Pause => qmp.execute(qapi::qmp::stop {}).await.map(drop),
                Task::Resume => qmp.execute(qapi::qmp::cont {}).await.map(drop),
                _ => unreachable!("not a QMP task"),
            };
            OpResult::Qmp { task, result }
        });
    }

    pub(super) fn begin_delete(&mut self) {
        self.commit(|vm| vm.task = Some(Task::Delete));
        let ctx = self.ctx.clone();
        let id = self.vm.id;
        let rt = self
            .runtime
            .as_ref()
            .map(|rt| (rt.process.clone(), rt.paths.clone()));
        let paths = RunPaths::new(&ctx.settings.run_dir, id);
        self.spawn_op(async move {
            if let Some((process, _)) = &rt {
                if let Err(e) = instance::stop_process(process, None, None, StopMode::Force).await {
                    return OpResult::Deleted(Err(VmError::Failed(error_chain(&e))));
                }
            }
            instance::remove_run_dir(&paths);
            ctx.confiner.release(id);
            OpResult::Deleted(ctx.store.remove(id).map_err(VmError::from))
        });
    }

    /// Handles an operation's result; true when the VM was deleted.
    pub(super) fn on_op_done(&mut self, result: OpResult) -> bool {
        match result {
            OpResult::Started(Ok((qemu, serial))) => {
                let pid = qemu.process.pid();
                let started = qemu.process.start_time();
                let tpm = qemu.tpm.as_ref().map(|t| (t.pid(), t.start_time()));
                self.attach(
                    qemu.process.clone(),
                    Some(qemu.qmp.clone()),
                    qemu.paths.clone(),
                    Some(qemu.events),
                    serial,
                );
                self.commit(|vm| {
                    vm.pid = Some(pid);
                    vm.pid_start = started;
                    vm.tpm_pid = tpm.map(|t| t.0);
                    vm.tpm_pid_start = tpm.and_then(|t| t.1);
                });
                self.observe(Observation::GuestStarted);
                self.finish_op(Ok(()));
            }
            OpResult::Started(Err(e)) => {
                let e = e.during("start failed");
                tracing::warn!(vm = %self.vm.name, error = %e, "start failed");
                self.observe(Observation::StartFailed);
                let error = match &e {
                    VmError::Invalid(spec) => format!("start failed: {spec}"),
                    other => other.to_string(),
                };
                self.commit(|vm| {
                    vm.pid = None;
                    vm.pid_start = None;
                    vm.tpm_pid = None;
                    vm.tpm_pid_start = None;
                    vm.error = Some(error);
                });
                self.finish_op(Err(e));
            }
            OpResult::Stopped(result) => match result {
                Ok(outcome) => {
                    tracing::info!(vm = %self.vm.name, ?outcome, "stopped");
                    self.teardown();
                    self.observe(Observation::StopFinished);
                    self.commit(|vm| {
                        vm.pid = None;
                        vm.pid_start = None;
                        vm.tpm_pid = None;
                        vm.tpm_pid_start = None;
                        vm.error = None;
                        vm.last_stop = Some(outcome.into());
                    });
                    self.finish_op(Ok(()));
                }
                Err(e) => {
                    let error = format!("stop failed: {}", error_chain(&e));
                    self.observe(Observation::StopFailed);
                    self.commit(|vm| vm.error = Some(error.clone()));
                    self.finish_op(Err(VmError::Failed(error)));
                }
            },
            OpResult::Rebooted { result, status } => self.on_rebooted(result, status),
            OpResult::Qmp { task, result } => match result {
                Ok(()) => {
                    match task {
                        Task::Pause => {
                            self.observe(Observation::VcpusStopped);
                            self.commit(|vm| vm.desired = Desired::Paused);
                        }
                        Task::Resume => {
                            self.observe(Observation::VcpusResumed);
                            self.commit(|vm| vm.desired = Desired::Running);
                        }
                        _ => {}
                    }
                    self.finish_op(Ok(()));
                }
                Err(e) => {
                    let message = format!("{}: {}", task.as_str(), error_chain(&e));
                    let error = match e {
                        QmpError::Timeout { .. } => VmError::Timeout(message.clone()),
                        _ => VmError::Failed(message.clone()),
                    };
                    // A timeout closes the link; QEMU may still run, but
                    // vmlet can no longer command it.
                    let lost = matches!(e, QmpError::Timeout { .. } | QmpError::Closed { .. })
                        && self
                            .runtime
                            .as_ref()
                            .is_some_and(|rt| rt.process.is_running());
                    if lost {
                        self.observe(Observation::ControlLost);
                        self.commit(|vm| vm.error = Some(message));
                        self.reconnect();
                    }
                    self.finish_op(Err(error));
                }
            },
            OpResult::Deleted(Ok(())) => {
                self.teardown();
                self.ctx.publish_deleted(&self.vm);
                tracing::info!(vm = %self.vm.name, id = %self.vm.id, "deleted");
                let waiters = self.op.take().map(|op| op.waiters).unwrap_or_default();
                self.vm.task = None;
                for w in waiters {
                    let _ = w.send(Ok(self.vm.clone()));
                }
                return true;
            }
            OpResult::MovedAway { target, result } => {
                self.on_moved_away(target, result);
                return true;
            }
            OpResult::Storage { result, status } => self.on_storage_done(result, status),
            OpResult::Edit(done) => self.on_edit_done(*done),
            OpResult::Deleted(Err(error)) => {
                self.teardown();
                let error = error.during("delete failed");
                let message = error.to_string();
                self.observe(Observation::DeleteFailed);
                self.commit(|vm| {
                    vm.pid = None;
                    vm.pid_start = None;
                    vm.tpm_pid = None;
                    vm.tpm_pid_start = None;
                    vm.error = Some(message);
                });
                self.finish_op(Err(error));
            }
        }
        false
    }
}

/// Asks the guest agent to reboot the guest (`guest-shutdown` mode
/// `reboot`) and waits up to `left` for the reset that reboot makes (a
/// guest-initiated `RESET`: the new boot runs in the same QEMU). `Err` when
/// the agent did not take the request or the guest did not reset in time;
/// the guest keeps running either way.
async fn reboot_by_agent(
    qmp: &QmpClient,
    agent: &GuestAgent,
    left: Duration,
    vm: &str,
) -> Result<(), ()> {
    use tokio::sync::broadcast::error::RecvError;
    // Subscribed before the request, so the guest's RESET is seen.
    let mut events = qmp.subscribe();
    let started = tokio::time::Instant::now();
    if let Err(e) = agent.reboot(left.min(instance::AGENT_STOP_DEADLINE)).await {
        tracing::info!(vm, error = %error_chain(&e), "guest agent could not reboot the guest");
        return Err(());
    }
    tracing::info!(
        vm,
        "guest ignored the power button: asked its guest agent to reboot it"
    );
    let reset = async {
        loop {
            match events.recv().await {
                Ok(event)
                    if event.name == "RESET"
                        && event.data.get("guest").and_then(serde_json::Value::as_bool)
                            == Some(true) =>
                {
                    return true
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return false,
            }
        }
    };
    let left = left.saturating_sub(started.elapsed());
    match tokio::time::timeout(left, reset).await {
        Ok(true) => Ok(()),
        _ => Err(()),
    }
}

impl Actor {
    /// Settles a reboot: the guest's `SHUTDOWN` on the way did not end
    /// QEMU, and the vCPUs run (or, when a step failed, are as QEMU says).
    fn on_rebooted(
        &mut self,
        result: Result<(), instance::RebootError>,
        status: Option<qapi::qmp::RunState>,
    ) {
        let Some(rt) = &mut self.runtime else {
            // QEMU exited meanwhile; its exit settled the state.
            let result =
                result.map_err(|e| VmError::Failed(format!("reboot: {}", error_chain(&e))));
            self.finish_op(result);
            return;
        };
        let guest_down = status == Some(qapi::qmp::RunState::shutdown);
        if !guest_down {
            rt.exit_events.forget_shutdown();
        }
        match status {
            Some(qapi::qmp::RunState::running) => {
                self.observe(Observation::VcpusResumed);
            }
            Some(_) => {
                self.observe(Observation::VcpusStopped);
            }
            None => {}
        }
        let result = result.map_err(|e| {
            let message = format!("reboot: {}", error_chain(&e));
            tracing::warn!(vm = %self.vm.name, error = %message, "reboot failed");
            match e.qmp_error() {
                Some(QmpError::Timeout { .. }) => VmError::Timeout(message),
                Some(_) => VmError::Failed(message),
                None => VmError::Timeout(message),
            }
        });
        if result.is_ok() {
            tracing::info!(vm = %self.vm.name, "guest rebooted");
        }
        // A timed-out command closed the link; QEMU may still run, but
        // vmlet can no longer command it (as for the other QMP tasks).
        let lost = matches!(result, Err(VmError::Timeout(_) | VmError::Failed(_)))
            && status.is_none()
            && self.runtime.as_ref().is_some_and(|rt| {
                rt.process.is_running()
                    && rt.qmp.as_ref().is_some_and(|q| q.close_reason().is_some())
            });
        if lost {
            if let Err(e) = &result {
                let message = e.to_string();
                self.observe(Observation::ControlLost);
                self.commit(|vm| vm.error = Some(message));
                self.reconnect();
            }
        }
        self.finish_op(result);
    }
}

/// Whether the huge pages `spec` asks for are free on the host now. QEMU
/// preallocates them: a pool too small for them is a conflict with what
/// the host has (409).
pub fn check_hugepages_free(spec: &VmSpec) -> Result<(), VmError> {
    let Some(size) = spec.memory.hugepages else {
        return Ok(());
    };
    let pools = crate::node::hugepage_pools(std::path::Path::new(crate::node::HUGEPAGES_SYSFS));
    let available = pools.get(&size).map_or(0, |(_, free)| *free);
    crate::node::check_hugepages(size, size.pages_for(spec.memory_mib), available, "free")
        .map_err(VmError::Conflict)
}

/// Launches the QEMU of `spec`, paused, with every file, tap and socket it
/// needs opened by vmlet, confined, and its vCPUs pinned: what a start
/// does before the guest runs. `incoming`: for the target of a live
/// migration (`-incoming defer`). On failure nothing is left running.
pub async fn launch_qemu(
    ctx: &Context,
    spec: &VmSpec,
    machine: &crate::spec::MachinePin,
    serial_banner: Option<&str>,
    incoming: bool,
) -> Result<QemuInstance, VmError> {
    let profile = ctx
        .profiles
        .get(&spec.profile)
        .map_err(|e| VmError::Failed(error_chain(&e)))?;
    // Told before anything is made. A VM on huge pages holds its turn
    // until its QEMU has taken them, so the next one's check sees them gone.
    let _hugepage_turn = match spec.memory.hugepages {
        Some(_) => Some(ctx.hugepage_launches.lock().await),
        None => None,
    };
    check_hugepages_free(spec)?;
    // A full disk stays a full disk (507).
    crate::storage::disks::write_seed(&ctx.layout, spec)?;
    // The taps live while `_host_nics` holds their fds: until QEMU has
    // inherited them (or the start failed, and they go).
    let (nics, _host_nics) = nic_ops::open_all(&ctx.networks, &spec.nics).await?;
    // Every disk, kernel and initrd opened now, by vmlet: QEMU gets fds and
    // never resolves a path from the spec.
    let mut files = LaunchFiles::open(spec, &ctx.layout, &ctx.host_roots)?;
    if let Some(firmware) = ctx.uefi_firmware(spec, &machine.machine_type)? {
        // Made here too, not only at create: for a VM whose firmware was
        // changed to UEFI, or whose NVRAM an operator removed to reset it.
        crate::storage::disks::provision_nvram(
            &ctx.layout,
            &ctx.qemu_img,
            spec.uuid,
            &firmware.vars_template,
        )
        .await?;
        files.open_firmware(&firmware, &ctx.layout.nvram(spec.uuid))?;
        if firmware.secure && matches!(spec.boot, crate::spec::Boot::Kernel { .. }) {
            tracing::warn!(
                vm = %spec.name,
                "{}",
                crate::qemu::firmware::KERNEL_BOOT_SECURE_BOOT_CAVEAT
            );
        }
    }
    let serial_log = ctx.layout.console_log(spec.uuid);
    let qemu_log = ctx.layout.qemu_log(spec.uuid);
    let paths = RunPaths::new(&ctx.settings.run_dir, spec.uuid);
    let confined = ctx.confiner.prepare(spec, ctx.accel == Accel::Kvm)?;
    let tpm_dir = ctx.layout.vm_tpm_dir(spec.uuid);
    let tpm_log = ctx.layout.tpm_log(spec.uuid);
    let launch = Launch {
        binary: &ctx.settings.qemu_binary,
        deadline: Duration::from_secs(ctx.settings.start_timeout_s),
        spec,
        profile,
        machine,
        accel: ctx.accel,
        paths: &paths,
        serial_log: &serial_log,
        serial_banner,
        qemu_log: &qemu_log,
        disks: &files.disks,
        disk_sets: &files.sets,
        passed_fds: &files.passed,
        boot_files: files.boot.as_ref(),
        nics: &nics,
        pflash: files.pflash,
        confine: confined.plan(),
        tpm: spec.tpm.map(|_| instance::TpmPlan {
            binary: &ctx.settings.swtpm_binary,
            state_dir: &tpm_dir,
            log: &tpm_log,
        }),
    };
    let launched = match incoming {
        false => instance::launch(launch).await,
        true => instance::launch_incoming(launch).await,
    };
    let qemu = match launched {
        Ok(qemu) => qemu,
        Err(e) => {
            ctx.confiner.release(spec.uuid);
            return Err(VmError::Failed(error_chain(&e)));
        }
    };
    // The swtpm shares the VM's uid and cgroup: the confiner ends it
    // before it lets them go.
    if let Some(tpm) = &qemu.tpm {
        ctx.confiner.hold_tpm(spec.uuid, tpm.clone());
    }
    if let Err(e) = pin_vcpus(&qemu.qmp, qemu.process.pid(), spec).await {
        let _ = qemu.process.kill().await;
        instance::remove_run_dir(&qemu.paths);
        ctx.confiner.release(spec.uuid);
        return Err(e);
    }
    Ok(qemu)
}

/// The line vmlet writes into the serial log (as a line of its own) before
/// boot `n`. It ends in a random token the guest never sees (the line goes
/// into the log file, not to the guest), so a guest printing a line like
/// it cannot pass for a new boot (see [`SerialLog::record_boot`]).
pub fn boot_banner(n: u64, at: SystemTime) -> String {
    let token = Uuid::new_v4().simple().to_string();
    format!(
        "{}{n} started {} #{}",
        crate::console::serial::BOOT_BANNER_PREFIX,
        humantime::format_rfc3339_seconds(at),
        &token[..16]
    )
}

/// Pins QEMU's threads as the spec's `resources` say: each vCPU thread to
/// its `vcpu_affinity` entry (or `cpu_set`), every other thread to
/// `cpu_set`. QEMU itself may not: its seccomp filter denies
/// `sched_setaffinity`. The vCPU threads come from `query-cpus-fast`
/// (`cpu-index` → `thread-id`). Also run after a reattach.
pub(super) async fn pin_vcpus(qmp: &QmpClient, pid: i32, spec: &VmSpec) -> Result<(), VmError> {
    let r = &spec.resources;
    if r.cpu_set.is_none() && r.vcpu_affinity.is_none() {
        return Ok(());
    }
    let common = r
        .cpu_set
        .as_deref()
        .map(crate::spec::parse_cpu_list)
        .transpose()
        .map_err(|e| VmError::Failed(format!("resources.cpu_set: {e}")))?;
    let per_vcpu = r
        .vcpu_affinity
        .as_deref()
        .map(|lists| {
            lists
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    crate::spec::parse_cpu_list(l)
                        .map_err(|e| format!("resources.vcpu_affinity[{i}]: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
        .map_err(VmError::Failed)?;
    let answer = qmp
        .query_raw("query-cpus-fast", None, instance::STOP_COMMAND_DEADLINE)
        .await
        .map_err(|e| crate::vm::disk_ops::qmp_error("listing the vCPU threads", e))?;
    let vcpus: Vec<(usize, i32)> = answer
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let index = usize::try_from(c["cpu-index"].as_u64()?).ok()?;
            Some((index, i32::try_from(c["thread-id"].as_i64()?).ok()?))
        })
        .collect();
    if vcpus.len() != spec.vcpus as usize {
        return Err(VmError::Failed(format!(
            "QEMU named {} vCPU threads for {} vCPUs",
            vcpus.len(),
            spec.vcpus
        )));
    }
    let threads = crate::confine::affinity::threads(pid)
        .map_err(|e| VmError::Failed(format!("listing QEMU's threads: {e}")))?;
    let plan =
        crate::confine::affinity::plan(&threads, &vcpus, common.as_deref(), per_vcpu.as_deref());
    let required: Vec<i32> = vcpus.iter().map(|&(_, tid)| tid).collect();
    crate::confine::affinity::apply(pid, &plan, &required).map_err(|e| {
        let what = match (&r.cpu_set, &r.vcpu_affinity) {
            (Some(set), None) => format!("pinning QEMU's threads to {set}"),
            _ => "pinning QEMU's threads (resources.cpu_set, resources.vcpu_affinity)".to_owned(),
        };
        VmError::Failed(format!("{what}: {e}"))
    })
}
