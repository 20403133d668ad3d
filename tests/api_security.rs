//! The API's listeners under attack, against a real `vmlet serve`: TCP
//! without the bearer token, cross-site "simple" requests, DNS rebinding,
//! foreign origins, non-JSON bodies, a token file others can read, a flood
//! of idle connections, slowloris heads, and the console's probing and
//! token-wasting requests. Each attack is made and shown refused, and the
//! legitimate use next to it shown working.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::api::{assert_error, console_token, create_vm, expect, id_of, next_event, uuid_of};
use common::daemon::{free_port, guest_spec_json, unique_name, wait_for_count, Daemon};
use common::{Scratch, BOOT_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use vmlet::client::{Client, Endpoint};

/// How long one raw exchange may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// A response read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// The head, lowercased (header names and values).
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn pair(&self) -> (u16, Value) {
        (self.status, self.json())
    }

    fn has_header(&self, line: &str) -> bool {
        self.head.lines().any(|l| l.trim() == line)
    }
}

/// One request on a fresh TCP connection to `addr`, with exactly the `Host`
/// and extra headers given, and `body` sent with `content_type` (if any).
async fn raw(
    addr: &str,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: Option<(Option<&str>, &[u8])>,
) -> Answer {
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let mut bytes = Vec::new();
    if let Some((content_type, data)) = body {
        if let Some(t) = content_type {
            request.push_str(&format!("content-type: {t}\r\n"));
        }
        request.push_str(&format!("content-length: {}\r\n", data.len()));
        bytes.extend_from_slice(data);
    }
    request.push_str("\r\n");
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: connecting to {addr}: {e}"));
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        answer
    };
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer"));
    parse_answer(&answer).unwrap_or_else(|| {
        panic!(
            "{method} {path}: not an HTTP answer: {:?}",
            String::from_utf8_lossy(&answer)
        )
    })
}

fn parse_answer(bytes: &[u8]) -> Option<Answer> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(Answer {
        status,
        head,
        body: bytes[end + 4..].to_vec(),
    })
}

/// A daemon listening on loopback TCP too, with no token configured.
async fn tcp_daemon(extra: &[(&str, &str)]) -> (Daemon, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut env = vec![("VMLET_TCP_LISTEN", addr.as_str())];
    env.extend_from_slice(extra);
    (Daemon::start_with_env(&env).await, addr)
}

/// The token the daemon generated.
fn generated_token(d: &Daemon) -> String {
    let path = d.state_dir.join("api-token");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("no generated token at {}: {e}", path.display()))
        .trim()
        .to_string()
}

fn tcp_client(addr: &str, token: Option<&str>) -> Client {
    Client::new(Endpoint::Tcp {
        url: format!("http://{addr}"),
        token: token.map(str::to_string),
    })
}

/// VMs in the daemon, read over the unix socket.
async fn vm_count(d: &Daemon) -> usize {
    d.client.list_vms().await.expect("listing VMs").len()
}

