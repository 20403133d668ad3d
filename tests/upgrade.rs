//! Upgraded byte streams end to end: a test route built on
//! `api::upgrade::accept`, served by the real `api::listener::serve` with
//! the real TCP middleware (bearer token, Host, Origin, JSON bodies), and
//! `Client::upgrade` on the other side. The route joins the stream to a
//! backend socket with `copy_bidirectional`, as a migration stream is
//! joined to QEMU's, and MiBs go both ways, across a pause longer than the
//! listener's header-read and idle timeouts, over TCP, TLS and the unix
//! socket.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{oneshot, watch};
use vmlet::api::listener::{self, Limits, Listener};
use vmlet::api::middleware::{self, HostRules, TcpGuard, Token};
use vmlet::api::upgrade;
use vmlet::client::{Client, ClientError, Endpoint};

const PROTOCOL: &str = "vmlet-test-stream";
const TOKEN: &str = "upgrade-test-token";

/// Short timeouts, so the pause in the stream outlives both.
const LIMITS: Limits = Limits {
    max_connections: 8,
    header_read_timeout: Duration::from_secs(1),
    idle_timeout: Duration::from_secs(1),
};
const PAUSE: Duration = Duration::from_millis(2_500);

/// Bytes the client sends and the backend sends back.
const UP_BYTES: usize = 3 << 20;
const DOWN_BYTES: usize = 5 << 20;

/// What the backend saw: bytes received and their hash.
type Seen = (usize, Vec<u8>);

/// The route: upgrade, then join the stream to one backend connection.
async fn pipe(State(backend): State<SocketAddr>, mut request: Request) -> Response {
    match upgrade::accept(&mut request, PROTOCOL) {
        Ok((response, stream)) => {
            tokio::spawn(async move {
                let mut upgraded = stream.await.expect("the connection upgrades");
                let mut conn = TcpStream::connect(backend).await.expect("backend");
                let _ = tokio::io::copy_bidirectional(&mut upgraded, &mut conn).await;
            });
            response
        }
        Err(e) => e.into_response(),
    }
}

/// A backend that takes one connection, sends [`DOWN_BYTES`] then closes
/// its side, and reports what it read until EOF.
async fn backend() -> (SocketAddr, oneshot::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (conn, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = conn.into_split();
        let writer = tokio::spawn(async move {
            write_pattern(&mut w, 2, DOWN_BYTES, None).await;
            w.shutdown().await.unwrap();
        });
        let seen = read_all(&mut r).await;
        writer.await.unwrap();
        let _ = tx.send(seen);
    });
    (addr, rx)
}

/// Deterministic bytes (xorshift), so each side can check the other's.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn write_pattern(
    w: &mut (impl AsyncWrite + Unpin),
    seed: u64,
    len: usize,
    pause_halfway: Option<Duration>,
) {
    let data = pattern(seed, len);
    let (first, second) = data.split_at(len / 2);
    w.write_all(first).await.unwrap();
    w.flush().await.unwrap();
    if let Some(pause) = pause_halfway {
        tokio::time::sleep(pause).await;
    }
    w.write_all(second).await.unwrap();
    w.flush().await.unwrap();
}

async fn read_all(r: &mut (impl AsyncRead + Unpin)) -> Seen {
    let mut hash = Sha256::new();
    let mut total = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await.expect("reading the stream");
        if n == 0 {
            return (total, hash.finalize().to_vec());
        }
        total += n;
        hash.update(&buf[..n]);
    }
}

fn digest(seed: u64, len: usize) -> Seen {
    (len, Sha256::digest(pattern(seed, len)).to_vec())
}

