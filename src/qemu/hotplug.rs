//! QMP device sequences on a running QEMU: disk and NIC hot-plug and
//! unplug, the free PCIe root port lookup, live I/O limits and resize, and
//! block jobs (snapshots) waited for to their end. Each sequence undoes
//! what it did when a step fails. The caller opens the host files and taps
//! and hands the fds in; errors are QMP's, kept whole.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::qemu::argv::HOTPLUG_PORT_PREFIX;
use crate::qemu::disk::{self, DiskPlan, DiskSets};
use crate::qemu::nic::{self, NicBackend, NicPlan};
use crate::qemu::profile::{DeviceBus, Profile};
use crate::qemu::qmp::{QmpClient, QmpError};
use crate::spec::{DiskBus, IoLimits, NicSpec};

/// Deadline of one QMP command here.
const QMP_DEADLINE: Duration = Duration::from_secs(10);
/// How long the guest gets to release an unplugged device.
pub const UNPLUG_DEADLINE: Duration = Duration::from_secs(30);
/// How long a block job (a snapshot) may run.
const JOB_DEADLINE: Duration = Duration::from_secs(600);

/// Why a device sequence failed.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// A QMP command failed or got no answer in time.
    #[error("{command}")]
    Qmp {
        /// The command.
        command: String,
        /// QEMU's error, or the transport's.
        #[source]
        source: QmpError,
    },
    /// Every hot-plug root port is taken.
    #[error("every hot-plug slot of this VM is in use")]
    NoFreePort,
    /// The guest did not let go of an unplugged device in time.
    #[error("the guest did not release {what} within {deadline:?}")]
    NotReleased {
        /// The device, in words.
        what: String,
        /// How long it had.
        deadline: Duration,
    },
    /// The QMP link closed in the middle of a sequence.
    #[error("QMP closed while unplugging")]
    Closed,
    /// A block job ended with an error, or vanished.
    #[error("{what}: {message}")]
    Job {
        /// The job's command.
        what: String,
        /// QEMU's error.
        message: String,
    },
    /// A block job ran past its deadline (it was cancelled).
    #[error("{what}: still running after {deadline:?}")]
    JobTimeout {
        /// The job's command.
        what: String,
        /// Its deadline.
        deadline: Duration,
    },
}

impl HotplugError {
    /// Whether QEMU (or the guest) did not answer in time.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            HotplugError::Qmp {
                source: QmpError::Timeout { .. },
                ..
            } | HotplugError::NotReleased { .. }
                | HotplugError::JobTimeout { .. }
        )
    }
}

/// Runs QMP `command` with `args`.
pub async fn call(qmp: &QmpClient, command: &str, args: Value) -> Result<Value, HotplugError> {
    qmp.execute_raw(command, Some(args), QMP_DEADLINE)
        .await
        .map_err(|source| HotplugError::Qmp {
            command: command.to_string(),
            source,
        })
}

/// The first empty hot-plug root port (`hpN`), asked of QEMU (`query-pci`).
pub async fn free_port(qmp: &QmpClient) -> Result<String, HotplugError> {
    let buses = qmp
        .execute_raw("query-pci", None, QMP_DEADLINE)
        .await
        .map_err(|source| HotplugError::Qmp {
            command: "query-pci".into(),
            source,
        })?;
    let mut ports: Vec<String> = Vec::new();
    for bus in buses.as_array().into_iter().flatten() {
        for device in bus["devices"].as_array().into_iter().flatten() {
            let id = device["qdev_id"].as_str().unwrap_or("");
            let empty = device["pci_bridge"]["devices"]
                .as_array()
                .is_some_and(|d| d.is_empty());
            if id.starts_with(HOTPLUG_PORT_PREFIX) && empty {
                ports.push(id.to_string());
            }
        }
    }
    ports.sort_by_key(|p| {
        p[HOTPLUG_PORT_PREFIX.len()..]
            .parse::<u32>()
            .unwrap_or(u32::MAX)
    });
    ports.into_iter().next().ok_or(HotplugError::NoFreePort)
}

/// Hot-plugs a disk whose file (and, for an overlay, image) vmlet opened:
/// passes them into fd sets (`add-fd`), then the throttle group, block
/// nodes and the device (on a free root port for PCI virtio-blk).
pub async fn attach_disk(
    qmp: &QmpClient,
    profile: &Profile,
    plan: &DiskPlan,
    file: BorrowedFd<'_>,
    base: Option<BorrowedFd<'_>>,
) -> Result<(), HotplugError> {
    let port = match (plan.spec.bus, profile.devices.bus) {
        (DiskBus::VirtioBlk, DeviceBus::Pci) => Some(free_port(qmp).await?),
        _ => None,
    };
    let mut undo: Vec<(&str, Value)> = Vec::new();
    let result = async {
        let file_set = add_fd(qmp, file, &plan.file_tag()).await?;
        undo.push(("remove-fd", json!({"fdset-id": file_set})));
        let base_set = match base {
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
        call(qmp, "object-add", disk::throttle_group(plan)).await?;
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
async fn add_fd(qmp: &QmpClient, fd: BorrowedFd<'_>, tag: &str) -> Result<u32, HotplugError> {
    let info = qmp
        .execute_with_fd(
            qapi::qmp::add_fd {
                fdset_id: None,
                opaque: Some(tag.to_string()),
            },
            fd,
        )
        .await
        .map_err(|source| HotplugError::Qmp {
            command: "add-fd".into(),
            source,
        })?;
    u32::try_from(info.fdset_id).map_err(|_| HotplugError::Job {
        what: "add-fd".into(),
        message: format!("fd set id {}", info.fdset_id),
    })
}

/// Removes the fd sets whose fds carry one of `tags` (`query-fdsets`), so
/// QEMU lets go of an unplugged disk's files.
async fn remove_fdsets(qmp: &QmpClient, tags: &[String]) -> Result<(), HotplugError> {
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
pub async fn unplug_device(qmp: &QmpClient, id: &str, what: &str) -> Result<(), HotplugError> {
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
                    return Err(HotplugError::Closed)
                }
            }
        }
    };
    match tokio::time::timeout(UNPLUG_DEADLINE, deleted).await {
        Ok(result) => result,
        Err(_) => Err(HotplugError::NotReleased {
            what: what.to_string(),
            deadline: UNPLUG_DEADLINE,
        }),
    }
}

