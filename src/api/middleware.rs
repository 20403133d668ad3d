//! Per-request concerns: a request id and one log line per request, and
//! bearer-token authentication for TCP listeners.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::error::ApiError;

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

/// Gives each request an id (`x-request-id` on the response), logs one
/// line when the response starts, and records its latency by route template
/// (axum's [`MatchedPath`]; `unmatched` for the fallback) for `/metrics`.
pub async fn log_request(request: Request, next: Next) -> Response {
    let id = format!("r{}", NEXT_REQUEST.fetch_add(1, Ordering::Relaxed));
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|r| r.as_str().to_string());
    let started = Instant::now();
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = {
        let _enter = span.enter();
        next.run(request).await
    };
    let status = response.status().as_u16();
    crate::metrics::observe_api_request(
        route.as_deref().unwrap_or("unmatched"),
        method.as_str(),
        status,
        started.elapsed(),
    );
    // Microsecond precision is plenty for a log line.
    let elapsed_ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    if status >= 500 {
        tracing::warn!(request_id = %id, %method, %path, status, elapsed_ms, "request");
    } else {
        tracing::info!(request_id = %id, %method, %path, status, elapsed_ms, "request");
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// The token TCP clients must present as `Authorization: Bearer TOKEN`.
#[derive(Clone)]
pub struct Token(pub Arc<Vec<u8>>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

/// Refuses requests without the right bearer token (401). `/healthz`
/// stays open for load balancers and probes, and so do the console routes a
/// browser opens: their one-time token is the credential.
pub async fn require_token(State(token): State<Token>, request: Request, next: Next) -> Response {
    if is_open_route(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), &token.0) => next.run(request).await,
        Some(_) => ApiError::unauthorized("wrong bearer token").into_response(),
        None => {
            ApiError::unauthorized("missing `Authorization: Bearer TOKEN` header").into_response()
        }
    }
}

/// Routes that need no bearer token: `/healthz`, and the console's
/// websocket, page and noVNC files (GET only).
pub fn is_open_route(method: &axum::http::Method, path: &str) -> bool {
    if path == "/healthz" {
        return true;
    }
    if method != axum::http::Method::GET {
        return false;
    }
    let vm_console = path
        .strip_prefix("/v1/vms/")
        .and_then(|rest| rest.strip_suffix("/console"))
        .is_some_and(|id| !id.is_empty() && !id.contains('/'));
    path == "/v1/console" || path == "/console" || path.starts_with("/novnc/") || vm_console
}

/// Compares without an early exit, so timing does not tell how much of a
/// guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(!constant_time_eq(&[0u8; 256], &[0u8; 512]));
    }

    #[test]
    fn only_health_and_console_gets_skip_the_bearer_token() {
        for path in [
            "/healthz",
            "/v1/console",
            "/console",
            "/novnc/core/rfb.js",
            "/v1/vms/web-1/console",
        ] {
            assert!(is_open_route(&Method::GET, path), "{path}");
        }
        for path in [
            "/v1/vms",
            "/v1/vms/web-1",
            "/v1/vms/web-1/console-log",
            "/v1/vms/a/b/console",
            "/v1/vms//console",
            "/metrics",
        ] {
            assert!(!is_open_route(&Method::GET, path), "{path}");
        }
        // Issuing a token needs the bearer token.
        assert!(!is_open_route(&Method::POST, "/v1/vms/web-1/console"));
        assert!(!is_open_route(&Method::POST, "/v1/console"));
    }
}
