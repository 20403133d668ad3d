//! `/v1/vms/{id}/disks` (hot-plug, unplug, I/O limits) and
//! `/v1/vms/{id}/snapshots`. Each answers when done, with the VM.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::api::body;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::AppState;
use crate::spec::{DiskSpec, IoLimits};
use crate::vm::actor::Change;
use crate::vm::disk_ops::{Snapshot, SnapshotKind};
use crate::vm::Vm;

/// `GET /v1/vms/{id}/snapshots`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotList {
    /// The VM's snapshots, oldest first.
    pub snapshots: Vec<Snapshot>,
}

/// `POST /v1/vms/{id}/snapshots`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// The snapshot's name.
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
}

/// Attach a volume (`volume` set; other fields as in a spec's disk). On a
/// running VM it is hot-plugged; 409 when the profile has no hot-plug.
#[utoipa::path(post, path = "/v1/vms/{id}/disks", tag = "disks",
    params(("id" = String, Path, description = "VM UUID or name")),
    request_body = DiskSpec,
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn attach(
    State(app): State<AppState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<Vm>, ApiError> {
    let disk: DiskSpec = body::parse(&bytes)?;
    Ok(Json(
        app.manager.change(&id, Change::AttachDisk(disk)).await?,
    ))
}

/// Detach a volume or host-file disk. On a running VM the guest is asked
/// to release it (`device_del`, then `DEVICE_DELETED`).
#[utoipa::path(delete, path = "/v1/vms/{id}/disks/{disk}", tag = "disks",
    params(("id" = String, Path, description = "VM UUID or name"),
        ("disk" = String, Path, description = "Disk name")),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn detach(
    State(app): State<AppState>,
    Path((id, disk)): Path<(String, String)>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(
        app.manager.change(&id, Change::DetachDisk(disk)).await?,
    ))
}

/// Replace a disk's I/O limits; applied at once on a running VM.
#[utoipa::path(put, path = "/v1/vms/{id}/disks/{disk}/limits", tag = "disks",
    params(("id" = String, Path, description = "VM UUID or name"),
        ("disk" = String, Path, description = "Disk name")),
    request_body = IoLimits,
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn set_limits(
    State(app): State<AppState>,
    Path((id, disk)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<Json<Vm>, ApiError> {
    let limits: IoLimits = body::parse(&bytes)?;
    Ok(Json(
        app.manager
            .change(&id, Change::SetLimits { disk, limits })
            .await?,
    ))
}

/// List a VM's snapshots.
#[utoipa::path(get, path = "/v1/vms/{id}/snapshots", tag = "snapshots",
    params(("id" = String, Path, description = "VM UUID or name")),
    responses((status = 200, body = SnapshotList), (status = 404, body = ErrorBody)))]
pub async fn list_snapshots(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<SnapshotList>, ApiError> {
    Ok(Json(SnapshotList {
        snapshots: app.manager.snapshots(&id).await?,
    }))
}

/// Take a snapshot: of memory and disks while the VM runs (`snapshot-save`),
/// of the disks when it is stopped (`qemu-img snapshot`). Every writable
/// disk must be qcow2.
#[utoipa::path(post, path = "/v1/vms/{id}/snapshots", tag = "snapshots",
    params(("id" = String, Path, description = "VM UUID or name")),
    request_body = SnapshotCreate,
    responses((status = 201, body = Snapshot), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_snapshot(
    State(app): State<AppState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let request: SnapshotCreate = body::parse(&bytes)?;
    app.manager
        .snapshot(&id, SnapshotKind::Create, request.name.clone())
        .await?;
    let snapshot = app
        .manager
        .snapshots(&id)
        .await?
        .into_iter()
        .find(|s| s.name == request.name)
        .ok_or_else(|| ApiError::not_found("the snapshot vanished after it was taken"))?;
    Ok((StatusCode::CREATED, Json(snapshot)))
}

/// Go back to a snapshot. A running VM gets the snapshot's memory too (it
/// continues from that moment); a stopped one gets its disks.
#[utoipa::path(post, path = "/v1/vms/{id}/snapshots/{name}/revert", tag = "snapshots",
    params(("id" = String, Path, description = "VM UUID or name"),
        ("name" = String, Path, description = "Snapshot name")),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn revert_snapshot(
    State(app): State<AppState>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(
        app.manager
            .snapshot(&id, SnapshotKind::Revert, name)
            .await?,
    ))
}

/// Delete a snapshot.
#[utoipa::path(delete, path = "/v1/vms/{id}/snapshots/{name}", tag = "snapshots",
    params(("id" = String, Path, description = "VM UUID or name"),
        ("name" = String, Path, description = "Snapshot name")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn delete_snapshot(
    State(app): State<AppState>,
    Path((id, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.manager
        .snapshot(&id, SnapshotKind::Delete, name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
