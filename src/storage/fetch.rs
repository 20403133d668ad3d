//! Fetching an image over http(s) without turning the daemon into a tool
//! for reaching what only the host can reach (SSRF).
//!
//! - Every destination address is checked against a deny list (loopback,
//!   private, link-local, CGNAT, multicast, documentation, …, and the
//!   IPv4-mapped/NAT64/6to4 forms of those) unless an allowed network
//!   (`[images] import_allowed_networks`) contains it.
//! - Names are resolved here, once per hop; the HTTP client is handed exactly
//!   the checked addresses and has no resolver of its own, so a second lookup
//!   cannot answer differently (DNS rebinding). Proxies from the environment
//!   are not used: they would connect somewhere unchecked.
//! - Redirects are followed by hand, at most [`MAX_REDIRECTS`], and every hop
//!   is checked like the first.
//! - Connection failures all read "could not connect", whatever the cause, so
//!   the error does not tell an open, closed or filtered port apart.
//! - What is shown of a URL ([`redact`]) has no credentials, query or
//!   fragment; the real URL is used only for the request.
//!
//! Why this file is long: the address rules (every deny range and its
//! IPv6 spellings) are listed in full, and their tests sit beside them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;

/// Redirects followed at most (curl's and browsers' limits are larger; an
/// image server needs one or two).
pub const MAX_REDIRECTS: usize = 5;

