//! The QMP sequences of a live migration with local disks, as libvirt and
//! Proxmox run them: on the target an NBD server exporting each disk and a
//! deferred incoming migration; on the source a `blockdev-mirror` of each
//! disk into its export, then the memory with `pause-before-switchover`.
//!
//! Every stream is a unix socket in QEMU's own run directory: vmlet carries
//! it between the hosts over its authenticated API, so QEMU never listens
//! on, or connects to, the network.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::qmp::{QmpClient, QmpError};

/// Deadline of one migration QMP command.
const DEADLINE: Duration = Duration::from_secs(10);
/// Prefix of the block jobs and NBD client nodes a migration adds.
pub const JOB_PREFIX: &str = "vmlet-mig-";

/// Why a migration step failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A QMP command failed or got no answer in time.
    #[error("QMP {command}")]
    Qmp {
        /// The command.
        command: String,
        /// QEMU's error, or the transport's.
        #[source]
        source: QmpError,
    },
    /// A disk copy failed.
    #[error("copying disk {disk}: {message}")]
    Mirror {
        /// The disk.
        disk: String,
        /// QEMU's error.
        message: String,
    },
    /// The memory copy failed.
    #[error("migration {status}: {message}")]
    Migration {
        /// QEMU's status (`failed`, `cancelled`).
        status: String,
        /// QEMU's error description.
        message: String,
    },
    /// A wait ran past its deadline.
    #[error("{what}: no result within {deadline:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        deadline: Duration,
    },
}

async fn call(qmp: &QmpClient, command: &str, args: Value) -> Result<Value, MigrateError> {
    qmp.execute_raw(command, Some(args), DEADLINE)
        .await
        .map_err(|source| MigrateError::Qmp {
            command: command.to_string(),
            source,
        })
}

/// The job (and NBD client node) id of disk `disk`'s copy.
pub fn job_id(disk: &str) -> String {
    format!("{JOB_PREFIX}{disk}")
}

/// The NBD export name of disk `disk` on the target.
pub fn export_name(disk: &str) -> String {
    disk.to_string()
}

