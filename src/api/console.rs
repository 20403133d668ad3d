//! Consoles over websockets: one-time tokens, the VNC and serial proxies,
//! the noVNC page, and the serial console log.
//!
//! `POST /v1/vms/{id}/console` hands out a token; `GET /v1/console?token=…`
//! (or `GET /v1/vms/{id}/console?token=…`, which also checks the VM) spends
//! it and upgrades to a websocket joined to the VM's VNC socket or serial
//! console. The token is checked before any upgrade, so a bad one gets a
//! plain 401. Those GET routes, the page and noVNC's files need no bearer
//! token: the one-time token is the credential, and browsers cannot send
//! headers on a websocket.

use std::path::{Component, Path as FsPath, PathBuf};

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::broadcast::error::RecvError;

use crate::api::body;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::AppState;
use crate::console::serial::Attached;
use crate::console::tokens::{Grant, TokenError};
use crate::console::ConsoleKind;
use crate::persist::timestamp;
use crate::vm::actor::{Live, VmError};

/// The subprotocol noVNC asks for.
pub const BINARY_PROTOCOL: &str = "binary";
/// Bytes read from a VM socket per websocket message.
const CHUNK: usize = 64 * 1024;
/// The console page.
const PAGE: &str = include_str!("console.html");

/// The page's Content-Security-Policy: its own origin only, and of inline
/// scripts only the page's own (by hash), so nothing injected can run.
fn page_policy() -> &'static str {
    static POLICY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        use base64::Engine;
        use sha2::Digest;
        let script = inline_script(PAGE).unwrap_or_default();
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
        format!(
            "default-src 'self'; script-src 'self' 'sha256-{hash}'; connect-src 'self'; \
             img-src 'self' data:; style-src 'self' 'unsafe-inline'; base-uri 'none'; \
             object-src 'none'; form-action 'none'; frame-ancestors 'none'"
        )
    });
    &POLICY
}

/// The Content-Security-Policy of every other `/console` and `/novnc/`
/// response: nothing may run or load from it, nor frame it. noVNC's own
/// HTML files (`vnc.html` takes a host to connect to in its URL) are inert
/// this way; its scripts still load as modules into the console page, whose
/// own policy governs them.
const INERT_POLICY: &str =
    "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Adds to every `/console` and `/novnc/` response, errors included: a
/// Content-Security-Policy (the handler's, or `INERT_POLICY`) with
/// `frame-ancestors 'none'`, `X-Frame-Options: DENY` for browsers without
/// CSP 2 (no clickjacking of a live console), and `nosniff` so a file is
/// never run as another type than the one sent.
pub async fn browser_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            header::HeaderValue::from_static(INERT_POLICY),
        );
    }
    headers.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    response
}

/// The text of the page's one inline module script.
fn inline_script(page: &str) -> Option<&str> {
    const OPEN: &str = "<script type=\"module\">";
    let start = page.find(OPEN)? + OPEN.len();
    let len = page[start..].find("</script>")?;
    Some(&page[start..start + len])
}

/// `POST /v1/vms/{id}/console` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleRequest {
    /// `vnc` (the display) or `serial` (ttyS0).
    #[serde(rename = "type")]
    pub kind: ConsoleKind,
}

pub use crate::console::ConsoleToken;

/// `?token=…`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct TokenQuery {
    /// A token from `POST /v1/vms/{id}/console`.
    pub token: String,
}

/// `GET /v1/vms/{id}/console-log` options.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct LogQuery {
    /// How many bytes from the end of the log (default 65536; at most the
    /// log's cap times its kept files).
    pub tail_bytes: Option<u64>,
    /// `current`: only the current (or last) boot's part of the log, from
    /// vmlet's `--- vmlet: boot N started …` line on. Left out: every boot.
    pub boot: Option<String>,
}

/// Default `tail_bytes`.
const DEFAULT_TAIL_BYTES: u64 = 64 * 1024;

/// Issue a one-time token for the VM's VNC or serial console (60 s, one
/// use). The VM must be running (or paused).
#[utoipa::path(post, path = "/v1/vms/{id}/console", tag = "console",
    params(("id" = String, Path, description = "VM UUID or name")),
    request_body = ConsoleRequest,
    responses((status = 201, body = ConsoleToken),
        (status = 400, body = ErrorBody, description = "Malformed JSON, or (TCP) `bad_host`"),
        (status = 401, body = ErrorBody, description = "TCP: missing or wrong bearer token"),
        (status = 403, body = ErrorBody, description = "TCP: `forbidden_origin`"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "Not running, or no such console"),
        (status = 415, body = ErrorBody, description = "The body is not application/json"),
        (status = 422, body = ErrorBody)))]
