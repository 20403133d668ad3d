//! The device and snapshot operations of a VM's actor: attach, detach,
//! throttle and grow disks, attach and detach NICs (a [`Change`]), and
//! take, revert to and delete snapshots. Each arrives as a [`Command`]
//! (through [`VmHandle::command`]), is decided by the state table, checked
//! against the VM's spec, and runs as the actor's operation: live over QMP
//! while QEMU runs, on the files while it does not.

use crate::spec::{
    validate_disk, validate_limits, validate_name, DiskBus, DiskSource, DiskSpec, IoLimits,
    NicSpec, SpecError, VmSpec,
};
use crate::vm::disk_ops::{self, SnapshotKind};
use crate::vm::launch;
use crate::vm::nic_ops;
use crate::vm::state::Observation;

use super::{error_chain, Actor, InFlight, OpResult, Reply, VmError};

/// A change to a VM's disks or snapshots, run by its actor as a task: live
/// over QMP while QEMU runs, on the files while it does not.
#[derive(Debug, Clone)]
pub enum Change {
    /// Add a disk (a volume): hot-plug, or just the spec when stopped.
    AttachDisk(DiskSpec),
    /// Remove a disk (a volume or host file): unplug, or just the spec.
    DetachDisk(String),
    /// Change a disk's I/O limits.
    SetLimits {
        /// The disk.
        disk: String,
        /// The new limits (replacing the old ones).
        limits: IoLimits,
    },
    /// Grow a disk to `size` bytes (the caller checked it grows).
    ResizeDisk {
        /// The disk.
        disk: String,
        /// New size in bytes.
        size: u64,
    },
    /// Add a NIC (its `mac` set): hot-plug, or just the spec when stopped.
    AttachNic(NicSpec),
    /// Remove the NIC with this MAC or index: unplug, or just the spec.
    DetachNic(String),
}

/// The storage work an actor runs: a change of devices or a snapshot.
// Built and consumed within one call, never stored: its size is no cost.
#[allow(clippy::large_enum_variant)]
pub(super) enum Work {
    Change(Change),
    Snapshot { kind: SnapshotKind, name: String },
}

impl Actor {
    /// Starts `work` as the VM's operation `task` (the state table let it
    /// run), or answers `reply` at once when the VM refuses it.
    pub(super) fn run_storage(
        &mut self,
        task: crate::vm::state::Task,
        work: Work,
        reply: Option<Reply>,
    ) {
        match self.begin_storage(work) {
            Ok(()) => {
                self.op = Some(InFlight {
                    task,
                    waiters: reply.into_iter().collect(),
                });
                self.commit(|vm| vm.task = Some(task));
            }
            Err(e) => self.reply(reply, Err(e)),
        }
    }

