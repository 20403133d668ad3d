//! A small HTTP/1.1 client for the vmlet API, used by the `vmlet vm …`
//! subcommands and by the integration tests to talk to a daemon.
//!
//! It speaks to a daemon over its unix socket or over plain `http://` TCP
//! (with a bearer token), opens one connection per request, and turns the
//! API's error bodies into [`ClientError::Api`]. [`Client::events`] follows
//! the server-sent event stream of `/v1/events`.
//!
//! The typed helpers (`list_vms`, `get_vm`, …) suit callers that want data;
//! [`Client::request`] and [`Client::request_json`] suit tests that check
//! exact status codes and bodies.

use std::fmt;
use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::api::console::ConsoleToken;
use crate::console::ConsoleKind;
use crate::net::networks::{Network, NetworkSpec};
use crate::node::NodeInfo;
use crate::spec::{DiskSpec, IoLimits, NicSpec};
use crate::storage::images::{Image, ImageImport};
use crate::storage::volumes::{Volume, VolumeCreate};
use crate::vm::disk_ops::Snapshot;
use crate::vm::events::Event;
use crate::vm::Vm;

pub use hyper::Method;

/// Where `vmlet serve` listens by default.
pub const DEFAULT_SOCKET: &str = "/run/vmlet/vmlet.sock";

/// How much of an unexpected (non-JSON) error body is quoted in an error.
const QUOTED_BODY_LIMIT: usize = 300;

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The daemon's unix socket.
    Unix(PathBuf),
    /// The daemon's TCP listener.
    Tcp {
        /// `http://HOST[:PORT]` (only `http` is supported).
        url: String,
        /// Bearer token sent as `Authorization: Bearer TOKEN`.
        token: Option<String>,
    },
}

impl Default for Endpoint {
    fn default() -> Self {
        Endpoint::Unix(DEFAULT_SOCKET.into())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix socket {}", path.display()),
            Endpoint::Tcp { url, .. } => f.write_str(url),
        }
    }
}

impl Endpoint {
    /// Checks that the endpoint can be used (a TCP URL must be
    /// `http://HOST[:PORT][/]`), so a typo fails before the first request.
    pub fn check(&self) -> Result<(), ClientError> {
        match self {
            Endpoint::Unix(_) => Ok(()),
            Endpoint::Tcp { url, .. } => parse_http_url(url).map(|_| ()),
        }
    }
}

/// A `http://` URL split into what a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TcpTarget {
    /// Host to connect to (IPv6 without brackets).
    host: String,
    /// Port to connect to.
    port: u16,
    /// The `Host` header: the authority as written.
    authority: String,
}

