//! Per-request concerns: a request id and one log line per request, the
//! JSON-only rule for request bodies, and what a TCP listener checks before
//! a request reaches a handler: the `Host` (DNS rebinding), the `Origin` of
//! state-changing requests (cross-site requests) and the bearer token.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
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
    // Instrumented, never entered across the await: a guard held over an
    // await leaves the span entered on whatever thread polls next, and
    // corrupts the subscriber's span stack.
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = tracing::Instrument::instrument(next.run(request), span).await;
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

/// What a TCP listener checks on every request, in this order: the `Host`
/// (400 `bad_host`), the `Origin` of a state-changing request (403
/// `forbidden_origin`), the bearer token (401 `unauthorized`).
#[derive(Debug, Clone)]
pub struct TcpGuard {
    /// The bearer token.
    pub token: Token,
    /// The `Host` values accepted.
    pub hosts: Arc<HostRules>,
    /// Whether the listener serves HTTPS: the daemon's own `Origin` is then
    /// `https://HOST`.
    pub https: bool,
}

/// Applies a [`TcpGuard`]. `/healthz` and the console's GET routes need no
/// bearer token (see [`is_open_route`]) but still get the `Host` check, so
/// a rebound name reaches nothing at all.
pub async fn tcp_guard(State(guard): State<TcpGuard>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if !guard.hosts.accepts(&host) {
        return bad_host(&host, &guard.hosts).into_response();
    }
    let scheme = if guard.https { "https" } else { "http" };
    if let Err(refused) = check_origin(request.method(), request.headers(), scheme, &host) {
        return refused.into_response();
    }
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
        Some(p) if constant_time_eq(p.as_bytes(), &guard.token.0) => next.run(request).await,
        Some(_) => ApiError::unauthorized("wrong bearer token").into_response(),
        None => ApiError::unauthorized(
            "missing `Authorization: Bearer TOKEN` header (the token is in the daemon's \
             auth_token_file, by default STATE_DIR/api-token)",
        )
        .into_response(),
    }
}

fn bad_host(host: &str, rules: &HostRules) -> ApiError {
    let shown = if host.is_empty() {
        "no Host header".to_string()
    } else {
        format!("Host {host:?}")
    };
    ApiError {
        code: "bad_host",
        ..ApiError::bad_request(format!(
            "{shown} is not a name of this daemon; accepted: {} (add names to allowed_hosts)",
            rules.describe()
        ))
    }
}

/// Refuses a state-changing request (anything but GET, HEAD and OPTIONS)
/// whose `Origin` is not the daemon's own, `SCHEME://HOST` for the
/// listener's scheme and the request's (already accepted) `Host`: a web page
/// elsewhere must not drive the API through a browser, whatever the browser
/// lets it send. A request without `Origin` (a program, not a browser) is
/// not concerned.
fn check_origin(
    method: &Method,
    headers: &HeaderMap,
    scheme: &str,
    host: &str,
) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let own = format!("{scheme}://{host}");
    if origin.as_bytes().eq_ignore_ascii_case(own.as_bytes()) {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::FORBIDDEN,
        code: "forbidden_origin",
        ..ApiError::bad_request(format!(
            "{method} from origin {:?} is refused: only {own} may change anything",
            String::from_utf8_lossy(origin.as_bytes())
        ))
    })
}

/// The `Host` header values a TCP listener accepts: the listen address
/// (`IP:PORT`), `localhost:PORT` when it is a loopback address, any IP
/// literal with the port when it listens on every address (an IP cannot be
/// rebound), and the configured `allowed_hosts` (with or without the port).
/// Compared without regard to case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRules {
    accepted: Vec<String>,
    any_ip_port: Option<u16>,
}

impl HostRules {
    /// The rules for a listener on `listen` with `allowed_hosts`.
    pub fn new(listen: SocketAddr, allowed_hosts: &[String]) -> HostRules {
        let port = listen.port();
        let mut accepted = vec![listen.to_string()];
        if listen.ip().is_loopback() {
            accepted.push(format!("localhost:{port}"));
        }
        for name in allowed_hosts {
            let name = name.trim().to_ascii_lowercase();
            if name.is_empty() {
                continue;
            }
            if !has_port(&name) {
                accepted.push(format!("{name}:{port}"));
            }
            accepted.push(name);
        }
        accepted.dedup();
        HostRules {
            accepted,
            any_ip_port: listen.ip().is_unspecified().then_some(port),
        }
    }

    /// Whether `host` (a `Host` header value) names this daemon.
    pub fn accepts(&self, host: &str) -> bool {
        let host = host.trim();
        if host.is_empty() {
            return false;
        }
        if self.accepted.iter().any(|a| a.eq_ignore_ascii_case(host)) {
            return true;
        }
        self.any_ip_port
            .is_some_and(|port| host.parse::<SocketAddr>().is_ok_and(|a| a.port() == port))
    }

    /// The accepted values, for error messages.
    pub fn describe(&self) -> String {
        let mut text = self.accepted.join(", ");
        if let Some(port) = self.any_ip_port {
            text.push_str(&format!(", any IP address with port {port}"));
        }
        text
    }
}

/// Whether an authority (`name`, `name:port`, `[v6]:port`) carries a port.
fn has_port(authority: &str) -> bool {
    match authority.rsplit_once(':') {
        Some((head, port)) => {
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!head.contains(':') || head.ends_with(']'))
        }
        None => false,
    }
}