    /// Checks a storage operation against the VM and spawns it.
    fn begin_storage(&mut self, work: Work) -> Result<(), VmError> {
        let ctx = self.ctx.clone();
        let profile = ctx
            .profiles
            .get(&self.vm.spec.profile)
            .map_err(|e| VmError::Failed(error_chain(&e)))?
            .clone();
        // Live when QEMU runs (decide() let only running, paused, stopped
        // and crashed VMs through).
        let qmp = match &self.runtime {
            Some(rt) if self.vm.state.has_process() => Some(
                rt.qmp
                    .clone()
                    .ok_or_else(|| VmError::Failed("no QMP link to this QEMU".into()))?,
            ),
            _ => None,
        };
        let live = qmp.is_some();
        let no_hotplug = || {
            VmError::Refused(format!(
                "profile {} does not support hot-plug: stop the VM to change its devices",
                profile.name
            ))
        };
        // Name every disk, so that removing one never renames the others.
        let mut spec = self.vm.spec.clone();
        for (i, disk) in spec.disks.iter_mut().enumerate() {
            disk.name = Some(disk.name_or_default(i));
        }
        let uuid = spec.uuid;
        let find = |spec: &VmSpec, name: &str| {
            spec.disks
                .iter()
                .position(|d| d.name.as_deref() == Some(name))
                .ok_or_else(|| VmError::NotFound(format!("VM {} has no disk {name}", spec.name)))
        };
        let layout = ctx.layout.clone();
        match work {
            Work::Change(Change::AttachDisk(mut disk)) => {
                validate_disk(&disk)?;
                if !matches!(disk.source(), Ok(DiskSource::Volume { .. })) {
                    return Err(VmError::Invalid(SpecError::field(
                        "volume",
                        "a disk is attached from a volume (POST /v1/volumes makes one)",
                    )));
                }
                if live && !profile.supports.hotplug {
                    return Err(no_hotplug());
                }
                // The controller is added at start only when a disk uses
                // SCSI (a VM that started with one and had them all
                // unplugged is refused too: the spec cannot tell).
                let scsi = |d: &DiskSpec| d.bus == DiskBus::VirtioScsi;
                if live && scsi(&disk) && !self.vm.spec.disks.iter().any(scsi) {
                    return Err(VmError::Refused(
                        "the VM has no SCSI controller (one is added at start when a disk uses virtio_scsi): attach with bus virtio_blk, or stop the VM".into(),
                    ));
                }
                let index = spec.disks.len();
                disk.name = Some(disk.name_or_default(index));
                spec.disks.push(disk.clone());
                spec.validate(|name| ctx.profiles.caps(name))?;
                let plan = launch::disk_plan(&layout, uuid, index, &disk);
                let live = qmp.map(|qmp| async move {
                    disk_ops::attach(&qmp, &profile, &plan, &ctx.host_roots).await
                });
                self.spawn_spec_change(spec, live);
            }
            Work::Change(Change::DetachDisk(name)) => {
                let index = find(&spec, &name)?;
                if spec.disks[index].owned_by_vm() {
                    return Err(VmError::Refused(format!(
                        "disk {name} was made for this VM (from an image or blank) and goes with it; only volumes and host files are detached"
                    )));
                }
                if live && !profile.supports.hotplug {
                    return Err(no_hotplug());
                }
                let plan = launch::disk_plan(&layout, uuid, index, &spec.disks[index]);
                spec.disks.remove(index);
                let live = qmp.map(|qmp| async move { disk_ops::detach(&qmp, &plan).await });
                self.spawn_spec_change(spec, live);
            }
            Work::Change(Change::SetLimits { disk, limits }) => {
                validate_limits(&limits)?;
                let index = find(&spec, &disk)?;
                spec.disks[index].limits = limits;
                let plan = launch::disk_plan(&layout, uuid, index, &spec.disks[index]);
                let live =
                    qmp.map(|qmp| async move { disk_ops::set_limits(&qmp, &plan, &limits).await });
                self.spawn_spec_change(spec, live);
            }
            Work::Change(Change::ResizeDisk { disk, size }) => {
                let index = find(&spec, &disk)?;
                let plan = launch::disk_plan(&layout, uuid, index, &spec.disks[index]);
                self.spawn_op(async move {
                    let result = match &qmp {
                        Some(qmp) => disk_ops::resize(qmp, &plan, size).await,
                        None => ctx
                            .qemu_img
                            .resize(&plan.file, size)
                            .await
                            .map_err(VmError::from),
                    };
                    OpResult::Storage {
                        result: result.map(|()| None),
                        status: None,
                    }
                });
            }
            Work::Change(Change::AttachNic(nic)) => {
                if live && !profile.supports.hotplug {
                    return Err(no_hotplug());
                }
                spec.nics.push(nic.clone());
                spec.validate(|name| ctx.profiles.caps(name))?;
                let live = qmp.map(|qmp| async move {
                    nic_ops::attach(&qmp, &profile, &ctx.networks, &nic).await
                });
                self.spawn_spec_change(spec, live);
            }
            Work::Change(Change::DetachNic(key)) => {
                let index = spec
                    .nics
                    .iter()
                    .position(|n| {
                        n.mac
                            .as_deref()
                            .is_some_and(|m| m.eq_ignore_ascii_case(&key))
                    })
                    .or_else(|| key.parse::<usize>().ok().filter(|i| *i < spec.nics.len()))
                    .ok_or_else(|| {
                        VmError::NotFound(format!("VM {} has no NIC {key}", spec.name))
                    })?;
                if live && !profile.supports.hotplug {
                    return Err(no_hotplug());
                }
                let nic = spec.nics.remove(index);
                let live = qmp.map(|qmp| async move { nic_ops::detach(&qmp, &nic).await });
                self.spawn_spec_change(spec, live);
            }
            Work::Snapshot { kind, name } => {
                validate_name("name", &name)?;
                let mut plans = launch::disk_plans(&layout, uuid, &spec.disks, false);
                disk_ops::snapshot_disks(&plans)?;
                if spec.boot.firmware().is_uefi() {
                    // The firmware's variables go back with the disks. Last,
                    // so a disk holds the memory state and the listing.
                    plans.push(launch::nvram_plan(&layout, uuid));
                }
                let agent = self.runtime.as_ref().and_then(|rt| rt.agent.clone());
                let vm_dir = ctx.store.vm_dir(uuid);
                self.spawn_op(async move {
                    let result = async {
                        let disks = disk_ops::snapshot_disks(&plans)?;
                        let existing =
                            disk_ops::list_snapshots(&ctx.qemu_img, &plans, &ctx.host_roots)
                                .await?;
                        let exists = existing.iter().any(|s| s.name == name);
                        match kind {
                            SnapshotKind::Create if exists => {
                                return Err(VmError::Conflict(format!(
                                    "snapshot {name} already exists"
                                )))
                            }
                            SnapshotKind::Revert | SnapshotKind::Delete if !exists => {
                                return Err(VmError::NotFound(format!("no snapshot {name}")))
                            }
                            _ => {}
                        }
                        match &qmp {
                            Some(qmp) => {
                                // Only a new snapshot is worth freezing for.
                                let agent = agent.filter(|_| kind == SnapshotKind::Create);
                                let quiesced = quiesced_snapshot(agent.as_deref(), async {
                                    disk_ops::snapshot_live(qmp, kind, &name, &disks).await
                                })
                                .await?;
                                record_quiesced(&vm_dir, kind, &name, quiesced);
                                let status = qmp
                                    .execute(qapi::qmp::query_status {})
                                    .await
                                    .map_err(|e| VmError::Failed(error_chain(&e)))?;
                                Ok(Some(status.status))
                            }
                            None => {
                                disk_ops::snapshot_offline(
                                    &ctx.qemu_img,
                                    kind,
                                    &name,
                                    &disks,
                                    &ctx.host_roots,
                                )
                                .await?;
                                record_quiesced(&vm_dir, kind, &name, false);
                                Ok(None)
                            }
                        }
                    }
                    .await;
                    match result {
                        Ok(status) => OpResult::Storage {
                            result: Ok(None),
                            status,
                        },
                        Err(e) => OpResult::Storage {
                            result: Err(e),
                            status: None,
                        },
                    }
                });
            }
        }
        Ok(())
    }

