//! Upgrading a request's connection to a plain byte stream, the server
//! half of `Client::upgrade`: a handler calls [`accept`], returns its `101`
//! response, and spawns a task that awaits the stream.
//!
//! Such a connection leaves the listener's hands at the `101`: the
//! header-read and idle timeouts no longer apply (a migration stream may
//! carry data for minutes or pause for a while), while it keeps its slot
//! under the connection cap until the stream is dropped. The middleware has
//! run on the request itself, so on TCP the bearer token was checked.

use std::future::Future;
use std::io;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::Response;
use hyper_util::rt::TokioIo;

use crate::api::error::ApiError;

/// The byte stream of an upgraded connection (`AsyncRead + AsyncWrite +
/// Unpin + Send`).
pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// Checks that `request` asks to upgrade its connection to `protocol`
/// (`Connection: upgrade`, `Upgrade: protocol`, compared without regard to
/// case, no body) and returns the `101 Switching Protocols` response to
/// send, with the future that resolves to the stream once it is sent.
///
/// The future must be awaited in a task of its own: the switch happens
/// only after the handler returns the response.
///
/// A request that does not ask for `protocol` gets 400 naming it.
pub fn accept<B>(
    request: &mut Request<B>,
    protocol: &str,
) -> Result<
    (
        Response,
        impl Future<Output = io::Result<Upgraded>> + Send + 'static,
    ),
    ApiError,
> {
    let protocol_value = HeaderValue::from_str(protocol).map_err(|_| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        ..ApiError::bad_request(format!(
            "upgrade protocol {protocol:?} cannot be sent in a header"
        ))
    })?;
    check_headers(request.headers(), protocol)?;
    let on_upgrade = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "this connection cannot be upgraded to {protocol} (HTTP/1.1 is needed)"
            ))
        })?;
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol_value);
    let stream = async move {
        on_upgrade
            .await
            .map(TokioIo::new)
            .map_err(|e| io::Error::other(format!("upgrading the connection failed: {e}")))
    };
    Ok((response, stream))
}

/// The header checks of [`accept`].
fn check_headers(headers: &HeaderMap, protocol: &str) -> Result<(), ApiError> {
    let wanted = || format!("`Connection: upgrade` and `Upgrade: {protocol}`");
    let upgrade = headers
        .get(header::UPGRADE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string());
    match upgrade {
        None => {
            return Err(ApiError::bad_request(format!(
                "this route needs {}; the request has no Upgrade header",
                wanted()
            )))
        }
        Some(got) if !got.eq_ignore_ascii_case(protocol) => {
            return Err(ApiError::bad_request(format!(
                "this route needs {}; got Upgrade: {got:?}",
                wanted()
            )))
        }
        Some(_) => {}
    }
    let connection_upgrade = headers.get_all(header::CONNECTION).iter().any(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    });
    if !connection_upgrade {
        return Err(ApiError::bad_request(format!(
            "this route needs {}; the Connection header lacks `upgrade`",
            wanted()
        )));
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes().trim_ascii() != b"0");
    if has_body {
        return Err(ApiError::bad_request(format!(
            "an upgrade to {protocol} takes no request body"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn only_an_upgrade_to_the_named_protocol_without_a_body_passes() {
        let ok = [
            headers(&[("connection", "upgrade"), ("upgrade", "vmlet-migration")]),
            headers(&[
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "VMLET-Migration"),
                ("content-length", "0"),
            ]),
            headers(&[
                ("connection", "keep-alive"),
                ("connection", "upgrade"),
                ("upgrade", "vmlet-migration"),
            ]),
        ];
        for h in &ok {
            assert!(check_headers(h, "vmlet-migration").is_ok(), "{h:?}");
        }
        let bad = [
            (headers(&[("connection", "upgrade")]), "no Upgrade header"),
            (
                headers(&[("connection", "upgrade"), ("upgrade", "websocket")]),
                "got Upgrade: \"websocket\"",
            ),
            (
                headers(&[("upgrade", "vmlet-migration")]),
                "lacks `upgrade`",
            ),
            (
                headers(&[
                    ("connection", "upgrade"),
                    ("upgrade", "vmlet-migration"),
                    ("content-length", "5"),
                ]),
                "no request body",
            ),
            (
                headers(&[
                    ("connection", "upgrade"),
                    ("upgrade", "vmlet-migration"),
                    ("transfer-encoding", "chunked"),
                ]),
                "no request body",
            ),
        ];
        for (h, why) in &bad {
            let err = check_headers(h, "vmlet-migration").unwrap_err();
            assert_eq!((err.status.as_u16(), err.code), (400, "bad_request"));
            assert!(err.message.contains(why), "{h:?}: {}", err.message);
            assert!(err.message.contains("vmlet-migration"), "{}", err.message);
        }
    }

    #[test]
    fn a_request_the_listener_cannot_upgrade_is_refused() {
        let mut request = Request::builder()
            .header("connection", "upgrade")
            .header("upgrade", "nbd")
            .body(())
            .unwrap();
        // No `OnUpgrade` in its extensions: not read from a hyper
        // connection.
        let err = accept(&mut request, "nbd").err().unwrap();
        assert_eq!(err.status.as_u16(), 400);
        assert!(err.message.contains("cannot be upgraded to nbd"));
    }
}
