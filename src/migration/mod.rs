//! Live migration between two vmlet daemons, driven by one API call on the
//! source (`POST /v1/vms/{id}/migrate`).
//!
//! The source daemon prepares the target through the target's API
//! (`POST /v1/migrations/incoming`: compatibility, capacity, disks, a QEMU
//! waiting with `-incoming defer`, NBD exports of its disks), copies each
//! disk with `blockdev-mirror` into its export, then the memory with
//! `pause-before-switchover`; at the switch it finishes the disk copies,
//! lets QEMU complete, and tells the target to run the guest
//! (`POST /v1/migrations/{id}/finish`). Every byte stream (the memory, each
//! disk) runs over an upgraded connection on the target's authenticated
//! API (`streams`); QEMU never listens on the network.
//!
//! Both daemons keep a record per migration (`record`), written at each
//! phase. Before the switch a failure anywhere rolls back: the guest runs
//! on the source as before and the target removes what it made. From the
//! moment the target saved the arriving VM's record it owns the guest: the
//! source never resumes it without the target's word (`recover`).
//!
//! This layer sits above `vm/` (it drives VMs through the manager and the
//! actor's migration steps) and `client/` (it talks to the other daemon).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use uuid::Uuid;

use crate::client::ClientError;
use crate::persist::timestamp;
use crate::spec::{Migration, Phase, Progress, SpecError};
use crate::vm::actor::VmError;
use crate::vm::events::EventBody;
use crate::vm::manager::Manager;

mod pace;
mod record;
mod recover;
mod source;
pub mod streams;
mod target;

use record::{MigrationFile, Records};

/// How often a migration in progress publishes its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Why a migration request failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// No such migration.
    #[error("no migration {0}")]
    NotFound(Uuid),
    /// The VM refused (busy, not running, not found, invalid…).
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The request is malformed.
    #[error(transparent)]
    Invalid(#[from] SpecError),
    /// The migration cannot do that now.
    #[error("{0}")]
    Conflict(String),
    /// The target daemon refused; its status and message are passed on.
    #[error("the target refused: {message}")]
    Refused {
        /// The target's HTTP status.
        status: u16,
        /// The target's error code.
        code: String,
        /// The target's message.
        message: String,
    },
    /// The target daemon could not be reached or answered nonsense.
    #[error("the target daemon: {0}")]
    Unreachable(String),
    /// Something failed on this host.
    #[error("{0}")]
    Failed(String),
}

impl From<crate::qemu::migrate::MigrateError> for MigrationError {
    fn from(e: crate::qemu::migrate::MigrateError) -> MigrationError {
        MigrationError::Failed(crate::vm::actor::error_chain(&e))
    }
}

impl From<ClientError> for MigrationError {
    fn from(e: ClientError) -> MigrationError {
        match e {
            ClientError::Api {
                status,
                code,
                message,
                ..
            } => MigrationError::Refused {
                status,
                code,
                message,
            },
            other => MigrationError::Unreachable(crate::vm::actor::error_chain(&other)),
        }
    }
}

/// Every migration this daemon takes part in, and the flows that run them.
#[derive(Debug, Clone)]
pub struct Migrations {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    manager: Arc<Manager>,
    records: Records,
    table: Mutex<HashMap<Uuid, Entry>>,
    /// This host's name, as the source of migrations.
    node: String,
    /// The CA trusted (with the system's roots) for `https://` targets.
    peer_ca: Option<std::path::PathBuf>,
}

#[derive(Debug)]
struct Entry {
    file: MigrationFile,
    /// Set to ask the flow to stop (cancel).
    cancel: watch::Sender<bool>,
    /// When progress was last published.
    published: Instant,
    /// Target only: what the flow holds (the QEMU, until the VM arrived).
    arriving: Option<Arc<tokio::sync::Mutex<target::Arriving>>>,
}