    /// Spawns a change of the VM's spec: runs `live` first (the QMP side,
    /// when QEMU runs), then the spec is committed if that worked.
    fn spawn_spec_change<F>(&self, spec: VmSpec, live: Option<F>)
    where
        F: std::future::Future<Output = Result<(), VmError>> + Send + 'static,
    {
        self.spawn_op(async move {
            let result = match live {
                Some(change) => change.await,
                None => Ok(()),
            };
            OpResult::Storage {
                result: result.map(|()| Some(Box::new(spec))),
                status: None,
            }
        });
    }

    /// Settles a storage operation: the new spec when it changed, the
    /// vCPUs' state when QEMU reported it, then the waiting replies.
    pub(super) fn on_storage_done(
        &mut self,
        result: Result<Option<Box<VmSpec>>, VmError>,
        status: Option<qapi::qmp::RunState>,
    ) {
        if let Ok(Some(spec)) = &result {
            let spec = VmSpec::clone(spec);
            self.commit(|vm| vm.spec = spec);
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
        self.finish_op(result.map(drop));
    }
}

/// Deadline of each of the guest agent's freeze and thaw.
const FREEZE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// Deadline of the handshake that tells whether an agent answers at all: a
/// guest without one delays its snapshots by this much only.
const AGENT_PING_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `snapshot` with the guest's filesystems frozen by `agent` when it
/// answers: whether they were (the snapshot is quiesced). Whenever a freeze
/// was asked for, a thaw follows, whatever the freeze or the snapshot gave:
/// an agent that froze after vmlet stopped waiting must not leave the
/// guest frozen.
async fn quiesced_snapshot<F>(
    agent: Option<&crate::qemu::agent::GuestAgent>,
    snapshot: F,
) -> Result<bool, VmError>
where
    F: std::future::Future<Output = Result<(), VmError>>,
{
    let Some(agent) = agent else {
        return snapshot.await.map(|()| false);
    };
    if let Err(e) = agent.ping(AGENT_PING_DEADLINE).await {
        tracing::info!(error = %error_chain(&e), "no guest agent answers: snapshot without freezing");
        return snapshot.await.map(|()| false);
    }
    let frozen = match agent.freeze(FREEZE_DEADLINE).await {
        Ok(count) => {
            tracing::info!(
                filesystems = count,
                "guest filesystems frozen for a snapshot"
            );
            true
        }
        Err(e) => {
            tracing::info!(error = %error_chain(&e), "snapshot without freezing the guest's filesystems");
            false
        }
    };
    let result = snapshot.await;
    let thawed = match agent.thaw(FREEZE_DEADLINE).await {
        Ok(_) => true,
        Err(e) => {
            // Not frozen (the freeze failed) is the usual reason.
            if frozen {
                tracing::warn!(error = %error_chain(&e), "thawing the guest's filesystems failed");
            }
            false
        }
    };
    result.map(|()| frozen && thawed)
}

/// Keeps the record of quiesced snapshots in step: a new one is noted
/// when it was quiesced, a deleted one forgotten. A failure to write it
/// only loses the mark (the snapshot is there): logged.
fn record_quiesced(vm_dir: &std::path::Path, kind: SnapshotKind, name: &str, quiesced: bool) {
    let mark = match kind {
        SnapshotKind::Create => Some(quiesced),
        SnapshotKind::Delete => None,
        SnapshotKind::Revert => return,
    };
    if let Err(e) = disk_ops::mark_quiesced(vm_dir, name, mark) {
        tracing::warn!(snapshot = name, error = %e, "could not record whether the snapshot is quiesced");
    }
}