/// Why a fetch failed. The messages name the URL only as [`redact`] shows
/// it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The destination is not allowed (no connection was attempted).
    #[error("could not fetch {url}: the destination is not allowed ({reason}); [images] import_allowed_networks lists networks that may be fetched from")]
    Denied {
        /// The URL, redacted.
        url: String,
        /// The kind of address (e.g. `loopback`), never the address of a
        /// resolved name.
        reason: &'static str,
    },
    /// The name did not resolve.
    #[error("could not fetch {url}: the host name did not resolve")]
    Resolve {
        /// The URL, redacted.
        url: String,
    },
    /// No connection, whatever the reason (refused, timed out,
    /// unreachable, TLS): the cause is logged, not shown.
    #[error("could not fetch {url}: could not connect")]
    Connect {
        /// The URL, redacted.
        url: String,
    },
    /// The server answered with an error status.
    #[error("could not fetch {url}: the server answered {status}")]
    Status {
        /// The URL, redacted.
        url: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
    },
    /// A redirect without a usable `Location`, to a scheme other than
    /// http(s), or one too many.
    #[error("could not fetch {url}: {message}")]
    Redirect {
        /// The URL, redacted.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The source is larger than `[images] import_max_bytes`.
    #[error("could not fetch {url}: the source is larger than the limit of {limit} bytes ([images] import_max_bytes)")]
    TooLarge {
        /// The URL, redacted.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The server went quiet, or the whole transfer took too long.
    #[error("could not fetch {url}: {what}")]
    Timeout {
        /// The URL, redacted.
        url: String,
        /// Which limit.
        what: String,
    },
    /// The transfer broke off.
    #[error("could not fetch {url}: {message}")]
    Transfer {
        /// The URL, redacted.
        url: String,
        /// What happened.
        message: String,
    },
}

impl From<FetchError> for crate::storage::StorageError {
    fn from(e: FetchError) -> Self {
        use crate::storage::StorageError;
        match e {
            FetchError::Denied { .. } | FetchError::TooLarge { .. } => {
                StorageError::Refused(e.to_string())
            }
            _ => StorageError::Failed(e.to_string()),
        }
    }
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `fd00::/8`; a bare
/// address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// The network `addr/prefix`; `None` when the prefix is too long or
    /// host bits are set.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<IpNet> {
        let net = IpNet { addr, prefix };
        (prefix <= net.max_prefix() && net.masked(addr) == addr).then_some(net)
    }

    fn max_prefix(&self) -> u8 {
        match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }

    /// True when `ip` (of the same family) is in the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && self.masked(ip) == self.addr
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<IpNet, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a network like 10.0.0.0/8 or fd00::/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        IpNet::new(addr, prefix).ok_or_else(|| {
            let net = IpNet { addr, prefix };
            format!(
                "{s:?} has host bits set (the network is {}/{prefix})",
                net.masked(addr)
            )
        })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a comma- or space-separated list of networks (the form of
/// `VMLET_IMPORT_ALLOWED_NETWORKS`); an empty string is an empty list.
pub fn parse_networks(s: &str) -> Result<Vec<IpNet>, String> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect()
}

/// The address as the network sees it: an IPv4-mapped IPv6 address
/// (`::ffff:127.0.0.1`) is the IPv4 address it carries.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// Networks denied by default, with the reason shown.
const DENIED_V4: &[(&str, &str)] = &[
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved or broadcast"),
];

const DENIED_V6: &[(&str, &str)] = &[
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    // IPv4-compatible addresses (deprecated); mapped ones are canonicalized
    // to IPv4 before this list is consulted.
    ("::/96", "IPv4-compatible"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
];

fn denied_in(list: &[(&str, &'static str)], ip: IpAddr) -> Option<&'static str> {
    list.iter().find_map(|(net, reason)| {
        let net: IpNet = net.parse().expect("the deny list parses");
        net.contains(ip).then_some(*reason)
    })
}

/// Why `ip` is denied by default, if it is: the address itself, or the
/// IPv4 address a NAT64 (`64:ff9b::/96`) or 6to4 (`2002::/16`) address
/// leads to.
pub fn default_denial(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => denied_in(DENIED_V4, IpAddr::V4(v4)),
        IpAddr::V6(v6) => {
            if let Some(reason) = denied_in(DENIED_V6, IpAddr::V6(v6)) {
                return Some(reason);
            }
            let bits = u128::from(v6);
            let embedded = if bits >> 32 == 0x0064_ff9b_u128 << 64 {
                Some(Ipv4Addr::from(bits as u32))
            } else if bits >> 112 == 0x2002 {
                Some(Ipv4Addr::from((bits >> 80) as u32))
            } else {
                None
            };
            embedded.and_then(|v4| denied_in(DENIED_V4, IpAddr::V4(v4)))
        }
    }
}

/// Which destinations a fetch may connect to.
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicy {
    allowed: Vec<IpNet>,
}

impl NetworkPolicy {
    /// The default deny list, overridden for the `allowed` networks.
    pub fn new(allowed: Vec<IpNet>) -> NetworkPolicy {
        NetworkPolicy { allowed }
    }

    /// `Err(reason)` when `ip` may not be connected to.
    pub fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        let ip = canonical(ip);
        if self.allowed.iter().any(|net| net.contains(ip)) {
            return Ok(());
        }
        match default_denial(ip) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }
}

/// A URL as it may be shown (records, events, logs, errors): without
/// user name, password, query or fragment, which may hold credentials.
pub fn redact(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// Limits of one fetch.
#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// Time to connect (per hop).
    pub connect_timeout: Duration,
    /// Longest wait for the response head or for the next body bytes.
    pub idle_timeout: Duration,
    /// The whole fetch, redirects and body included. The caller applies it
    /// (it spans the caller's writes too).
    pub total_timeout: Duration,
    /// Largest source accepted, in bytes.
    pub max_bytes: u64,
}

/// A URL's host: an address, or a name to resolve.
enum Host {
    Ip(IpAddr),
    Name(String),
}

/// The host of `url`. The URL parser has already normalized the odd IPv4
/// spellings (`0x7f.1`, `2130706433`) of http(s) URLs to dotted quads, and
/// brackets IPv6 addresses.
fn host_of(url: &Url) -> Option<Host> {
    let host = url.host_str()?;
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse().ok().map(|ip| Host::Ip(IpAddr::V6(ip)));
    }
    match host.parse::<Ipv4Addr>() {
        Ok(v4) => Some(Host::Ip(IpAddr::V4(v4))),
        Err(_) => Some(Host::Name(host.to_string())),
    }
}

/// Fetches URLs under a [`NetworkPolicy`] and [`FetchLimits`].
#[derive(Debug, Clone)]
pub struct Fetcher {
    policy: NetworkPolicy,
    limits: FetchLimits,
}

/// A response being read: [`Download::chunk`] enforces the idle timeout and
/// the size limit.
pub struct Download {
    response: reqwest::Response,
    shown: String,
    limits: FetchLimits,
    done: u64,
}

/// The HTTP client may never resolve a name itself: every name it is given
/// is overridden with checked addresses, so reaching this is a bug, and it
/// fails closed.
struct NoResolver;

impl reqwest::dns::Resolve for NoResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_string();
        Box::pin(
            async move { Err(format!("{name} was not resolved and checked beforehand").into()) },
        )
    }
}

impl Fetcher {
    /// A fetcher.
    pub fn new(policy: NetworkPolicy, limits: FetchLimits) -> Fetcher {
        Fetcher { policy, limits }
    }

    /// The limits.
    pub fn limits(&self) -> &FetchLimits {
        &self.limits
    }

    /// Checks a URL whose host is an IP address at once (a name needs a
    /// lookup: [`Fetcher::open`] checks it).
    pub fn check_literal(&self, url: &Url) -> Result<(), FetchError> {
        let Some(Host::Ip(ip)) = host_of(url) else {
            return Ok(());
        };
        self.policy.check(ip).map_err(|reason| FetchError::Denied {
            url: redact(url),
            reason,
        })
    }

