//! Changing a VM's spec (`PATCH /v1/vms/{id}`): a stopped VM takes the new
//! spec at once; a running one takes what QEMU can take live (memory down
//! to its boot size through the balloon, disk I/O limits, disks and NICs
//! plugged in or out, `autostart`) and keeps the rest as its pending spec,
//! which becomes its spec at the next start.

use std::time::Duration;

use serde_json::json;

use crate::qemu::qmp::QmpClient;
use crate::spec::{name_disks, split, LiveCaps, LiveChange, VmSpec};
use crate::storage::MIB;
use crate::vm::disk_ops;
use crate::vm::launch;
use crate::vm::nic_ops;
use crate::vm::record::Pending;
use crate::vm::state::Task;

use super::{error_chain, Actor, InFlight, OpResult, Reply, VmError};

/// How long one QMP command of an edit may take.
const QMP_DEADLINE: Duration = Duration::from_secs(10);

/// A spec change for the actor: the new spec, and what the caller based
/// it on, so a change made meanwhile is never overwritten unseen.
#[derive(Debug, Clone)]
pub struct Edit {
    /// The whole new spec (validated, MACs settled).
    pub spec: VmSpec,
    /// The spec the patch was applied to (the pending spec, else the spec).
    pub base: VmSpec,
    /// The generation the caller read (`If-Match`), if it gave one.
    pub generation: Option<u64>,
}

/// How an edit of a running VM ended.
pub(super) struct EditDone {
    /// The spec QEMU now runs (whatever was applied live, even when a
    /// later step failed).
    applied: VmSpec,
    /// What waits for the next start.
    pending: Option<Pending>,
    result: Result<(), VmError>,
}

impl Actor {
    /// Runs `edit` as the VM's operation `task` (the state table let it).
    pub(super) fn run_edit(&mut self, task: Task, edit: Edit, reply: Option<Reply>) {
        if let Some(generation) = edit.generation {
            if generation != self.vm.generation {
                let e = VmError::StaleGeneration(format!(
                    "VM {} is at generation {}, not {generation}: read it again and retry",
                    self.vm.name, self.vm.generation
                ));
                return self.reply(reply, Err(e));
            }
        }
        let current = self.vm.pending.as_ref().map_or(&self.vm.spec, |p| &p.spec);
        if *current != edit.base {
            let e = VmError::Conflict(format!(
                "VM {}'s spec changed while this change was checked; retry",
                self.vm.name
            ));
            return self.reply(reply, Err(e));
        }
        let mut wanted = edit.spec;
        name_disks(&mut wanted);
        let qmp = match &self.runtime {
            Some(rt) if self.vm.state.has_process() => rt.qmp.clone(),
            _ => None,
        };
        let Some(qmp) = qmp else {
            // No QEMU: the spec is simply replaced.
            self.commit(|vm| {
                // Naming the disks alone is no change (and no generation).
                let mut named = vm.spec.clone();
                name_disks(&mut named);
                if named != wanted {
                    if wanted.profile != vm.spec.profile {
                        // Another profile is another machine: the next
                        // start pins the VM anew.
                        vm.machine = None;
                    }
                    vm.spec = wanted;
                }
                vm.pending = None;
            });
            return self.reply(reply, Ok(()));
        };
        let profile = match self.ctx.profiles.get(&self.vm.spec.profile) {
            Ok(p) => p.clone(),
            Err(e) => return self.reply(reply, Err(VmError::Failed(error_chain(&e)))),
        };
        let mut running = self.vm.spec.clone();
        name_disks(&mut running);
        let ctx = self.ctx.clone();
        self.op = Some(InFlight {
            task,
            waiters: reply.into_iter().collect(),
        });
        self.commit(|vm| vm.task = Some(task));
        self.spawn_op(async move {
            let boot_memory_mib = match boot_memory_mib(&qmp).await {
                Ok(mib) => mib,
                Err(e) => {
                    return OpResult::Edit(Box::new(EditDone {
                        applied: running,
                        pending: None,
                        result: Err(e),
                    }))
                }
            };
            let caps = LiveCaps {
                boot_memory_mib,
                balloon: profile.defaults.balloon,
                hotplug: profile.supports.hotplug,
            };
            let plan = split(&running, &wanted, caps);
            let pending = (!plan.pending.is_empty()).then(|| Pending {
                spec: wanted.clone(),
                fields: plan.pending.clone(),
            });
            let mut applied = running;
            for change in plan.live {
                let uuid = applied.uuid;
                let step = async {
                    match &change {
                        LiveChange::Memory(mib) => balloon(&qmp, *mib).await,
                        LiveChange::Limits { disk, limits } => {
                            let (index, spec) = find_disk(&applied, disk)?;
                            let plan = launch::disk_plan(&ctx.layout, uuid, index, spec);
                            disk_ops::set_limits(&qmp, &plan, limits).await
                        }
                        LiveChange::DetachDisk(disk) => {
                            let (index, spec) = find_disk(&applied, disk)?;
                            let plan = launch::disk_plan(&ctx.layout, uuid, index, spec);
                            disk_ops::detach(&qmp, &plan).await
                        }
                        LiveChange::AttachDisk(disk) => {
                            let index = applied.disks.len();
                            let plan = launch::disk_plan(&ctx.layout, uuid, index, disk);
                            disk_ops::attach(&qmp, &profile, &plan, &ctx.host_roots).await
                        }
                        LiveChange::DetachNic(mac) => {
                            let nic = applied
                                .nics
                                .iter()
                                .find(|n| n.mac.as_deref() == Some(mac.as_str()))
                                .ok_or_else(|| VmError::NotFound(format!("no NIC {mac}")))?;
                            nic_ops::detach(&qmp, nic).await
                        }
                        LiveChange::AttachNic(nic) => {
                            nic_ops::attach(&qmp, &profile, &ctx.networks, nic).await
                        }
                        LiveChange::Record { .. } => Ok(()),
                    }
                }
                .await;
                if let Err(e) = step {
                    // What was applied stays applied; nothing is left
                    // pending that the caller did not see succeed.
                    return OpResult::Edit(Box::new(EditDone {
                        applied,
                        pending: None,
                        result: Err(e.during("changing the running VM")),
                    }));
                }
                change.apply(&mut applied);
            }
            OpResult::Edit(Box::new(EditDone {
                applied,
                pending,
                result: Ok(()),
            }))
        });
    }

