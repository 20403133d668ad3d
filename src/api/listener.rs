//! Serving the API on a listener: vmlet's own accept loop (instead of
//! `axum::serve`) so that each listener has a connection cap and each
//! connection a header-read and an idle timeout.
//!
//! - **Cap**: a listener serves at most `max_connections` at once. One more
//!   is accepted (so it leaves the kernel's backlog and costs no file
//!   descriptor for long), sent a best-effort `503 busy` (not over TLS)
//!   and closed at once. The unix socket has its own cap, so a flood of
//!   TCP clients never locks out the root-only socket. A websocket or an
//!   upgraded stream keeps its slot until it closes.
//! - **Header-read timeout** (slowloris): a client must send a whole request
//!   head within `header_read_timeout` of opening the connection, or of the
//!   first byte it sends after an idle spell.
//! - **Idle timeout**: a keep-alive connection with no request for
//!   `idle_timeout` is closed. A request being handled or a response being
//!   streamed (`/v1/events`) is not idle, and a connection upgraded to a
//!   websocket (a console) is out of HTTP's hands: neither timeout cuts them.
//!
//! - **TLS**: a [`Listener::Tls`] runs each connection's TLS handshake (see
//!   [`super::tls`]) within the header-read timeout, then serves it like
//!   any other; the cap counts a connection from its accept.
//!
//! hyper's own `header_read_timeout` is not used: its timer starts whenever a
//! connection waits for a request, so it cannot tell an idle keep-alive
//! connection from a slow request head.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// A connection's cap and timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time to send a whole request head.
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
}

/// What the API listens on.
pub enum Listener {
    /// A TCP address, plain HTTP.
    Tcp(TcpListener),
    /// A TCP address, HTTPS only.
    Tls(TcpListener, TlsAcceptor),
    /// The unix socket.
    Unix(UnixListener),
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `TlsAcceptor` has no `Debug`; its configuration is no one's business.
        match self {
            Listener::Tcp(l) => f.debug_tuple("Tcp").field(l).finish(),
            Listener::Tls(l, _) => f.debug_tuple("Tls").field(l).finish_non_exhaustive(),
            Listener::Unix(l) => f.debug_tuple("Unix").field(l).finish(),
        }
    }
}

/// The answer of a connection over the cap, written if the socket takes it
/// at once (it always has room for this much).
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\ncontent-length: 81\r\n\r\n\
{\"error\":{\"code\":\"busy\",\"message\":\"too many connections; try again in a moment\"}}";

/// How long the accept loop pauses after a failed accept (e.g. `EMFILE`),
/// so a full descriptor table does not turn it into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How often a connection with a request in flight looks again whether it
/// went idle.
const BUSY_RECHECK: Duration = Duration::from_millis(250);

/// Serves `router` on `listener` until `stop` turns true, then lets every
/// connection finish its request in flight (idle ones close at once).
pub async fn serve(
    listener: Listener,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut at_cap = false;
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = accept(&listener) => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an API connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if !at_cap {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "API connection cap reached: refusing new connections"
                );
                at_cap = true;
            }
            // A TLS client could not read a plain answer: it is just closed.
            if !matches!(listener, Listener::Tls(..)) {
                stream.refuse();
            }
            continue;
        };
        at_cap = false;
        let (router, stop) = (router.clone(), stop.clone());
        match (stream, &listener) {
            (Stream::Tcp(s), Listener::Tls(_, acceptor)) => connections.spawn(tls_connection(
                s,
                acceptor.clone(),
                router,
                limits,
                permit,
                stop,
            )),
            (Stream::Tcp(s), _) => connections.spawn(connection(s, router, limits, permit, stop)),
            (Stream::Unix(s), _) => connections.spawn(connection(s, router, limits, permit, stop)),
        };
    }
    while connections.join_next().await.is_some() {}
}

/// An accepted connection.
enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Stream {
    /// Writes [`BUSY`] if it fits without waiting, then closes.
    fn refuse(self) {
        let _ = match &self {
            Stream::Tcp(s) => s.try_write(BUSY),
            Stream::Unix(s) => s.try_write(BUSY),
        };
    }
}

async fn accept(listener: &Listener) -> io::Result<Stream> {
    match listener {
        Listener::Tcp(l) | Listener::Tls(l, _) => {
            let (stream, _) = l.accept().await?;
            // Small JSON answers go out at once.
            let _ = stream.set_nodelay(true);
            // A client host that vanishes (a migration's source among
            // them) ends its connections instead of holding them forever.
            crate::client::keep_alive(&stream);
            Ok(Stream::Tcp(stream))
        }
        Listener::Unix(l) => Ok(Stream::Unix(l.accept().await?.0)),
    }
}

/// Runs the TLS handshake (given the header-read timeout), then serves the
/// connection. The slot is held from the accept on.
async fn tls_connection(
    stream: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    router: Router,
    limits: Limits,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let handshake = super::tls::handshake(stream, &acceptor, limits.header_read_timeout);
    let stream = tokio::select! {
        stream = handshake => stream,
        // Nothing in flight yet: nothing to finish.
        _ = stop.wait_for(|s| *s) => None,
    };
    if let Some(stream) = stream {
        connection(stream, router, limits, permit, stop).await;
    }
}