pub async fn create_token(
    State(app): State<AppState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<ConsoleToken>), ApiError> {
    let request: ConsoleRequest = body::parse(&bytes)?;
    let (vm, _) = app.manager.console(&id, request.kind)?;
    let issued = app
        .consoles
        .issue(Grant {
            vm,
            kind: request.kind,
        })
        .map_err(|e| VmError::Failed(format!("no randomness for a token: {e}")))?;
    let token = ConsoleToken {
        url: format!("/v1/console?token={}", issued.token),
        page_url: (request.kind == ConsoleKind::Vnc)
            .then(|| format!("/console?token={}", issued.token)),
        token: issued.token,
        kind: request.kind,
        expires_at: timestamp(issued.expires_at),
    };
    Ok((StatusCode::CREATED, Json(token)))
}

/// Open a console: spends the token and upgrades to a websocket (binary
/// messages; noVNC's `binary` subprotocol is accepted). A `vnc` console
/// carries RFB; a `serial` one sends the last 64 KiB of output first, then
/// live output, and takes input. 401 for an unknown, used or expired token;
/// 400 for a request that is not a websocket upgrade (the token is not
/// spent).
#[utoipa::path(get, path = "/v1/console", tag = "console", params(TokenQuery), security(()),
    responses((status = 101, description = "Switching to the websocket"),
        (status = 400, body = ErrorBody, description = "Not a websocket upgrade"),
        (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn open(
    State(app): State<AppState>,
    Query(query): Query<TokenQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match checked_upgrade(&app, &query.token, upgrade) {
        Ok(upgrade) => upgrade,
        Err(refused) => return refused.into_response(),
    };
    connect(&app, &query.token, None, upgrade).await
}

/// Open a console of this VM: like `GET /v1/console`, and the token must be
/// for this VM. Any bad token is a 401, whether or not the VM exists, so
/// VM names cannot be probed with made-up tokens.
#[utoipa::path(get, path = "/v1/vms/{id}/console", tag = "console", security(()),
    params(("id" = String, Path, description = "VM UUID or name"), TokenQuery),
    responses((status = 101, description = "Switching to the websocket"),
        (status = 400, body = ErrorBody, description = "Not a websocket upgrade"),
        (status = 401, body = ErrorBody, description = "Unknown, used or expired token, \
            or a token for another (or no) VM"),
        (status = 409, body = ErrorBody)))]
pub async fn open_vm(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<TokenQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match checked_upgrade(&app, &query.token, upgrade) {
        Ok(upgrade) => upgrade,
        Err(refused) => return refused.into_response(),
    };
    match app.manager.find(&id) {
        Ok(handle) => connect(&app, &query.token, Some(handle.id()), upgrade).await,
        // A live token tried on a VM that is not its own (here: none) is
        // burnt, and the answer is the same 401 as for another VM.
        Err(_) => {
            let _ = app.consoles.redeem(&query.token, None);
            token_refused(TokenError::OtherVm).into_response()
        }
    }
}

/// The checks made before a token is spent: the token is live (401
/// otherwise) and the request is a websocket upgrade (400 otherwise, and
/// the token stays usable, so a stray plain GET cannot waste it).
fn checked_upgrade(
    app: &AppState,
    token: &str,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<WebSocketUpgrade, ApiError> {
    app.consoles.peek(token).map_err(token_refused)?;
    upgrade.map_err(|rejection| {
        ApiError::bad_request(format!(
            "not a websocket request ({rejection}); the token was not used"
        ))
    })
}

/// What a spent token is joined to.
enum Target {
    Vnc(UnixStream, Live),
    Serial(Attached, Live),
}

async fn connect(
    app: &AppState,
    token: &str,
    vm: Option<uuid::Uuid>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let grant = match app.consoles.redeem(token, vm) {
        Ok(grant) => grant,
        Err(e) => return token_refused(e).into_response(),
    };
    let target = match reach(app, grant).await {
        Ok(target) => target,
        Err(e) => return e.into_response(),
    };
    tracing::info!(vm = %grant.vm, console = grant.kind.as_str(), "console opened");
    upgrade
        .protocols([BINARY_PROTOCOL])
        .on_upgrade(move |socket| async move {
            match target {
                Target::Vnc(stream, live) => proxy_vnc(socket, stream, live).await,
                Target::Serial(attached, live) => proxy_serial(socket, attached, live).await,
            }
            tracing::info!(vm = %grant.vm, console = grant.kind.as_str(), "console closed");
        })
}

/// Connects to the granted console before the upgrade, so a VM that
/// stopped since the token was issued gets a 409, not an empty websocket.
async fn reach(app: &AppState, grant: Grant) -> Result<Target, ApiError> {
    let (_, live) = app.manager.console(&grant.vm.to_string(), grant.kind)?;
    match grant.kind {
        ConsoleKind::Vnc => {
            let socket = live.paths.vnc_socket();
            let stream = UnixStream::connect(&socket).await.map_err(|e| {
                ApiError::from(VmError::Failed(format!(
                    "cannot reach the VM's VNC server: {e}"
                )))
            })?;
            Ok(Target::Vnc(stream, live))
        }
        ConsoleKind::Serial => {
            let hub = live.serial.clone().ok_or_else(|| {
                ApiError::from(VmError::Refused("the VM has no serial console".into()))
            })?;
            let attached = hub
                .attach()
                .map_err(|e| ApiError::from(VmError::Refused(e.to_string())))?;
            Ok(Target::Serial(attached, live))
        }
    }
}

fn token_refused(e: TokenError) -> ApiError {
    ApiError::unauthorized(e.to_string())
}

/// Sends the close frame: `reason` when the VM side ended the session,
/// a normal close when the client did.
async fn finish(mut sink: SplitSink<WebSocket, Message>, reason: Option<(u16, &str)>) {
    let (code, text) = reason.unwrap_or((CLOSE_NORMAL, "closed"));
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: text.into(),
    }));
    let _ = sink.send(frame).await;
    let _ = sink.close().await;
}