#[tokio::test]
async fn tcp_needs_the_token_the_hosts_name_its_own_origin_and_json() {
    let (mut d, addr) = tcp_daemon(&[]).await;
    let port = addr.rsplit_once(':').unwrap().1.to_string();

    // A token was generated: 256 bits as hex, readable by its owner only.
    let token = generated_token(&d);
    assert_eq!(token.len(), 64, "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    let mode = std::fs::metadata(d.state_dir.join("api-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    let spec =
        serde_json::to_vec(&guest_spec_json(&unique_name("csrf"), "guest.action=hold")).unwrap();

    // Loopback no longer means open: another local user gets 401.
    let anonymous = raw(&addr, "GET", "/v1/vms", &addr, &[], None).await;
    assert_error(&anonymous.pair(), 401, "unauthorized");
    let create = raw(
        &addr,
        "POST",
        "/v1/vms",
        &addr,
        &[],
        Some((Some("application/json"), &spec)),
    )
    .await;
    assert_error(&create.pair(), 401, "unauthorized");

    // A web page's cross-site "simple" POST (text/plain, its own Origin).
    let origin = [("origin", "http://evil.example")];
    let simple = raw(
        &addr,
        "POST",
        "/v1/vms",
        &addr,
        &origin,
        Some((Some("text/plain"), &spec)),
    )
    .await;
    assert_error(&simple.pair(), 403, "forbidden_origin");
    // Even with the token (say, a leaked one), a foreign origin changes
    // nothing; reads are not state changes.
    let with_token = [auth[0], origin[0]];
    let foreign = raw(
        &addr,
        "POST",
        "/v1/vms",
        &addr,
        &with_token,
        Some((Some("application/json"), &spec)),
    )
    .await;
    let error = assert_error(&foreign.pair(), 403, "forbidden_origin");
    assert!(
        error["message"].as_str().unwrap().contains("evil.example"),
        "{error}"
    );
    for method in ["DELETE", "PUT"] {
        let answer = raw(&addr, method, "/v1/vms/x", &addr, &with_token, None).await;
        assert_error(&answer.pair(), 403, "forbidden_origin");
    }
    let read = raw(&addr, "GET", "/v1/vms", &addr, &with_token, None).await;
    assert_eq!(read.status, 200, "{:?}", read);

    // DNS rebinding: the attacker's name, resolved to 127.0.0.1. Refused
    // whatever the route, even with the token and even on /healthz.
    for host in ["rebind.example", &format!("rebind.example:{port}")] {
        for path in ["/v1/vms", "/healthz", "/console?token=x"] {
            let answer = raw(&addr, "GET", path, host, &auth, None).await;
            let error = assert_error(&answer.pair(), 400, "bad_host");
            let message = error["message"].as_str().unwrap();
            assert!(
                message.contains(host) && message.contains(&addr),
                "{message}"
            );
        }
    }
    let no_host = raw(&addr, "GET", "/v1/vms", "", &auth, None).await;
    assert_error(&no_host.pair(), 400, "bad_host");

    // Bodies must be JSON, token or not.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let answer = raw(
            &addr,
            "POST",
            "/v1/vms",
            &addr,
            &auth,
            Some((content_type, &spec)),
        )
        .await;
        let error = assert_error(&answer.pair(), 415, "unsupported_media_type");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("application/json"),
            "{error}"
        );
    }
    // The unix socket too (its file mode is its guard, but the rule is one).
    let over_unix = d
        .client
        .request_bytes(Method::POST, "/v1/vms", Some("text/plain"), spec.clone())
        .await
        .unwrap();
    assert_error(
        &(over_unix.status, over_unix.json().unwrap()),
        415,
        "unsupported_media_type",
    );
    assert_eq!(vm_count(&d).await, 0, "an attack created a VM");

    // The legitimate client: right token, its own Host (by address or as
    // localhost), its own Origin, JSON with a charset.
    let own_origin = format!("http://localhost:{port}");
    let localhost = format!("localhost:{port}");
    let good = [auth[0], ("origin", own_origin.as_str())];
    let created = raw(
        &addr,
        "POST",
        "/v1/vms",
        &localhost,
        &good,
        Some((Some("application/json; charset=utf-8"), &spec)),
    )
    .await;
    assert_eq!(
        created.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&created.body)
    );
    assert_eq!(vm_count(&d).await, 1);
    let health = raw(&addr, "GET", "/healthz", &addr, &[], None).await;
    assert_eq!(health.status, 200, "/healthz stays open to probes");
    let client = tcp_client(&addr, Some(&token));
    assert_eq!(client.list_vms().await.unwrap().len(), 1);
    let wrong = tcp_client(&addr, Some("0".repeat(64).as_str()));
    let err = wrong.list_vms().await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");

    // The CLI finds the daemon's token by itself on this host.
    let url = format!("http://{addr}");
    let ok = cli(&["vm", "list", "-o", "json", "--url", &url], &d.state_dir).await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let listed: Value = serde_json::from_slice(&ok.stdout).unwrap();
    let vms = listed.get("vms").unwrap_or(&listed);
    assert_eq!(vms.as_array().map(Vec::len), Some(1), "{listed}");
    let elsewhere = Scratch::new();
    let refused = cli(&["vm", "list", "--url", &url], elsewhere.path()).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("401") || stderr.contains("unauthorized"),
        "{stderr}"
    );

    // A restart keeps the token: clients keep working.
    d.restart().await;
    assert_eq!(generated_token(&d), token);
    assert_eq!(client.list_vms().await.unwrap().len(), 1);
}

/// Runs the CLI with `VMLET_STATE_DIR=state_dir` and no token settings.
async fn cli(args: &[&str], state_dir: &Path) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"));
    command
        .args(args)
        .env_remove("VMLET_SOCKET")
        .env_remove("VMLET_URL")
        .env_remove("VMLET_TOKEN_FILE")
        .env_remove("VMLET_AUTH_TOKEN_FILE")
        .env("VMLET_STATE_DIR", state_dir)
        .stdin(Stdio::null());
    tokio::time::timeout(ANSWER_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("vmlet {args:?} did not finish"))
        .expect("running vmlet")
}

