//! The target side, driven by the source daemon through this daemon's API:
//! prepare (checks, place, disks, a QEMU waiting for the memory, NBD
//! exports), the byte streams, and finish (the VM becomes this host's and
//! runs). Until finish, a failure or a cancel removes everything the
//! migration made here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use uuid::Uuid;

use super::record::MigrationFile;
use super::streams::{self, QemuDir};
use super::{MigrationError, Migrations};
use crate::console::serial::{SerialHub, BOOT_BANNER_PREFIX};
use crate::persist::timestamp;
use crate::qemu::instance::QemuInstance;
use crate::qemu::migrate as qmig;
use crate::spec::{DiskProgress, FinishRequest, Migration, Phase, Progress, Role, SEED_DISK};
use crate::vm::manager::IncomingRequest;
use crate::vm::state::PowerAction;
use crate::vm::Vm;

/// How long the memory may take to be complete once the source says so.
const COMPLETE_DEADLINE: Duration = Duration::from_secs(30);
/// How long QEMU gets to bind its sockets when told to.
const SOCKET_DEADLINE: Duration = Duration::from_secs(10);

/// What an arriving VM holds here until it arrived or was abandoned.
#[derive(Debug)]
pub(super) struct Arriving {
    vm: Vm,
    qemu: Option<QemuInstance>,
    serial: Option<Arc<SerialHub>>,
    volumes: Vec<String>,
    /// The exported disks.
    disks: Vec<String>,
    dir: QemuDir,
    memory_started: bool,
    /// Adopted or abandoned: nothing more to do.
    done: bool,
    /// Stops the watch on the arriving QEMU.
    stop_watch: watch::Sender<bool>,
    /// Bytes received: the memory, and each disk's stream.
    received: Arc<Received>,
}

/// What the streams of an arriving VM carried so far, for its progress.
#[derive(Debug, Default)]
struct Received {
    memory: Arc<AtomicU64>,
    disks: std::sync::Mutex<Vec<(String, Arc<AtomicU64>)>>,
}

impl Received {
    fn disk(&self, name: &str) -> Arc<AtomicU64> {
        let mut disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, count)) = disks.iter().find(|(n, _)| n == name) {
            return count.clone();
        }
        let count = Arc::new(AtomicU64::new(0));
        disks.push((name.to_string(), count.clone()));
        count
    }

    /// The progress as this side sees it: bytes that arrived (a disk's
    /// total is its size; the memory's the guest's).
    fn progress(&self, memory_total: u64, sizes: &[(String, u64)]) -> Progress {
        let memory = self.memory.load(Ordering::Relaxed);
        let disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        Progress {
            ram_total: memory_total,
            ram_remaining: memory_total.saturating_sub(memory),
            ram_transferred: memory,
            dirty_rate: 0,
            disks: sizes
                .iter()
                .map(|(name, size)| DiskProgress {
                    name: name.clone(),
                    total: *size,
                    done: disks
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(0, |(_, c)| c.load(Ordering::Relaxed)),
                })
                .collect(),
        }
    }
}

