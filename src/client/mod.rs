//! A small HTTP/1.1 client for the vmlet API, used by the `vmlet vm …`
//! subcommands and by the integration tests to talk to a daemon.
//!
//! It speaks to a daemon over its unix socket or over TCP, `http://` or
//! `https://` (with a bearer token), opens one connection per request, and turns the
//! API's error bodies into [`ClientError::Api`]. [`Client::events`] follows
//! the server-sent event stream of `/v1/events`.
//!
//! The typed helpers (`list_vms`, `get_vm`, …) suit callers that want data;
//! [`Client::request`] and [`Client::request_json`] suit tests that check
//! exact status codes and bodies.
//!
//! This file holds the [`Client`] type and its error; the rest is split by
//! job, each file adding its part of `impl Client`:
//!
//! - `endpoint`: where the daemon listens ([`Endpoint`], `http[s]://` URLs);
//! - `tls`: whom `https://` trusts (system roots, a CA file) and the
//!   handshake;
//! - `transport`: one HTTP/1.1 exchange per connection, the token header,
//!   [`RawResponse`] and how error bodies are read;
//! - `paths`: API paths built from names, refusing what a URL cannot carry;
//! - `sse`: the `/v1/events` stream ([`SseParser`], [`EventStream`]);
//! - `console`: console tokens, the serial log and console websockets;
//! - `upgrade`: connections upgraded to byte streams ([`Client::upgrade`]);
//! - `node`, `vms`, `disks`, `storage`, `networks`: the typed endpoints.
//!
//! Every public item is re-exported here: callers name them `client::…`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

mod console;
mod disks;
mod endpoint;
mod migrations;
mod networks;
mod node;
mod paths;
mod sse;
mod storage;
mod tls;
mod transport;
mod upgrade;
mod vms;

pub use console::{ConsoleIo, ConsoleSocket};
pub use endpoint::{Endpoint, DEFAULT_SOCKET};
pub use hyper::Method;
pub use migrations::STREAM_PROTOCOL;
pub use paths::check_segment;
pub use sse::{decode_event, EventStream, SseMessage, SseParser};
pub use transport::{keep_alive, RawResponse};
pub use upgrade::Upgraded;

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
    /// The TLS handshake with an `https://` endpoint failed.
    #[error("TLS handshake with {endpoint} failed: {reason}{hint}")]
    Tls {
        /// The endpoint, as people read it.
        endpoint: String,
        /// rustls's reason (`invalid peer certificate: UnknownIssuer`, …).
        reason: String,
        /// What to check, for certificate errors (else empty).
        hint: &'static str,
    },
    /// The CA file given for `https://` cannot be used.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
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

/// A client of one vmlet daemon. Cheap to clone; holds no connection.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    /// For an `https://` endpoint: whom to trust.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Client {
    /// A client for the daemon at `endpoint`. An `https://` endpoint's
    /// certificate must chain to one of the system's trusted roots.
    pub fn new(endpoint: Endpoint) -> Client {
        Client::with_ca_file(endpoint, None)
            .expect("without a CA file, a TLS configuration always builds")
    }

    /// A client for the daemon at `endpoint` that, for an `https://`
    /// endpoint, also trusts the CA certificates in the PEM file `ca_file`
    /// (read here, so a bad file fails before any request). For a unix
    /// socket or an `http://` URL the file is not used.
    pub fn with_ca_file(endpoint: Endpoint, ca_file: Option<&Path>) -> Result<Client, ClientError> {
        let tls = if endpoint.is_https() {
            Some(tls::client_config(ca_file)?)
        } else {
            None
        };
        Ok(Client { endpoint, tls })
    }

    /// A client for the daemon's unix socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Client {
        Client::new(Endpoint::Unix(path.into()))
    }

    /// The endpoint it talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}
