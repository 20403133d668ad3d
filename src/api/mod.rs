//! The HTTP API (v1): routes, request and response types, the error
//! mapping, authentication and server-sent events. HTTP only: every
//! decision is the VM manager's.

pub mod body;
pub mod console;
pub mod error;
pub mod events;
pub mod images;
pub mod listener;
pub mod metrics;
pub mod middleware;
pub mod migrations;
pub mod networks;
pub mod tls;
pub mod upgrade;
pub mod vm_disks;
pub mod vms;
pub mod volumes;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::OpenApi;

use crate::api::error::ApiError;
use crate::node::NodeInfo;
use crate::vm::manager::Manager;

/// What handlers share.
#[derive(Debug)]
pub struct App {
    /// The VMs.
    pub manager: Arc<Manager>,
    /// Live migrations, to and from this host.
    pub migrations: crate::migration::Migrations,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Flips to `true` when the daemon shuts down (ends event streams).
    pub shutdown: watch::Receiver<bool>,
    /// Live console tokens.
    pub consoles: crate::console::tokens::TokenStore,
    /// noVNC's files, for the console page.
    pub novnc_dir: std::path::PathBuf,
}

/// Handler state.
pub type AppState = Arc<App>;

/// `GET /healthz`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok` when the daemon answers.
    pub status: String,
}

/// Liveness: the daemon answers (it only listens once VMs are reattached).
/// No bearer token needed, even on TCP.
#[utoipa::path(get, path = "/healthz", tag = "node", security(()),
    responses((status = 200, body = Health),
        (status = 400, body = crate::api::error::ErrorBody, description = "TCP: `bad_host`")))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// The host: CPUs, memory, QEMU, accelerator, profiles, VMs by state.
#[utoipa::path(get, path = "/v1/node", tag = "node",
    responses((status = 200, body = NodeInfo)))]
pub async fn node(State(app): State<AppState>) -> Json<NodeInfo> {
    Json(app.manager.node())
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "node",
    responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json")))]
pub async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    )
        .into_response()
}

/// The OpenAPI document, generated from the handlers and types.
#[derive(OpenApi)]
#[openapi(
    info(title = "vmlet", description = "Node daemon for QEMU virtualization hosts: API v1. \
        Errors are `{\"error\":{\"code\",\"message\"}}` with 400 malformed (`bad_host`: on TCP, \
        a `Host` that is not one of the daemon's names), 401 unauthorized (TCP: missing or wrong \
        bearer token), 403 `forbidden_origin` (TCP: a state-changing request from another \
        `Origin`), 404 not found, 409 conflicting state or task, 412 `stale_generation` (the \
        VM changed since the generation given), 413 body too large, 415 \
        `unsupported_media_type` (a body that is not `application/json`), 422 invalid spec \
        (the field named), 503 QEMU or host failure, 507 the host's disk is full. On TCP every \
        route but `/healthz` and the console's GET routes (their one-time token is the \
        credential) needs `Authorization: Bearer TOKEN`; the unix socket needs none."),
    security(("bearer" = [])),
    paths(
        healthz, node, openapi, metrics::scrape,
        vms::list, vms::show, vms::create, vms::put, vms::patch, vms::delete,
        vms::start, vms::stop, vms::reboot, vms::pause, vms::resume,
        vm_disks::attach, vm_disks::detach, vm_disks::set_limits,
        vm_disks::list_snapshots, vm_disks::create_snapshot, vm_disks::revert_snapshot,
        vm_disks::delete_snapshot,
        images::list, images::show, images::import, images::delete,
        volumes::list, volumes::show, volumes::create, volumes::resize, volumes::delete,
        networks::list, networks::show, networks::create, networks::delete,
        networks::attach_nic, networks::detach_nic,
        console::create_token, console::open, console::open_vm, console::page, console::log,
        events::stream,
        migrations::migrate, migrations::list, migrations::show, migrations::cancel,
        migrations::incoming, migrations::finish, migrations::memory, migrations::disk,
    ),
    tags(
        (name = "vms", description = "VMs and their specs"),
        (name = "power", description = "Power actions; each answers when done"),
        (name = "disks", description = "Hot-plug, unplug and I/O limits of a VM's disks"),
        (name = "snapshots", description = "VM snapshots (live: memory and disks)"),
        (name = "images", description = "The image store"),
        (name = "volumes", description = "Named volumes"),
        (name = "networks", description = "Bridges, VLANs and a VM's NICs"),
        (name = "console", description = "VNC and serial consoles: one-time tokens, websockets, the noVNC page, the serial log"),
        (name = "events", description = "Change events"),
        (name = "migrations", description = "Live migration between vmlet hosts (`migrate` on the source; `incoming`, `finish` and the streams are daemon to daemon)"),
        (name = "node", description = "The host"),
    ),
    modifiers(&BearerAuth, &CommonResponses)
)]
pub struct ApiDoc;