/// Why QEMU would refuse to migrate (`query-migrate`'s `blocked-reasons`):
/// an empty list when nothing blocks it.
pub async fn blockers(qmp: &QmpClient) -> Result<Vec<String>, MigrateError> {
    let status = call(qmp, "query-migrate", json!({})).await?;
    Ok(status["blocked-reasons"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect())
}

// ---- target ---------------------------------------------------------------

/// Serves `disks` (format node names) over NBD on the unix socket `socket`
/// (a path as QEMU sees it), writable, each under its own name.
pub async fn serve_disks(
    qmp: &QmpClient,
    socket: &str,
    disks: &[String],
) -> Result<(), MigrateError> {
    call(
        qmp,
        "nbd-server-start",
        // nbd-server-start still takes the legacy socket address form.
        json!({"addr": {"type": "unix", "data": {"path": socket}}}),
    )
    .await?;
    for disk in disks {
        call(
            qmp,
            "block-export-add",
            json!({
                "type": "nbd",
                "id": job_id(disk),
                "node-name": disk,
                "name": export_name(disk),
                "writable": true,
            }),
        )
        .await?;
    }
    Ok(())
}

/// Ends the NBD exports of `disks` and the server (after the switch, or
/// when giving up). Exports already gone are fine.
pub async fn stop_serving(qmp: &QmpClient, disks: &[String]) -> Result<(), MigrateError> {
    for disk in disks {
        let _ = call(
            qmp,
            "block-export-del",
            json!({"id": job_id(disk), "mode": "hard"}),
        )
        .await;
    }
    match call(qmp, "nbd-server-stop", json!({})).await {
        Ok(_) => Ok(()),
        Err(MigrateError::Qmp {
            source: QmpError::Qemu { .. },
            ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes the paused incoming QEMU (`-incoming defer`) listen for the
/// migration stream on unix socket `socket` (as QEMU sees it).
pub async fn listen_incoming(qmp: &QmpClient, socket: &str) -> Result<(), MigrateError> {
    call(
        qmp,
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    )
    .await?;
    call(
        qmp,
        "migrate-incoming",
        json!({"uri": format!("unix:{socket}")}),
    )
    .await?;
    Ok(())
}

// ---- source ---------------------------------------------------------------

/// How a disk is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// Only what the VM's own layer holds (an overlay on an image the
    /// target has too).
    Top,
    /// Everything (a blank disk, a volume).
    Full,
}

/// Adds an NBD client node for disk `disk`'s export, reached through unix
/// socket `socket` (as QEMU sees it), and starts mirroring the disk (from
/// `root`, the node its device reads) into it. `speed`: bytes per second,
/// 0 for no cap.
pub async fn start_mirror(
    qmp: &QmpClient,
    disk: &str,
    root: &str,
    socket: &str,
    mode: CopyMode,
    speed: u64,
) -> Result<(), MigrateError> {
    let node = job_id(disk);
    call(
        qmp,
        "blockdev-add",
        json!({
            "driver": "nbd",
            "node-name": node,
            "server": {"type": "unix", "path": socket},
            "export": export_name(disk),
        }),
    )
    .await?;
    let sync = match mode {
        CopyMode::Top => "top",
        CopyMode::Full => "full",
    };
    let started = call(
        qmp,
        "blockdev-mirror",
        json!({
            "job-id": node,
            "device": root,
            "target": node,
            "sync": sync,
            "speed": speed,
            "auto-dismiss": false,
        }),
    )
    .await;
    if let Err(e) = started {
        let _ = call(qmp, "blockdev-del", json!({"node-name": node})).await;
        return Err(e);
    }
    Ok(())
}

/// One disk copy as QEMU reports it (`query-jobs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorState {
    /// The disk.
    pub disk: String,
    /// QEMU's job status (`running`, `ready`, `concluded`, …).
    pub status: String,
    /// Bytes copied.
    pub done: u64,
    /// Bytes to copy (an estimate that grows as the guest writes).
    pub total: u64,
    /// The job's error, once concluded with one.
    pub error: Option<String>,
}

impl MirrorState {
    /// Source and target are in step (and are kept so).
    pub fn is_ready(&self) -> bool {
        self.status == "ready"
    }
}

/// The migration's disk copies, in QEMU's order.
pub async fn mirrors(qmp: &QmpClient) -> Result<Vec<MirrorState>, MigrateError> {
    let jobs = call(qmp, "query-jobs", json!({})).await?;
    Ok(parse_mirrors(&jobs))
}

fn parse_mirrors(jobs: &Value) -> Vec<MirrorState> {
    jobs.as_array()
        .into_iter()
        .flatten()
        .filter_map(|job| {
            let disk = job["id"].as_str()?.strip_prefix(JOB_PREFIX)?;
            Some(MirrorState {
                disk: disk.to_string(),
                status: job["status"].as_str().unwrap_or("").to_string(),
                done: job["current-progress"].as_u64().unwrap_or(0),
                total: job["total-progress"].as_u64().unwrap_or(0),
                error: job["error"].as_str().map(str::to_string),
            })
        })
        .collect()
}

/// Switches disk `disk`'s ready copy to write-blocking: from now on a guest
/// write completes only once it reached the target too, so the copy
/// converges whatever the guest writes.
pub async fn write_blocking(qmp: &QmpClient, disk: &str) -> Result<(), MigrateError> {
    call(
        qmp,
        "block-job-change",
        json!({"id": job_id(disk), "type": "mirror", "copy-mode": "write-blocking"}),
    )
    .await
    .map(drop)
}

/// Ends the copies of `disks` with the target complete and the source
/// still the VM's disk (`block-job-cancel` of a ready mirror: no pivot),
/// waits until each has concluded, and removes their NBD nodes. Called
/// with the vCPUs paused, so nothing is written meanwhile.
pub async fn finish_mirrors(
    qmp: &QmpClient,
    disks: &[String],
    deadline: Duration,
) -> Result<(), MigrateError> {
    for disk in disks {
        call(qmp, "block-job-cancel", json!({"device": job_id(disk)})).await?;
    }
    let result = wait_concluded(qmp, disks, deadline).await;
    remove_nodes(qmp, disks).await;
    result
}

/// Stops the copies of `disks` at once, whatever their state, and removes
/// their NBD nodes. Never fails: what is already gone is fine.
pub async fn abandon_mirrors(qmp: &QmpClient, disks: &[String]) {
    for disk in disks {
        let _ = call(
            qmp,
            "block-job-cancel",
            json!({"device": job_id(disk), "force": true}),
        )
        .await;
    }
    let _ = wait_concluded(qmp, disks, Duration::from_secs(10)).await;
    remove_nodes(qmp, disks).await;
}

async fn remove_nodes(qmp: &QmpClient, disks: &[String]) {
    for disk in disks {
        let _ = call(qmp, "job-dismiss", json!({"id": job_id(disk)})).await;
        let _ = call(qmp, "blockdev-del", json!({"node-name": job_id(disk)})).await;
    }
}

/// Waits until every copy of `disks` has concluded (or is gone); the first
/// error a job reports is returned.
async fn wait_concluded(
    qmp: &QmpClient,
    disks: &[String],
    deadline: Duration,
) -> Result<(), MigrateError> {
    let started = Instant::now();
    loop {
        let states = mirrors(qmp).await?;
        let open: Vec<&MirrorState> = states
            .iter()
            .filter(|m| {
                disks.contains(&m.disk) && !matches!(m.status.as_str(), "concluded" | "null")
            })
            .collect();
        if open.is_empty() {
            if let Some(failed) = states
                .iter()
                .find(|m| disks.contains(&m.disk) && m.error.is_some())
            {
                return Err(MigrateError::Mirror {
                    disk: failed.disk.clone(),
                    message: failed.error.clone().unwrap_or_default(),
                });
            }
            return Ok(());
        }
        if started.elapsed() > deadline {
            return Err(MigrateError::Timeout {
                what: "finishing the disk copies".into(),
                deadline,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts sending the memory to unix socket `socket` (as QEMU sees it):
/// paused before the switch (so the disk copies can be finished first),
/// with events and auto-converge, `downtime_ms` and `bandwidth` (bytes
/// per second, 0: no cap).
pub async fn start(
    qmp: &QmpClient,
    socket: &str,
    downtime_ms: u64,
    bandwidth: u64,
) -> Result<(), MigrateError> {
    let capabilities: Vec<Value> = ["pause-before-switchover", "events", "auto-converge"]
        .iter()
        .map(|c| json!({"capability": c, "state": true}))
        .collect();
    call(
        qmp,
        "migrate-set-capabilities",
        json!({"capabilities": capabilities}),
    )
    .await?;
    // QEMU caps a migration at 128 MiB/s unless told otherwise, and has no
    // "unlimited": no cap is 1 TiB/s (its largest is about 18 TB/s).
    let bandwidth = if bandwidth == 0 { 1 << 40 } else { bandwidth };
    call(
        qmp,
        "migrate-set-parameters",
        json!({"downtime-limit": downtime_ms, "max-bandwidth": bandwidth}),
    )
    .await?;
    call(qmp, "migrate", json!({"uri": format!("unix:{socket}")})).await?;
    Ok(())
}

/// Raises the downtime the switch may take.
pub async fn set_downtime(qmp: &QmpClient, downtime_ms: u64) -> Result<(), MigrateError> {
    call(
        qmp,
        "migrate-set-parameters",
        json!({"downtime-limit": downtime_ms}),
    )
    .await
    .map(drop)
}

/// The memory copy as QEMU reports it (`query-migrate`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RamState {
    /// QEMU's status: `none`, `setup`, `active`, `pre-switchover`,
    /// `device`, `completed`, `failed`, `cancelling`, `cancelled`, …
    pub status: String,
    /// Guest memory, bytes.
    pub total: u64,
    /// Still to send, bytes.
    pub remaining: u64,
    /// Sent, bytes.
    pub transferred: u64,
    /// Dirtied per second, bytes.
    pub dirty_rate: u64,
    /// Completed passes over memory.
    pub passes: u64,
    /// The pause at the switch, ms (once completed).
    pub downtime_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
}

impl RamState {
    /// The migration ended without completing.
    pub fn failed(&self) -> bool {
        matches!(self.status.as_str(), "failed" | "cancelled")
    }
}

/// Reads the memory copy's state.
pub async fn ram(qmp: &QmpClient) -> Result<RamState, MigrateError> {
    Ok(parse_ram(&call(qmp, "query-migrate", json!({})).await?))
}

fn parse_ram(v: &Value) -> RamState {
    let ram = &v["ram"];
    let page = ram["page-size"].as_u64().unwrap_or(4096);
    RamState {
        status: v["status"].as_str().unwrap_or("none").to_string(),
        total: ram["total"].as_u64().unwrap_or(0),
        remaining: ram["remaining"].as_u64().unwrap_or(0),
        transferred: ram["transferred"].as_u64().unwrap_or(0),
        dirty_rate: ram["dirty-pages-rate"]
            .as_u64()
            .unwrap_or(0)
            .saturating_mul(page),
        passes: ram["dirty-sync-count"].as_u64().unwrap_or(0),
        downtime_ms: v["downtime"].as_u64(),
        error: v["error-desc"].as_str().map(str::to_string),
    }
}

/// Lets a migration paused before the switch go on to complete.
pub async fn continue_switchover(qmp: &QmpClient) -> Result<(), MigrateError> {
    call(qmp, "migrate-continue", json!({"state": "pre-switchover"}))
        .await
        .map(drop)
}

/// Cancels the memory copy (a migration that is not running is fine).
pub async fn cancel(qmp: &QmpClient) {
    let _ = call(qmp, "migrate_cancel", json!({})).await;
}

/// Waits until the memory copy is no longer under way (after a cancel):
/// its final state.
pub async fn settle(qmp: &QmpClient, deadline: Duration) -> Result<RamState, MigrateError> {
    let started = Instant::now();
    loop {
        let state = ram(qmp).await?;
        if !matches!(
            state.status.as_str(),
            "setup" | "active" | "pre-switchover" | "device" | "cancelling" | "wait-unplug"
        ) {
            return Ok(state);
        }
        if started.elapsed() > deadline {
            return Err(MigrateError::Timeout {
                what: "cancelling the migration".into(),
                deadline,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_migration_jobs_are_read() {
        let jobs = json!([
            {"id": "vmlet-mig-root", "type": "mirror", "status": "ready",
             "current-progress": 10, "total-progress": 10},
            {"id": "snap1", "type": "snapshot-save", "status": "running",
             "current-progress": 1, "total-progress": 2},
            {"id": "vmlet-mig-data", "type": "mirror", "status": "concluded",
             "current-progress": 3, "total-progress": 8, "error": "Input/output error"},
        ]);
        let m = parse_mirrors(&jobs);
        assert_eq!(m.len(), 2);
        assert!(m[0].is_ready());
        assert_eq!(
            (m[0].disk.as_str(), m[0].done, m[0].total),
            ("root", 10, 10)
        );
        assert_eq!(m[1].error.as_deref(), Some("Input/output error"));
    }

    #[test]
    fn memory_figures_are_read_in_bytes() {
        let v = json!({"status": "active", "ram": {"total": 268435456, "remaining": 1048576,
            "transferred": 95000000, "dirty-pages-rate": 100, "page-size": 4096,
            "dirty-sync-count": 3}});
        let r = parse_ram(&v);
        assert_eq!(r.status, "active");
        assert_eq!(r.dirty_rate, 409600);
        assert_eq!(r.passes, 3);
        assert!(!r.failed());
        let done = parse_ram(&json!({"status": "completed", "downtime": 42}));
        assert_eq!(done.downtime_ms, Some(42));
        let failed = parse_ram(&json!({"status": "failed", "error-desc": "broken pipe"}));
        assert!(failed.failed());
        assert_eq!(failed.error.as_deref(), Some("broken pipe"));
    }
}