/// Parses `http://HOST[:PORT][/]`. Paths, queries, user info and other
/// schemes are refused: the API lives at the root of the listener.
fn parse_http_url(url: &str) -> Result<TcpTarget, ClientError> {
    let bad = |reason: &str| ClientError::BadEndpoint {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(bad("expected http://HOST:PORT"));
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(bad(&format!(
            "scheme {scheme} is not supported: only http:// (put TLS in front of vmlet with a proxy)"
        )));
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    if authority.contains(['/', '?', '#']) {
        return Err(bad("a path, query or fragment is not supported"));
    }
    if authority.contains('@') {
        return Err(bad("user info is not supported; use a token file"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in the host"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| bad(&format!("{p:?} is not a port")))?,
    };
    Ok(TcpTarget {
        host: host.to_string(),
        port,
        authority: authority.to_string(),
    })
}

/// What went wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint URL cannot be used.
    #[error("bad daemon URL {url}: {reason}")]
    BadEndpoint {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A VM id, name or action cannot be put into a URL.
    #[error("{value:?} is not a valid {what}: only letters, digits, '.', '_' and '-' are allowed")]
    BadSegment {
        /// What the value was meant to be (`VM id or name`, `action`).
        what: &'static str,
        /// The value.
        value: String,
    },
    /// A raw request's path cannot be sent.
    #[error("bad request path {path:?}: {reason}")]
    BadPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection to the daemon.
    #[error("cannot connect to vmlet at {endpoint} ({hint})")]
    Connect {
        /// The endpoint, as people read it.
        endpoint: String,
        /// What to check.
        hint: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (connection reset, malformed response, …).
    #[error("HTTP exchange with {endpoint} failed")]
    Http {
        /// The endpoint, as people read it.
        endpoint: String,
        /// Cause.
        #[source]
        source: hyper::Error,
    },
    /// The daemon answered with an error.
    #[error("{status} {code}: {message}{}", field_note(message, field.as_deref()))]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's error code (`not_found`, `conflict`, `invalid_spec`, …).
        code: String,
        /// The API's message.
        message: String,
        /// The spec field at fault, for validation errors.
        field: Option<String>,
        /// The task in progress, for `409` conflicts.
        task: Option<String>,
    },
    /// A console websocket could not be opened or broke.
    #[error("console websocket {path}: {reason}")]
    Websocket {
        /// The websocket's path (without its token).
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A successful response whose body is not what was expected.
    #[error("unexpected response to {request}: {reason}")]
    Decode {
        /// `METHOD PATH`.
        request: String,
        /// What did not fit.
        reason: String,
    },
}

/// ` (field F)` unless the message already names the field.
fn field_note(message: &str, field: Option<&str>) -> String {
    match field {
        Some(field) if !message.contains(field) => format!(" (field {field})"),
        _ => String::new(),
    }
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The error code of an API error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A response as received.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl RawResponse {
    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; an empty body is `null`.
    pub fn json(&self) -> Result<Value, serde_json::Error> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body)
    }

    /// The `content-type` header, if any.
    pub fn content_type(&self) -> Option<&str> {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
    }

    /// The API error this response carries, for a non-2xx status. A body
    /// that is not the API's error shape is quoted as the message.
    pub fn api_error(&self) -> Option<ClientError> {
        if self.is_success() {
            return None;
        }
        #[derive(Deserialize)]
        struct Envelope {
            error: Body,
        }
        #[derive(Deserialize)]
        struct Body {
            code: String,
            message: String,
            #[serde(default)]
            field: Option<String>,
            #[serde(default)]
            task: Option<String>,
        }
        let error = match serde_json::from_slice::<Envelope>(&self.body) {
            Ok(Envelope { error }) => ClientError::Api {
                status: self.status,
                code: error.code,
                message: error.message,
                field: error.field,
                task: error.task,
            },
            Err(_) => {
                let text = self.text();
                let text = text.trim();
                let message = if text.is_empty() {
                    hyper::StatusCode::from_u16(self.status)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("no error body")
                        .to_string()
                } else {
                    truncate(text, QUOTED_BODY_LIMIT)
                };
                ClientError::Api {
                    status: self.status,
                    code: "http_error".to_string(),
                    message,
                    field: None,
                    task: None,
                }
            }
        };
        Some(error)
    }
}

fn truncate(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// Checks that `value` can go into a URL path as one segment unchanged.
/// VM names and UUIDs only use these characters, so nothing is lost by
/// refusing the rest instead of percent-encoding it.
pub fn check_segment<'a>(what: &'static str, value: &'a str) -> Result<&'a str, ClientError> {
    let ok = !value.is_empty()
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(value)
    } else {
        Err(ClientError::BadSegment {
            what,
            value: value.to_string(),
        })
    }
}

fn vm_path(id: &str) -> Result<String, ClientError> {
    Ok(format!("/v1/vms/{}", check_segment("VM id or name", id)?))
}

fn image_path(name: &str) -> Result<String, ClientError> {
    Ok(format!("/v1/images/{}", check_segment("image name", name)?))
}

fn volume_path(name: &str) -> Result<String, ClientError> {
    Ok(format!(
        "/v1/volumes/{}",
        check_segment("volume name", name)?
    ))
}

fn network_path(name: &str) -> Result<String, ClientError> {
    Ok(format!(
        "/v1/networks/{}",
        check_segment("network name", name)?
    ))
}

/// `/v1/vms/{id}/nics/{nic}`: `nic` is a MAC (`52:54:00:12:34:56`) or an
/// index, so `:` is allowed besides what [`check_segment`] takes.
fn nic_path(vm: &str, nic: &str) -> Result<String, ClientError> {
    let ok = !nic.is_empty() && nic.bytes().all(|b| b.is_ascii_alphanumeric() || b == b':');
    let path = format!("{}/nics/{nic}", vm_path(vm)?);
    if !ok {
        return Err(ClientError::BadPath {
            path,
            reason: "a NIC is named by its MAC (52:54:00:12:34:56) or its index".into(),
        });
    }
    Ok(path)
}

fn disk_path(vm: &str, disk: &str) -> Result<String, ClientError> {
    Ok(format!(
        "{}/disks/{}",
        vm_path(vm)?,
        check_segment("disk name", disk)?
    ))
}

fn snapshot_path(vm: &str, snapshot: &str) -> Result<String, ClientError> {
    Ok(format!(
        "{}/snapshots/{}",
        vm_path(vm)?,
        check_segment("snapshot name", snapshot)?
    ))
}

/// A request body as JSON (the API's request types always serialize).
fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or_default()
}

/// The body of `GET /v1/vms`.
#[derive(Deserialize)]
struct VmList {
    vms: Vec<Vm>,
}

/// The body of `GET /v1/images`.
#[derive(Deserialize)]
struct ImageList {
    images: Vec<Image>,
}

/// The body of `GET /v1/volumes`.
#[derive(Deserialize)]
struct VolumeList {
    volumes: Vec<Volume>,
}

/// The body of `GET /v1/networks`.
#[derive(Deserialize)]
struct NetworkList {
    networks: Vec<Network>,
}

/// The body of `GET /v1/vms/{id}/snapshots`.
#[derive(Deserialize)]
struct SnapshotList {
    snapshots: Vec<Snapshot>,
}

/// A byte stream to the daemon (unix or TCP).
pub trait ConsoleIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ConsoleIo for T {}

/// An open console websocket.
pub type ConsoleSocket = tokio_tungstenite::WebSocketStream<Box<dyn ConsoleIo>>;

/// A client of one vmlet daemon. Cheap to clone; holds no connection.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
}

impl Client {
    /// A client for the daemon at `endpoint`.
    pub fn new(endpoint: Endpoint) -> Client {
        Client { endpoint }
    }

    /// A client for the daemon's unix socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Client {
        Client::new(Endpoint::Unix(path.into()))
    }

    /// The endpoint it talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// `POST /v1/vms/{id}/console`: a one-time token for a console.
    pub async fn console_token(
        &self,
        id_or_name: &str,
        kind: ConsoleKind,
    ) -> Result<ConsoleToken, ClientError> {
        let id = check_segment("VM id or name", id_or_name)?;
        let body = serde_json::json!({ "type": kind });
        Ok(self
            .call(Method::POST, &format!("/v1/vms/{id}/console"), Some(&body))
            .await?
            .1)
    }

    /// `GET /v1/vms/{id}/console-log`: the last `tail_bytes` of the serial
    /// log (the daemon's default, 64 KiB, when `None`).
    pub async fn console_log(
        &self,
        id_or_name: &str,
        tail_bytes: Option<u64>,
    ) -> Result<Vec<u8>, ClientError> {
        let id = check_segment("VM id or name", id_or_name)?;
        let query = tail_bytes
            .map(|n| format!("?tail_bytes={n}"))
            .unwrap_or_default();
        let response = self
            .request(
                Method::GET,
                &format!("/v1/vms/{id}/console-log{query}"),
                None,
            )
            .await?;
        match response.api_error() {
            Some(error) => Err(error),
            None => Ok(response.body.to_vec()),
        }
    }

    /// Opens a console websocket at `url` (a token's `url`, a path with its
    /// `?token=`), asking for the `binary` subprotocol.
    pub async fn open_console(&self, url: &str) -> Result<ConsoleSocket, ClientError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let shown = url.split('?').next().unwrap_or(url).to_string();
        let failed = |reason: String| ClientError::Websocket {
            path: shown.clone(),
            reason,
        };
        if !url.starts_with('/') {
            return Err(failed("must be a path starting with /".into()));
        }
        let (host, stream): (String, Box<dyn ConsoleIo>) = match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| failed(format!("connecting to {}: {e}", path.display())))?;
                ("localhost".into(), Box::new(stream))
            }
            Endpoint::Tcp { url: base, .. } => {
                let target = parse_http_url(base)?;
                let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
                    .await
                    .map_err(|e| failed(format!("connecting to {base}: {e}")))?;
                let _ = stream.set_nodelay(true);
                (target.authority, Box::new(stream))
            }
        };
        let mut request = format!("ws://{host}{url}")
            .into_client_request()
            .map_err(|e| failed(e.to_string()))?;
        request.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("binary"),
        );
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((socket, _)) => Ok(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let raw = RawResponse {
                    status: response.status().as_u16(),
                    headers: response.headers().clone(),
                    body: Bytes::from(response.body().clone().unwrap_or_default()),
                };
                Err(raw
                    .api_error()
                    .unwrap_or_else(|| failed(format!("refused with {}", raw.status))))
            }
            Err(e) => Err(failed(e.to_string())),
        }
    }

    /// Sends a request with an optional JSON body and reads the whole
    /// response, whatever its status.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<RawResponse, ClientError> {
        let (content_type, bytes) = match body {
            Some(value) => (
                Some("application/json"),
                // Serializing a `Value` cannot fail.
                serde_json::to_vec(value).unwrap_or_default(),
            ),
            None => (None, Vec::new()),
        };
        self.request_bytes(method, path_and_query, content_type, bytes)
            .await
    }

    /// Sends a request with any body (malformed JSON, an oversized body…)
    /// and reads the whole response, whatever its status.
    pub async fn request_bytes(
        &self,
        method: Method,
        path_and_query: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<RawResponse, ClientError> {
        let response = self
            .send(method, path_and_query, content_type, body, None)
            .await?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|source| self.http_error(source))?
            .to_bytes();
        Ok(RawResponse {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// Sends a request and returns the status and the body as JSON (`null`
    /// when empty), whatever the status: what tests need to check exact
    /// status codes and error bodies.
    pub async fn request_json(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), ClientError> {
        let request = format!("{method} {path_and_query}");
        let response = self.request(method, path_and_query, body).await?;
        let value = response.json().map_err(|e| ClientError::Decode {
            request,
            reason: format!(
                "status {}, body is not JSON ({e}): {}",
                response.status,
                truncate(response.text().trim(), QUOTED_BODY_LIMIT)
            ),
        })?;
        Ok((response.status, value))
    }

    /// Sends a request, turns a non-2xx status into [`ClientError::Api`]
    /// and decodes a 2xx body as `T`. Returns the status too.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, T), ClientError> {
        let request = format!("{method} {path}");
        let response = self.request(method, path, body).await?;
        if let Some(error) = response.api_error() {
            return Err(error);
        }
        let value = serde_json::from_slice(&response.body).map_err(|e| ClientError::Decode {
            request,
            reason: e.to_string(),
        })?;
        Ok((response.status, value))
    }

    /// Like [`Client::call`] for responses whose body does not matter.
    async fn call_empty(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<u16, ClientError> {
        let response = self.request(method, path, body).await?;
        match response.api_error() {
            Some(error) => Err(error),
            None => Ok(response.status),
        }
    }

    /// `GET /healthz`: succeeds when the daemon answers `200`.
    pub async fn health(&self) -> Result<(), ClientError> {
        self.call_empty(Method::GET, "/healthz", None).await?;
        Ok(())
    }

    /// `GET /v1/node`: the host's facts and capacity.
    pub async fn node(&self) -> Result<NodeInfo, ClientError> {
        Ok(self.call(Method::GET, "/v1/node", None).await?.1)
    }

    /// `GET /v1/vms`: every VM.
    pub async fn list_vms(&self) -> Result<Vec<Vm>, ClientError> {
        let (_, list): (_, VmList) = self.call(Method::GET, "/v1/vms", None).await?;
        Ok(list.vms)
    }

    /// `GET /v1/vms/{id}`: one VM, by UUID or name.
    pub async fn get_vm(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        Ok(self.call(Method::GET, &vm_path(id_or_name)?, None).await?.1)
    }

    /// `POST /v1/vms`: creates a VM; the daemon picks its UUID.
    pub async fn create_vm(&self, spec: &Value) -> Result<Vm, ClientError> {
        Ok(self.call(Method::POST, "/v1/vms", Some(spec)).await?.1)
    }

    /// `PUT /v1/vms/{uuid}`: creates a VM with this UUID, or finds it
    /// already created with the same spec (safe to retry). Returns whether
    /// it was created by this call.
    pub async fn put_vm(&self, uuid: Uuid, spec: &Value) -> Result<(bool, Vm), ClientError> {
        let path = format!("/v1/vms/{uuid}");
        let (status, vm) = self.call(Method::PUT, &path, Some(spec)).await?;
        Ok((status == 201, vm))
    }

    /// `DELETE /v1/vms/{id}`; `force` deletes a running VM too, stopping it.
    pub async fn delete_vm(&self, id_or_name: &str, force: bool) -> Result<(), ClientError> {
        self.delete_vm_with(id_or_name, force, false).await
    }

    /// [`Client::delete_vm`]; `delete_volumes` deletes the volumes attached
    /// to it too (they are kept otherwise).
    pub async fn delete_vm_with(
        &self,
        id_or_name: &str,
        force: bool,
        delete_volumes: bool,
    ) -> Result<(), ClientError> {
        let mut path = vm_path(id_or_name)?;
        let query: Vec<&str> = [
            (force, "force=true"),
            (delete_volumes, "delete_volumes=true"),
        ]
        .into_iter()
        .filter_map(|(on, q)| on.then_some(q))
        .collect();
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        self.call_empty(Method::DELETE, &path, None).await?;
        Ok(())
    }

    /// `POST /v1/vms/{id}/disks`: attaches a volume (`disk.volume`), hot-
    /// plugging it into a running VM. Returns the VM after.
    pub async fn attach_disk(&self, id_or_name: &str, disk: &DiskSpec) -> Result<Vm, ClientError> {
        let path = format!("{}/disks", vm_path(id_or_name)?);
        Ok(self
            .call(Method::POST, &path, Some(&to_json(disk)))
            .await?
            .1)
    }

    /// `DELETE /v1/vms/{id}/disks/{disk}`: detaches a disk (unplugging it
    /// from a running VM). Returns the VM after.
    pub async fn detach_disk(&self, id_or_name: &str, disk: &str) -> Result<Vm, ClientError> {
        let path = disk_path(id_or_name, disk)?;
        Ok(self.call(Method::DELETE, &path, None).await?.1)
    }

    /// `PUT /v1/vms/{id}/disks/{disk}/limits`: replaces a disk's I/O limits
    /// (applied at once to a running VM). Returns the VM after.
    pub async fn set_disk_limits(
        &self,
        id_or_name: &str,
        disk: &str,
        limits: &IoLimits,
    ) -> Result<Vm, ClientError> {
        let path = format!("{}/limits", disk_path(id_or_name, disk)?);
        Ok(self
            .call(Method::PUT, &path, Some(&to_json(limits)))
            .await?
            .1)
    }

    /// `GET /v1/vms/{id}/snapshots`: a VM's snapshots, oldest first.
    pub async fn list_snapshots(&self, id_or_name: &str) -> Result<Vec<Snapshot>, ClientError> {
        let path = format!("{}/snapshots", vm_path(id_or_name)?);
        let (_, list): (_, SnapshotList) = self.call(Method::GET, &path, None).await?;
        Ok(list.snapshots)
    }

    /// `POST /v1/vms/{id}/snapshots`: takes a snapshot (memory and disks of
    /// a running VM, disks only of a stopped one).
    pub async fn create_snapshot(
        &self,
        id_or_name: &str,
        name: &str,
    ) -> Result<Snapshot, ClientError> {
        let path = format!("{}/snapshots", vm_path(id_or_name)?);
        let body = serde_json::json!({ "name": name });
        Ok(self.call(Method::POST, &path, Some(&body)).await?.1)
    }

    /// `POST /v1/vms/{id}/snapshots/{name}/revert`: goes back to a snapshot.
    /// Returns the VM after.
    pub async fn revert_snapshot(&self, id_or_name: &str, name: &str) -> Result<Vm, ClientError> {
        let path = format!("{}/revert", snapshot_path(id_or_name, name)?);
        Ok(self.call(Method::POST, &path, None).await?.1)
    }

    /// `DELETE /v1/vms/{id}/snapshots/{name}`.
    pub async fn delete_snapshot(&self, id_or_name: &str, name: &str) -> Result<(), ClientError> {
        let path = snapshot_path(id_or_name, name)?;
        self.call_empty(Method::DELETE, &path, None).await?;
        Ok(())
    }

    /// `GET /v1/images`: every image (failed imports included).
    pub async fn list_images(&self) -> Result<Vec<Image>, ClientError> {
        let (_, list): (_, ImageList) = self.call(Method::GET, "/v1/images", None).await?;
        Ok(list.images)
    }

    /// `GET /v1/images/{name}`.
    pub async fn get_image(&self, name: &str) -> Result<Image, ClientError> {
        Ok(self.call(Method::GET, &image_path(name)?, None).await?.1)
    }

    /// `POST /v1/images`: starts an import; returns the image, `importing`.
    pub async fn import_image(&self, request: &ImageImport) -> Result<Image, ClientError> {
        Ok(self
            .call(Method::POST, "/v1/images", Some(&to_json(request)))
            .await?
            .1)
    }

    /// `DELETE /v1/images/{name}` (also cancels an import under way).
    pub async fn delete_image(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &image_path(name)?, None)
            .await?;
        Ok(())
    }

    /// `GET /v1/volumes`: every volume.
    pub async fn list_volumes(&self) -> Result<Vec<Volume>, ClientError> {
        let (_, list): (_, VolumeList) = self.call(Method::GET, "/v1/volumes", None).await?;
        Ok(list.volumes)
    }

    /// `GET /v1/volumes/{name}`.
    pub async fn get_volume(&self, name: &str) -> Result<Volume, ClientError> {
        Ok(self.call(Method::GET, &volume_path(name)?, None).await?.1)
    }

    /// `POST /v1/volumes`: creates a volume, blank or copied from an image.
    pub async fn create_volume(&self, request: &VolumeCreate) -> Result<Volume, ClientError> {
        Ok(self
            .call(Method::POST, "/v1/volumes", Some(&to_json(request)))
            .await?
            .1)
    }

    /// `POST /v1/volumes/{name}/resize`: grows a volume to `size_mib`.
    pub async fn resize_volume(&self, name: &str, size_mib: u64) -> Result<Volume, ClientError> {
        let path = format!("{}/resize", volume_path(name)?);
        let body = serde_json::json!({ "size_mib": size_mib });
        Ok(self.call(Method::POST, &path, Some(&body)).await?.1)
    }

    /// `DELETE /v1/volumes/{name}` (refused while a VM uses it).
    pub async fn delete_volume(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &volume_path(name)?, None)
            .await?;
        Ok(())
    }

    /// `GET /v1/networks`: every network, with the NICs on it.
    pub async fn list_networks(&self) -> Result<Vec<Network>, ClientError> {
        let (_, list): (_, NetworkList) = self.call(Method::GET, "/v1/networks", None).await?;
        Ok(list.networks)
    }

    /// `GET /v1/networks/{name}`.
    pub async fn get_network(&self, name: &str) -> Result<Network, ClientError> {
        Ok(self.call(Method::GET, &network_path(name)?, None).await?.1)
    }

    /// `POST /v1/networks`: creates (or adopts) the bridge, the VLAN device.
    pub async fn create_network(&self, spec: &NetworkSpec) -> Result<Network, ClientError> {
        Ok(self
            .call(Method::POST, "/v1/networks", Some(&to_json(spec)))
            .await?
            .1)
    }

    /// `DELETE /v1/networks/{name}` (refused while NICs are on it).
    pub async fn delete_network(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &network_path(name)?, None)
            .await?;
        Ok(())
    }

    /// `POST /v1/vms/{id}/nics`: adds a NIC (hot-plugged into a running VM).
    /// Returns the VM after.
    pub async fn attach_nic(&self, id_or_name: &str, nic: &NicSpec) -> Result<Vm, ClientError> {
        let path = format!("{}/nics", vm_path(id_or_name)?);
        Ok(self.call(Method::POST, &path, Some(&to_json(nic))).await?.1)
    }

    /// `DELETE /v1/vms/{id}/nics/{nic}`: removes a NIC by MAC or index
    /// (unplugging it from a running VM). Returns the VM after.
    pub async fn detach_nic(&self, id_or_name: &str, nic: &str) -> Result<Vm, ClientError> {
        let path = nic_path(id_or_name, nic)?;
        Ok(self.call(Method::DELETE, &path, None).await?.1)
    }

    /// `POST /v1/vms/{id}/{action}` (`start`, `stop`, `reboot`, `pause`,
    /// `resume`) with an optional body; returns the VM after the action.
    pub async fn action(
        &self,
        id_or_name: &str,
        action: &str,
        body: Option<&Value>,
    ) -> Result<Vm, ClientError> {
        let path = format!(
            "{}/{}",
            vm_path(id_or_name)?,
            check_segment("action", action)?
        );
        Ok(self.call(Method::POST, &path, body).await?.1)
    }

    /// Starts a VM.
    pub async fn start(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        self.action(id_or_name, "start", None).await
    }

    /// Stops a VM: `force` skips the ACPI power button; `timeout_s` bounds
    /// how long the guest gets to power off (the daemon's default if unset).
    pub async fn stop(
        &self,
        id_or_name: &str,
        force: bool,
        timeout_s: Option<u64>,
    ) -> Result<Vm, ClientError> {
        let mut body = serde_json::json!({ "force": force });
        if let Some(t) = timeout_s {
            body["timeout_s"] = t.into();
        }
        self.action(id_or_name, "stop", Some(&body)).await
    }

    /// Resets a VM's guest.
    pub async fn reboot(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        self.action(id_or_name, "reboot", None).await
    }

    /// Pauses a VM's vCPUs.
    pub async fn pause(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        self.action(id_or_name, "pause", None).await
    }

    /// Resumes a VM's vCPUs.
    pub async fn resume(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        self.action(id_or_name, "resume", None).await
    }

    /// `GET /v1/events[?since=N]`: follows the event stream. `since` replays
    /// the buffered events after that sequence number first.
    pub async fn events(&self, since: Option<u64>) -> Result<EventStream, ClientError> {
        let path = match since {
            Some(n) => format!("/v1/events?since={n}"),
            None => "/v1/events".to_string(),
        };
        let response = self
            .send(
                Method::GET,
                &path,
                None,
                Vec::new(),
                Some("text/event-stream"),
            )
            .await?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|source| self.http_error(source))?
                .to_bytes();
            let raw = RawResponse {
                status,
                headers: parts.headers,
                body,
            };
            return Err(raw.api_error().expect("a non-2xx status is an error"));
        }
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with("text/event-stream") {
            return Err(ClientError::Decode {
                request: format!("GET {path}"),
                reason: format!("content-type is {content_type:?}, not text/event-stream"),
            });
        }
        Ok(EventStream {
            endpoint: self.endpoint.to_string(),
            body: response.into_body(),
            parser: SseParser::default(),
            done: false,
        })
    }

    /// Opens a connection, sends one request and returns the response with
    /// its body still to be read. The connection lives until the body is
    /// read or dropped.
    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
        accept: Option<&str>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let bad_path = |reason: &str| ClientError::BadPath {
            path: path_and_query.to_string(),
            reason: reason.to_string(),
        };
        if !path_and_query.starts_with('/') {
            return Err(bad_path("must start with /"));
        }
        let uri: hyper::Uri = path_and_query
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad_path(&e.to_string()))?;
        let (host, token) = match &self.endpoint {
            Endpoint::Unix(_) => ("localhost".to_string(), None),
            Endpoint::Tcp { url, token } => (parse_http_url(url)?.authority, token.as_deref()),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, header_value(&host, "host")?)
            .header(
                header::USER_AGENT,
                concat!("vmlet/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::ACCEPT, accept.unwrap_or("application/json"));
        if let Some(token) = token {
            request = request.header(
                header::AUTHORIZATION,
                header_value(&format!("Bearer {token}"), "token")?,
            );
        }
        if let Some(content_type) = content_type {
            request = request.header(
                header::CONTENT_TYPE,
                header_value(content_type, "content type")?,
            );
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| bad_path(&e.to_string()))?;

        let mut sender = self.connect().await?;
        sender
            .send_request(request)
            .await
            .map_err(|source| self.http_error(source))
    }

    /// Opens a connection and starts its HTTP/1.1 driver task.
    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let connect_error = |source: std::io::Error| ClientError::Connect {
            endpoint: self.endpoint.to_string(),
            hint: match (source.kind(), &self.endpoint) {
                (std::io::ErrorKind::PermissionDenied, _) => {
                    "no permission: run as root or as a member of the socket's group"
                }
                (_, Endpoint::Unix(_)) => {
                    "is `vmlet serve` running? --socket or VMLET_SOCKET names another socket"
                }
                (_, Endpoint::Tcp { .. }) => "is `vmlet serve` running and listening on TCP there?",
            },
            source,
        };
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(connect_error)?;
                self.handshake(stream).await
            }
            Endpoint::Tcp { url, .. } => {
                let target = parse_http_url(url)?;
                let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
                    .await
                    .map_err(connect_error)?;
                // Requests are small and latency matters more than packets.
                let _ = stream.set_nodelay(true);
                self.handshake(stream).await
            }
        }
    }

    async fn handshake<S>(
        &self,
        stream: S,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| self.http_error(source))?;
        tokio::spawn(async move {
            // Its errors reach the caller through the response or its body.
            let _ = connection.await;
        });
        Ok(sender)
    }

    fn http_error(&self, source: hyper::Error) -> ClientError {
        ClientError::Http {
            endpoint: self.endpoint.to_string(),
            source,
        }
    }
}

