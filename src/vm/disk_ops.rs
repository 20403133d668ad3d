//! The disk operations a VM actor runs as tasks: hot-plug and unplug,
//! I/O limits, online resize, and snapshots, each either live (QMP, while
//! QEMU runs) or offline (`qemu-img`, while it does not).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::error_chain;
use crate::persist::timestamp;
use crate::qemu::disk::{self, DiskPlan, FileOrigin};
use crate::qemu::hotplug;
use crate::qemu::profile::Profile;
use crate::qemu::qmp::{QmpClient, QmpError};
use crate::spec::{DiskFormat, IoLimits};
use crate::storage::files::{self, OpenMode};
use crate::storage::qemu_img::{QemuImg, SnapshotCommand};
use crate::vm::error::VmError;
use crate::vm::launch;

/// A snapshot of a VM, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Snapshot {
    /// Its name (the qcow2 snapshot tag).
    pub name: String,
    /// Whether it holds the guest's memory and device state (taken while
    /// the VM ran); if not, it holds the disks only.
    pub vm_state: bool,
    /// Bytes of saved memory and device state.
    pub vm_state_size: u64,
    /// When it was taken (RFC 3339, UTC).
    pub created_at: String,
    /// The guest's filesystems were frozen by its guest agent while it was
    /// taken (`guest-fsfreeze-freeze`/`thaw`), so they are consistent on
    /// the disks; false when there was no answering agent, or the VM was
    /// not running.
    #[serde(default)]
    pub quiesced: bool,
}

/// The file in a VM's state directory naming its snapshots taken with the
/// guest's filesystems frozen (a JSON array of names).
pub const QUIESCED_FILE: &str = "snapshots-quiesced.json";