/// Refuses a request body that is not JSON (415 `unsupported_media_type`),
/// on every listener: the API takes JSON only, and insisting on the type
/// stops the "simple" cross-site requests (`text/plain`, forms) a browser
/// sends without asking. A bodyless request needs no type.
pub async fn require_json_body(request: Request, next: Next) -> Response {
    if has_body(request.headers()) {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        // A PATCH body is a JSON merge patch (RFC 7386), which has its own
        // media type; plain JSON means the same there.
        let patch = request.method() == Method::PATCH;
        let accepted = content_type
            .as_deref()
            .is_some_and(|t| is_json(t) || (patch && is_merge_patch(t)));
        if !accepted {
            let got = match &content_type {
                Some(t) => format!("Content-Type {t:?}"),
                None => "no Content-Type".to_string(),
            };
            return ApiError {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code: "unsupported_media_type",
                ..ApiError::bad_request(format!(
                    "request bodies must be JSON (Content-Type: application/json{}); got {got}",
                    if patch {
                        ", or application/merge-patch+json"
                    } else {
                        ""
                    }
                ))
            }
            .into_response();
        }
    }
    next.run(request).await
}

/// Whether a request announces a body: a non-zero `Content-Length`, or a
/// `Transfer-Encoding` (chunked).
fn has_body(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() != "0")
}

/// `application/json`, parameters (`; charset=utf-8`) allowed.
pub fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// `application/merge-patch+json` (RFC 7386), parameters allowed.
pub fn is_merge_patch(content_type: &str) -> bool {
    content_type.split(';').next().is_some_and(|t| {
        t.trim()
            .eq_ignore_ascii_case("application/merge-patch+json")
    })
}

/// Routes that need no bearer token: `/healthz`, and the console's
/// websocket, page and noVNC files (GET only).
pub fn is_open_route(method: &Method, path: &str) -> bool {
    if path == "/healthz" {
        return true;
    }
    if method != Method::GET {
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

    #[test]
    fn hosts_are_the_listen_address_localhost_and_configured_names() {
        let rules = HostRules::new("127.0.0.1:8780".parse().unwrap(), &[]);
        for good in ["127.0.0.1:8780", "localhost:8780", "LOCALHOST:8780"] {
            assert!(rules.accepts(good), "{good}");
        }
        for bad in [
            "",
            "rebind.example",
            "rebind.example:8780",
            "127.0.0.1",
            "127.0.0.1:8781",
            "localhost",
            "10.0.0.1:8780",
        ] {
            assert!(!rules.accepts(bad), "{bad}");
        }
        let rules = HostRules::new(
            "0.0.0.0:8780".parse().unwrap(),
            &["Node1.example.com".into(), "proxy.example:443".into()],
        );
        for good in [
            "node1.example.com",
            "node1.example.com:8780",
            "proxy.example:443",
            "10.1.2.3:8780",
            "[fd00::1]:8780",
        ] {
            assert!(rules.accepts(good), "{good}");
        }
        for bad in [
            "proxy.example",
            "proxy.example:8780",
            "10.1.2.3:80",
            "localhost:8780",
            "evil.example:8780",
        ] {
            assert!(!rules.accepts(bad), "{bad}");
        }
        assert!(rules.describe().contains("node1.example.com:8780"));
        let v6 = HostRules::new("[::1]:9000".parse().unwrap(), &[]);
        assert!(v6.accepts("[::1]:9000") && v6.accepts("localhost:9000"));
    }

    #[test]
    fn ports_are_found_in_names_and_ipv6_literals() {
        assert!(has_port("a.example:80"));
        assert!(has_port("[::1]:80"));
        assert!(!has_port("a.example"));
        assert!(!has_port("[::1]"));
        assert!(!has_port("::1"));
        assert!(!has_port("a.example:"));
    }

    #[test]
    fn only_foreign_origins_of_state_changing_requests_are_refused() {
        let mut headers = HeaderMap::new();
        assert!(check_origin(&Method::POST, &headers, "http", "127.0.0.1:8780").is_ok());
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        let err = check_origin(&Method::POST, &headers, "http", "127.0.0.1:8780").unwrap_err();
        assert_eq!((err.status.as_u16(), err.code), (403, "forbidden_origin"));
        assert!(check_origin(&Method::DELETE, &headers, "http", "127.0.0.1:8780").is_err());
        assert!(check_origin(&Method::GET, &headers, "http", "127.0.0.1:8780").is_ok());
        headers.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(check_origin(&Method::PUT, &headers, "http", "127.0.0.1:8780").is_err());
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8780"),
        );
        assert!(check_origin(&Method::POST, &headers, "http", "127.0.0.1:8780").is_ok());
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://127.0.0.1:8780"),
        );
        assert!(check_origin(&Method::POST, &headers, "http", "127.0.0.1:8780").is_err());
        // Over TLS the daemon's own origin is the https one.
        assert!(check_origin(&Method::POST, &headers, "https", "127.0.0.1:8780").is_ok());
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8780"),
        );
        assert!(check_origin(&Method::POST, &headers, "https", "127.0.0.1:8780").is_err());
    }

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_merge_patch("application/merge-patch+json"));
        assert!(is_merge_patch(
            "application/merge-patch+json; charset=utf-8"
        ));
        assert!(!is_merge_patch("application/json-patch+json"));
        assert!(!is_json("application/merge-patch+json"));
        for bad in [
            "text/plain",
            "application/jsonx",
            "",
            "application/x-www-form-urlencoded",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
        let mut headers = HeaderMap::new();
        assert!(!has_body(&headers));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        assert!(!has_body(&headers));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert!(has_body(&headers));
        let mut chunked = HeaderMap::new();
        chunked.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert!(has_body(&chunked));
    }
}