impl Migrations {
    /// The migrations of the daemon whose VMs `manager` holds. Loads the
    /// records and settles those left under way by a restart (see
    /// `recover`): call once, after the VMs were reattached.
    pub async fn open(manager: Arc<Manager>) -> std::io::Result<Migrations> {
        let records = Records::open(&manager.context().settings.state_dir)?;
        let peer_ca = manager
            .context()
            .settings
            .peer_ca_file()
            .map(std::path::Path::to_path_buf);
        let migrations = Migrations {
            inner: Arc::new(Inner {
                manager,
                records,
                table: Mutex::new(HashMap::new()),
                node: crate::node::hostname(),
                peer_ca,
            }),
        };
        recover::recover(&migrations).await;
        Ok(migrations)
    }

    /// Every migration, newest first.
    pub fn list(&self) -> Vec<Migration> {
        let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Migration> = table.values().map(|e| e.file.migration.clone()).collect();
        all.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(a.id.cmp(&b.id)));
        all
    }

    /// Migration `id`.
    pub fn get(&self, id: Uuid) -> Result<Migration, MigrationError> {
        let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        table
            .get(&id)
            .map(|e| e.file.migration.clone())
            .ok_or(MigrationError::NotFound(id))
    }

    /// Asks migration `id` to stop. Before the switch it rolls back (the
    /// guest stays on the source); at or after it, it is refused (409): the
    /// guest is moving and only completing is safe. A finished migration
    /// stays as it is.
    pub async fn cancel(&self, id: Uuid) -> Result<Migration, MigrationError> {
        let (phase, cancel, arriving) = {
            let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
            let entry = table.get(&id).ok_or(MigrationError::NotFound(id))?;
            (
                entry.file.migration.phase,
                entry.cancel.clone(),
                entry.arriving.clone(),
            )
        };
        if phase.is_final() {
            return self.get(id);
        }
        if phase == Phase::Switchover {
            return Err(MigrationError::Conflict(format!(
                "migration {id} is switching over: the guest is moving and can no longer stay"
            )));
        }
        let _ = cancel.send(true);
        if let Some(arriving) = arriving {
            target::abandon(self, id, &arriving, Phase::Cancelled, "cancelled").await;
        }
        self.get(id)
    }

    /// Publishes and saves migration `id` after `change`. The phase only
    /// moves as the phase table allows (a change that would move it
    /// otherwise is logged and its phase dropped).
    fn update(&self, id: Uuid, change: impl FnOnce(&mut MigrationFile)) -> Option<Migration> {
        let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        let entry = table.get_mut(&id)?;
        let before = entry.file.migration.phase;
        change(&mut entry.file);
        let after = entry.file.migration.phase;
        if before != after && !before.may_become(after) {
            tracing::error!(%id, from = before.as_str(), to = after.as_str(), "migration phase change refused");
            entry.file.migration.phase = before;
        }
        if entry.file.migration.phase.is_final() && entry.file.migration.finished_at.is_none() {
            entry.file.migration.finished_at = Some(timestamp(SystemTime::now()));
        }
        if let Err(e) = self.inner.records.save(&entry.file) {
            tracing::error!(%id, error = %e, "could not save the migration record");
        }
        entry.published = Instant::now();
        let migration = entry.file.migration.clone();
        drop(table);
        self.publish(&migration);
        Some(migration)
    }

    /// Moves migration `id` to `phase` (saved and published).
    fn set_phase(&self, id: Uuid, phase: Phase) {
        self.update(id, |f| f.migration.phase = phase);
    }

    /// Ends migration `id` in `phase` (failed or cancelled) with `error`.
    fn end(&self, id: Uuid, phase: Phase, error: String) {
        self.update(id, |f| {
            f.migration.phase = phase;
            f.migration.error = Some(error);
        });
        self.prune();
    }

    /// Records migration `id`'s progress; published at most every
    /// [`PROGRESS_EVERY`], not saved (a restart does not need it).
    fn progress(&self, id: Uuid, progress: Progress) {
        let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = table.get_mut(&id) else {
            return;
        };
        entry.file.migration.progress = progress;
        if entry.published.elapsed() < PROGRESS_EVERY {
            return;
        }
        entry.published = Instant::now();
        let migration = entry.file.migration.clone();
        drop(table);
        self.publish(&migration);
    }

    fn publish(&self, migration: &Migration) {
        self.inner.manager.events().publish(EventBody::Migration {
            migration: Box::new(migration.clone()),
        });
    }

    /// Adds a new migration (saved and published); refused when its id is
    /// taken.
    fn insert(&self, file: MigrationFile) -> Result<watch::Receiver<bool>, MigrationError> {
        let (cancel, cancelled) = watch::channel(false);
        let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        let id = file.migration.id;
        if table.contains_key(&id) {
            return Err(MigrationError::Conflict(format!(
                "a migration {id} exists already"
            )));
        }
        self.inner
            .records
            .save(&file)
            .map_err(|e| MigrationError::Failed(format!("saving the migration record: {e}")))?;
        let migration = file.migration.clone();
        table.insert(
            id,
            Entry {
                file,
                cancel,
                published: Instant::now(),
                arriving: None,
            },
        );
        drop(table);
        self.publish(&migration);
        Ok(cancelled)
    }

    /// Loads a record found at start into the table (no event).
    fn restore(&self, file: MigrationFile) -> watch::Receiver<bool> {
        let (cancel, cancelled) = watch::channel(false);
        let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        table.insert(
            file.migration.id,
            Entry {
                file,
                cancel,
                published: Instant::now(),
                arriving: None,
            },
        );
        cancelled
    }

    /// A migration's file as kept.
    fn file(&self, id: Uuid) -> Option<MigrationFile> {
        let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        table.get(&id).map(|e| e.file.clone())
    }

    /// Drops the oldest finished migrations past [`record::KEEP_FINISHED`].
    fn prune(&self) {
        let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut finished: Vec<(String, Uuid)> = table
            .values()
            .filter(|e| e.file.migration.phase.is_final())
            .map(|e| (e.file.migration.started_at.clone(), e.file.migration.id))
            .collect();
        if finished.len() <= record::KEEP_FINISHED {
            return;
        }
        finished.sort();
        let extra = finished.len() - record::KEEP_FINISHED;
        for (_, id) in finished.into_iter().take(extra) {
            table.remove(&id);
            self.inner.records.remove(id);
        }
    }

    fn manager(&self) -> &Manager {
        &self.inner.manager
    }
}

