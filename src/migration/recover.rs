//! Migrations a restart interrupted. The rule: the guest runs on exactly
//! one host. Before the target saved the arriving VM, the source owns it:
//! the target removes what it made, the source rolls back. From then on the
//! target owns it: the target lets it run, the source removes its copy,
//! and a source that cannot tell asks the target (keeping the guest paused
//! until it gets an answer).

use std::time::{Duration, Instant};

use super::record::MigrationFile;
use super::source::{roll_back, run_state};
use super::Migrations;
use crate::qemu::process::QemuProcess;
use crate::spec::{Phase, Role};
use crate::vm::actor::MigrationEnd;
use crate::vm::state::{PowerAction, PowerState};

/// Settles every unfinished migration found at start.
pub(super) async fn recover(migrations: &Migrations) {
    for file in migrations.inner.records.load_all() {
        let unfinished = !file.migration.phase.is_final();
        migrations.restore(file.clone());
        if !unfinished {
            continue;
        }
        tracing::info!(id = %file.migration.id, role = ?file.migration.role, phase = file.migration.phase.as_str(), "settling a migration a restart interrupted");
        match file.migration.role {
            Role::Target => recover_target(migrations, file).await,
            Role::Source => {
                let migrations = migrations.clone();
                tokio::spawn(async move { recover_source(&migrations, file).await });
            }
        }
    }
    migrations.prune();
}

async fn recover_target(migrations: &Migrations, file: MigrationFile) {
    let id = file.migration.id;
    // The commit point is the VM's record, not the phase: `Switchover` is
    // written just before the record is saved, so a restart between the two
    // finds the phase without the VM, and then the source still owns the guest.
    let arrived = match migrations.manager().find(&file.migration.vm.to_string()) {
        Ok(handle) if file.migration.phase == Phase::Switchover => Some(handle),
        _ => None,
    };
    if let Some(handle) = arrived {
        // The record was saved: the VM is this host's (reattached already).
        // Let it run, if the restart came before it did.
        let error = match handle.view().state.get() {
            PowerState::Paused => handle
                .act(PowerAction::Resume, Default::default())
                .await
                .err()
                .map(|e| format!("the guest arrived but did not resume: {e}")),
            _ => None,
        };
        migrations.update(id, |f| {
            f.migration.phase = Phase::Completed;
            f.migration.error = error;
        });
        return;
    }
    // Before the VM was saved here: nothing of it may stay.
    if let (Some((pid, start)), Some(vm)) = (file.qemu, &file.vm) {
        if let Ok(process) = QemuProcess::adopt(pid, vm.id, Some(start)) {
            let _ = process.kill().await;
        }
    }
    if let Some(vm) = &file.vm {
        migrations
            .manager()
            .discard_incoming(&vm.spec, None, &file.volumes)
            .await;
    }
    migrations.end(
        id,
        Phase::Failed,
        "the target daemon restarted before the switch".into(),
    );
}

async fn recover_source(migrations: &Migrations, file: MigrationFile) {
    let id = file.migration.id;
    let vm_key = file.migration.vm.to_string();
    let token = file.token.clone().unwrap_or_default();
    let peer = match migrations.peer(&file.migration.target, &token) {
        Ok(peer) => peer,
        Err(e) => {
            // Without a way to ask, the guest cannot be settled safely here:
            // say so and leave it for the operator.
            migrations.note_waiting(id, &e.to_string());
            return;
        }
    };
    let lent = migrations.manager().lend_for_migration(&vm_key, true).await;
    let (handle, live) = match lent {
        Ok(lent) => lent,
        Err(e) => {
            // No QEMU here any more. If the target has the guest, the VM is
            // its; else it is lost here as it would be without migration.
            let confirmed = confirm(&peer, id, Duration::from_secs(30)).await;
            if confirmed == Some(true) {
                let _ = migrations.manager().delete(&vm_key, true, true).await;
                migrations.update(id, |f| {
                    f.migration.phase = Phase::Completed;
                    f.migration.error = None;
                });
            } else {
                migrations.end(
                    id,
                    Phase::Failed,
                    format!("the source daemon restarted during the migration and found no VM to settle: {e}"),
                );
            }
            return;
        }
    };
    let qmp = live.qmp.clone().expect("lent VMs answer on QMP");
    let disks = super::copied_disk_names(&handle.view().spec);
    let completed_here = matches!(
        run_state(&qmp).await,
        Some(qapi::qmp::RunState::postmigrate)
    );
    if file.migration.phase != Phase::Switchover && !completed_here {
        roll_back(&qmp, &disks).await;
        let _ = tokio::time::timeout(Duration::from_secs(30), peer.cancel_migration(id)).await;
        let status = run_state(&qmp).await;
        let _ = migrations
            .manager()
            .settle_migration(&handle, MigrationEnd::Stayed { status })
            .await;
        migrations.end(
            id,
            Phase::Failed,
            "the source daemon restarted during the migration: rolled back".into(),
        );
        return;
    }
    // QEMU sent everything: only the target can say who runs the guest.
    if file.migration.phase != Phase::Switchover {
        migrations.set_phase(id, Phase::Switchover);
    }
    let mut wait = Duration::from_millis(500);
    loop {
        match confirm(&peer, id, Duration::from_secs(30)).await {
            Some(true) => {
                let end = MigrationEnd::Moved {
                    target: file.migration.target.clone(),
                };
                let _ = migrations.manager().settle_migration(&handle, end).await;
                migrations.update(id, |f| {
                    f.migration.phase = Phase::Completed;
                    f.migration.error = None;
                });
                return;
            }
            Some(false) => {
                roll_back(&qmp, &disks).await;
                let status = run_state(&qmp).await;
                let _ = migrations
                    .manager()
                    .settle_migration(&handle, MigrationEnd::Stayed { status })
                    .await;
                migrations.end(
                    id,
                    Phase::Failed,
                    "the target did not take the guest: it runs here again".into(),
                );
                return;
            }
            None => {
                migrations.note_waiting(id, "the target does not answer");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Asks the target to take the guest (`finish`, which it answers the same
/// when asked again): `Some(true)` it runs it, `Some(false)` it refused
/// and never ran it, `None` no answer within `deadline`.
async fn confirm(peer: &crate::client::Client, id: uuid::Uuid, deadline: Duration) -> Option<bool> {
    let started = Instant::now();
    let measured = crate::spec::FinishRequest::default();
    match tokio::time::timeout(deadline, peer.finish_incoming(id, &measured)).await {
        Ok(Ok(_)) => Some(true),
        Ok(Err(crate::client::ClientError::Api { status, .. }))
            if status == 404 || status == 409 =>
        {
            Some(false)
        }
        _ => {
            tracing::debug!(%id, waited = ?started.elapsed(), "no answer from the target");
            None
        }
    }
}