/// Runs `vmlet serve` expecting it to refuse to start; returns its output.
async fn refused_start(scratch: &Scratch, env: &[(&str, &str)]) -> String {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"));
    command
        .arg("serve")
        .arg("--state-dir")
        .arg(scratch.path().join("state"))
        .arg("--run-dir")
        .arg(scratch.path().join("run"))
        .arg("--config")
        .arg("/dev/null")
        .env("VMLET_ACCEL", "tcg")
        .env("VMLET_TCP_LISTEN", &addr)
        .env_remove("VMLET_AUTH_TOKEN_FILE")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = tokio::time::timeout(ANSWER_TIMEOUT, command.output())
        .await
        .expect("vmlet serve should have refused to start")
        .expect("running vmlet serve");
    assert!(!output.status.success(), "vmlet serve started");
    assert!(!scratch.path().join("run/vmlet.sock").exists());
    String::from_utf8_lossy(&output.stderr).into_owned() + &String::from_utf8_lossy(&output.stdout)
}

#[tokio::test]
async fn token_files_others_can_read_or_write_are_refused_at_start() {
    let scratch = Scratch::new();
    let configured = scratch.path().join("token");
    std::fs::write(&configured, "a-configured-token\n").unwrap();
    for mode in [0o644, 0o660, 0o602] {
        std::fs::set_permissions(&configured, std::fs::Permissions::from_mode(mode)).unwrap();
        let output = refused_start(
            &scratch,
            &[("VMLET_AUTH_TOKEN_FILE", configured.to_str().unwrap())],
        )
        .await;
        assert!(
            output.contains(&configured.display().to_string())
                && output.contains(&format!("{mode:04o}")),
            "{output}"
        );
    }
    // A generated token file someone loosened is refused just the same.
    let state = scratch.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let generated = state.join("api-token");
    std::fs::write(&generated, "loosened\n").unwrap();
    std::fs::set_permissions(&generated, std::fs::Permissions::from_mode(0o640)).unwrap();
    let output = refused_start(&scratch, &[]).await;
    assert!(
        output.contains(&generated.display().to_string()) && output.contains("0640"),
        "{output}"
    );
    assert_eq!(std::fs::read_to_string(&generated).unwrap(), "loosened\n");
}

/// Whether the server closed `stream` (EOF or reset; a `503 busy` answer
/// counts too), looking without waiting.
fn closed_by_server(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match stream.try_read(&mut buf) {
        Ok(0) => true,
        Ok(n) => String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 503"),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_flood_of_idle_connections_leaves_the_socket_and_new_clients_served() {
    // The reported attack: 1,100 idle TCP connections. The default cap
    // (256) holds; the header-read timeout (5 s here) then frees them.
    const FLOOD: usize = 1100;
    const CAP: usize = 256;
    let (d, addr) = tcp_daemon(&[("VMLET_HEADER_READ_TIMEOUT_S", "5")]).await;
    let token = generated_token(&d);
    let fds_before = open_fds(d.pid());
    let flood_started = Instant::now();
    let mut idle = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        let stream = TcpStream::connect(&addr)
            .await
            .unwrap_or_else(|e| panic!("connection {} of the flood: {e}", idle.len() + 1));
        idle.push(stream);
    }

    // The unix socket answers at once, and so does the daemon over TCP,
    // with a 503 (or a closed connection) for one over the cap.
    let started = Instant::now();
    d.client.health().await.expect("the unix socket answers");
    assert!(d.client.list_vms().await.unwrap().is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let fresh = tcp_client(&addr, Some(&token));
    match fresh.list_vms().await {
        Ok(_) => panic!("a connection over the cap was served"),
        Err(e) => assert!(
            e.status() == Some(503) || e.status().is_none(),
            "over the cap: {e}"
        ),
    }

    // The daemon holds at most the cap: the rest were closed at once.
    let mut held = usize::MAX;
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(1) {
        held = idle.iter().filter(|s| !closed_by_server(s)).count();
        if held <= CAP {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        flood_started.elapsed() < Duration::from_secs(5),
        "the flood took too long to check the cap before the timeout"
    );
    assert!(
        (CAP / 2..=CAP).contains(&held),
        "{held} idle connections held"
    );
    let fds = open_fds(d.pid());
    assert!(
        fds <= fds_before + CAP + 16,
        "{fds} fds open (was {fds_before})"
    );

    // None of them sent a request head: all closed after the timeout, and
    // a fresh TCP client is served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = idle.iter().filter(|s| !closed_by_server(s)).count();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} idle connections still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fresh.list_vms().await.unwrap().is_empty());
    drop(idle);
}

/// Reads from `stream` until the server closes it; how long that took.
async fn time_to_close(stream: &mut TcpStream, since: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), read_all)
        .await
        .expect("the server never closed the connection");
    since.elapsed()
}