/// Adds the error answers every route of a kind can give, whatever its
/// handler does, so no route's list can forget one: 400 (a malformed
/// request, a Host the daemon does not answer to), 401 (bearer token, on
/// every route that needs one), 403 (a foreign `Origin` on a
/// state-changing request), and for routes with a JSON body 413 (too
/// large), 415 (not `application/json`) and 422 (a field named).
struct CommonResponses;

/// Routes a TCP listener serves without a bearer token (see
/// [`middleware`]): health, and the console's GETs (their one-time token
/// is their credential).
fn without_bearer_token(path: &str, method: &str) -> bool {
    path == "/healthz"
        || (method == "get"
            && (path == "/console"
                || path == "/v1/console"
                || path == "/v1/vms/{id}/console"
                || path.starts_with("/novnc/")))
}

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{RefOr, ResponseBuilder};

        let error = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        utoipa::openapi::ContentBuilder::new()
                            .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        };
        // Handler names repeat across modules (`list`, `show`, …), but an
        // operationId must be unique: those get their tag in front.
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for item in openapi.paths.paths.values() {
            for op in [&item.get, &item.put, &item.post, &item.delete]
                .into_iter()
                .flatten()
            {
                if let Some(id) = &op.operation_id {
                    *seen.entry(id.clone()).or_default() += 1;
                }
            }
        }
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                let tag = op.tags.as_ref().and_then(|t| t.first()).cloned();
                if let (Some(id), Some(tag)) = (op.operation_id.as_mut(), tag) {
                    if seen.get(id.as_str()).is_some_and(|n| *n > 1) {
                        *id = format!("{tag}_{id}");
                    }
                }
            }
        }
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                ("get", item.get.as_mut()),
                ("put", item.put.as_mut()),
                ("post", item.post.as_mut()),
                ("delete", item.delete.as_mut()),
                ("patch", item.patch.as_mut()),
            ];
            for (method, operation) in operations {
                let Some(operation) = operation else { continue };
                let responses = &mut operation.responses.responses;
                let mut add = |status: &str, description: &str| {
                    responses
                        .entry(status.to_string())
                        .or_insert_with(|| error(description));
                };
                add(
                    "400",
                    "Malformed request (`bad_request`: bad JSON or parameter), or a Host \
                     header this daemon does not answer to (`bad_host`, TCP listeners)",
                );
                if !without_bearer_token(path, method) {
                    add(
                        "401",
                        "Missing or wrong bearer token (`unauthorized`, TCP listeners)",
                    );
                }
                if method != "get" {
                    add(
                        "403",
                        "An `Origin` header other than the daemon's own \
                         (`forbidden_origin`, TCP listeners)",
                    );
                }
                if operation.request_body.is_some() {
                    add("413", "The body is over the limit (`payload_too_large`)");
                    add(
                        "415",
                        "The body is not `application/json` (`unsupported_media_type`)",
                    );
                    add(
                        "422",
                        "A field is invalid (`invalid_spec`, the field named)",
                    );
                }
            }
        }
    }
}

/// Adds the `bearer` security scheme the TCP listener requires.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "TCP listeners: the token in the daemon's auth_token_file (by default \
                         STATE_DIR/api-token, generated on first start). The unix socket needs \
                         no token.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document as pretty JSON (what `docs/openapi.json` holds).
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut text = doc
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

async fn fallback() -> ApiError {
    ApiError::not_found("no such route")
}

