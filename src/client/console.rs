//! VM consoles: one-time console tokens, the serial console log, and the
//! console websocket itself (opened over the same unix socket or TCP
//! listener as the API, TLS included).

use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::Method;

use super::endpoint::parse_http_url;
use super::paths::check_segment;
use super::{Client, ClientError, Endpoint, RawResponse};
use crate::console::ConsoleKind;
use crate::console::ConsoleToken;

/// A byte stream to the daemon (unix or TCP).
pub trait ConsoleIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ConsoleIo for T {}

/// An open console websocket.
pub type ConsoleSocket = tokio_tungstenite::WebSocketStream<Box<dyn ConsoleIo>>;

impl Client {
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
        self.console_log_of(id_or_name, tail_bytes, false).await
    }

    /// `GET /v1/vms/{id}/console-log`, with `current_boot`: only the
    /// current boot's part (`boot=current`).
    pub async fn console_log_of(
        &self,
        id_or_name: &str,
        tail_bytes: Option<u64>,
        current_boot: bool,
    ) -> Result<Vec<u8>, ClientError> {
        let id = check_segment("VM id or name", id_or_name)?;
        let mut params = Vec::new();
        if let Some(n) = tail_bytes {
            params.push(format!("tail_bytes={n}"));
        }
        if current_boot {
            params.push("boot=current".to_string());
        }
        let query = if params.is_empty() {
            String::new()
        } else {
            format!("?{}", params.join("&"))
        };
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
        let mut scheme = "ws";
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
                match self.tls_config(&target)? {
                    Some(config) => {
                        let endpoint = self.endpoint.to_string();
                        let stream =
                            super::tls::connect(config, &target, &endpoint, stream).await?;
                        scheme = "wss";
                        (target.authority, Box::new(stream))
                    }
                    None => (target.authority, Box::new(stream)),
                }
            }
        };
        let mut request = format!("{scheme}://{host}{url}")
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
}
