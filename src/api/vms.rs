//! `/v1/vms`: list, create, show, change, delete, and power actions. Handlers only
//! parse and answer; the VM manager and actors decide.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::body;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::AppState;
use crate::spec::{merge_patch, VmSpec};
use crate::vm::actor::ActOptions;
use crate::vm::error::VmError;
use crate::vm::manager::Created;
use crate::vm::state::PowerAction;
use crate::vm::Vm;

/// `GET /v1/vms`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmList {
    /// Every VM, by name.
    pub vms: Vec<Vm>,
}

/// `DELETE /v1/vms/{id}` options.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Delete even a running VM (it is stopped first, without asking the guest).
    #[serde(default)]
    pub force: bool,
    /// Delete the VM's volumes too (its own overlays and blank disks always
    /// go; images never do).
    #[serde(default)]
    pub delete_volumes: bool,
}

/// `POST /v1/vms/{id}/stop` body (optional).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Kill QEMU at once (SIGTERM, then SIGKILL) instead of pressing the
    /// ACPI power button. May overtake a graceful stop in progress.
    #[serde(default)]
    pub force: bool,
    /// Seconds the guest gets to power off before QEMU is quit
    /// (default: the daemon's `stop_grace_s`).
    #[serde(default)]
    #[schema(maximum = 86_400)]
    pub timeout_s: Option<u64>,
}

/// `POST /v1/vms/{id}/reboot` options.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RebootRequest {
    /// Reset the machine at once (QMP `system_reset`, like the reset
    /// button) instead of asking the guest.
    #[serde(default)]
    pub force: bool,
    /// Seconds the guest gets to shut down after the ACPI power button
    /// before the reboot fails (default: the daemon's `stop_grace_s`).
    #[serde(default)]
    #[schema(maximum = 86_400)]
    pub timeout_s: Option<u64>,
}

/// Largest `timeout_s` a stop or reboot accepts (one day).
const MAX_STOP_TIMEOUT_S: u64 = 86_400;

/// List VMs.
#[utoipa::path(get, path = "/v1/vms", tag = "vms",
    responses((status = 200, body = VmList)))]
pub async fn list(State(app): State<AppState>) -> Json<VmList> {
    Json(VmList {
        vms: app.manager.list(),
    })
}

/// Show one VM (by UUID or name).
///
/// The `ETag` header is its generation, for a later `PATCH` with
/// `If-Match`.
#[utoipa::path(get, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "VM UUID or name")),
    responses((status = 200, body = Vm, headers(("ETag" = String, description = "The VM's generation, quoted (`\"7\"`): send it back as `If-Match`"))),
        (status = 404, body = ErrorBody)))]
pub async fn show(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<([(header::HeaderName, String); 1], Json<Vm>), ApiError> {
    let vm = app.manager.show(&id)?;
    Ok((etag(&vm), Json(vm)))
}

/// The `ETag` header of a VM view: its generation, quoted, which is what
/// [`if_match`] takes back.
fn etag(vm: &Vm) -> [(header::HeaderName, String); 1] {
    [(header::ETAG, format!("\"{}\"", vm.generation))]
}

/// Create a VM; the server picks its UUID. The VM is created stopped.
#[utoipa::path(post, path = "/v1/vms", tag = "vms",
    request_body(content = VmSpec, description = "The spec, without `uuid`"),
    responses((status = 201, body = Vm), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let mut value: serde_json::Value = body::parse(&bytes)?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| ApiError::invalid_field("body", "must be a JSON object (a VM spec)"))?;
    if object.contains_key("uuid") {
        return Err(ApiError::invalid_field(
            "uuid",
            "is chosen by the server on POST; use PUT /v1/vms/{uuid} to choose it",
        ));
    }
    object.insert("uuid".into(), Uuid::new_v4().to_string().into());
    let spec: VmSpec = body::from_value(value)?;
    match app.manager.create(spec).await? {
        Created::New(vm) | Created::Existing(vm) => Ok((StatusCode::CREATED, Json(vm))),
    }
}