    /// The checked addresses of `url`'s host.
    async fn destinations(&self, url: &Url) -> Result<Vec<SocketAddr>, FetchError> {
        let shown = redact(url);
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs: Vec<SocketAddr> = match host_of(url) {
            Some(Host::Ip(ip)) => vec![SocketAddr::new(ip, port)],
            Some(Host::Name(name)) => {
                let lookup = tokio::net::lookup_host((name.as_str(), port));
                match tokio::time::timeout(self.limits.connect_timeout, lookup).await {
                    Ok(Ok(addrs)) => addrs.collect(),
                    Ok(Err(e)) => {
                        tracing::debug!(url = %shown, error = %e, "import: lookup failed");
                        vec![]
                    }
                    Err(_) => vec![],
                }
            }
            None => vec![],
        };
        if addrs.is_empty() {
            return Err(FetchError::Resolve { url: shown });
        }
        // One denied address refuses the name: a name that mixes public and
        // internal addresses is not one to trust.
        for addr in &addrs {
            if let Err(reason) = self.policy.check(addr.ip()) {
                return Err(FetchError::Denied { url: shown, reason });
            }
        }
        Ok(addrs
            .into_iter()
            .map(|a| SocketAddr::new(canonical(a.ip()), a.port()))
            .collect())
    }

    /// GETs `url`, following redirects, and returns the successful response
    /// for reading. The caller bounds the whole fetch with
    /// [`FetchLimits::total_timeout`].
    pub async fn open(&self, url: &Url) -> Result<Download, FetchError> {
        let mut current = url.clone();
        let mut hops = 0;
        loop {
            let shown = redact(&current);
            let addrs = self.destinations(&current).await?;
            let mut builder = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(self.limits.connect_timeout)
                .dns_resolver(Arc::new(NoResolver))
                .user_agent(concat!("vmlet/", env!("CARGO_PKG_VERSION")));
            if let Some(Host::Name(name)) = host_of(&current) {
                builder = builder.resolve_to_addrs(&name, &addrs);
            }
            let client = builder.build().map_err(|e| FetchError::Transfer {
                url: shown.clone(),
                message: format!("building the HTTP client: {}", e.without_url()),
            })?;
            let send = client.get(current.clone()).send();
            let response = match tokio::time::timeout(self.limits.idle_timeout, send).await {
                Ok(Ok(response)) => response,
                Ok(Err(e)) => {
                    // The cause (refused, unreachable, TLS…) stays in the
                    // log: shown, it would tell port states apart.
                    tracing::debug!(url = %shown, error = %crate::error_chain(&e.without_url()), "import: request failed");
                    return Err(FetchError::Connect { url: shown });
                }
                Err(_) => {
                    return Err(FetchError::Connect { url: shown });
                }
            };
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| FetchError::Redirect {
                        url: shown.clone(),
                        message: format!("{status} without a Location"),
                    })?;
                let next = current.join(location).map_err(|_| FetchError::Redirect {
                    url: shown.clone(),
                    message: format!("{status} to an invalid Location"),
                })?;
                if !matches!(next.scheme(), "http" | "https") {
                    return Err(FetchError::Redirect {
                        url: shown,
                        message: format!("redirected to scheme {}", next.scheme()),
                    });
                }
                hops += 1;
                if hops > MAX_REDIRECTS {
                    return Err(FetchError::Redirect {
                        url: shown,
                        message: format!("more than {MAX_REDIRECTS} redirects"),
                    });
                }
                tracing::debug!(from = %shown, to = %redact(&next), "import: following a redirect");
                current = next;
                continue;
            }
            if !status.is_success() {
                return Err(FetchError::Status { url: shown, status });
            }
            if let Some(length) = response.content_length() {
                if length > self.limits.max_bytes {
                    return Err(FetchError::TooLarge {
                        url: shown,
                        limit: self.limits.max_bytes,
                    });
                }
            }
            return Ok(Download {
                response,
                shown,
                limits: self.limits.clone(),
                done: 0,
            });
        }
    }
}

impl Download {
    /// The URL finally fetched, redacted.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The announced size.
    pub fn content_length(&self) -> Option<u64> {
        self.response.content_length()
    }

