//! The source side: `POST /v1/vms/{id}/migrate`. The VM is lent to the
//! migration (its task is `migrate`), the target prepared (its refusal is
//! the request's answer), then the rest runs as a task of its own: disks,
//! memory, the switch, and the target's word that it runs the guest.
//!
//! Why this file is long: it is one sequence, read top to bottom in the
//! order a migration runs; its pure pacing decisions live in `pace.rs`.

use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::pace::{raise_ceiling, Convergence, Limits, StallWatch};
use super::record::MigrationFile;
use super::streams::{self, QemuDir};
use super::{sleep_or_cancel, MigrationError, Migrations};
use crate::client::Client;
use crate::persist::timestamp;
use crate::qemu::migrate::{self as qmig, CopyMode};
use crate::qemu::qmp::QmpClient;
use crate::spec::{
    DiskProgress, DiskSource, MigrateRequest, Migration, Phase, Progress, Role, SEED_DISK,
};
use crate::vm::actor::{MigrationEnd, VmHandle};
use crate::vm::manager::{IncomingDisk, IncomingImage, IncomingRequest};

/// How long the target may take to prepare (disks, QEMU, exports).
const PREPARE_DEADLINE: Duration = Duration::from_secs(120);
/// How long a call to the target may take otherwise.
const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// How often the copies are polled.
const POLL: Duration = Duration::from_millis(200);
/// How long finishing the disk copies at the switch may take.
const FINISH_MIRRORS: Duration = Duration::from_secs(60);
/// One disk to copy.
#[derive(Debug, Clone)]
struct CopiedDisk {
    name: String,
    mode: CopyMode,
}

/// What the running source flow holds.
struct Run {
    id: Uuid,
    handle: VmHandle,
    qmp: QmpClient,
    dir: QemuDir,
    peer: Client,
    target_url: String,
    request: MigrateRequest,
    disks: Vec<CopiedDisk>,
    /// The byte-stream tasks (one per disk, one for the memory).
    joins: Vec<JoinHandle<()>>,
    started: Instant,
    /// The copies stopped moving: the streams are cut before rolling back
    /// (QEMU's cancel waits for requests in flight, which a frozen peer
    /// never answers).
    stalled: bool,
}