#[tokio::test]
async fn slow_heads_and_idle_connections_are_closed_but_event_streams_are_not() {
    let (d, addr) = tcp_daemon(&[
        ("VMLET_HEADER_READ_TIMEOUT_S", "1"),
        ("VMLET_IDLE_TIMEOUT_S", "2"),
    ])
    .await;
    let token = generated_token(&d);
    let second = Duration::from_secs(1);

    // Half a request head, then nothing.
    let mut half = TcpStream::connect(&addr).await.unwrap();
    let since = Instant::now();
    half.write_all(format!("GET /v1/vms HTTP/1.1\r\nhost: {addr}\r\n").as_bytes())
        .await
        .unwrap();
    let took = time_to_close(&mut half, since).await;
    assert!(
        took >= second * 9 / 10 && took < second * 4,
        "closed after {took:?}"
    );

    // A head trickled a byte at a time (slowloris) is cut the same way.
    let mut trickle = TcpStream::connect(&addr).await.unwrap();
    let since = Instant::now();
    let head = format!(
        "GET /v1/vms HTTP/1.1\r\nhost: {addr}\r\nx-pad: {}\r\n",
        "a".repeat(64)
    );
    let mut cut = false;
    for byte in head.as_bytes() {
        if trickle.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = if cut {
        since.elapsed()
    } else {
        time_to_close(&mut trickle, since).await
    };
    assert!(took < second * 4, "a trickled head lived {took:?}");
    assert!(took >= second * 9 / 10, "closed after {took:?}");

    // A keep-alive connection idle after its request: closed after 2 s.
    let mut keep = TcpStream::connect(&addr).await.unwrap();
    keep.write_all(format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(ANSWER_TIMEOUT, keep.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    let since = Instant::now();
    let took = time_to_close(&mut keep, since).await;
    assert!(
        took >= second * 18 / 10 && took < second * 6,
        "idle closed after {took:?}"
    );

    // An event stream outlives both timeouts (nothing is sent on it for
    // 15 s, its keep-alive interval) and still delivers.
    let client = tcp_client(&addr, Some(&token));
    let mut events = client.events(None).await.expect("the event stream");
    tokio::time::sleep(second * 4).await;
    let vm = create_vm(
        &d,
        &guest_spec_json(&unique_name("sse"), "guest.action=hold"),
    )
    .await;
    let event = next_event(&mut events, Duration::from_secs(10))
        .await
        .expect("an event after the idle spell");
    let text = serde_json::to_string(&event).unwrap();
    assert!(text.contains(&id_of(&vm)), "{text}");
}

/// noVNC stand-in files, so the headers are checked whatever is installed.
fn novnc_dir(scratch: &Scratch) -> String {
    let dir = scratch.path().join("novnc");
    std::fs::create_dir_all(dir.join("core")).unwrap();
    std::fs::write(dir.join("core/rfb.js"), "export default class RFB {}\n").unwrap();
    std::fs::write(
        dir.join("vnc.html"),
        "<!doctype html><script src=app.js></script>\n",
    )
    .unwrap();
    dir.display().to_string()
}

/// Opens `path` as a websocket over TCP. Err: the refused upgrade's status.
async fn open_ws(
    addr: &str,
    path: &str,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, u16> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("ws://{addr}{path}").into_client_request().unwrap();
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("websocket to {path}: {e}"),
    }
}

/// Reads binary messages until they contain `needle`.
async fn read_until(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>, needle: &[u8]) {
    let mut seen = Vec::new();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while !seen.windows(needle.len()).any(|w| w == needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) => seen.extend_from_slice(&bytes),
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "no {:?} on the console ({other:?}): {}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&seen)
            ),
        }
    }
}