fn header_value(value: &str, what: &str) -> Result<HeaderValue, ClientError> {
    HeaderValue::from_str(value).map_err(|_| ClientError::BadPath {
        path: value.to_string(),
        reason: format!("the {what} cannot be sent in an HTTP header"),
    })
}

/// One server-sent event as framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseMessage {
    /// The `id:` field, if any.
    pub id: Option<String>,
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines, joined by `\n`.
    pub data: String,
}

/// Incremental parser of the `text/event-stream` format: feed it bytes as
/// they arrive, take whole events out. Lines end with `\n` or `\r\n`;
/// comment lines (`:` keep-alives) and `retry:` are skipped, and an event
/// without data is not dispatched (as in the HTML standard).
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes not yet forming a whole line.
    pending: Vec<u8>,
    /// The event being assembled.
    current: SseMessage,
    /// Whether `current` has seen a `data` line.
    has_data: bool,
    /// Events complete and not yet taken.
    ready: std::collections::VecDeque<SseMessage>,
}

impl SseParser {
    /// Feeds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(newline) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let end = start + newline;
            let mut line = &self.pending[start..end];
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            let line = String::from_utf8_lossy(line).into_owned();
            self.line(&line);
            start = end + 1;
        }
        self.pending.drain(..start);
    }

    /// The next complete event, if any.
    pub fn next_message(&mut self) -> Option<SseMessage> {
        self.ready.pop_front()
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            let message = std::mem::take(&mut self.current);
            if std::mem::take(&mut self.has_data) {
                self.ready.push_back(message);
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.current.event = Some(value.to_string()),
            // An id with NUL is ignored, as the standard says.
            "id" if !value.contains('\0') => self.current.id = Some(value.to_string()),
            _ => {}
        }
    }
}