impl Migrations {
    /// Starts moving VM `key` to `request.target`. Refusals (the VM busy or
    /// not running, its disks or CPU not migratable, QEMU's blockers, the
    /// target's own refusal: unknown image, too little capacity, an
    /// incompatible CPU model) are this call's answer and leave nothing
    /// behind on either side; once the target is prepared it answers at
    /// once and the migration goes on by itself.
    pub async fn start(
        &self,
        key: &str,
        request: MigrateRequest,
    ) -> Result<Migration, MigrationError> {
        request.validate()?;
        let (handle, live) = self.manager().lend_for_migration(key, false).await?;
        let vm = handle.view();
        let qmp = live.qmp.clone().expect("lent VMs answer on QMP");
        let lent = Lent {
            migrations: self,
            handle: &handle,
            qmp: &qmp,
        };
        let blockers = qmig::blockers(&qmp).await.map_err(|e| {
            MigrationError::Failed(format!("asking QEMU for migration blockers: {e}"))
        });
        let blockers = match blockers {
            Ok(b) => b,
            Err(e) => return lent.refuse(e).await,
        };
        if !blockers.is_empty() {
            return lent
                .refuse(MigrationError::Conflict(format!(
                    "QEMU cannot migrate this VM: {}",
                    blockers.join("; ")
                )))
                .await;
        }
        // Mirrors copy the disks' current state only: internal snapshots
        // would be lost on the way, so they are refused, not dropped.
        match self.manager().snapshots(&vm.id.to_string()).await {
            Ok(snapshots) if !snapshots.is_empty() => {
                let names: Vec<&str> = snapshots.iter().map(|s| s.name.as_str()).collect();
                return lent
                    .refuse(MigrationError::Conflict(format!(
                        "the VM has snapshots ({}): live migration copies the disks' current state only, so they would be lost; delete them first",
                        names.join(", ")
                    )))
                    .await;
            }
            Ok(_) => {}
            Err(e) => {
                return lent
                    .refuse(MigrationError::Failed(format!(
                        "listing the VM's snapshots: {e}"
                    )))
                    .await
            }
        }
        let disks = match self.source_disks(&vm.spec, &qmp).await {
            Ok(d) => d,
            Err(e) => return lent.refuse(e).await,
        };
        let id = Uuid::new_v4();
        let migration = Migration {
            id,
            vm: vm.id,
            vm_name: vm.name.clone(),
            role: Role::Source,
            source: self.inner.node.clone(),
            target: request.target.url.trim_end_matches('/').to_string(),
            phase: Phase::Preparing,
            started_at: timestamp(SystemTime::now()),
            finished_at: None,
            max_downtime_ms: request.max_downtime_ms,
            max_bandwidth_mib_s: request.max_bandwidth_mib_s,
            progress: Progress::default(),
            downtime_ms: None,
            total_ms: None,
            error: None,
        };
        let peer = match self.peer(&request.target.url, &request.target.token) {
            Ok(peer) => peer,
            Err(e) => return lent.refuse(e).await,
        };
        let incoming = IncomingRequest {
            id,
            source: self.inner.node.clone(),
            qemu_version: self.manager().context().qemu.version.clone(),
            max_downtime_ms: request.max_downtime_ms,
            max_bandwidth_mib_s: request.max_bandwidth_mib_s,
            vm: vm.clone(),
            images: self.images_of(&vm.spec),
            disks: disks.iter().map(|(d, _)| d.clone()).collect(),
        };
        let prepared =
            match tokio::time::timeout(PREPARE_DEADLINE, peer.prepare_incoming(&incoming)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(MigrationError::from(e)),
                Err(_) => Err(MigrationError::Unreachable(format!(
                    "no answer to prepare within {PREPARE_DEADLINE:?}"
                ))),
            };
        if let Err(e) = prepared {
            // The target removes what it made of a refused prepare; a
            // timed-out one is told to stop.
            if matches!(e, MigrationError::Unreachable(_)) {
                let _ = tokio::time::timeout(CALL_DEADLINE, peer.cancel_migration(id)).await;
            }
            return lent.refuse(e).await;
        }
        let cancelled = match self.insert(MigrationFile {
            migration: migration.clone(),
            token: Some(request.target.token.clone()),
            vm: None,
            volumes: vec![],
            qemu: None,
        }) {
            Ok(c) => c,
            Err(e) => {
                let _ = tokio::time::timeout(CALL_DEADLINE, peer.cancel_migration(id)).await;
                return lent.refuse(e).await;
            }
        };
        tracing::info!(vm = %vm.name, %id, target = %migration.target, "migration started");
        let run = Run {
            id,
            handle: handle.clone(),
            qmp: qmp.clone(),
            dir: QemuDir::of(&live.paths, live.pid),
            peer,
            target_url: migration.target.clone(),
            request,
            disks: disks
                .into_iter()
                .map(|(d, mode)| CopiedDisk { name: d.name, mode })
                .collect(),
            joins: Vec::new(),
            started: Instant::now(),
            stalled: false,
        };
        let migrations = self.clone();
        tokio::spawn(async move { migrations.run_source(run, cancelled).await });
        Ok(migration)
    }

