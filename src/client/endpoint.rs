//! Where the daemon listens: its unix socket (the default) or a TCP
//! listener, `http://HOST[:PORT]` or `https://HOST[:PORT]`, with a bearer
//! token, and the parsing of such URLs.

use std::fmt;
use std::path::PathBuf;

use super::ClientError;

/// Where `vmlet serve` listens by default.
pub const DEFAULT_SOCKET: &str = "/run/vmlet/vmlet.sock";

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The daemon's unix socket.
    Unix(PathBuf),
    /// The daemon's TCP listener.
    Tcp {
        /// `http://HOST[:PORT]` or `https://HOST[:PORT]`.
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
    /// `http[s]://HOST[:PORT][/]`), so a typo fails before the first
    /// request.
    pub fn check(&self) -> Result<(), ClientError> {
        match self {
            Endpoint::Unix(_) => Ok(()),
            Endpoint::Tcp { url, .. } => parse_http_url(url).map(|_| ()),
        }
    }

    /// Whether it is an `https://` URL (a malformed one is not).
    pub fn is_https(&self) -> bool {
        match self {
            Endpoint::Unix(_) => false,
            Endpoint::Tcp { url, .. } => parse_http_url(url).is_ok_and(|t| t.https),
        }
    }
}

/// A `http://` or `https://` URL split into what a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TcpTarget {
    /// Host to connect to (IPv6 without brackets).
    pub(super) host: String,
    /// Port to connect to.
    pub(super) port: u16,
    /// The `Host` header: the authority as written.
    pub(super) authority: String,
    /// `https://`: TLS over the connection.
    pub(super) https: bool,
}

/// Parses `http[s]://HOST[:PORT][/]` (ports 80 and 443 by default). Paths,
/// queries, user info and other schemes are refused: the API lives at the
/// root of the listener.
pub(super) fn parse_http_url(url: &str) -> Result<TcpTarget, ClientError> {
    let bad = |reason: &str| ClientError::BadEndpoint {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(bad("expected http://HOST:PORT or https://HOST:PORT"));
    };
    let https = if scheme.eq_ignore_ascii_case("https") {
        true
    } else if scheme.eq_ignore_ascii_case("http") {
        false
    } else {
        return Err(bad(&format!(
            "scheme {scheme} is not supported: only http:// and https://"
        )));
    };
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
        None if https => 443,
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| bad(&format!("{p:?} is not a port")))?,
    };
    Ok(TcpTarget {
        host: host.to_string(),
        port,
        authority: authority.to_string(),
        https,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_urls_are_accepted() {
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
        let t = parse_http_url("https://node1.example:8780/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.authority.as_str(), t.https),
            ("node1.example", 8780, "node1.example:8780", true)
        );
        let t = parse_http_url("HTTPS://[fd00::1]").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.https), ("fd00::1", 443, true));
        assert!(!parse_http_url("http://node1").unwrap().https);
        for (bad, why) in [
            ("ftp://node1:8780", "only http:// and https://"),
            ("wss://node1:8780", "only http:// and https://"),
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
}