    /// Bytes read so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, FetchError> {
        let next = tokio::time::timeout(self.limits.idle_timeout, self.response.chunk()).await;
        let chunk = match next {
            Err(_) => {
                return Err(FetchError::Timeout {
                    url: self.shown.clone(),
                    what: format!(
                        "no data for {} s ([images] import_idle_timeout_s)",
                        self.limits.idle_timeout.as_secs()
                    ),
                })
            }
            Ok(Err(e)) => {
                tracing::debug!(url = %self.shown, error = %crate::error_chain(&e.without_url()), "import: body failed");
                return Err(FetchError::Transfer {
                    url: self.shown.clone(),
                    message: "the transfer broke off".into(),
                });
            }
            Ok(Ok(chunk)) => chunk,
        };
        if let Some(chunk) = &chunk {
            self.done += chunk.len() as u64;
            if self.done > self.limits.max_bytes {
                return Err(FetchError::TooLarge {
                    url: self.shown.clone(),
                    limit: self.limits.max_bytes,
                });
            }
        }
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_default_deny_list_covers_internal_destinations() {
        for (addr, reason) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("::ffff:192.168.1.1", "private"),
            ("fd12:3456::1", "unique local (private)"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("100.64.0.1", "shared address space (CGNAT)"),
            ("224.0.0.251", "multicast"),
            ("ff02::1", "multicast"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("255.255.255.255", "reserved or broadcast"),
            ("192.0.2.10", "documentation"),
            ("198.51.100.1", "documentation"),
            ("203.0.113.7", "documentation"),
            ("2001:db8::1", "documentation"),
            ("::127.0.0.1", "IPv4-compatible"),
            // NAT64 and 6to4 forms of internal IPv4 addresses.
            ("64:ff9b::7f00:1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:c0a8:0101::1", "private"),
        ] {
            assert_eq!(default_denial(ip(addr)), Some(reason), "{addr}");
        }
        for addr in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ] {
            assert_eq!(default_denial(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn allowed_networks_override_the_deny_list() {
        let policy = NetworkPolicy::new(parse_networks("127.0.0.0/8, fd00::/8").unwrap());
        assert!(policy.check(ip("127.0.0.1")).is_ok());
        assert!(policy.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(policy.check(ip("fd00::5")).is_ok());
        assert_eq!(policy.check(ip("::1")), Err("loopback"));
        assert_eq!(policy.check(ip("10.0.0.1")), Err("private"));
        assert!(policy.check(ip("8.8.8.8")).is_ok());
        assert_eq!(
            NetworkPolicy::default().check(ip("127.0.0.1")),
            Err("loopback")
        );
    }

    #[test]
    fn networks_parse_strictly() {
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.255.0.1")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(!net.contains(ip("::ffff:10.0.0.1")));
        assert_eq!(net.to_string(), "10.0.0.0/8");
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("1.2.3.4")));
        let one: IpNet = "192.168.1.5".parse().unwrap();
        assert!(one.contains(ip("192.168.1.5")) && !one.contains(ip("192.168.1.6")));
        let err = "10.0.0.1/8".parse::<IpNet>().unwrap_err();
        assert!(
            err.contains("host bits") && err.contains("10.0.0.0/8"),
            "{err}"
        );
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("fd00::/129".parse::<IpNet>().is_err());
        assert!("example.com/8".parse::<IpNet>().is_err());
        assert!(parse_networks("").unwrap().is_empty());
        assert_eq!(parse_networks("127.0.0.0/8 ::1/128").unwrap().len(), 2);
    }

    #[test]
    fn odd_spellings_of_internal_addresses_are_caught() {
        let fetcher = Fetcher::new(
            NetworkPolicy::default(),
            FetchLimits {
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
                total_timeout: Duration::from_secs(1),
                max_bytes: 1,
            },
        );
        for url in [
            "http://127.0.0.1/x",
            "http://0x7f.1/x",
            "http://2130706433/x",
            "http://017700000001/x",
            "http://[::1]/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://[::ffff:7f00:1]/x",
            "https://169.254.169.254/latest/meta-data",
            "http://[fe80::1]:8080/x",
        ] {
            let err = fetcher
                .check_literal(&Url::parse(url).unwrap())
                .expect_err(url);
            assert!(matches!(err, FetchError::Denied { .. }), "{url}: {err}");
        }
        assert!(fetcher
            .check_literal(&Url::parse("http://8.8.8.8/x").unwrap())
            .is_ok());
        // A name is checked after its lookup, not here.
        assert!(fetcher
            .check_literal(&Url::parse("http://localhost/x").unwrap())
            .is_ok());
    }

    #[test]
    fn shown_urls_carry_no_credentials_or_query() {
        let url =
            Url::parse("https://user:s3cret@example.com:8443/img/a.qcow2?token=abc#frag").unwrap();
        assert_eq!(redact(&url), "https://example.com:8443/img/a.qcow2");
        let plain = Url::parse("http://127.0.0.1:8080/x.raw").unwrap();
        assert_eq!(redact(&plain), "http://127.0.0.1:8080/x.raw");
    }
}