    /// The disks to copy, their sizes (from QEMU) and how: overlays only
    /// their own layer, blank disks and volumes whole. The cloud-init seed
    /// is not copied: the target writes its own from the spec.
    async fn source_disks(
        &self,
        spec: &crate::spec::VmSpec,
        qmp: &QmpClient,
    ) -> Result<Vec<(IncomingDisk, CopyMode)>, MigrationError> {
        let nodes = qmp
            .execute_raw(
                "query-named-block-nodes",
                Some(json!({"flat": true})),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| MigrationError::Failed(format!("listing the VM's disks: {e}")))?;
        let node_size = |name: &str| {
            nodes
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["node-name"] == name)
                .and_then(|n| n["image"]["virtual-size"].as_u64())
        };
        let mut disks = Vec::new();
        for (i, disk) in spec.disks.iter().enumerate() {
            let name = disk.name_or_default(i);
            if name == SEED_DISK {
                continue;
            }
            let mode = match disk.source() {
                Ok(DiskSource::Image { .. }) => CopyMode::Top,
                Ok(DiskSource::Blank { .. } | DiskSource::Volume { .. }) => CopyMode::Full,
                _ => {
                    return Err(MigrationError::Conflict(format!(
                        "disks[{i}] cannot be migrated"
                    )))
                }
            };
            let size = node_size(&name)
                .ok_or_else(|| MigrationError::Failed(format!("QEMU does not show disk {name}")))?;
            disks.push((
                IncomingDisk {
                    name,
                    virtual_size: size,
                },
                mode,
            ));
        }
        if spec.boot.firmware().is_uefi() {
            // The firmware's variables (boot entries, keys) move whole.
            let size = node_size(super::NVRAM_NODE).ok_or_else(|| {
                MigrationError::Failed("QEMU does not show the VM's NVRAM".into())
            })?;
            disks.push((
                IncomingDisk {
                    name: super::NVRAM_NODE.to_string(),
                    virtual_size: size,
                },
                CopyMode::Full,
            ));
        }
        Ok(disks)
    }

    /// The images `spec`'s overlays read, with their checksums.
    fn images_of(&self, spec: &crate::spec::VmSpec) -> Vec<IncomingImage> {
        let ctx = self.manager().context();
        spec.disks
            .iter()
            .filter_map(|d| match d.source() {
                Ok(DiskSource::Image { image, .. }) => Some(image.to_string()),
                _ => None,
            })
            .filter_map(|name| ctx.images.get(&name).ok())
            .map(|image| IncomingImage {
                name: image.name,
                sha256: image.sha256,
                source_sha256: image.source_sha256,
            })
            .collect()
    }

    async fn run_source(self, mut run: Run, mut cancelled: watch::Receiver<bool>) {
        let result = self.copy_and_switch(&mut run, &mut cancelled).await;
        match result {
            Ok(downtime) => self.hand_over(run, downtime).await,
            Err(e) => {
                let phase = if *cancelled.borrow() {
                    Phase::Cancelled
                } else {
                    Phase::Failed
                };
                let message = if phase == Phase::Cancelled {
                    "cancelled".to_string()
                } else {
                    e.to_string()
                };
                tracing::warn!(id = %run.id, error = %e, "migration failed before the switch: rolling back");
                if run.stalled {
                    for join in &run.joins {
                        join.abort();
                    }
                }
                roll_back(&run.qmp, &run.disks).await;
                for join in &run.joins {
                    join.abort();
                }
                self.remove_sockets(&run);
                let status = run_state(&run.qmp).await;
                if let Err(e) = self
                    .manager()
                    .settle_migration(&run.handle, MigrationEnd::Stayed { status })
                    .await
                {
                    tracing::error!(id = %run.id, error = %e, "could not settle the VM after a failed migration");
                }
                self.end(run.id, phase, message);
                // The guest runs here again whatever the target says: a
                // target that froze must not hold the VM busy here. It
                // also gives up by itself when the streams close.
                let (peer, id) = (run.peer.clone(), run.id);
                tokio::spawn(async move {
                    match tokio::time::timeout(CALL_DEADLINE, peer.cancel_migration(id)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::debug!(%id, error = %e, "could not tell the target the migration ended")
                        }
                        Err(_) => {
                            tracing::debug!(%id, "the target did not answer the cancel in time")
                        }
                    }
                });
            }
        }
    }

    /// Copies the disks, then the memory, up to the switch; returns the
    /// downtime QEMU measured. Any error leaves the rolling back to the
    /// caller.
    async fn copy_and_switch(
        &self,
        run: &mut Run,
        cancelled: &mut watch::Receiver<bool>,
    ) -> Result<Option<u64>, MigrationError> {
        let speed = run.request.max_bandwidth_mib_s.unwrap_or(0) * crate::storage::MIB;
        if !run.disks.is_empty() {
            self.set_phase(run.id, Phase::Mirroring);
        }
        for (index, disk) in run.disks.clone().iter().enumerate() {
            let remote = run.peer.disk_stream(run.id, &disk.name).await?;
            let socket = streams::disk_socket(index);
            let listener = run
                .dir
                .listen(&socket)
                .map_err(|e| MigrationError::Failed(format!("binding {socket}: {e}")))?;
            run.joins
                .push(spawn_join(run.id, listener, remote, disk.name.clone()));
            // What the guest's device reads: a disk's throttle filter; the
            // NVRAM's own node (the pflash device has no filter).
            let root = if disk.name == super::NVRAM_NODE {
                disk.name.clone()
            } else {
                crate::qemu::disk::throttle_node(&disk.name)
            };
            qmig::start_mirror(
                &run.qmp,
                &disk.name,
                &root,
                &run.dir.qemu_path(&socket),
                disk.mode,
                speed,
            )
            .await?;
        }
        let limits = Limits::of(&self.manager().context().settings.migration);
        // Disks first, until each copy is in step; then every guest write
        // waits for the target too, so they stay in step whatever it writes.
        let mut stall = StallWatch::new(limits.stall, run.started.elapsed());
        loop {
            let mirrors = self.poll_mirrors(run).await?;
            if mirrors.iter().all(|m| m.is_ready()) {
                break;
            }
            let moved = mirrors.iter().map(|m| m.done).sum();
            self.check_limits(run, &limits, &mut stall, moved, "copying the disks")?;
            if sleep_or_cancel(cancelled, POLL).await {
                return Err(MigrationError::Failed("cancelled".into()));
            }
        }
        for disk in &run.disks {
            qmig::write_blocking(&run.qmp, &disk.name).await?;
        }
        self.set_phase(run.id, Phase::Ram);
        let remote = run.peer.memory_stream(run.id).await?;
        let listener = run
            .dir
            .listen(streams::MEMORY_SOCKET)
            .map_err(|e| MigrationError::Failed(format!("binding the memory socket: {e}")))?;
        run.joins
            .push(spawn_join(run.id, listener, remote, "memory".into()));
        let mut downtime = run.request.max_downtime_ms;
        let bandwidth = run.request.max_bandwidth_mib_s.unwrap_or(0) * crate::storage::MIB;
        qmig::start(
            &run.qmp,
            &run.dir.qemu_path(streams::MEMORY_SOCKET),
            downtime,
            bandwidth,
        )
        .await?;
        let ram_started = Instant::now();
        let mut convergence = Convergence::new(downtime);
        let ceiling = raise_ceiling(run.request.max_downtime_ms);
        let mut stall = StallWatch::new(limits.stall, run.started.elapsed());
        loop {
            let ram = qmig::ram(&run.qmp).await?;
            let mirrors = self.poll_mirrors_with(run, &ram).await?;
            if ram.failed() {
                return Err(MigrationError::Failed(format!(
                    "QEMU's migration {}: {}",
                    ram.status,
                    ram.error.unwrap_or_default()
                )));
            }
            if ram.status == "pre-switchover" {
                break;
            }
            let moved = ram.transferred + mirrors.iter().map(|m| m.done).sum::<u64>();
            self.check_limits(run, &limits, &mut stall, moved, "copying the memory")?;
            if let Some(raised) =
                convergence.observe(ram_started.elapsed(), ram.passes, ram.remaining, ceiling)
            {
                downtime = raised;
                tracing::info!(id = %run.id, downtime_ms = downtime, "memory does not converge: raising the downtime limit");
                qmig::set_downtime(&run.qmp, downtime).await?;
            }
            if sleep_or_cancel(cancelled, POLL).await {
                return Err(MigrationError::Failed("cancelled".into()));
            }
        }
        // The vCPUs are paused: finish the disk copies (nothing is written
        // meanwhile), then let QEMU send the rest and complete.
        let names: Vec<String> = run.disks.iter().map(|d| d.name.clone()).collect();
        qmig::finish_mirrors(&run.qmp, &names, FINISH_MIRRORS).await?;
        if *cancelled.borrow() {
            return Err(MigrationError::Failed("cancelled".into()));
        }
        self.set_phase(run.id, Phase::Switchover);
        qmig::continue_switchover(&run.qmp).await?;
        // The target runs nothing before it is told (`hand_over`): a last
        // transfer that stops moving may still roll back (the deadline no
        // longer applies: the guest is paused, finishing is quickest).
        let no_deadline = Limits {
            deadline: None,
            ..limits
        };
        let mut stall = StallWatch::new(limits.stall, run.started.elapsed());
        loop {
            let ram = qmig::ram(&run.qmp).await?;
            match ram.status.as_str() {
                "completed" => return Ok(ram.downtime_ms),
                _ if ram.failed() => {
                    return Err(MigrationError::Failed(format!(
                        "QEMU's migration {} at the switch: {}",
                        ram.status,
                        ram.error.unwrap_or_default()
                    )))
                }
                _ => {
                    self.check_limits(
                        run,
                        &no_deadline,
                        &mut stall,
                        ram.transferred,
                        "at the switch",
                    )?;
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
            }
        }
    }

    /// Fails the migration when its copies stalled (`moved`, the bytes
    /// copied so far, unchanged for the stall timeout) or it ran past its
    /// deadline; `doing` says what it was doing.
    fn check_limits(
        &self,
        run: &mut Run,
        limits: &Limits,
        stall: &mut StallWatch,
        moved: u64,
        doing: &str,
    ) -> Result<(), MigrationError> {
        let now = run.started.elapsed();
        if let Some(still) = stall.observe(moved, now) {
            run.stalled = true;
            return Err(MigrationError::Failed(format!(
                "the migration stalled {doing}: nothing moved for {} s (stall_timeout_s), the target host or the network between the hosts does not take more",
                still.as_secs()
            )));
        }
        if let Some(deadline) = limits.deadline.filter(|d| now >= *d) {
            return Err(MigrationError::Failed(format!(
                "the migration did not reach its switch within {} s (deadline_s) while {doing}",
                deadline.as_secs()
            )));
        }
        Ok(())
    }

    async fn poll_mirrors(&self, run: &Run) -> Result<Vec<qmig::MirrorState>, MigrationError> {
        self.poll_mirrors_with(run, &qmig::RamState::default())
            .await
    }

    /// Reads the disk copies (failing on a failed one) and publishes the
    /// progress with the memory's `ram`.
    async fn poll_mirrors_with(
        &self,
        run: &Run,
        ram: &qmig::RamState,
    ) -> Result<Vec<qmig::MirrorState>, MigrationError> {
        let mirrors = qmig::mirrors(&run.qmp).await?;
        for disk in &run.disks {
            match mirrors.iter().find(|m| m.disk == disk.name) {
                None => {
                    return Err(MigrationError::Failed(format!(
                        "the copy of disk {} vanished",
                        disk.name
                    )))
                }
                Some(m) if m.status == "concluded" || m.error.is_some() => {
                    return Err(MigrationError::Failed(format!(
                        "copying disk {}: {}",
                        disk.name,
                        m.error.clone().unwrap_or_else(|| "ended early".into())
                    )))
                }
                Some(_) => {}
            }
        }
        self.progress(
            run.id,
            Progress {
                ram_total: ram.total,
                ram_remaining: ram.remaining,
                ram_transferred: ram.transferred,
                dirty_rate: ram.dirty_rate,
                disks: mirrors
                    .iter()
                    .map(|m| DiskProgress {
                        name: m.disk.clone(),
                        total: m.total,
                        done: m.done,
                    })
                    .collect(),
            },
        );
        Ok(mirrors)
    }

    /// After QEMU completed: the target runs the guest once it says so.
    /// Its refusal (it never ran the guest) rolls back here; no answer at
    /// all leaves the guest paused on both sides until one comes (a guest
    /// must never run twice), asked again and again.
    async fn hand_over(self, run: Run, downtime: Option<u64>) {
        self.remove_sockets(&run);
        let total = run.started.elapsed().as_millis() as u64;
        self.update(run.id, |f| {
            f.migration.downtime_ms = downtime;
            f.migration.total_ms = Some(total);
        });
        let mut wait = Duration::from_millis(200);
        loop {
            let measured = crate::spec::FinishRequest {
                downtime_ms: downtime,
                total_ms: Some(total),
            };
            match tokio::time::timeout(CALL_DEADLINE, run.peer.finish_incoming(run.id, &measured))
                .await
            {
                Ok(Ok(_)) => break,
                Ok(Err(crate::client::ClientError::Api {
                    status, message, ..
                })) if status == 404 || status == 409 => {
                    tracing::warn!(id = %run.id, %message, "the target refused the switch: the guest stays here");
                    let _ = qmig::cancel(&run.qmp).await;
                    let resumed = run
                        .qmp
                        .execute(qapi::qmp::cont {})
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string());
                    let status = run_state(&run.qmp).await;
                    let _ = self
                        .manager()
                        .settle_migration(&run.handle, MigrationEnd::Stayed { status })
                        .await;
                    let note = match resumed {
                        Ok(()) => String::new(),
                        Err(e) => format!(" (resuming it here failed: {e})"),
                    };
                    self.end(
                        run.id,
                        Phase::Failed,
                        format!("the target refused the switch: {message}{note}"),
                    );
                    return;
                }
                Ok(Err(e)) => self.note_waiting(run.id, &e.to_string()),
                Err(_) => self.note_waiting(run.id, "no answer"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
        // Gone from here first: a client that sees `completed` no longer
        // finds the VM on this host.
        if let Err(e) = self
            .manager()
            .settle_migration(
                &run.handle,
                MigrationEnd::Moved {
                    target: run.target_url.clone(),
                },
            )
            .await
        {
            tracing::error!(id = %run.id, error = %e, "could not remove the VM after it moved");
        }
        self.update(run.id, |f| {
            f.migration.phase = Phase::Completed;
            f.migration.error = None;
        });
        tracing::info!(id = %run.id, target = %run.target_url, ?downtime, total_ms = total, "migration completed");
        self.prune();
    }

    pub(super) fn note_waiting(&self, id: Uuid, why: &str) {
        tracing::warn!(%id, %why, "the target did not confirm the switch yet; the guest stays paused");
        self.update(id, |f| {
            f.migration.error = Some(format!(
                "waiting for the target to confirm the switch (the guest is paused): {why}"
            ))
        });
    }

    fn remove_sockets(&self, run: &Run) {
        run.dir.remove(streams::MEMORY_SOCKET);
        for index in 0..run.disks.len() {
            run.dir.remove(&streams::disk_socket(index));
        }
    }
}

/// Undoes a migration before the switch on the source QEMU: stops the
/// memory copy and the disk copies, removes the NBD nodes, and lets the
/// guest run again if the migration paused it.
pub(super) async fn roll_back(qmp: &QmpClient, disks: &[impl AsRef<str>]) {
    qmig::cancel(qmp).await;
    let _ = qmig::settle(qmp, Duration::from_secs(30)).await;
    let names: Vec<String> = disks.iter().map(|d| d.as_ref().to_string()).collect();
    qmig::abandon_mirrors(qmp, &names).await;
    if let Some(state) = run_state(qmp).await {
        use qapi::qmp::RunState as S;
        if matches!(state, S::paused | S::finish_migrate | S::postmigrate) {
            if let Err(e) = qmp.execute(qapi::qmp::cont {}).await {
                tracing::warn!(error = %e, "could not resume the guest after rolling back");
            }
        }
    }
}

impl AsRef<str> for CopiedDisk {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

/// QEMU's run state, when it answers.
pub(super) async fn run_state(qmp: &QmpClient) -> Option<qapi::qmp::RunState> {
    qmp.execute_with_deadline(qapi::qmp::query_status {}, Duration::from_secs(5))
        .await
        .ok()
        .map(|s| s.status)
}

/// Joins QEMU's connection on `listener` to `remote` in a task of its own.
fn spawn_join(
    id: Uuid,
    listener: tokio::net::UnixListener,
    remote: crate::client::Upgraded,
    what: String,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        match streams::accept_and_join(listener, remote).await {
            Ok((sent, received)) => {
                tracing::debug!(%id, stream = %what, sent, received, "migration stream ended")
            }
            Err(e) => tracing::debug!(%id, stream = %what, error = %e, "migration stream broke"),
        }
    })
}

/// The VM, lent to a migration that is refused before it began: given
/// back untouched.
struct Lent<'a> {
    migrations: &'a Migrations,
    handle: &'a VmHandle,
    qmp: &'a QmpClient,
}

impl Lent<'_> {
    async fn refuse<T>(self, e: MigrationError) -> Result<T, MigrationError> {
        let status = run_state(self.qmp).await;
        if let Err(settle) = self
            .migrations
            .manager()
            .settle_migration(self.handle, MigrationEnd::Stayed { status })
            .await
        {
            tracing::error!(error = %settle, "could not give the VM back after a refused migration");
        }
        Err(e)
    }
}
