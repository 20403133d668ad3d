//! Upgraded connections: `POST PATH` with `Connection: upgrade` and
//! `Upgrade: PROTOCOL`, answered `101 Switching Protocols`, after which the
//! connection is a plain byte stream both ways (what migration and NBD
//! streams between daemons ride on).

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;

use super::transport::header_value;
use super::{Client, ClientError, RawResponse};

/// The byte stream of an upgraded connection: `AsyncRead + AsyncWrite +
/// Unpin + Send`, over whatever carried the request (unix socket, TCP or
/// TLS). Bytes the server sent right after its `101` are not lost: hyper
/// hands them out first.
pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

impl Client {
    /// Sends `POST path` with no body, `Connection: upgrade`,
    /// `Upgrade: protocol` (and the bearer token on TCP), and returns the
    /// connection as a byte stream once the daemon answers `101 Switching
    /// Protocols` naming the same protocol. Any other answer is an error:
    /// the API error its body carries for a 4xx/5xx, a
    /// [`ClientError::Decode`] for anything else.
    pub async fn upgrade(&self, path: &str, protocol: &str) -> Result<Upgraded, ClientError> {
        let request_name = format!("POST {path} (Upgrade: {protocol})");
        check_protocol(protocol)?;
        let request = self
            .request_head(Method::POST, path, Some("application/json"))?
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, header_value(protocol, "upgrade protocol")?)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::BadPath {
                path: path.to_string(),
                reason: e.to_string(),
            })?;
        let response = self.send_request(request).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|source| self.http_error(source))?
                .to_bytes();
            let raw = RawResponse {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            };
            return Err(raw.api_error().unwrap_or_else(|| ClientError::Decode {
                request: request_name,
                reason: format!(
                    "expected 101 Switching Protocols, got {} ({})",
                    raw.status,
                    raw.text().trim()
                ),
            }));
        }
        let agreed = response
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !agreed.trim().eq_ignore_ascii_case(protocol) {
            return Err(ClientError::Decode {
                request: request_name,
                reason: format!("101 switches to {agreed:?}, not {protocol:?}"),
            });
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|source| self.http_error(source))?;
        Ok(TokioIo::new(upgraded))
    }
}

/// An upgrade protocol is an HTTP token, optionally with `/VERSION`
/// (RFC 9110 §7.8): anything else is refused before a connection opens.
fn check_protocol(protocol: &str) -> Result<(), ClientError> {
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let valid = match protocol.split_once('/') {
        Some((name, version)) => token(name) && token(version),
        None => token(protocol),
    };
    if valid {
        Ok(())
    } else {
        Err(ClientError::BadPath {
            path: protocol.to_string(),
            reason: "an upgrade protocol must be a token such as `vmlet-migration` \
                     or `name/version`"
                .to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_protocols_must_be_tokens() {
        for good in ["vmlet-migration", "nbd", "websocket", "h2c", "proto/1.0"] {
            assert!(check_protocol(good).is_ok(), "{good}");
        }
        for bad in ["", "two words", "a,b", "a/", "/1", "x\r\ny", "a/b/c", "é"] {
            let err = check_protocol(bad).unwrap_err().to_string();
            assert!(err.contains("upgrade protocol"), "{bad}: {err}");
        }
    }
}