impl Migrations {
    /// `POST /v1/migrations/incoming`: prepares this host for VM
    /// `request.vm`. A refusal leaves nothing behind.
    pub async fn prepare(&self, request: IncomingRequest) -> Result<Migration, MigrationError> {
        let vm = request.vm.clone();
        if vm.id != vm.spec.uuid {
            return Err(MigrationError::Invalid(crate::spec::SpecError::field(
                "vm.id",
                "must equal vm.spec.uuid",
            )));
        }
        self.manager().check_qemu_version(&request.qemu_version)?;
        self.manager()
            .reserve_incoming(&vm, &request.images)
            .await?;
        let migration = Migration {
            id: request.id,
            vm: vm.id,
            vm_name: vm.name.clone(),
            role: Role::Target,
            source: request.source.clone(),
            target: self.inner.node.clone(),
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
        let file = MigrationFile {
            migration,
            token: None,
            vm: Some(Box::new(vm.clone())),
            volumes: vec![],
            qemu: None,
        };
        if let Err(e) = self.insert(file) {
            self.manager().discard_incoming(&vm.spec, None, &[]).await;
            return Err(e);
        }
        let id = request.id;
        match self.make_arriving(&request).await {
            Ok(arriving) => {
                let stop = arriving.stop_watch.subscribe();
                let process = arriving.qemu.as_ref().map(|q| q.process.clone());
                let arriving = Arc::new(tokio::sync::Mutex::new(arriving));
                {
                    let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(entry) = table.get_mut(&id) {
                        entry.arriving = Some(arriving.clone());
                    }
                }
                if let Some(process) = process {
                    self.watch_arriving(id, process, arriving, stop);
                }
                self.set_phase(id, Phase::Mirroring);
                tracing::info!(vm = %vm.name, %id, source = %request.source, "ready for an arriving VM");
                self.get(id)
            }
            Err((e, volumes)) => {
                self.manager()
                    .discard_incoming(&vm.spec, None, &volumes)
                    .await;
                self.end(id, Phase::Failed, e.to_string());
                Err(e)
            }
        }
    }

    /// Disks, QEMU and exports of an arriving VM. On failure, returns the
    /// volumes made so far with the error (the QEMU, if any, is stopped).
    async fn make_arriving(
        &self,
        request: &IncomingRequest,
    ) -> Result<Arriving, (MigrationError, Vec<String>)> {
        let vm = &request.vm;
        let volumes = self
            .manager()
            .provision_incoming(&vm.spec, &request.disks)
            .await
            .map_err(|e| (MigrationError::from(e), vec![]))?;
        let fail = |e: MigrationError| (e, volumes.clone());
        let keep = volumes.clone();
        self.update(request.id, |f| f.volumes = keep);
        let banner = format!(
            "{BOOT_BANNER_PREFIX}{} migrated in from {} at {}",
            vm.boots,
            request.source,
            humantime::format_rfc3339_seconds(SystemTime::now())
        );
        let (qemu, serial) = self
            .manager()
            .launch_incoming(&vm.spec, vm.machine.as_ref(), &banner)
            .await
            .map_err(|e| fail(e.into()))?;
        let pid = qemu.process.pid();
        let started = qemu.process.start_time();
        self.update(request.id, |f| f.qemu = started.map(|s| (pid, s)));
        let dir = QemuDir::of(&qemu.paths, pid);
        let disks: Vec<String> = request
            .disks
            .iter()
            .map(|d| d.name.clone())
            .filter(|d| d != SEED_DISK)
            .collect();
        if let Err(e) =
            qmig::serve_disks(&qemu.qmp, &dir.qemu_path(streams::NBD_SOCKET), &disks).await
        {
            let _ = qemu.process.kill().await;
            return Err(fail(MigrationError::Failed(format!(
                "exporting the disks: {}",
                crate::vm::actor::error_chain(&e)
            ))));
        }
        let (stop_watch, _) = watch::channel(false);
        let received = Arc::new(Received::default());
        let sizes: Vec<(String, u64)> = request
            .disks
            .iter()
            .map(|d| (d.name.clone(), d.virtual_size))
            .collect();
        self.report_arrivals(
            request.id,
            received.clone(),
            vm.spec.memory_mib * crate::storage::MIB,
            sizes,
            stop_watch.subscribe(),
        );
        Ok(Arriving {
            vm: vm.clone(),
            qemu: Some(qemu),
            serial,
            volumes,
            disks,
            dir,
            memory_started: false,
            done: false,
            stop_watch,
            received,
        })
    }

    /// Publishes what arrived, every second, until the VM arrived or was
    /// abandoned.
    fn report_arrivals(
        &self,
        id: Uuid,
        received: Arc<Received>,
        memory_total: u64,
        sizes: Vec<(String, u64)>,
        mut stop: watch::Receiver<bool>,
    ) {
        let migrations = self.clone();
        tokio::spawn(async move {
            loop {
                let stopped = tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                    _ = stop.changed() => true,
                };
                migrations.progress(id, received.progress(memory_total, &sizes));
                if stopped || *stop.borrow() {
                    return;
                }
            }
        });
    }