/// Create a VM with the caller's UUID. Safe to retry: the same spec again
/// answers 200; a different spec under that UUID answers 409.
#[utoipa::path(put, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = Uuid, Path, description = "The VM's UUID")),
    request_body(content = VmSpec, description = "The spec; `uuid` may be left out, else it must match the path"),
    responses((status = 201, body = Vm, description = "Created"),
        (status = 200, body = Vm, description = "The same spec already existed"),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn put(
    State(app): State<AppState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad_request(format!("{id:?} is not a UUID: PUT creates by UUID")))?;
    let mut value: serde_json::Value = body::parse(&bytes)?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| ApiError::invalid_field("body", "must be a JSON object (a VM spec)"))?;
    match object.get("uuid") {
        None => {
            object.insert("uuid".into(), id.to_string().into());
        }
        Some(given) if given.as_str().and_then(|s| Uuid::parse_str(s).ok()) == Some(id) => {}
        Some(_) => {
            return Err(ApiError::invalid_field(
                "uuid",
                format!("must match the path ({id})"),
            ));
        }
    }
    let spec: VmSpec = body::from_value(value)?;
    match app.manager.create(spec).await? {
        Created::New(vm) => Ok((StatusCode::CREATED, Json(vm))),
        Created::Existing(vm) => Ok((StatusCode::OK, Json(vm))),
    }
}

/// `PATCH /v1/vms/{id}` options.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PatchQuery {
    /// Apply only if the VM is still at this generation (like `If-Match`).
    #[serde(default)]
    pub generation: Option<u64>,
}

