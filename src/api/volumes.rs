//! `/v1/volumes`: named volumes.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::api::body;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::AppState;
use crate::storage::volumes::{Volume, VolumeCreate, VolumeResize};

/// `GET /v1/volumes`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeList {
    /// Every volume, by name.
    pub volumes: Vec<Volume>,
}

/// List volumes, each with the VM disk using it.
#[utoipa::path(get, path = "/v1/volumes", tag = "volumes",
    responses((status = 200, body = VolumeList)))]
pub async fn list(State(app): State<AppState>) -> Result<Json<VolumeList>, ApiError> {
    Ok(Json(VolumeList {
        volumes: app.manager.volumes().await?,
    }))
}

/// Show one volume.
#[utoipa::path(get, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(app.manager.volume(&name).await?))
}

/// Create a volume: blank (`size_mib`) or a copy of an image.
#[utoipa::path(post, path = "/v1/volumes", tag = "volumes",
    request_body = VolumeCreate,
    responses((status = 201, body = Volume), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 507, body = ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    let request: VolumeCreate = body::parse(&bytes)?;
    Ok((
        StatusCode::CREATED,
        Json(app.manager.create_volume(&request).await?),
    ))
}

/// Grow a volume; online (`block_resize`) when its VM runs.
#[utoipa::path(post, path = "/v1/volumes/{name}/resize", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    request_body = VolumeResize,
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn resize(
    State(app): State<AppState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Json<Volume>, ApiError> {
    let request: VolumeResize = body::parse(&bytes)?;
    Ok(Json(
        app.manager.resize_volume(&name, request.size_mib).await?,
    ))
}

/// Delete a volume. 409 while a VM uses it.
#[utoipa::path(delete, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.manager.delete_volume(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