#[tokio::test]
async fn console_tokens_cannot_probe_vms_or_be_wasted_and_pages_cannot_be_framed() {
    let scratch = Scratch::new();
    let novnc = novnc_dir(&scratch);
    let (d, addr) = tcp_daemon(&[
        ("VMLET_NOVNC_DIR", &novnc),
        ("VMLET_HEADER_READ_TIMEOUT_S", "1"),
        ("VMLET_IDLE_TIMEOUT_S", "1"),
    ])
    .await;

    // Headers on every /console and /novnc answer, errors included.
    for (path, status) in [
        ("/novnc/vnc.html", 200),
        ("/novnc/core/rfb.js", 200),
        ("/novnc/core%00.js", 404),
        ("/novnc/core", 404),
        ("/novnc/missing.js", 404),
        ("/console?token=bogus", 401),
    ] {
        let answer = raw(&addr, "GET", path, &addr, &[], None).await;
        assert_eq!(
            answer.status,
            status,
            "{path}: {:?}",
            String::from_utf8_lossy(&answer.body)
        );
        assert!(
            answer.has_header("x-frame-options: deny"),
            "{path}: {}",
            answer.head
        );
        assert!(
            answer.has_header("x-content-type-options: nosniff"),
            "{path}: {}",
            answer.head
        );
        let csp = answer
            .head
            .lines()
            .find_map(|l| l.strip_prefix("content-security-policy:"))
            .unwrap_or_else(|| panic!("{path}: no CSP in {}", answer.head));
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        if path == "/novnc/vnc.html" {
            assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        }
    }

    let vm = create_vm(
        &d,
        &guest_spec_json(&unique_name("ws"), "guest.action=shell"),
    )
    .await;
    let id = id_of(&vm);
    let name = vm["name"].as_str().unwrap().to_string();

    // A made-up token gets the same 401 for a VM that exists and one that
    // does not: names cannot be probed.
    for vm_path in [
        format!("/v1/vms/{name}/console"),
        "/v1/vms/no-such-vm/console".into(),
    ] {
        let answer = raw(
            &addr,
            "GET",
            &format!("{vm_path}?token=bogus"),
            &addr,
            &[],
            None,
        )
        .await;
        assert_error(&answer.pair(), 401, "unauthorized");
    }

    expect(&d, Method::POST, &format!("/v1/vms/{id}/start"), None, 200).await;
    wait_for_count(&d.serial_log(uuid_of(&vm)), "GUEST-READY", 1, BOOT_TIMEOUT).await;

    // Plain GETs (a link, a prefetch, an image tag) do not spend a token.
    let token = console_token(&d, &id, "serial").await;
    for path in [
        format!("/v1/console?token={token}"),
        format!("/v1/vms/{name}/console?token={token}"),
    ] {
        let answer = raw(&addr, "GET", &path, &addr, &[], None).await;
        assert_error(&answer.pair(), 400, "bad_request");
    }
    // A live token tried on a VM that does not exist: 401, and burnt.
    let other = console_token(&d, &id, "serial").await;
    assert_eq!(
        open_ws(&addr, &format!("/v1/vms/no-such-vm/console?token={other}"))
            .await
            .err(),
        Some(401)
    );
    assert_eq!(
        open_ws(&addr, &format!("/v1/vms/{id}/console?token={other}"))
            .await
            .err(),
        Some(401)
    );

    // The unspent token opens the console over TCP without the bearer
    // token, and the session outlives the idle and header timeouts.
    let mut ws = open_ws(&addr, &format!("/v1/vms/{name}/console?token={token}"))
        .await
        .expect("the token survived the plain GETs");
    read_until(&mut ws, b"GUEST-READY").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        ws.send(Message::Binary(
            "echo IDLE-''4242\n".as_bytes().to_vec().into(),
        ))
        .await
        .expect("the console is still open after 4 s idle");
        let answered =
            tokio::time::timeout(Duration::from_secs(3), read_until(&mut ws, b"IDLE-4242")).await;
        if answered.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the guest shell never answered");
    }
    // Spent now.
    assert_eq!(
        open_ws(&addr, &format!("/v1/console?token={token}"))
            .await
            .err(),
        Some(401)
    );
    drop(ws);
    common::api::force_delete_vm(&d, &id).await;
}

#[tokio::test]
async fn sigterm_still_shuts_down_promptly_with_streams_and_idle_connections_open() {
    let (mut d, addr) = tcp_daemon(&[]).await;
    let token = generated_token(&d);
    let _tcp_events = tcp_client(&addr, Some(&token)).events(None).await.unwrap();
    let _unix_events = d.client.events(None).await.unwrap();
    let mut half = TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"GET /v1/vms HTTP/1.1\r\n").await.unwrap();
    let _idle = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = d.terminate();
        (d, status)
    })
    .await
    .unwrap()
    .1;
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
}