/// Serves one connection until it closes, times out, or the daemon stops.
async fn connection<S>(
    stream: S,
    router: Router,
    limits: Limits,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
        _permit: permit,
    });
    let service = Tracked {
        inner: TowerToHyperService::new(router),
        activity: activity.clone(),
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Our own timers (see the module comment); `None` also keeps hyper from
    // warning that its default one has no timer.
    builder.header_read_timeout(None::<Duration>);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "API connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                // A connection without a request in flight has nothing to
                // finish (a half-sent head included): closed at once.
                if !activity.busy() {
                    return;
                }
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
            reason = activity.expired(limits) => {
                // Dropping the connection closes the socket.
                tracing::debug!(reason, "closing an API connection");
                return;
            }
        }
    }
}

/// "Never", for [`Activity::first_byte`].
const NONE: u64 = u64::MAX;

/// What the timeouts of one connection look at. Times are milliseconds
/// since `base`.
#[derive(Debug)]
struct Activity {
    base: Instant,
    /// Requests whose response is not fully sent yet.
    in_flight: AtomicUsize,
    /// Whether any request came (before that, the header-read timeout runs
    /// from the connection's opening).
    served: AtomicBool,
    /// When the last response finished.
    idle_since: AtomicU64,
    /// When the first byte after `idle_since` came, or [`NONE`].
    first_byte: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(NONE),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// Whether a request is being handled or its response sent.
    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0
    }

    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::SeqCst) == 0 {
            let _ = self.first_byte.compare_exchange(
                NONE,
                self.now(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }

    /// The deadline that applies now, with its reason; `None` while a
    /// request is in flight.
    fn deadline(&self, limits: Limits) -> Option<(u64, &'static str)> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE - 1);
        let header = ms(limits.header_read_timeout);
        if !self.served.load(Ordering::SeqCst) {
            return Some((header, "no whole request head in time"));
        }
        match self.first_byte.load(Ordering::SeqCst) {
            NONE => Some((
                self.idle_since
                    .load(Ordering::SeqCst)
                    .saturating_add(ms(limits.idle_timeout)),
                "idle",
            )),
            first => Some((
                first.saturating_add(header),
                "no whole request head in time",
            )),
        }
    }

    /// Resolves when the connection has outlived its deadline.
    async fn expired(&self, limits: Limits) -> &'static str {
        loop {
            let wait = match self.deadline(limits) {
                None => BUSY_RECHECK,
                Some((deadline, reason)) => {
                    let now = self.now();
                    if now >= deadline {
                        return reason;
                    }
                    Duration::from_millis(deadline - now)
                }
            };
            // The state may change meanwhile: look again when woken.
            tokio::time::sleep(wait).await;
        }
    }
}

/// Counts a request from its head until its response is sent (or
/// abandoned).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> InFlight {
        activity.served.store(true, Ordering::SeqCst);
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        // Timestamps first: a watcher that sees no request in flight must
        // see the new idle spell.
        a.first_byte.store(NONE, Ordering::SeqCst);
        a.idle_since.store(a.now(), Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The router as a hyper service that counts requests in flight.
#[derive(Clone)]
struct Tracked {
    inner: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

type BoxedResponse =
    Pin<Box<dyn Future<Output = Result<hyper::Response<GuardedBody>, Infallible>> + Send>>;

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = hyper::Response<GuardedBody>;
    type Error = Infallible;
    type Future = BoxedResponse;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let guard = InFlight::start(self.activity.clone());
        let response = self.inner.call(request.map(Body::new));
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| GuardedBody {
                body,
                _guard: guard,
            }))
        })
    }
}

/// A response body that holds its request's [`InFlight`] until hyper is
/// done with it (sent, or the connection dropped).
struct GuardedBody {
    body: Body,
    _guard: InFlight,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket, noting when bytes come in, and holding the
/// listener's slot for as long as the socket lives (a websocket too).
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.bytes_read();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 1,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
    };

    #[test]
    fn the_busy_answer_is_well_formed() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let value: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(value["error"]["code"], "busy");
    }

    #[test]
    fn a_fresh_connection_gets_the_header_timeout_then_idle_then_header_again() {
        let a = Arc::new(Activity::new());
        assert_eq!(
            a.deadline(LIMITS),
            Some((10_000, "no whole request head in time"))
        );
        let request = InFlight::start(a.clone());
        assert_eq!(a.deadline(LIMITS), None);
        // Bytes while a request runs (its body) start no clock.
        a.bytes_read();
        assert_eq!(a.first_byte.load(Ordering::SeqCst), NONE);
        drop(request);
        let idle_since = a.idle_since.load(Ordering::SeqCst);
        assert_eq!(a.deadline(LIMITS), Some((idle_since + 30_000, "idle")));
        a.bytes_read();
        let first = a.first_byte.load(Ordering::SeqCst);
        assert_eq!(
            a.deadline(LIMITS),
            Some((first + 10_000, "no whole request head in time"))
        );
    }
}
