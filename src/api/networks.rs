//! `/v1/networks` and a VM's NICs (`/v1/vms/{id}/nics`).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::api::body;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::AppState;
use crate::net::networks::{Network, NetworkSpec};
use crate::spec::NicSpec;
use crate::vm::actor::Change;
use crate::vm::Vm;

/// `GET /v1/networks`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkList {
    /// Every network, by name.
    pub networks: Vec<Network>,
}

/// List networks, each with the NICs on it.
#[utoipa::path(get, path = "/v1/networks", tag = "networks",
    responses((status = 200, body = NetworkList)))]
pub async fn list(State(app): State<AppState>) -> Json<NetworkList> {
    Json(NetworkList {
        networks: app.manager.networks().await,
    })
}

/// Show one network: bridge, MTU, VLAN, the NICs on it.
#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "Network name")),
    responses((status = 200, body = Network), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Network>, ApiError> {
    Ok(Json(app.manager.network(&name).await?))
}

/// Create a network: a Linux bridge (an existing one is adopted and never
/// deleted), optionally a VLAN `UPLINK.ID` on it; or `type: user`.
/// Netlink failures carry the kernel's reason (EEXIST, EPERM, ENODEV).
#[utoipa::path(post, path = "/v1/networks", tag = "networks",
    request_body = NetworkSpec,
    responses((status = 201, body = Network), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    let spec: NetworkSpec = body::parse(&bytes)?;
    Ok((
        StatusCode::CREATED,
        Json(app.manager.create_network(spec).await?),
    ))
}

/// Delete a network; 409 while NICs are on it. Links vmlet did not create
/// stay.
#[utoipa::path(delete, path = "/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "Network name")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.manager.delete_network(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Add a NIC; hot-plugged when the VM runs (409 without hot-plug). The
/// MAC is derived from the VM's UUID when not given.
#[utoipa::path(post, path = "/v1/vms/{id}/nics", tag = "networks",
    params(("id" = String, Path, description = "VM UUID or name")),
    request_body = NicSpec,
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn attach_nic(
    State(app): State<AppState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<Vm>, ApiError> {
    let nic: NicSpec = body::parse(&bytes)?;
    Ok(Json(app.manager.attach_nic(&id, nic).await?))
}

/// Remove a NIC (by MAC or index); unplugged when the VM runs, and its tap
/// removed.
#[utoipa::path(delete, path = "/v1/vms/{id}/nics/{nic}", tag = "networks",
    params(("id" = String, Path, description = "VM UUID or name"),
        ("nic" = String, Path, description = "The NIC's MAC or index")),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn detach_nic(
    State(app): State<AppState>,
    Path((id, nic)): Path<(String, String)>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(app.manager.change(&id, Change::DetachNic(nic)).await?))
}