/// Close codes: normal, and "going away" when the VM stopped.
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;

/// The next bytes the client sends (binary or text messages); `None` once
/// it closes or the connection breaks.
async fn next_input(from_client: &mut SplitStream<WebSocket>) -> Option<Bytes> {
    while let Some(Ok(message)) = from_client.next().await {
        match message {
            Message::Binary(bytes) => return Some(bytes),
            Message::Text(text) => return Some(Bytes::copy_from_slice(text.as_bytes())),
            Message::Close(_) => return None,
            _ => {}
        }
    }
    None
}

/// Joins the websocket and the VM's VNC socket until either side closes or
/// the VM stops.
async fn proxy_vnc(socket: WebSocket, stream: UnixStream, live: Live) {
    let (mut sink, mut from_client) = socket.split();
    let (mut vm_read, mut vm_write) = stream.into_split();
    let to_vm = async {
        while let Some(bytes) = next_input(&mut from_client).await {
            if vm_write.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    let from_vm = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match vm_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let message = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    if sink.send(message).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let reason = tokio::select! {
        _ = to_vm => None,
        _ = from_vm => Some((CLOSE_GOING_AWAY, "the VNC server closed the connection")),
        _ = live.gone() => Some((CLOSE_GOING_AWAY, "the VM stopped")),
    };
    finish(sink, reason).await;
}

/// Streams the serial console (history first) to the websocket and its
/// input to the guest, until either side closes or the VM stops.
async fn proxy_serial(socket: WebSocket, attached: Attached, live: Live) {
    let Some(hub) = live.serial.clone() else {
        return;
    };
    let Attached {
        history,
        live: mut live_output,
    } = attached;
    let (mut sink, mut from_client) = socket.split();
    let to_vm = async {
        while let Some(bytes) = next_input(&mut from_client).await {
            if hub.send(bytes).await.is_err() {
                break;
            }
        }
    };
    let from_vm = async {
        if !history.is_empty() && sink.send(Message::Binary(history.into())).await.is_err() {
            return;
        }
        loop {
            match live_output.recv().await {
                Ok(bytes) => {
                    if sink.send(Message::Binary(bytes)).await.is_err() {
                        return;
                    }
                }
                // A reader too slow for the guest skips ahead.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            }
        }
    };
    let reason = tokio::select! {
        _ = to_vm => None,
        _ = from_vm => Some((CLOSE_GOING_AWAY, "the serial console closed (the VM stopped)")),
        _ = live.gone() => Some((CLOSE_GOING_AWAY, "the VM stopped")),
    };
    finish(sink, reason).await;
}

/// The console page (noVNC) for a `vnc` token. The token is checked, not
/// spent: the page's websocket spends it.
#[utoipa::path(get, path = "/console", tag = "console", params(TokenQuery), security(()),
    responses((status = 200, description = "The noVNC page (framing forbidden by its \
            Content-Security-Policy and X-Frame-Options)", content_type = "text/html"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn page(State(app): State<AppState>, Query(query): Query<TokenQuery>) -> Response {
    match app.consoles.peek(&query.token) {
        Ok(grant) if grant.kind == ConsoleKind::Vnc => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
                // The token is in the URL: never send it on as a referrer.
                (header::REFERRER_POLICY, "no-referrer"),
                (header::CONTENT_SECURITY_POLICY, page_policy()),
            ],
            PAGE,
        )
            .into_response(),
        Ok(_) => ApiError::bad_request(
            "the page is for vnc tokens; open a serial token's url as a websocket",
        )
        .into_response(),
        Err(e) => token_refused(e).into_response(),
    }
}

/// noVNC's files, from the configured directory (`console.novnc_dir`).
pub async fn novnc(State(app): State<AppState>, Path(path): Path<String>) -> Response {
    let Some(file) = static_path(&app.novnc_dir, &path) else {
        return ApiError::not_found("no such file").into_response();
    };
    match tokio::fs::read(&file).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, content_type(&file)),
                (header::CACHE_CONTROL, "max-age=3600"),
            ],
            bytes,
        )
            .into_response(),
        // A name the file system cannot hold (a NUL byte) or a directory is
        // just not a file here.
        Err(e) if is_missing(&e) => ApiError::not_found(format!(
            "no such file in the noVNC directory ({})",
            app.novnc_dir.display()
        ))
        .into_response(),
        Err(e) => {
            ApiError::from(VmError::Failed(format!("reading a noVNC file: {e}"))).into_response()
        }
    }
}