/// Turns axum's own rejections (413 from the body limit, 405, bad path
/// parameters) into the API's error body.
async fn uniform_errors(State(limit): State<usize>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    // Our own errors are JSON already.
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status().is_success() || is_json {
        return response;
    }
    let status = response.status();
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(limit),
        StatusCode::METHOD_NOT_ALLOWED => ApiError {
            status,
            code: "method_not_allowed",
            ..ApiError::bad_request("method not allowed on this route")
        },
        s if s.is_client_error() => {
            let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
                .await
                .unwrap_or_default();
            ApiError {
                status: s,
                ..ApiError::bad_request(String::from_utf8_lossy(&body).trim().to_string())
            }
        }
        _ => return response,
    };
    error.into_response()
}

/// The API's routes. `guard`: for TCP listeners, the `Host`, `Origin` and
/// bearer-token checks of [`middleware::tcp_guard`]. Every listener refuses
/// request bodies that are not JSON.
pub fn router(app: AppState, guard: Option<middleware::TcpGuard>) -> Router {
    let limit = app.max_body_bytes;
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/node", get(node))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics::scrape))
        .route("/v1/vms", get(vms::list).post(vms::create))
        .route(
            "/v1/vms/{id}",
            get(vms::show)
                .put(vms::put)
                .patch(vms::patch)
                .delete(vms::delete),
        )
        .route("/v1/vms/{id}/start", post(vms::start))
        .route("/v1/vms/{id}/stop", post(vms::stop))
        .route("/v1/vms/{id}/reboot", post(vms::reboot))
        .route("/v1/vms/{id}/pause", post(vms::pause))
        .route("/v1/vms/{id}/resume", post(vms::resume))
        .route("/v1/vms/{id}/disks", post(vm_disks::attach))
        .route("/v1/vms/{id}/disks/{disk}", delete(vm_disks::detach))
        .route(
            "/v1/vms/{id}/disks/{disk}/limits",
            put(vm_disks::set_limits),
        )
        .route(
            "/v1/vms/{id}/snapshots",
            get(vm_disks::list_snapshots).post(vm_disks::create_snapshot),
        )
        .route(
            "/v1/vms/{id}/snapshots/{name}",
            delete(vm_disks::delete_snapshot),
        )
        .route(
            "/v1/vms/{id}/snapshots/{name}/revert",
            post(vm_disks::revert_snapshot),
        )
        .route("/v1/images", get(images::list).post(images::import))
        .route(
            "/v1/images/{name}",
            get(images::show).delete(images::delete),
        )
        .route("/v1/volumes", get(volumes::list).post(volumes::create))
        .route(
            "/v1/volumes/{name}",
            get(volumes::show).delete(volumes::delete),
        )
        .route("/v1/volumes/{name}/resize", post(volumes::resize))
        .route("/v1/networks", get(networks::list).post(networks::create))
        .route(
            "/v1/networks/{name}",
            get(networks::show).delete(networks::delete),
        )
        .route("/v1/vms/{id}/nics", post(networks::attach_nic))
        .route("/v1/vms/{id}/nics/{nic}", delete(networks::detach_nic))
        .route("/v1/vms/{id}/migrate", post(migrations::migrate))
        .route("/v1/migrations", get(migrations::list))
        .route("/v1/migrations/incoming", post(migrations::incoming))
        .route("/v1/migrations/{id}", get(migrations::show))
        .route("/v1/migrations/{id}/cancel", post(migrations::cancel))
        .route("/v1/migrations/{id}/finish", post(migrations::finish))
        .route("/v1/migrations/{id}/memory", post(migrations::memory))
        .route("/v1/migrations/{id}/disks/{disk}", post(migrations::disk))
        .route("/v1/events", get(events::stream))
        .route(
            "/v1/vms/{id}/console",
            get(console::open_vm).post(console::create_token),
        )
        .route("/v1/vms/{id}/console-log", get(console::log))
        .route("/v1/console", get(console::open))
        .route(
            "/console",
            get(console::page).layer(from_fn(console::browser_headers)),
        )
        .route(
            "/novnc/{*path}",
            get(console::novnc).layer(from_fn(console::browser_headers)),
        )
        .fallback(fallback)
        .with_state(app)
        .layer(DefaultBodyLimit::max(limit))
        .layer(from_fn_with_state(limit, uniform_errors))
        .layer(from_fn(middleware::require_json_body));
    if let Some(guard) = guard {
        router = router.layer(from_fn_with_state(guard, middleware::tcp_guard));
    }
    router.layer(from_fn(middleware::log_request))
}