/// The test server: the route behind the listener; stopped on drop.
struct Server {
    stop: watch::Sender<bool>,
    backend_seen: Option<oneshot::Receiver<Seen>>,
    _scratch: Option<common::Scratch>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn router(backend: SocketAddr, guard: Option<TcpGuard>) -> Router {
    let router = Router::new()
        .route("/test/pipe", post(pipe))
        .with_state(backend)
        .layer(from_fn(middleware::require_json_body));
    match guard {
        Some(guard) => router.layer(from_fn_with_state(guard, middleware::tcp_guard)),
        None => router,
    }
}

/// Serves the route on a TCP port with the bearer-token middleware;
/// returns the server and its client endpoint's URL.
async fn tcp_server() -> (Server, String) {
    serve_tcp(None).await
}

/// [`tcp_server`], over TLS when `tls` is given.
async fn serve_tcp(tls: Option<tokio_rustls::TlsAcceptor>) -> (Server, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (backend, seen) = backend().await;
    let guard = TcpGuard {
        token: Token(Arc::new(TOKEN.as_bytes().to_vec())),
        hosts: Arc::new(HostRules::new(addr, &[])),
        https: tls.is_some(),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = match tls {
        Some(acceptor) => Listener::Tls(listener, acceptor),
        None => Listener::Tcp(listener),
    };
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(listener::serve(
        listener,
        router(backend, Some(guard)),
        LIMITS,
        stop_rx,
    ));
    let server = Server {
        stop,
        backend_seen: Some(seen),
        _scratch: None,
    };
    (server, format!("{scheme}://{addr}"))
}

fn tcp_client(url: &str, token: Option<&str>) -> Client {
    Client::new(Endpoint::Tcp {
        url: url.to_string(),
        token: token.map(str::to_string),
    })
}

/// Pumps both ways through `client`'s upgrade and checks every byte.
async fn pump(client: &Client, server: &mut Server) {
    let stream = client
        .upgrade("/test/pipe", PROTOCOL)
        .await
        .expect("the upgrade is accepted");
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        write_pattern(&mut w, 1, UP_BYTES, Some(PAUSE)).await;
        w.shutdown().await.unwrap();
    });
    let received = tokio::time::timeout(Duration::from_secs(60), read_all(&mut r))
        .await
        .expect("the stream ends in time");
    writer.await.unwrap();
    assert_eq!(received, digest(2, DOWN_BYTES), "bytes from the backend");
    let seen = tokio::time::timeout(Duration::from_secs(30), server.backend_seen.take().unwrap())
        .await
        .expect("the backend saw EOF")
        .unwrap();
    assert_eq!(seen, digest(1, UP_BYTES), "bytes the backend received");
}

#[tokio::test]
async fn an_upgraded_tcp_stream_carries_mibs_both_ways_past_the_timeouts() {
    let (mut server, url) = tcp_server().await;
    pump(&tcp_client(&url, Some(TOKEN)), &mut server).await;
}

#[tokio::test]
async fn an_upgraded_tls_stream_carries_mibs_both_ways_past_the_timeouts() {
    let pki = common::tls::TestPki::new();
    let acceptor = vmlet::api::tls::acceptor(Some(&pki.cert), Some(&pki.key))
        .unwrap()
        .expect("TLS is configured");
    let (mut server, url) = serve_tcp(Some(acceptor)).await;
    let client = Client::with_ca_file(
        Endpoint::Tcp {
            url: url.clone(),
            token: Some(TOKEN.to_string()),
        },
        Some(&pki.ca),
    )
    .unwrap();
    pump(&client, &mut server).await;
    // Without the token, over TLS too: refused before any upgrade.
    let anonymous =
        Client::with_ca_file(Endpoint::Tcp { url, token: None }, Some(&pki.ca)).unwrap();
    let err = anonymous
        .upgrade("/test/pipe", PROTOCOL)
        .await
        .err()
        .unwrap();
    assert_eq!(err.status(), Some(401), "{err}");
}

#[tokio::test]
async fn an_upgraded_unix_stream_carries_mibs_both_ways() {
    let scratch = common::Scratch::new();
    let socket = scratch.path().join("api.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (backend, seen) = backend().await;
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(listener::serve(
        Listener::Unix(listener),
        router(backend, None),
        LIMITS,
        stop_rx,
    ));
    let mut server = Server {
        stop,
        backend_seen: Some(seen),
        _scratch: Some(scratch),
    };
    pump(&Client::unix(&socket), &mut server).await;
}

#[tokio::test]
async fn a_wrong_protocol_or_a_missing_token_is_refused_with_an_api_error() {
    let (_server, url) = tcp_server().await;
    let err = tcp_client(&url, Some(TOKEN))
        .upgrade("/test/pipe", "websocket")
        .await
        .expect_err("a wrong protocol is refused");
    assert_eq!((err.status(), err.code()), (Some(400), Some("bad_request")));
    let text = err.to_string();
    assert!(
        text.contains(PROTOCOL) && text.contains("websocket"),
        "{text}"
    );

    let err = tcp_client(&url, None)
        .upgrade("/test/pipe", PROTOCOL)
        .await
        .expect_err("no token is refused");
    assert_eq!(
        (err.status(), err.code()),
        (Some(401), Some("unauthorized"))
    );
    assert!(err.to_string().contains("Bearer"), "{err}");

    let err = tcp_client(&url, Some("wrong"))
        .upgrade("/test/pipe", PROTOCOL)
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(err.status(), Some(401), "{err}");

    // A route that does not upgrade: the 404 comes back as such.
    let err = tcp_client(&url, Some(TOKEN))
        .upgrade("/test/nothing-here", PROTOCOL)
        .await
        .expect_err("no such route");
    assert!(matches!(err, ClientError::Api { status: 404, .. }), "{err}");
}