/// Decodes an SSE message's data as an [`Event`]. The `id` and event name
/// fill in `seq` and `type` when the data leaves them out.
pub fn decode_event(message: &SseMessage) -> Result<Event, ClientError> {
    let decode_error = |reason: String| ClientError::Decode {
        request: "GET /v1/events".to_string(),
        reason,
    };
    let mut value: Value = serde_json::from_str(&message.data)
        .map_err(|e| decode_error(format!("event data is not JSON ({e}): {}", message.data)))?;
    if let Some(object) = value.as_object_mut() {
        if let Some(seq) = message.id.as_deref().and_then(|id| id.parse::<u64>().ok()) {
            object.entry("seq").or_insert(seq.into());
        }
        if let Some(name) = &message.event {
            object.entry("type").or_insert(name.as_str().into());
        }
    }
    serde_json::from_value(value).map_err(|e| decode_error(format!("event {e}")))
}

/// The daemon's event stream, read as it arrives.
#[derive(Debug)]
pub struct EventStream {
    endpoint: String,
    body: Incoming,
    parser: SseParser,
    done: bool,
}

impl EventStream {
    /// The next event; `None` when the daemon ended the stream.
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        let message = match self.next_message().await? {
            Ok(message) => message,
            Err(e) => return Some(Err(e)),
        };
        Some(decode_event(&message))
    }

    /// The next event as framed on the wire, undecoded; `None` when the
    /// daemon ended the stream (a half-received event is dropped).
    pub async fn next_message(&mut self) -> Option<Result<SseMessage, ClientError>> {
        loop {
            if let Some(message) = self.parser.next_message() {
                return Some(Ok(message));
            }
            if self.done {
                return None;
            }
            match self.body.frame().await {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(source)) => {
                    self.done = true;
                    return Some(Err(ClientError::Http {
                        endpoint: self.endpoint.clone(),
                        source,
                    }));
                }
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.parser.push(data);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(parser: &mut SseParser) -> Vec<SseMessage> {
        std::iter::from_fn(|| parser.next_message()).collect()
    }

    fn msg(id: Option<&str>, event: Option<&str>, data: &str) -> SseMessage {
        SseMessage {
            id: id.map(Into::into),
            event: event.map(Into::into),
            data: data.into(),
        }
    }

    #[test]
    fn sse_events_split_at_every_byte_come_out_whole() {
        let wire = b": keep-alive\n\nid: 7\nevent: vm\ndata: {\"a\":1}\n\nid: 8\r\nevent: resync\r\ndata: x\r\n\r\n";
        for split in 0..wire.len() {
            let mut parser = SseParser::default();
            parser.push(&wire[..split]);
            let mut got = messages(&mut parser);
            parser.push(&wire[split..]);
            got.extend(messages(&mut parser));
            assert_eq!(
                got,
                vec![
                    msg(Some("7"), Some("vm"), "{\"a\":1}"),
                    msg(Some("8"), Some("resync"), "x")
                ],
                "split at {split}"
            );
        }
        // One byte at a time too.
        let mut parser = SseParser::default();
        let mut got = Vec::new();
        for b in wire {
            parser.push(&[*b]);
            got.extend(messages(&mut parser));
        }
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn sse_data_lines_join_with_newlines_and_comments_are_skipped() {
        let mut parser = SseParser::default();
        parser.push(b"data: one\n: a comment\ndata:two\ndata\nretry: 5\n\n");
        assert_eq!(messages(&mut parser), vec![msg(None, None, "one\ntwo\n")]);
    }

    #[test]
    fn sse_events_without_data_or_unterminated_are_not_dispatched() {
        let mut parser = SseParser::default();
        parser.push(b"event: vm\nid: 3\n\n:ping\n\ndata: half");
        assert!(messages(&mut parser).is_empty());
        // The field state of the dropped event does not leak into the next.
        parser.push(b"\n\n");
        assert_eq!(messages(&mut parser), vec![msg(None, None, "half")]);
    }

    #[test]
    fn event_data_decodes_with_seq_and_type_from_the_framing() {
        let full = msg(
            Some("9"),
            Some("vm_deleted"),
            r#"{"seq":9,"time":"2024-01-01T00:00:00.000Z","type":"vm_deleted","id":"00000000-0000-0000-0000-000000000000","name":"web"}"#,
        );
        let event = decode_event(&full).unwrap();
        assert_eq!(event.seq, 9);
        assert_eq!(event.body.name(), "vm_deleted");
        let bare = msg(
            Some("10"),
            Some("resync"),
            r#"{"time":"t","requested":3,"oldest":null}"#,
        );
        let event = decode_event(&bare).unwrap();
        assert_eq!(event.seq, 10);
        assert_eq!(
            event.body,
            crate::vm::events::EventBody::Resync {
                requested: 3,
                oldest: None
            }
        );
        let err = decode_event(&msg(None, None, "not json")).unwrap_err();
        assert!(err.to_string().contains("not JSON"), "{err}");
    }

    #[test]
    fn segments_allow_names_and_uuids_only() {
        for ok in ["web-1", "a.b_c", "0f3c9a2e-1111-4222-8333-944445555666"] {
            assert_eq!(check_segment("VM", ok).unwrap(), ok);
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a?x=1",
            "%2e",
            "é",
            "a\r\nX: y",
        ] {
            assert!(
                matches!(
                    check_segment("VM", bad),
                    Err(ClientError::BadSegment { .. })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(vm_path("web").unwrap(), "/v1/vms/web");
        assert!(vm_path("../node").is_err());
        assert_eq!(image_path("deb-12").unwrap(), "/v1/images/deb-12");
        assert_eq!(volume_path("data").unwrap(), "/v1/volumes/data");
        assert_eq!(disk_path("web", "d1").unwrap(), "/v1/vms/web/disks/d1");
        assert_eq!(
            snapshot_path("web", "s1").unwrap(),
            "/v1/vms/web/snapshots/s1"
        );
        assert!(image_path("a/b").is_err());
        assert!(disk_path("web", "..").is_err());
    }

    #[test]
    fn only_plain_http_urls_are_accepted() {
        let t = parse_http_url("http://10.0.0.5:8780").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("10.0.0.5", 8780));
        assert_eq!(t.authority, "10.0.0.5:8780");
        let t = parse_http_url("HTTP://node1/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.authority.as_str()),
            ("node1", 80, "node1")
        );
        let t = parse_http_url("http://[::1]:9000").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.authority.as_str()),
            ("::1", 9000, "[::1]:9000")
        );
        for (bad, why) in [
            ("https://node1:8780", "only http://"),
            ("node1:8780", "expected http://"),
            ("http://", "no host"),
            ("http://node1:8780/api", "path"),
            ("http://node1:99999", "not a port"),
            ("http://u:p@node1", "user info"),
            ("http://[::1", "unclosed"),
        ] {
            let err = parse_http_url(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn api_error_bodies_become_api_errors() {
        let raw = |status: u16, body: &str| RawResponse {
            status,
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        };
        let e = raw(
            409,
            r#"{"error":{"code":"conflict","message":"VM is busy with task stop","task":"stop"}}"#,
        )
        .api_error()
        .unwrap();
        assert_eq!(e.to_string(), "409 conflict: VM is busy with task stop");
        assert!(matches!(e, ClientError::Api { task: Some(ref t), .. } if t == "stop"));
        let e = raw(
            422,
            r#"{"error":{"code":"invalid_spec","message":"must be absolute","field":"disks[0].path"}}"#,
        )
        .api_error()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "422 invalid_spec: must be absolute (field disks[0].path)"
        );
        let e = raw(
            422,
            r#"{"error":{"code":"invalid_spec","message":"name: too long","field":"name"}}"#,
        )
        .api_error()
        .unwrap();
        assert_eq!(e.to_string(), "422 invalid_spec: name: too long");
        let e = raw(502, "<html>bad gateway</html>").api_error().unwrap();
        assert_eq!(e.to_string(), "502 http_error: <html>bad gateway</html>");
        let e = raw(404, "").api_error().unwrap();
        assert_eq!(e.to_string(), "404 http_error: Not Found");
        assert!(raw(200, "{}").api_error().is_none());
        assert_eq!(raw(204, "").json().unwrap(), Value::Null);
    }
}