/// Change a VM's spec with a JSON merge patch (RFC 7386) on its spec (its
/// pending spec, when it has one). A stopped VM takes the change at once.
/// A running VM takes live what QEMU can (memory down to its boot size
/// through the balloon, disk I/O limits, disks and NICs plugged in or out,
/// `autostart`); the rest is kept in `pending` and becomes the spec at the
/// next start. `uuid` and `name` cannot change. With `If-Match: "N"` or
/// `?generation=N`, a VM no longer at generation N answers 412.
#[utoipa::path(patch, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "VM UUID or name"),
        ("If-Match" = Option<String>, Header, nullable = false, pattern = r#"^(W/)?("[0-9]{1,19}"|[0-9]{1,19})$"#, description = "The generation the change is based on, quoted (`\"7\"`); anything else is 400"),
        PatchQuery),
    request_body(description = "A JSON merge patch of the spec (RFC 7386), as `application/merge-patch+json` or plain `application/json`",
        content((Object = "application/merge-patch+json"), (Object = "application/json"))),
    responses((status = 200, body = Vm, description = "Changed (see `pending` for what waits for the next start)",
            headers(("ETag" = String, description = "The VM's new generation, quoted"))),
        (status = 400, body = ErrorBody, description = "If-Match is not a generation"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 412, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn patch(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<PatchQuery>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<([(header::HeaderName, String); 1], Json<Vm>), ApiError> {
    let (header, param) = (if_match(&headers)?, query.generation);
    let patch: serde_json::Value = body::parse(&bytes)?;
    if !patch.is_object() {
        return Err(ApiError::invalid_field(
            "body",
            "must be a JSON object (a merge patch of the VM's spec)",
        ));
    }
    let vm = app.manager.find(&id)?.view();
    // Two different generations cannot both be the VM's.
    let generation = match (header, param) {
        (Some(a), Some(b)) if a != b => {
            return Err(VmError::StaleGeneration(format!(
                "If-Match ({a}) and generation ({b}) disagree: the VM is at generation {}",
                vm.generation
            ))
            .into())
        }
        (a, b) => a.or(b),
    };
    let base = vm.pending.map_or(vm.spec, |p| p.spec);
    let mut value = serde_json::to_value(&base)
        .map_err(|e| ApiError::bad_request(format!("the VM's spec: {e}")))?;
    merge_patch(&mut value, &patch);
    let spec: VmSpec = body::from_value(value)?;
    let changed = app.manager.edit(&id, spec, base, generation).await?;
    Ok((etag(&changed), Json(changed)))
}

/// The generation in an `If-Match` header: `"7"` (or `7`, or `W/"7"`).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let bad = || ApiError::bad_request("If-Match must be a VM generation, like \"7\"");
    let text = value.to_str().map_err(|_| bad())?.trim();
    let text = text.strip_prefix("W/").unwrap_or(text);
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    text.parse().map(Some).map_err(|_| bad())
}

/// Delete a VM. A running or paused VM needs `force=true`.
#[utoipa::path(delete, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "VM UUID or name"), DeleteQuery),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    app.manager
        .delete(&id, query.force, query.delete_volumes)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn act(
    app: &AppState,
    id: &str,
    action: PowerAction,
    options: ActOptions,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(app.manager.act(id, action, options).await?))
}

/// Start a VM; answers once the guest runs. Starting a running VM succeeds.
#[utoipa::path(post, path = "/v1/vms/{id}/start", tag = "power",
    params(("id" = String, Path, description = "VM UUID or name")),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn start(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    act(&app, &id, PowerAction::Start, ActOptions::default()).await
}

/// Stop a VM: ACPI power button, then after `timeout_s` QMP `quit`, then
/// SIGKILL; or at once with `force`. Answers once QEMU is gone. Stopping a
/// stopped VM succeeds.
#[utoipa::path(post, path = "/v1/vms/{id}/stop", tag = "power",
    params(("id" = String, Path, description = "VM UUID or name")),
    request_body(content = Option<StopRequest>, description = "Optional: no body (or `null`) is `{}`"),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn stop(
    State(app): State<AppState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<Vm>, ApiError> {
    let request: StopRequest = body::parse_optional(&bytes)?;
    if request.timeout_s.is_some_and(|t| t > MAX_STOP_TIMEOUT_S) {
        return Err(ApiError::invalid_field(
            "timeout_s",
            format!("must be at most {MAX_STOP_TIMEOUT_S}"),
        ));
    }
    let options = ActOptions {
        stop_timeout: request.timeout_s.map(Duration::from_secs),
        ..ActOptions::default()
    };
    act(
        &app,
        &id,
        PowerAction::Stop {
            force: request.force,
        },
        options,
    )
    .await
}

/// Reboot the guest by asking it, as libvirt's ACPI reboot does: QEMU is set
/// to pause when the guest shuts down, the ACPI power button is pressed, and
/// once the guest has shut down the machine is reset and started again (the
/// same QEMU: a new boot). A guest that does not shut down within
/// `timeout_s` keeps running and the reboot fails (503 `timeout`); a paused
/// VM is refused (409). With `force`, the machine is reset at once. Answers
/// once the new boot runs.
#[utoipa::path(post, path = "/v1/vms/{id}/reboot", tag = "power",
    params(("id" = String, Path, description = "VM UUID or name")),
    request_body(content = Option<RebootRequest>, description = "Optional: no body (or `null`) is `{}`"),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn reboot(
    State(app): State<AppState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<Vm>, ApiError> {
    let request: RebootRequest = body::parse_optional(&bytes)?;
    if request.timeout_s.is_some_and(|t| t > MAX_STOP_TIMEOUT_S) {
        return Err(ApiError::invalid_field(
            "timeout_s",
            format!("must be at most {MAX_STOP_TIMEOUT_S}"),
        ));
    }
    let options = ActOptions {
        stop_timeout: request.timeout_s.map(Duration::from_secs),
        force: request.force,
    };
    act(&app, &id, PowerAction::Reboot, options).await
}

/// Pause the vCPUs. Pausing a paused VM succeeds.
#[utoipa::path(post, path = "/v1/vms/{id}/pause", tag = "power",
    params(("id" = String, Path, description = "VM UUID or name")),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn pause(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    act(&app, &id, PowerAction::Pause, ActOptions::default()).await
}

/// Resume paused vCPUs. Resuming a running VM succeeds.
#[utoipa::path(post, path = "/v1/vms/{id}/resume", tag = "power",
    params(("id" = String, Path, description = "VM UUID or name")),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn resume(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    act(&app, &id, PowerAction::Resume, ActOptions::default()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_takes_a_quoted_or_bare_generation() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::IF_MATCH, v.parse().unwrap());
            if_match(&h)
        };
        assert_eq!(with("\"7\"").unwrap(), Some(7));
        assert_eq!(with("W/\"7\"").unwrap(), Some(7));
        assert_eq!(with("12").unwrap(), Some(12));
        assert_eq!(with("\"x\"").unwrap_err().status.as_u16(), 400);
        assert_eq!(with("*").unwrap_err().status.as_u16(), 400);
        assert_eq!(if_match(&HeaderMap::new()).unwrap(), None);
    }
}