/// The names of `vm_dir`'s snapshots taken quiesced (none when the file is
/// missing or unreadable: it only ever adds a `true`).
pub fn quiesced_names(vm_dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read(vm_dir.join(QUIESCED_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Records whether snapshot `name` was taken quiesced (`Some`), or forgets
/// it (`None`, deleted). Written whole to a new file, then renamed.
pub fn mark_quiesced(vm_dir: &Path, name: &str, quiesced: Option<bool>) -> std::io::Result<()> {
    let mut names = quiesced_names(vm_dir);
    let changed = if quiesced == Some(true) {
        names.insert(name.to_string())
    } else {
        names.remove(name)
    };
    if !changed {
        return Ok(());
    }
    let tmp = vm_dir.join(format!("{QUIESCED_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&names).expect("names serialize"))?;
    std::fs::rename(&tmp, vm_dir.join(QUIESCED_FILE))
}

/// What a snapshot request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Take a snapshot.
    Create,
    /// Go back to one.
    Revert,
    /// Delete one.
    Delete,
}

/// A QMP failure as a [`VmError`] (a timeout stays a timeout).
pub fn qmp_error(what: &str, e: QmpError) -> VmError {
    let message = format!("{what}: {}", error_chain(&e));
    match e {
        QmpError::Timeout { .. } => VmError::Timeout(message),
        _ => VmError::Failed(message),
    }
}

/// The disks a snapshot covers: every writable disk, all of which must be
/// qcow2 (the first also holds the memory state).
pub fn snapshot_disks(plans: &[DiskPlan]) -> Result<Vec<&DiskPlan>, VmError> {
    let writable: Vec<&DiskPlan> = plans.iter().filter(|p| !p.spec.read_only).collect();
    if let Some(raw) = writable.iter().find(|p| p.format != DiskFormat::Qcow2) {
        return Err(VmError::Refused(format!(
            "disk {} is raw: snapshots need every writable disk in qcow2",
            raw.name
        )));
    }
    if writable.is_empty() {
        return Err(VmError::Refused(
            "the VM has no writable qcow2 disk to hold a snapshot".into(),
        ));
    }
    Ok(writable)
}

/// Opens a snapshot disk's file for `qemu-img` exactly as a start opens it
/// for QEMU: a host file below `host_roots` without symlinks and with a
/// qcow2 header that names no backing or data file, vmlet's own files
/// without following a symlink. `qemu-img` then reads the fd, never the
/// path, so a file swapped after create is refused, not acted on.
fn open_for_qemu_img(
    plan: &DiskPlan,
    host_roots: &[PathBuf],
    write: bool,
) -> Result<OwnedFd, VmError> {
    let mode = OpenMode {
        write,
        direct: false,
    };
    match plan.origin {
        FileOrigin::Host => launch::open_host_file(host_roots, &plan.file, mode, plan.format),
        FileOrigin::Managed => files::open_managed(&plan.file, mode),
    }
    .map_err(|e| VmError::Refused(format!("disk {}: {}", plan.name, error_chain(&e))))
}

/// The snapshots of a VM, read from its first snapshot disk (`qemu-img
/// info -U`, which works while QEMU holds the image), opened as a start
/// opens it (`host_roots`: the allowed host directories).
pub async fn list_snapshots(
    qemu_img: &QemuImg,
    plans: &[DiskPlan],
    host_roots: &[PathBuf],
) -> Result<Vec<Snapshot>, VmError> {
    let Ok(disks) = snapshot_disks(plans) else {
        return Ok(vec![]);
    };
    let fd = open_for_qemu_img(disks[0], host_roots, false)?;
    let info = qemu_img
        .info_fd(fd.as_fd(), &disks[0].file, true)
        .await
        .map_err(|e| VmError::from(e).during(&format!("disk {}", disks[0].name)))?;
    Ok(info
        .snapshots
        .into_iter()
        .map(|s| Snapshot {
            name: s.name,
            vm_state: s.vm_state_size > 0,
            vm_state_size: s.vm_state_size,
            created_at: timestamp(std::time::UNIX_EPOCH + Duration::from_secs(s.date_sec)),
            quiesced: false,
        })
        .collect())
}

/// Runs a snapshot operation while QEMU runs: the job-based
/// `snapshot-save`/`snapshot-load`/`snapshot-delete` (memory and disks).
pub async fn snapshot_live(
    qmp: &QmpClient,
    kind: SnapshotKind,
    name: &str,
    disks: &[&DiskPlan],
) -> Result<(), VmError> {
    let devices: Vec<String> = disks.iter().map(|p| disk::format_node(&p.name)).collect();
    let job = format!("vmlet-snapshot-{}", uuid::Uuid::new_v4());
    let (command, args) = match kind {
        SnapshotKind::Create | SnapshotKind::Revert => (
            if kind == SnapshotKind::Create {
                "snapshot-save"
            } else {
                "snapshot-load"
            },
            json!({"job-id": job, "tag": name, "vmstate": devices[0], "devices": devices}),
        ),
        SnapshotKind::Delete => (
            "snapshot-delete",
            json!({"job-id": job, "tag": name, "devices": devices}),
        ),
    };
    Ok(hotplug::run_job(qmp, command, &job, args).await?)
}

/// Runs a snapshot operation on the files of a VM that is not running
/// (`qemu-img snapshot`; disks only). Every disk is opened first as a
/// start opens it (`host_roots`: the allowed host directories), so a
/// refused one changes nothing; `qemu-img` reads the fds. A take that
/// fails part way removes the snapshots it made.
pub async fn snapshot_offline(
    qemu_img: &QemuImg,
    kind: SnapshotKind,
    name: &str,
    disks: &[&DiskPlan],
    host_roots: &[PathBuf],
) -> Result<(), VmError> {
    let command = match kind {
        SnapshotKind::Create => SnapshotCommand::Create,
        SnapshotKind::Revert => SnapshotCommand::Apply,
        SnapshotKind::Delete => SnapshotCommand::Delete,
    };
    let fds = disks
        .iter()
        .map(|plan| open_for_qemu_img(plan, host_roots, true))
        .collect::<Result<Vec<_>, _>>()?;
    for (done, (plan, fd)) in disks.iter().zip(&fds).enumerate() {
        if let Err(e) = qemu_img.snapshot_fd(fd.as_fd(), command, name).await {
            if kind == SnapshotKind::Create {
                for undo in &fds[..done] {
                    let _ = qemu_img
                        .snapshot_fd(undo.as_fd(), SnapshotCommand::Delete, name)
                        .await;
                }
            }
            return Err(VmError::from(e).during(&format!("disk {}", plan.name)));
        }
    }
    Ok(())
}

/// Hot-plugs a disk: opens its files as a start would (host files below
/// the allowed directories, without symlinks) and hands them to
/// [`hotplug::attach_disk`].
pub async fn attach(
    qmp: &QmpClient,
    profile: &Profile,
    plan: &DiskPlan,
    host_roots: &[PathBuf],
) -> Result<(), VmError> {
    let file =
        launch::open_disk_file(plan, host_roots).map_err(|e| VmError::Refused(error_chain(&e)))?;
    let base = plan
        .base
        .as_ref()
        .map(|base| files::open_managed(base, launch::base_mode(plan)))
        .transpose()
        .map_err(|e| VmError::Refused(error_chain(&e)))?;
    let base_fd = base.as_ref().map(|fd| fd.as_fd());
    Ok(hotplug::attach_disk(qmp, profile, plan, file.as_fd(), base_fd).await?)
}

/// Unplugs a disk ([`hotplug::detach_disk`]).
pub async fn detach(qmp: &QmpClient, plan: &DiskPlan) -> Result<(), VmError> {
    Ok(hotplug::detach_disk(qmp, plan).await?)
}

/// Sets a running disk's I/O limits.
pub async fn set_limits(
    qmp: &QmpClient,
    plan: &DiskPlan,
    limits: &IoLimits,
) -> Result<(), VmError> {
    Ok(hotplug::set_disk_limits(qmp, plan, limits).await?)
}

/// Grows a running disk.
pub async fn resize(qmp: &QmpClient, plan: &DiskPlan, size: u64) -> Result<(), VmError> {
    Ok(hotplug::resize_disk(qmp, plan, size).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiesced_marks_follow_creates_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        assert!(quiesced_names(dir.path()).is_empty(), "no file: none");
        mark_quiesced(dir.path(), "a", Some(true)).unwrap();
        mark_quiesced(dir.path(), "b", Some(false)).unwrap();
        mark_quiesced(dir.path(), "c", Some(true)).unwrap();
        mark_quiesced(dir.path(), "c", None).unwrap();
        assert_eq!(
            quiesced_names(dir.path()).into_iter().collect::<Vec<_>>(),
            ["a"]
        );
        // A damaged file counts as no marks (never as a false "true").
        std::fs::write(dir.path().join(QUIESCED_FILE), b"{not json").unwrap();
        assert!(quiesced_names(dir.path()).is_empty());
    }
}
