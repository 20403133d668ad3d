//! The wire: one HTTP/1.1 exchange per connection over the unix socket,
//! TCP or TLS, with the `Host`, `Accept` and bearer-token headers; whole responses
//! as [`RawResponse`], and the API's error bodies read as
//! [`ClientError::Api`].

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;

use super::endpoint::parse_http_url;
use super::{Client, ClientError, Endpoint};

/// How much of an unexpected (non-JSON) error body is quoted in an error.
const QUOTED_BODY_LIMIT: usize = 300;

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

/// A request body as JSON (the API's request types always serialize).
pub(super) fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or_default()
}

impl Client {
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
    pub(super) async fn call<T: serde::de::DeserializeOwned>(
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
    pub(super) async fn call_empty(
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

    /// Opens a connection, sends one request and returns the response with
    /// its body still to be read. The connection lives until the body is
    /// read or dropped.
    pub(super) async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
        accept: Option<&str>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let mut request = self.request_head(method, path_and_query, accept)?;
        if let Some(content_type) = content_type {
            request = request.header(
                header::CONTENT_TYPE,
                header_value(content_type, "content type")?,
            );
        }
        let request =
            request
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| ClientError::BadPath {
                    path: path_and_query.to_string(),
                    reason: e.to_string(),
                })?;
        self.send_request(request).await
    }

    /// A request's method, path and the headers every request carries:
    /// `Host`, `User-Agent`, `Accept` and the bearer token.
    pub(super) fn request_head(
        &self,
        method: Method,
        path_and_query: &str,
        accept: Option<&str>,
    ) -> Result<hyper::http::request::Builder, ClientError> {
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
        Ok(request)
    }

    /// Opens a connection and sends `request` on it.
    pub(super) async fn send_request(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
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
                keep_alive(&stream);
                match self.tls_config(&target)? {
                    Some(config) => {
                        let endpoint = self.endpoint.to_string();
                        let stream =
                            super::tls::connect(config, &target, &endpoint, stream).await?;
                        self.handshake(stream).await
                    }
                    None => self.handshake(stream).await,
                }
            }
        }
    }

    /// The TLS configuration for an `https://` target (`None` for
    /// `http://`).
    pub(super) fn tls_config(
        &self,
        target: &super::endpoint::TcpTarget,
    ) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, ClientError> {
        if !target.https {
            return Ok(None);
        }
        match &self.tls {
            Some(config) => Ok(Some(config.clone())),
            // Set for every https endpoint by `Client::with_ca_file`; the
            // system roots, should that ever not hold.
            None => super::tls::client_config(None).map(Some),
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
            // With upgrades, a `101` hands the socket to `hyper::upgrade::on`
            // (see [`Client::upgrade`]) instead of closing it.
            let _ = connection.with_upgrades().await;
        });
        Ok(sender)
    }

    pub(super) fn http_error(&self, source: hyper::Error) -> ClientError {
        ClientError::Http {
            endpoint: self.endpoint.to_string(),
            source,
        }
    }
}

pub(super) fn header_value(value: &str, what: &str) -> Result<HeaderValue, ClientError> {
    HeaderValue::from_str(value).map_err(|_| ClientError::BadPath {
        path: value.to_string(),
        reason: format!("the {what} cannot be sent in an HTTP header"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

/// Seconds a TCP connection may sit idle before the kernel probes the peer.
const KEEPALIVE_IDLE_S: libc::c_int = 15;
/// Seconds between probes.
const KEEPALIVE_INTERVAL_S: libc::c_int = 5;
/// Unanswered probes after which the connection is dead.
const KEEPALIVE_PROBES: libc::c_int = 4;
/// Milliseconds sent data may stay unacknowledged (a peer that is gone,
/// or frozen with a full receive window) before the connection is dead.
const USER_TIMEOUT_MS: libc::c_int = 60_000;

/// Turns on TCP keepalive (probes after 15 s idle, every 5 s, 4 of them)
/// and a 60 s `TCP_USER_TIMEOUT` on `stream`, so a host on the other end
/// that vanishes without closing (powered off, its network cut) ends the
/// connection within about a minute instead of never: a migration stream
/// or a call to another daemon then fails instead of waiting forever.
/// Best effort: a refused option leaves the connection as it was.
pub fn keep_alive(stream: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_S),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, USER_TIMEOUT_MS),
    ] {
        // SAFETY: `fd` is the stream's open socket for this whole call, and
        // the option value is a c_int that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), name, "could not set a TCP keepalive option");
        }
    }
}

#[cfg(test)]
mod keep_alive_tests {
    use super::*;

    fn option(
        stream: &tokio::net::TcpStream,
        level: libc::c_int,
        name: libc::c_int,
    ) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: reads one c_int option of an open socket into `value`.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        value
    }

    #[tokio::test]
    async fn connections_get_keepalive_and_a_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        assert_eq!(option(&stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
        keep_alive(&stream);
        assert_eq!(option(&stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(
            option(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            KEEPALIVE_IDLE_S
        );
        assert_eq!(
            option(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            KEEPALIVE_INTERVAL_S
        );
        assert_eq!(
            option(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
            KEEPALIVE_PROBES
        );
        assert_eq!(
            option(&stream, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
            USER_TIMEOUT_MS
        );
    }
}