    /// Abandons migration `id` when its QEMU exits before the VM arrived.
    fn watch_arriving(
        &self,
        id: Uuid,
        process: Arc<crate::qemu::process::QemuProcess>,
        arriving: Arc<tokio::sync::Mutex<Arriving>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let migrations = self.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let exited = tokio::select! {
                status = process.exited() => Some(status),
                () = stopped => None,
            };
            if let Some(status) = exited {
                let why = format!("the arriving VM's QEMU exited ({status:?}) before the switch");
                abandon(&migrations, id, &arriving, Phase::Failed, &why).await;
            }
        });
    }

    fn arriving(&self, id: Uuid) -> Result<Arc<tokio::sync::Mutex<Arriving>>, MigrationError> {
        let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        let entry = table.get(&id).ok_or(MigrationError::NotFound(id))?;
        entry
            .arriving
            .clone()
            .ok_or_else(|| MigrationError::Conflict(format!("migration {id} is not arriving here")))
    }

    /// Checks that migration `id` takes a stream now (before the `101`).
    pub fn check_stream(&self, id: Uuid, disk: Option<&str>) -> Result<(), MigrationError> {
        let migration = self.get(id)?;
        if migration.role != Role::Target || migration.phase.is_final() {
            return Err(MigrationError::Conflict(format!(
                "migration {id} takes no streams here (it is {} on this host)",
                migration.phase.as_str()
            )));
        }
        self.arriving(id)?;
        if let Some(disk) = disk {
            let file = self.file(id).and_then(|f| f.vm);
            let known = file.is_some_and(|vm| {
                super::copied_disk_names(&vm.spec)
                    .iter()
                    .any(|name| name == disk)
            });
            if !known || disk == SEED_DISK {
                return Err(MigrationError::Conflict(format!(
                    "migration {id} has no disk {disk:?}"
                )));
            }
        }
        Ok(())
    }

    /// Disk `disk`'s stream: joined to the arriving QEMU's NBD server. A
    /// disk stream that ends before the memory began means the source gave
    /// up: the migration is abandoned.
    pub async fn disk_stream<S>(&self, id: Uuid, disk: String, remote: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Ok(arriving) = self.arriving(id) else {
            return;
        };
        let (socket, count) = {
            let a = arriving.lock().await;
            (a.dir.host_path(streams::NBD_SOCKET), a.received.disk(&disk))
        };
        let remote = streams::Counted::new(remote, count);
        let result = match streams::connect(&socket, SOCKET_DEADLINE).await {
            Ok(local) => streams::join(local, remote).await.map(drop),
            Err(e) => Err(e),
        };
        let started = arriving.lock().await.memory_started;
        if !started {
            let why = match result {
                Ok(()) => format!("the stream of disk {disk} ended before the memory copy began"),
                Err(e) => format!("the stream of disk {disk} broke: {e}"),
            };
            abandon(self, id, &arriving, Phase::Failed, &why).await;
        }
    }

    /// The memory stream: the arriving QEMU is told to listen, and the
    /// stream is joined to it. Ends with the stream; a memory copy that
    /// did not complete then abandons the migration.
    pub async fn memory_stream<S>(&self, id: Uuid, remote: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Ok(arriving) = self.arriving(id) else {
            return;
        };
        let (qmp, dir, count) = {
            let mut a = arriving.lock().await;
            if a.memory_started || a.done {
                return;
            }
            a.memory_started = true;
            let Some(qemu) = &a.qemu else { return };
            (qemu.qmp.clone(), a.dir.clone(), a.received.memory.clone())
        };
        let remote = streams::Counted::new(remote, count);
        self.set_phase(id, Phase::Ram);
        let joined = async {
            qmig::listen_incoming(&qmp, &dir.qemu_path(streams::MEMORY_SOCKET))
                .await
                .map_err(|e| e.to_string())?;
            let local = streams::connect(&dir.host_path(streams::MEMORY_SOCKET), SOCKET_DEADLINE)
                .await
                .map_err(|e| e.to_string())?;
            streams::join(local, remote)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        dir.remove(streams::MEMORY_SOCKET);
        let state = qmig::ram(&qmp).await.ok();
        let completed = state.as_ref().is_some_and(|s| s.status == "completed");
        if !completed && !arriving.lock().await.done {
            let why = match (joined, state) {
                (Err(e), _) => format!("the memory stream broke: {e}"),
                (Ok(_), Some(s)) => format!(
                    "the memory stream ended with the incoming migration {}{}",
                    s.status,
                    s.error.map(|e| format!(": {e}")).unwrap_or_default()
                ),
                (Ok(_), None) => "the memory stream ended and QEMU no longer answers".into(),
            };
            abandon(self, id, &arriving, Phase::Failed, &why).await;
        }
    }

    /// `POST /v1/migrations/{id}/finish`: the source's QEMU completed. Once
    /// this host's QEMU has the whole memory too, the VM becomes this
    /// host's (its record saved: from here on this host owns the guest) and
    /// runs. Asked again after it succeeded, it answers the same.
    ///
    /// It runs to its end even when the caller goes away half-way (the
    /// source daemon killed, its connection cut): a finish dropped between
    /// saving the VM and resuming it would leave the guest paused here,
    /// and a second finish only reports.
    pub async fn finish(
        &self,
        id: Uuid,
        measured: FinishRequest,
    ) -> Result<Migration, MigrationError> {
        let migrations = self.clone();
        tokio::spawn(async move { migrations.finish_now(id, measured).await })
            .await
            .map_err(|e| MigrationError::Failed(format!("finishing migration {id}: {e}")))?
    }

    async fn finish_now(
        &self,
        id: Uuid,
        measured: FinishRequest,
    ) -> Result<Migration, MigrationError> {
        let migration = self.get(id)?;
        if migration.role != Role::Target {
            return Err(MigrationError::Conflict(format!(
                "migration {id} is not arriving here"
            )));
        }
        match migration.phase {
            Phase::Completed => return Ok(migration),
            Phase::Failed | Phase::Cancelled => {
                return Err(MigrationError::Conflict(format!(
                    "migration {id} was abandoned here ({}): the guest never ran on this host",
                    migration
                        .error
                        .unwrap_or_else(|| migration.phase.as_str().into())
                )))
            }
            _ => {}
        }
        let arriving = self.arriving(id)?;
        let mut a = arriving.lock().await;
        if a.done {
            drop(a);
            return self.get(id);
        }
        let Some(qmp) = a.qemu.as_ref().map(|q| q.qmp.clone()) else {
            return Err(MigrationError::Conflict("the arriving QEMU is gone".into()));
        };
        let started = std::time::Instant::now();
        loop {
            let state = qmig::ram(&qmp).await?;
            if state.status == "completed" {
                break;
            }
            if state.failed() || started.elapsed() > COMPLETE_DEADLINE {
                let why = format!(
                    "the memory did not arrive complete (incoming migration {})",
                    state.status
                );
                drop(a);
                abandon(self, id, &arriving, Phase::Failed, &why).await;
                return Err(MigrationError::Conflict(why));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = a.stop_watch.send(true);
        if let Err(e) = qmig::stop_serving(&qmp, &a.disks).await {
            tracing::warn!(%id, error = %e, "could not stop the NBD exports");
        }
        self.set_phase(id, Phase::Switchover);
        let qemu = a.qemu.take().expect("checked above");
        let serial = a.serial.take();
        let handle = match self.manager().adopt_migrated(a.vm.clone(), qemu, serial) {
            Ok(handle) => handle,
            Err(e) => {
                // Not saved: this host does not own the guest. Abandoning
                // is safe, and the source resumes it.
                a.done = true;
                let vm = a.vm.clone();
                let volumes = a.volumes.clone();
                drop(a);
                self.manager()
                    .discard_incoming(&vm.spec, None, &volumes)
                    .await;
                self.update(id, |f| {
                    f.migration.phase = Phase::Failed;
                    f.migration.error = Some(e.to_string());
                });
                return Err(e.into());
            }
        };
        a.done = true;
        drop(a);
        let resumed = handle
            .act(PowerAction::Resume, Default::default())
            .await
            .err()
            .map(|e| format!("the guest arrived but did not resume: {e}"));
        self.update(id, |f| {
            let m = &mut f.migration;
            m.phase = Phase::Completed;
            m.error = resumed;
            m.downtime_ms = measured.downtime_ms;
            m.total_ms = measured.total_ms;
            // All of it arrived (pages of zeroes are never sent, so the
            // bytes counted fall short of the total).
            m.progress.ram_remaining = 0;
            for disk in &mut m.progress.disks {
                disk.done = disk.total;
            }
        });
        tracing::info!(%id, vm = %migration.vm_name, "VM arrived");
        self.prune();
        self.get(id)
    }
}

/// Removes everything arriving migration `id` made here and ends it in
/// `phase`, unless the VM already arrived (or this already happened).
pub(super) async fn abandon(
    migrations: &Migrations,
    id: Uuid,
    arriving: &Arc<tokio::sync::Mutex<Arriving>>,
    phase: Phase,
    why: &str,
) {
    let mut a = arriving.lock().await;
    if a.done {
        return;
    }
    a.done = true;
    let _ = a.stop_watch.send(true);
    tracing::warn!(%id, vm = %a.vm.name, %why, "abandoning an arriving VM");
    let qemu = a.qemu.take();
    a.serial.take();
    let spec = a.vm.spec.clone();
    let volumes = a.volumes.clone();
    drop(a);
    migrations
        .manager()
        .discard_incoming(&spec, qemu, &volumes)
        .await;
    migrations.end(id, phase, why.to_string());
}