    /// Settles an edit of a running VM: its spec is what QEMU took, its
    /// pending spec what waits.
    pub(super) fn on_edit_done(&mut self, done: EditDone) {
        let EditDone {
            applied,
            pending,
            result,
        } = done;
        let failed = result.is_err();
        self.commit(|vm| {
            vm.spec = applied;
            // A failed edit keeps an earlier pending spec (the caller
            // retries); a finished one replaces it.
            if !failed {
                vm.pending = pending;
            }
        });
        self.finish_op(result);
    }
}

fn find_disk<'a>(
    spec: &'a VmSpec,
    name: &str,
) -> Result<(usize, &'a crate::spec::DiskSpec), VmError> {
    spec.disks
        .iter()
        .enumerate()
        .find(|(_, d)| d.name.as_deref() == Some(name))
        .ok_or_else(|| VmError::NotFound(format!("VM {} has no disk {name}", spec.name)))
}

/// The memory QEMU booted with (`query-memory-size-summary`
/// `base-memory`): the balloon cannot give the guest more.
async fn boot_memory_mib(qmp: &QmpClient) -> Result<u64, VmError> {
    let summary = qmp
        .execute_raw("query-memory-size-summary", None, QMP_DEADLINE)
        .await
        .map_err(|e| VmError::Failed(error_chain(&e)))?;
    summary
        .get("base-memory")
        .and_then(serde_json::Value::as_u64)
        .map(|bytes| bytes / MIB)
        .ok_or_else(|| VmError::Failed(format!("query-memory-size-summary answered {summary}")))
}

/// Sets the balloon's target: the guest keeps `mib` MiB.
async fn balloon(qmp: &QmpClient, mib: u64) -> Result<(), VmError> {
    qmp.execute_raw("balloon", Some(json!({ "value": mib * MIB })), QMP_DEADLINE)
        .await
        .map(drop)
        .map_err(|e| VmError::Failed(format!("balloon to {mib} MiB: {}", error_chain(&e))))
}
