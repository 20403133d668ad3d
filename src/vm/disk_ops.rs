//! The disk operations a VM actor runs as tasks: hot-plug and unplug,
//! I/O limits, online resize, and snapshots, each either live (QMP, while
//! QEMU runs) or offline (`qemu-img`, while it does not).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use crate::error_chain;
use crate::persist::timestamp;
use crate::qemu::disk::{self, DiskPlan, DiskSets};
use crate::qemu::profile::Profile;
use crate::qemu::qmp::{QmpClient, QmpError};
use crate::spec::{DiskFormat, IoLimits};
use crate::storage::files;
use crate::storage::qemu_img::{QemuImg, SnapshotCommand};
use crate::vm::error::VmError;
use crate::vm::launch;

/// Deadline of one QMP command here.
const QMP_DEADLINE: Duration = Duration::from_secs(10);
/// How long the guest gets to release an unplugged disk.
pub const UNPLUG_DEADLINE: Duration = Duration::from_secs(30);
/// How long a snapshot job may run.
const JOB_DEADLINE: Duration = Duration::from_secs(600);

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

/// Runs QMP `command` with `args`, errors as [`VmError`].
pub async fn call(qmp: &QmpClient, command: &str, args: Value) -> Result<Value, VmError> {
    qmp.execute_raw(command, Some(args), QMP_DEADLINE)
        .await
        .map_err(|e| qmp_error(command, e))
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

/// The snapshots of a VM, read from its first snapshot disk (`qemu-img
/// info -U`, which works while QEMU holds the image).
pub async fn list_snapshots(
    qemu_img: &QemuImg,
    plans: &[DiskPlan],
) -> Result<Vec<Snapshot>, VmError> {
    let Ok(disks) = snapshot_disks(plans) else {
        return Ok(vec![]);
    };
    let info = qemu_img.info(&disks[0].file, Some("qcow2"), true).await?;
    Ok(info
        .snapshots
        .into_iter()
        .map(|s| Snapshot {
            name: s.name,
            vm_state: s.vm_state_size > 0,
            vm_state_size: s.vm_state_size,
            created_at: timestamp(std::time::UNIX_EPOCH + Duration::from_secs(s.date_sec)),
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
    call(qmp, command, args).await?;
    wait_for_job(qmp, &job, command).await
}

/// Polls `query-jobs` until job `id` concludes, dismisses it and returns its
/// error, if any.
async fn wait_for_job(qmp: &QmpClient, id: &str, what: &str) -> Result<(), VmError> {
    let started = Instant::now();
    loop {
        let jobs = qmp
            .execute_raw("query-jobs", None, QMP_DEADLINE)
            .await
            .map_err(|e| qmp_error("query-jobs", e))?;
        let job = jobs
            .as_array()
            .and_then(|jobs| jobs.iter().find(|j| j["id"] == id))
            .cloned();
        match job {
            Some(job) if job["status"] == "concluded" => {
                let _ = call(qmp, "job-dismiss", json!({"id": id})).await;
                return match job["error"].as_str() {
                    Some(error) => Err(VmError::Failed(format!("{what}: {error}"))),
                    None => Ok(()),
                };
            }
            Some(_) => {}
            None => return Err(VmError::Failed(format!("{what}: job {id} vanished"))),
        }
        if started.elapsed() > JOB_DEADLINE {
            let _ = call(qmp, "job-cancel", json!({"id": id})).await;
            return Err(VmError::Timeout(format!(
                "{what}: still running after {JOB_DEADLINE:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a snapshot operation on the files of a VM that is not running
/// (`qemu-img snapshot`; disks only). A take that fails part way removes
/// the snapshots it made.
pub async fn snapshot_offline(
    qemu_img: &QemuImg,
    kind: SnapshotKind,
    name: &str,
    disks: &[&DiskPlan],
) -> Result<(), VmError> {
    let command = match kind {
        SnapshotKind::Create => SnapshotCommand::Create,
        SnapshotKind::Revert => SnapshotCommand::Apply,
        SnapshotKind::Delete => SnapshotCommand::Delete,
    };
    for (done, plan) in disks.iter().enumerate() {
        if let Err(e) = qemu_img.snapshot(&plan.file, command, name).await {
            if kind == SnapshotKind::Create {
                for undo in &disks[..done] {
                    let _ = qemu_img
                        .snapshot(&undo.file, SnapshotCommand::Delete, name)
                        .await;
                }
            }
            return Err(e.into());
        }
    }
    Ok(())
}

/// The first empty hot-plug root port (`hpN`), asked of QEMU (`query-pci`).
pub async fn free_port(qmp: &QmpClient) -> Result<String, VmError> {
    let buses = qmp
        .execute_raw("query-pci", None, QMP_DEADLINE)
        .await
        .map_err(|e| qmp_error("query-pci", e))?;
    let mut ports: Vec<String> = Vec::new();
    for bus in buses.as_array().into_iter().flatten() {
        for device in bus["devices"].as_array().into_iter().flatten() {
            let id = device["qdev_id"].as_str().unwrap_or("");
            let empty = device["pci_bridge"]["devices"]
                .as_array()
                .is_some_and(|d| d.is_empty());
            if id.starts_with(crate::qemu::argv::HOTPLUG_PORT_PREFIX) && empty {
                ports.push(id.to_string());
            }
        }
    }
    ports.sort_by_key(|p| p[2..].parse::<u32>().unwrap_or(u32::MAX));
    ports
        .into_iter()
        .next()
        .ok_or_else(|| VmError::Refused("every hot-plug slot of this VM is in use".into()))
}

/// Hot-plugs a disk: opens its files (as a launch would) and passes them
/// into fd sets (`add-fd`), then the throttle group, block nodes and the
/// device (on a free root port for PCI virtio-blk). Undoes what it did when
/// a step fails.
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
    let port = match (plan.spec.bus, profile.devices.bus) {
        (crate::spec::DiskBus::VirtioBlk, crate::qemu::profile::DeviceBus::Pci) => {
            Some(free_port(qmp).await?)
        }
        _ => None,
    };
    let mut undo: Vec<(&str, Value)> = Vec::new();
    let result = async {
        let file_set = add_fd(qmp, &file, &plan.file_tag()).await?;
        undo.push(("remove-fd", json!({"fdset-id": file_set})));
        let base_set = match &base {
            Some(fd) => {
                let set = add_fd(qmp, fd, &plan.base_tag()).await?;
                undo.push(("remove-fd", json!({"fdset-id": set})));
                Some(set)
            }
            None => None,
        };
        let sets = DiskSets {
            file: file_set,
            base: base_set,
        };
        let group = disk::throttle_group(plan);
        call(qmp, "object-add", group).await?;
        undo.push((
            "object-del",
            json!({"id": disk::throttle_group_id(&plan.name)}),
        ));
        for node in disk::blockdevs(plan, sets) {
            let node_name = node["node-name"].clone();
            call(qmp, "blockdev-add", node).await?;
            undo.push(("blockdev-del", json!({"node-name": node_name})));
        }
        call(
            qmp,
            "device_add",
            disk::device(profile, plan, port.as_deref()),
        )
        .await?;
        Ok(())
    }
    .await;
    if result.is_err() {
        for (command, args) in undo.into_iter().rev() {
            let _ = call(qmp, command, args).await;
        }
    }
    result
}

/// Passes `fd` into a new fd set tagged `tag`; returns the set's id.
async fn add_fd(qmp: &QmpClient, fd: &OwnedFd, tag: &str) -> Result<u32, VmError> {
    let info = qmp
        .execute_with_fd(
            qapi::qmp::add_fd {
                fdset_id: None,
                opaque: Some(tag.to_string()),
            },
            fd.as_fd(),
        )
        .await
        .map_err(|e| qmp_error("add-fd", e))?;
    u32::try_from(info.fdset_id)
        .map_err(|_| VmError::Failed(format!("add-fd: fd set id {}", info.fdset_id)))
}

/// Removes the fd sets whose fds carry one of `tags` (`query-fdsets`), so
/// QEMU lets go of an unplugged disk's files.
async fn remove_fdsets(qmp: &QmpClient, tags: &[String]) -> Result<(), VmError> {
    let sets = call(qmp, "query-fdsets", json!({})).await?;
    for set in sets.as_array().into_iter().flatten() {
        let tagged = set["fds"].as_array().into_iter().flatten().any(|fd| {
            fd["opaque"]
                .as_str()
                .is_some_and(|o| tags.iter().any(|t| t == o))
        });
        if tagged {
            call(qmp, "remove-fd", json!({"fdset-id": set["fdset-id"]})).await?;
        }
    }
    Ok(())
}

/// `device_del` of device `id`, then waits (up to [`UNPLUG_DEADLINE`]) for
/// the guest to let go of it (`DEVICE_DELETED`). `what` names it in errors.
pub async fn unplug_device(qmp: &QmpClient, id: &str, what: &str) -> Result<(), VmError> {
    // Subscribed before the command, so the event cannot be missed.
    let mut events = qmp.subscribe();
    call(qmp, "device_del", json!({"id": id})).await?;
    let deleted = async {
        loop {
            match events.recv().await {
                Ok(event) if event.name == "DEVICE_DELETED" && event.data["device"] == id => {
                    return Ok(());
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Err(VmError::Failed("QMP closed while unplugging".into()))
                }
            }
        }
    };
    match tokio::time::timeout(UNPLUG_DEADLINE, deleted).await {
        Ok(result) => result,
        Err(_) => Err(VmError::Timeout(format!(
            "the guest did not release {what} within {UNPLUG_DEADLINE:?}"
        ))),
    }
}

/// Unplugs a disk: `device_del`, waits for the guest to let go
/// (`DEVICE_DELETED`), then removes its block nodes and throttle group.
pub async fn detach(qmp: &QmpClient, plan: &DiskPlan) -> Result<(), VmError> {
    let what = format!("disk {}", plan.name);
    unplug_device(qmp, &disk::device_id(&plan.name), &what).await?;
    // Only the node names matter here.
    let sets = DiskSets {
        file: 0,
        base: plan.base.as_ref().map(|_| 0),
    };
    for node in disk::blockdevs(plan, sets).iter().rev() {
        call(qmp, "blockdev-del", json!({"node-name": node["node-name"]})).await?;
    }
    if disk::has_throttle(plan) {
        call(
            qmp,
            "object-del",
            json!({"id": disk::throttle_group_id(&plan.name)}),
        )
        .await?;
    }
    remove_fdsets(qmp, &[plan.file_tag(), plan.base_tag()]).await
}

/// Sets a running disk's I/O limits (its throttle group's `limits`).
pub async fn set_limits(
    qmp: &QmpClient,
    plan: &DiskPlan,
    limits: &IoLimits,
) -> Result<(), VmError> {
    call(
        qmp,
        "qom-set",
        json!({
            "path": format!("/objects/{}", disk::throttle_group_id(&plan.name)),
            "property": "limits",
            "value": disk::throttle_limits(limits),
        }),
    )
    .await
    .map(drop)
}

/// Grows a running disk: `block_resize` on the node its device reads from
/// (resizing a node under the throttle filter would not reach the guest).
pub async fn resize(qmp: &QmpClient, plan: &DiskPlan, size: u64) -> Result<(), VmError> {
    call(
        qmp,
        "block_resize",
        json!({"node-name": disk::top_node(plan), "size": size}),
    )
    .await
    .map(drop)
}
