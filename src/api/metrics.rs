//! `GET /metrics`: Prometheus metrics in the text format.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::api::AppState;

/// Prometheus metrics (text format 0.0.4): VMs by state; per VM (labels
/// `id`, `name`) vCPU time, QEMU RSS, block I/O, NIC traffic, balloon
/// size and its cgroup's CPU, memory and task figures; API request and QMP
/// command latency, QMP timeouts. A hung QEMU delays the answer by at most
/// two seconds; its QMP-derived series are then missing and
/// `vmlet_vm_metrics_up` is 0.
#[utoipa::path(get, path = "/metrics", tag = "node",
    responses((status = 200, description = "Metrics in the Prometheus text format",
        content_type = "text/plain; version=0.0.4; charset=utf-8", body = String)))]
pub async fn scrape(State(app): State<AppState>) -> Response {
    let text = crate::vm::scrape::render(&app.manager.handles(), app.manager.cgroup_stats()).await;
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}
