//! Live migration: `POST /v1/vms/{id}/migrate` (the scheduler's one call,
//! on the source), `/v1/migrations` on both daemons, and the daemon-to-
//! daemon calls the source makes on the target (prepare, the upgraded byte
//! streams, finish).

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::error::{ApiError, ErrorBody};
use crate::api::{body, upgrade, AppState};
use crate::migration::streams::PROTOCOL;
use crate::spec::{FinishRequest, MigrateRequest, Migration};
use crate::vm::manager::IncomingRequest;

/// `GET /v1/migrations`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationList {
    /// Every migration this daemon took part in (recent finished ones
    /// included), newest first.
    pub migrations: Vec<Migration>,
}

fn migration_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found(format!("no migration {id}")))
}

/// Move a running VM to another vmlet host (live migration with its local
/// disks). The target is prepared before the answer: its refusal (no such
/// image, too little capacity, an incompatible CPU model) is this call's
/// 409/422 and leaves nothing on either side. Then it answers 202 and the
/// migration runs on its own: follow it with `GET /v1/migrations/{id}` or
/// the `migration` events.
#[utoipa::path(post, path = "/v1/vms/{id}/migrate", tag = "migrations",
    params(("id" = String, Path, description = "VM UUID or name")),
    request_body = MigrateRequest,
    responses((status = 202, body = Migration), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 502, body = ErrorBody), (status = 503, body = ErrorBody),
        (status = 507, body = ErrorBody)))]
pub async fn migrate(
    State(app): State<AppState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Migration>), ApiError> {
    let request: MigrateRequest = body::parse(&bytes)?;
    let migrations = app.migrations.clone();
    // Run to its end even when the caller goes away: a start cut short
    // would leave the VM lent to a migration that never runs.
    let migration = detached(async move { migrations.start(&id, request).await }).await?;
    Ok((StatusCode::ACCEPTED, Json(migration)))
}

/// List migrations (in progress and recently finished), newest first.
#[utoipa::path(get, path = "/v1/migrations", tag = "migrations",
    responses((status = 200, body = MigrationList)))]
pub async fn list(State(app): State<AppState>) -> Json<MigrationList> {
    Json(MigrationList {
        migrations: app.migrations.list(),
    })
}

/// Show one migration.
#[utoipa::path(get, path = "/v1/migrations/{id}", tag = "migrations",
    params(("id" = String, Path, description = "Migration id")),
    responses((status = 200, body = Migration), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Migration>, ApiError> {
    Ok(Json(app.migrations.get(migration_id(&id)?)?))
}

/// Cancel a migration before its switch: the guest keeps running on the
/// source and the target removes what it made. At the switch it is too
/// late (409); a finished migration is answered as it is.
#[utoipa::path(post, path = "/v1/migrations/{id}/cancel", tag = "migrations",
    params(("id" = String, Path, description = "Migration id")),
    responses((status = 200, body = Migration), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn cancel(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Migration>, ApiError> {
    Ok(Json(app.migrations.cancel(migration_id(&id)?).await?))
}

/// Daemon to daemon: prepare this host for a VM arriving by live
/// migration (checks, capacity, disks, a QEMU waiting for the memory, NBD
/// exports of its disks). A refusal leaves nothing behind.
#[utoipa::path(post, path = "/v1/migrations/incoming", tag = "migrations",
    request_body = IncomingRequest,
    responses((status = 201, body = Migration), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody),
        (status = 507, body = ErrorBody)))]
pub async fn incoming(
    State(app): State<AppState>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Migration>), ApiError> {
    let request: IncomingRequest = body::parse(&bytes)?;
    let migrations = app.migrations.clone();
    let prepared = detached(async move { migrations.prepare(request).await }).await?;
    Ok((StatusCode::CREATED, Json(prepared)))
}

/// Daemon to daemon: the source's QEMU completed; once the memory arrived
/// complete here, this host owns the VM and runs it. Safe to repeat.
#[utoipa::path(post, path = "/v1/migrations/{id}/finish", tag = "migrations",
    params(("id" = String, Path, description = "Migration id")),
    request_body = FinishRequest,
    responses((status = 200, body = Migration), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn finish(
    State(app): State<AppState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<Migration>, ApiError> {
    let id = migration_id(&id)?;
    let measured: FinishRequest = body::parse_optional(&bytes)?;
    let migrations = app.migrations.clone();
    Ok(Json(
        detached(async move { migrations.finish(id, measured).await }).await?,
    ))
}

/// Runs `work` in a task of its own, so that a caller who hangs up does
/// not cut it short half-way (the handler's future is dropped then, the
/// task is not).
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, crate::migration::MigrationError>>
        + Send
        + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work)
        .await
        .map_err(|e| ApiError::from(crate::migration::MigrationError::Failed(e.to_string())))?
        .map_err(ApiError::from)
}

/// Daemon to daemon: the memory stream of an arriving VM, over this
/// connection upgraded to `vmlet-migration/1` (answered `101`).
#[utoipa::path(post, path = "/v1/migrations/{id}/memory", tag = "migrations",
    params(("id" = String, Path, description = "Migration id")),
    responses((status = 101, description = "Switching to the stream"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn memory(
    State(app): State<AppState>,
    Path(id): Path<String>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let id = migration_id(&id)?;
    app.migrations.check_stream(id, None)?;
    let (response, stream) = upgrade::accept(&mut request, PROTOCOL)?;
    let migrations = app.migrations.clone();
    tokio::spawn(async move {
        match stream.await {
            Ok(stream) => migrations.memory_stream(id, stream).await,
            Err(e) => tracing::warn!(%id, error = %e, "the memory stream did not open"),
        }
    });
    Ok(response)
}

/// Daemon to daemon: disk `disk`'s NBD stream of an arriving VM, over this
/// connection upgraded to `vmlet-migration/1` (answered `101`).
#[utoipa::path(post, path = "/v1/migrations/{id}/disks/{disk}", tag = "migrations",
    params(("id" = String, Path, description = "Migration id"),
        ("disk" = String, Path, description = "Disk name")),
    responses((status = 101, description = "Switching to the stream"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn disk(
    State(app): State<AppState>,
    Path((id, disk)): Path<(String, String)>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let id = migration_id(&id)?;
    app.migrations.check_stream(id, Some(&disk))?;
    let (response, stream) = upgrade::accept(&mut request, PROTOCOL)?;
    let migrations = app.migrations.clone();
    tokio::spawn(async move {
        match stream.await {
            Ok(stream) => migrations.disk_stream(id, disk, stream).await,
            Err(e) => tracing::warn!(%id, error = %e, "a disk stream did not open"),
        }
    });
    Ok(response)
}