/// `dir/path` when `path` is a plain relative path (no `..`, no root, no
/// hidden names, no control characters such as a decoded `%00`); `None`
/// otherwise.
fn static_path(dir: &FsPath, path: &str) -> Option<PathBuf> {
    if path.is_empty() || path.chars().any(char::is_control) {
        return None;
    }
    let relative = FsPath::new(path);
    let plain = relative.components().all(|c| match c {
        Component::Normal(name) => !name.to_string_lossy().starts_with('.'),
        _ => false,
    });
    plain.then(|| dir.join(relative))
}

/// Read errors that mean "no such file" to a client.
fn is_missing(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::NotFound
            | ErrorKind::InvalidInput
            | ErrorKind::IsADirectory
            | ErrorKind::NotADirectory
            | ErrorKind::InvalidFilename
    )
}

fn content_type(file: &FsPath) -> &'static str {
    match file.extension().and_then(|e| e.to_str()) {
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("woff") => "font/woff",
        Some("woff2") => "font/woff2",
        Some("ttf") => "font/ttf",
        Some("oga") => "audio/ogg",
        Some("mp3") => "audio/mpeg",
        _ => "application/octet-stream",
    }
}

/// The end of the VM's serial console log (any state: the log outlives
/// QEMU). Raw bytes as the guest wrote them, with vmlet's line
/// `--- vmlet: boot N started <RFC 3339 UTC>` before each boot;
/// `boot=current` returns only the current boot's part.
#[utoipa::path(get, path = "/v1/vms/{id}/console-log", tag = "console",
    params(("id" = String, Path, description = "VM UUID or name"), LogQuery),
    responses((status = 200, description = "The log's tail", content_type = "text/plain"),
        (status = 400, body = ErrorBody, description = "TCP: `bad_host`"),
        (status = 401, body = ErrorBody, description = "TCP: missing or wrong bearer token"),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn log(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let limit = app.manager.console_log_limit();
    let tail_bytes = query.tail_bytes.unwrap_or(DEFAULT_TAIL_BYTES.min(limit));
    if tail_bytes > limit {
        // A query parameter, not a spec field.
        return Err(ApiError::invalid_request(
            "tail_bytes",
            format!("at most {limit} (the log's cap times its kept files)"),
        ));
    }
    let current_boot = match query.boot.as_deref() {
        None => false,
        Some("current") => true,
        Some(_) => {
            return Err(ApiError::invalid_field(
                "boot",
                "must be `current` (or left out for every boot)",
            ))
        }
    };
    let bytes = app
        .manager
        .console_log(&id, tail_bytes, current_boot)
        .await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_paths_stay_in_the_directory() {
        let dir = FsPath::new("/usr/share/novnc");
        assert_eq!(
            static_path(dir, "core/rfb.js"),
            Some(PathBuf::from("/usr/share/novnc/core/rfb.js"))
        );
        for bad in [
            "",
            "../etc/passwd",
            "core/../../etc/passwd",
            "/etc/passwd",
            ".git/config",
            "core\0.js",
            "core/rfb.js\n",
        ] {
            assert_eq!(static_path(dir, bad), None, "{bad}");
        }
    }

    #[test]
    fn the_page_policy_allows_exactly_its_own_script() {
        let script = inline_script(PAGE).expect("the page has its module script");
        assert!(script.contains("/novnc/core/rfb.js"));
        assert!(page_policy().contains("script-src 'self' 'sha256-"));
        assert!(page_policy().contains("frame-ancestors 'none'"));
        assert_eq!(inline_script("<p>no script</p>"), None);
    }

    #[test]
    fn scripts_are_served_as_javascript() {
        assert_eq!(
            content_type(FsPath::new("a/rfb.js")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type(FsPath::new("a/b")), "application/octet-stream");
    }
}