impl Migrations {
    /// A client of the other daemon at `url` with `token`; over `https://`
    /// it trusts the system's roots and the configured peer CA file.
    fn peer(&self, url: &str, token: &str) -> Result<crate::client::Client, MigrationError> {
        let endpoint = crate::client::Endpoint::Tcp {
            url: url.trim_end_matches('/').to_string(),
            token: Some(token.to_string()),
        };
        crate::client::Client::with_ca_file(endpoint, self.inner.peer_ca.as_deref())
            .map_err(|e| MigrationError::Unreachable(crate::vm::actor::error_chain(&e)))
    }
}

/// The block nodes a migration copies for VM `spec`: its disks but the
/// cloud-init seed (the target writes its own), and a UEFI VM's NVRAM
/// (`efi-vars`; the firmware code is the target's own, read-only).
fn copied_disk_names(spec: &crate::spec::VmSpec) -> Vec<String> {
    let mut names: Vec<String> = spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| d.name_or_default(i))
        .filter(|d| d != crate::spec::SEED_DISK)
        .collect();
    if spec.boot.firmware().is_uefi() {
        names.push(NVRAM_NODE.to_string());
    }
    names
}

/// The NVRAM's block node (see `spec::UEFI_NODES`).
const NVRAM_NODE: &str = crate::spec::UEFI_NODES[1];

/// A wait that ends early when `cancelled` flips.
async fn sleep_or_cancel(cancelled: &mut watch::Receiver<bool>, period: Duration) -> bool {
    if *cancelled.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(period) => *cancelled.borrow(),
        changed = cancelled.changed() => changed.is_err() || *cancelled.borrow(),
    }
}