/// Unplugs a disk: `device_del`, waits for the guest to let go
/// (`DEVICE_DELETED`), then removes its block nodes, throttle group and fd
/// sets.
pub async fn detach_disk(qmp: &QmpClient, plan: &DiskPlan) -> Result<(), HotplugError> {
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
pub async fn set_disk_limits(
    qmp: &QmpClient,
    plan: &DiskPlan,
    limits: &IoLimits,
) -> Result<(), HotplugError> {
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
pub async fn resize_disk(qmp: &QmpClient, plan: &DiskPlan, size: u64) -> Result<(), HotplugError> {
    call(
        qmp,
        "block_resize",
        json!({"node-name": disk::top_node(plan), "size": size}),
    )
    .await
    .map(drop)
}

/// Starts job `command` (whose `args` name `job-id` `job`) and waits for it:
/// polls `query-jobs` until it concludes, dismisses it and returns its
/// error, if any. Past [`JOB_DEADLINE`] the job is cancelled.
pub async fn run_job(
    qmp: &QmpClient,
    command: &str,
    job: &str,
    args: Value,
) -> Result<(), HotplugError> {
    call(qmp, command, args).await?;
    let started = Instant::now();
    loop {
        let jobs = call(qmp, "query-jobs", json!({})).await?;
        let found = jobs
            .as_array()
            .and_then(|jobs| jobs.iter().find(|j| j["id"] == job))
            .cloned();
        match found {
            Some(found) if found["status"] == "concluded" => {
                let _ = call(qmp, "job-dismiss", json!({"id": job})).await;
                return match found["error"].as_str() {
                    Some(error) => Err(HotplugError::Job {
                        what: command.to_string(),
                        message: error.to_string(),
                    }),
                    None => Ok(()),
                };
            }
            Some(_) => {}
            None => {
                return Err(HotplugError::Job {
                    what: command.to_string(),
                    message: format!("job {job} vanished"),
                })
            }
        }
        if started.elapsed() > JOB_DEADLINE {
            let _ = call(qmp, "job-cancel", json!({"id": job})).await;
            return Err(HotplugError::JobTimeout {
                what: command.to_string(),
                deadline: JOB_DEADLINE,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Hot-plugs a NIC whose tap (and vhost) fds vmlet opened: passes them
/// with `getfd`, then `netdev_add` and `device_add` on a free root port;
/// `user`: user-mode networking, no fds. Undoes what it did if a step
/// fails (closing the fds QEMU was given, so the tap goes).
pub async fn attach_nic(
    qmp: &QmpClient,
    profile: &Profile,
    spec: &NicSpec,
    tap_fds: &[BorrowedFd<'_>],
    vhost_fds: &[BorrowedFd<'_>],
    user: bool,
) -> Result<(), HotplugError> {
    let port = free_port(qmp).await?;
    let id = nic::netdev_id(spec);
    let named: Vec<(BorrowedFd<'_>, String, bool)> = tap_fds
        .iter()
        .enumerate()
        .map(|(q, fd)| (*fd, format!("{id}-q{q}"), false))
        .chain(
            vhost_fds
                .iter()
                .enumerate()
                .map(|(q, fd)| (*fd, format!("{id}-v{q}"), true)),
        )
        .collect();
    let mut passed = Vec::new();
    let result = async {
        let mut fds = Vec::new();
        let mut vhost = Vec::new();
        for (fd, name, is_vhost) in named {
            qmp.execute_with_fd(
                qapi::qmp::getfd {
                    fdname: name.clone(),
                },
                fd,
            )
            .await
            .map_err(|source| HotplugError::Qmp {
                command: "getfd".into(),
                source,
            })?;
            passed.push(name.clone());
            if is_vhost {
                vhost.push(name);
            } else {
                fds.push(name);
            }
        }
        let plan = NicPlan {
            spec: spec.clone(),
            backend: if user {
                NicBackend::User
            } else {
                NicBackend::Tap {
                    fds,
                    vhost_fds: vhost,
                }
            },
        };
        call(qmp, "netdev_add", nic::netdev(&plan)).await?;
        if let Err(e) = call(qmp, "device_add", nic::device(profile, &plan, Some(&port))).await {
            let _ = call(qmp, "netdev_del", json!({"id": id})).await;
            return Err(e);
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        for name in passed {
            let _ = call(qmp, "closefd", json!({"fdname": name})).await;
        }
    }
    result
}

/// Unplugs a NIC: `device_del`, waits for the guest to let go
/// (`DEVICE_DELETED`), then `netdev_del` (QEMU closes the tap).
pub async fn detach_nic(qmp: &QmpClient, spec: &NicSpec) -> Result<(), HotplugError> {
    let what = format!("NIC {}", spec.mac.as_deref().unwrap_or("?"));
    unplug_device(qmp, &nic::device_id(spec), &what).await?;
    call(qmp, "netdev_del", json!({"id": nic::netdev_id(spec)}))
        .await
        .map(drop)
}
