//! The actor's side of a live migration. The migration itself (the target
//! daemon, the disk and memory copies) runs in `migration/`, outside the
//! actor: it takes the VM with [`MigrationStep::Begin`] (the VM's task is
//! `migrate` meanwhile, so every other action gets 409), drives the VM's
//! QEMU through the QMP link the actor lends out ([`Live`]), and settles it
//! with [`MigrationStep::End`]: the VM stayed (rolled back) or moved away,
//! when the actor removes what is left here and ends.

use super::*;

/// A step of a live migration, as the migration flow tells the actor.
#[derive(Debug, Clone)]
pub enum MigrationStep {
    /// Take the running VM for a migration.
    Begin,
    /// The migration is over.
    End(MigrationEnd),
}

/// How a migration ended, for the VM on this host.
#[derive(Debug, Clone)]
pub enum MigrationEnd {
    /// The VM stays here (the migration failed or was cancelled before the
    /// switch, and the guest runs here as before). `status`: QEMU's run
    /// state after the roll-back, when it could be read.
    Stayed {
        /// QEMU's run state.
        status: Option<qapi::qmp::RunState>,
    },
    /// The VM runs on `target` now: stop this QEMU, remove the VM here.
    Moved {
        /// Where it went (the target daemon's URL).
        target: String,
    },
}

impl Actor {
    pub(super) fn begin_migration(&mut self, task: Task, reply: Option<Reply>) {
        self.op = Some(InFlight {
            task,
            waiters: Vec::new(),
        });
        self.commit(|vm| vm.task = Some(task));
        self.reply(reply, Ok(()));
    }

    pub(super) fn end_migration(&mut self, end: MigrationEnd, reply: Option<Reply>) {
        if self.op.as_ref().map(|op| op.task) != Some(Task::Migrate) {
            self.reply(
                reply,
                Err(VmError::Refused(format!(
                    "VM {} is not being migrated",
                    self.vm.name
                ))),
            );
            return;
        }
        match end {
            MigrationEnd::Stayed { status } => {
                match status {
                    Some(qapi::qmp::RunState::running) => {
                        self.observe(Observation::VcpusResumed);
                    }
                    Some(_) => {
                        self.observe(Observation::VcpusStopped);
                    }
                    None => {}
                }
                self.reply(reply, Ok(()));
                self.finish_op(Ok(()));
            }
            MigrationEnd::Moved { target } => {
                if let Some(op) = &mut self.op {
                    // Internally a removal: the QEMU's exit that follows is
                    // expected, not a crash (the VM still shows `migrate`).
                    op.task = Task::Delete;
                    op.waiters.extend(reply);
                }
                let ctx = self.ctx.clone();
                let id = self.vm.id;
                let process = self.runtime.as_ref().map(|rt| rt.process.clone());
                let paths = RunPaths::new(&ctx.settings.run_dir, id);
                self.spawn_op(async move {
                    if let Some(process) = &process {
                        if let Err(e) =
                            instance::stop_process(process, None, None, StopMode::Force).await
                        {
                            return OpResult::MovedAway {
                                target,
                                result: Err(VmError::Failed(error_chain(&e))),
                            };
                        }
                    }
                    instance::remove_run_dir(&paths);
                    ctx.confiner.release(id);
                    OpResult::MovedAway {
                        target,
                        result: ctx.store.remove(id).map_err(VmError::from),
                    }
                });
            }
        }
    }

    /// The VM's QEMU here is gone after it moved: the actor ends. A record
    /// that could not be removed is logged; the VM is gone from this host
    /// either way (it runs on the target).
    pub(super) fn on_moved_away(&mut self, target: String, result: Result<(), VmError>) {
        self.teardown();
        if let Err(e) = result {
            tracing::error!(vm = %self.vm.name, error = %e, "could not remove the migrated VM's files");
        }
        tracing::info!(vm = %self.vm.name, id = %self.vm.id, %target, "migrated away");
        self.ctx.publish_migrated(&self.vm, &target);
        let waiters = self.op.take().map(|op| op.waiters).unwrap_or_default();
        self.vm.task = None;
        for w in waiters {
            let _ = w.send(Ok(self.vm.clone()));
        }
    }
}
