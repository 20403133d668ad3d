//! Consoles through the daemon: one-time tokens, the VNC websocket proxy,
//! the serial console websocket (history, input, several readers), the
//! console log and its rotation. Real QEMU, real guest (TCG), real HTTP and
//! websockets over the daemon's unix socket.

mod common;

use std::time::{Duration, Instant};

use common::api::{assert_error, call, console_token, create_vm, expect, id_of, uuid_of};
use common::daemon::{guest_spec_json, unique_name, wait_for_count, Daemon};
use common::BOOT_TIMEOUT;
use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// Token lifetime in these tests: short enough to watch one expire.
const TTL_S: u64 = 2;
/// How long a websocket read may take before the test gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

type Ws = WebSocketStream<UnixStream>;

/// Opens `path` (with its `?token=`) as a websocket on the daemon's socket,
/// asking for noVNC's `binary` subprotocol. Err: the HTTP status of a
/// refused upgrade.
async fn open_ws(d: &Daemon, path: &str) -> Result<Ws, u16> {
    let stream = UnixStream::connect(&d.socket)
        .await
        .expect("the API socket");
    let mut request = format!("ws://localhost{path}")
        .into_client_request()
        .expect("a websocket request");
    request
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("binary"));
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, response)) => {
            assert_eq!(
                response
                    .headers()
                    .get("sec-websocket-protocol")
                    .map(|v| v.as_bytes()),
                Some(&b"binary"[..]),
                "the binary subprotocol is accepted"
            );
            Ok(ws)
        }
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().as_deref().unwrap_or_default();
            eprintln!(
                "upgrade refused: {} {}",
                response.status(),
                String::from_utf8_lossy(body)
            );
            Err(response.status().as_u16())
        }
        Err(e) => panic!("websocket to {path}: {e}"),
    }
}

/// Reads binary messages until their bytes contain `needle`; returns
/// everything read.
async fn read_until(ws: &mut Ws, needle: &[u8]) -> Vec<u8> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + READ_TIMEOUT;
    while !seen.windows(needle.len()).any(|w| w == needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) => seen.extend_from_slice(&bytes),
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "no {:?} on the console ({other:?}); it sent:\n{}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&seen)
            ),
        }
    }
    seen
}

/// Waits for the server to close `ws` (a close frame or the end).
async fn wait_closed(ws: &mut Ws) -> Option<String> {
    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.reason.to_string()),
            Ok(Some(Ok(_))) => {}
            Ok(None | Some(Err(_))) => return None,
            Err(_) => panic!("the console stayed open"),
        }
    }
}

async fn daemon(extra: &[(&str, &str)]) -> Daemon {
    let ttl = TTL_S.to_string();
    let mut env = vec![("VMLET_CONSOLE_TOKEN_TTL_S", ttl.as_str())];
    env.extend_from_slice(extra);
    Daemon::start_with_env(&env).await
}

async fn start(d: &Daemon, spec: &Value) -> Value {
    let vm = create_vm(d, spec).await;
    let vm = expect(
        d,
        Method::POST,
        &format!("/v1/vms/{}/start", id_of(&vm)),
        None,
        200,
    )
    .await;
    assert_eq!(vm["state"], "running", "{vm}");
    vm
}

#[tokio::test]
async fn vnc_console_through_one_time_tokens() {
    let d = daemon(&[]).await;
    let a = start(
        &d,
        &guest_spec_json(&unique_name("vnc-a"), "guest.action=hold"),
    )
    .await;
    let b = create_vm(
        &d,
        &guest_spec_json(&unique_name("vnc-b"), "guest.action=hold"),
    )
    .await;
    let (a_id, b_id) = (id_of(&a), id_of(&b));

    // A token: 256 bits in hex, 60 s here 2 s, and where to use it.
    let token = expect(
        &d,
        Method::POST,
        &format!("/v1/vms/{a_id}/console"),
        Some(&json!({"type": "vnc"})),
        201,
    )
    .await;
    let secret = token["token"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 64, "{token}");
    assert!(secret.bytes().all(|c| c.is_ascii_hexdigit()), "{token}");
    assert_eq!(token["type"], "vnc");
    assert_eq!(token["url"], format!("/v1/console?token={secret}"));
    assert_eq!(token["page_url"], format!("/console?token={secret}"));
    assert!(token["expires_at"].is_string(), "{token}");

    // The proxy reaches QEMU's VNC server: its RFB banner comes through.
    let url = token["url"].as_str().unwrap();
    let mut ws = open_ws(&d, url).await.expect("the token opens the console");
    read_until(&mut ws, b"RFB 003.008\n").await;
    // A second use of the same token is refused before any upgrade.
    assert_eq!(open_ws(&d, url).await.err(), Some(401), "reused token");
    // Closing the client side ends the session.
    ws.close(None).await.unwrap();
    drop(ws);

    // An expired token is refused.
    let late = console_token(&d, &a_id, "vnc").await;
    tokio::time::sleep(Duration::from_millis(TTL_S * 1000 + 500)).await;
    let answer = open_ws(&d, &format!("/v1/console?token={late}")).await;
    assert_eq!(answer.err(), Some(401), "expired token");

    // A token for A does not open B, and is burnt by the try.
    let for_a = console_token(&d, &a_id, "vnc").await;
    assert_eq!(
        open_ws(&d, &format!("/v1/vms/{b_id}/console?token={for_a}"))
            .await
            .err(),
        Some(401),
        "A's token on B"
    );
    assert_eq!(
        open_ws(&d, &format!("/v1/console?token={for_a}"))
            .await
            .err(),
        Some(401),
        "a token tried on another VM works no more"
    );
    // Made-up tokens, and a missing one.
    assert_eq!(
        open_ws(&d, &format!("/v1/console?token={}", "0".repeat(64)))
            .await
            .err(),
        Some(401)
    );
    assert_eq!(open_ws(&d, "/v1/console").await.err(), Some(400));
    // The VM-scoped route with the right VM works.
    let for_a = console_token(&d, &a_id, "vnc").await;
    let mut ws = open_ws(&d, &format!("/v1/vms/{a_id}/console?token={for_a}"))
        .await
        .expect("A's token on A");
    read_until(&mut ws, b"RFB 003.008\n").await;

    // The noVNC page: served for a live vnc token without spending it.
    let for_page = console_token(&d, &a_id, "vnc").await;
    let page = d
        .client
        .request(Method::GET, &format!("/console?token={for_page}"), None)
        .await
        .unwrap();
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(page.content_type(), Some("text/html; charset=utf-8"));
    assert_eq!(
        page.headers.get("referrer-policy").map(|v| v.as_bytes()),
        Some(&b"no-referrer"[..])
    );
    assert!(
        page.text().contains("/novnc/core/rfb.js"),
        "{}",
        page.text()
    );
    let mut from_page = open_ws(&d, &format!("/v1/console?token={for_page}"))
        .await
        .expect("the page left its token for the websocket");
    read_until(&mut from_page, b"RFB 003.008\n").await;
    drop(from_page);
    let answer = call(&d, Method::GET, &format!("/console?token={for_page}"), None).await;
    assert_error(&answer, 401, "unauthorized");
    let serial = console_token(&d, &a_id, "serial").await;
    let answer = call(&d, Method::GET, &format!("/console?token={serial}"), None).await;
    assert_error(&answer, 400, "bad_request");
    // noVNC's own files, and nothing outside their directory.
    let rfb = d
        .client
        .request(Method::GET, "/novnc/core/rfb.js", None)
        .await
        .unwrap();
    assert_eq!(rfb.status, 200, "is Debian's novnc installed?");
    assert_eq!(rfb.content_type(), Some("text/javascript; charset=utf-8"));
    for bad in [
        "/novnc/../../../etc/passwd",
        "/novnc/%2e%2e/%2e%2e/etc/passwd",
        "/novnc/.hidden",
    ] {
        let answer = d.client.request(Method::GET, bad, None).await.unwrap();
        assert_eq!(answer.status, 404, "{bad}: {}", answer.text());
    }

    // No token for a stopped VM, a bad type, or a VM without a display.
    let answer = call(
        &d,
        Method::POST,
        &format!("/v1/vms/{b_id}/console"),
        Some(&json!({"type": "vnc"})),
    )
    .await;
    assert_error(&answer, 409, "conflict");
    let answer = call(
        &d,
        Method::POST,
        &format!("/v1/vms/{a_id}/console"),
        Some(&json!({"type": "spice"})),
    )
    .await;
    assert_eq!(answer.0, 422, "{answer:?}");

    // Stopping the VM closes its console sessions.
    expect(
        &d,
        Method::POST,
        &format!("/v1/vms/{a_id}/stop"),
        Some(&json!({"force": true})),
        200,
    )
    .await;
    let reason = wait_closed(&mut ws).await;
    eprintln!("closed: {reason:?}");
    let answer = call(
        &d,
        Method::POST,
        &format!("/v1/vms/{a_id}/console"),
        Some(&json!({"type": "vnc"})),
    )
    .await;
    assert_error(&answer, 409, "conflict");
    // The session lines in the daemon's log.
    let log = d.log_text();
    assert!(log.contains("console opened") && log.contains("console closed"));
}

#[tokio::test]
async fn serial_console_history_input_readers_and_log() {
    // A small cap, so the test can watch the log rotate.
    let d = daemon(&[("VMLET_CONSOLE_LOG_MAX_BYTES", "16384")]).await;
    let vm = start(
        &d,
        &guest_spec_json(&unique_name("serial"), "guest.action=shell"),
    )
    .await;
    let id = id_of(&vm);
    let log = d.serial_log(uuid_of(&vm));
    wait_for_count(&log, "GUEST-READY", 1, BOOT_TIMEOUT).await;

    // Attached after the boot: the history has the boot's marker line.
    let token = console_token(&d, &id, "serial").await;
    let mut first = open_ws(&d, &format!("/v1/console?token={token}"))
        .await
        .expect("the serial console");
    read_until(&mut first, b"GUEST-READY").await;
    let token = console_token(&d, &id, "serial").await;
    let mut second = open_ws(&d, &format!("/v1/console?token={token}"))
        .await
        .expect("a second reader");
    read_until(&mut second, b"GUEST-READY").await;

    // Input reaches the guest's shell; both readers see its answer. The
    // quotes keep the marker out of the shell's echo of the typed line. The
    // shell may still be starting: type until it answers.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        first
            .send(Message::Binary(
                "echo MARK-''4711\n".as_bytes().to_vec().into(),
            ))
            .await
            .unwrap();
        let got =
            tokio::time::timeout(Duration::from_secs(3), read_until(&mut first, b"MARK-4711"))
                .await;
        if got.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the guest shell never answered");
    }
    read_until(&mut second, b"MARK-4711").await;

    // `vmlet console`: history on stdout, typed input reaches the guest,
    // the escape key detaches.
    cli_console(&d, &id).await;

    // The log's tail over HTTP.
    assert_eq!(console_log(&d, &id, 0).await, b"");
    let tail = console_log(&d, &id, 64).await;
    assert!(tail.len() <= 64 && !tail.is_empty(), "{} bytes", tail.len());
    let whole = std::fs::read(&log).unwrap();
    assert!(
        whole.ends_with(&tail) || tail.len() < 64,
        "the tail is the log's end"
    );
    let answer = call(
        &d,
        Method::GET,
        &format!("/v1/vms/{id}/console-log?tail_bytes=999999999"),
        None,
    )
    .await;
    assert_eq!(answer.0, 422, "{answer:?}");
    assert!(answer.1.to_string().contains("tail_bytes"), "{answer:?}");

    // 40 KB of output: the log rotates under its 16 KiB cap, and the tail
    // reads across the rotated file.
    first
        .send(Message::Binary(
            "i=0; while [ $i -lt 500 ]; do echo LINE-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done; echo DONE-''0815\n"
                .as_bytes()
                .to_vec()
                .into(),
        ))
        .await
        .unwrap();
    read_until(&mut first, b"DONE-0815").await;
    let rotated = log.with_extension("log.1");
    let wait = Instant::now();
    while !rotated.exists() {
        assert!(wait.elapsed() < READ_TIMEOUT, "no rotated log");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(size < 2 * 16384, "the log has {size} bytes after rotation");
    let tail = console_log(&d, &id, 30_000).await;
    let text = String::from_utf8_lossy(&tail);
    assert!(
        text.contains("DONE-0815") && text.contains("LINE-499-"),
        "{text}"
    );

    // Stopping the VM ends both sessions; the log stays readable.
    expect(
        &d,
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(&json!({"force": true})),
        200,
    )
    .await;
    wait_closed(&mut first).await;
    wait_closed(&mut second).await;
    let tail = console_log(&d, &id, 30_000).await;
    assert!(String::from_utf8_lossy(&tail).contains("DONE-0815"));
    let answer = call(&d, Method::GET, "/v1/vms/nope/console-log", None).await;
    assert_error(&answer, 404, "not_found");
}

/// `GET /v1/vms/{id}/console-log?tail_bytes=N`, raw.
async fn console_log(d: &Daemon, id: &str, n: u64) -> Vec<u8> {
    d.client
        .console_log(id, Some(n))
        .await
        .unwrap_or_else(|e| panic!("console-log: {e}"))
}

/// Runs `vmlet console ID` with piped stdin: types a command, waits for its
/// answer on stdout, then detaches with Ctrl-].
async fn cli_console(d: &Daemon, id: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"))
        .args(["console", id, "--socket"])
        .arg(&d.socket)
        .env_remove("VMLET_URL")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("vmlet console");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"echo CLI-''0042\r").await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + READ_TIMEOUT;
    while !seen.windows(8).any(|w| w == b"CLI-0042") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stdout.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            other => {
                let mut stderr = String::new();
                let _ = child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr)
                    .await;
                panic!(
                    "vmlet console: no answer ({other:?}); it printed:\n{}\nand on stderr:\n{stderr}",
                    String::from_utf8_lossy(&seen)
                )
            }
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("GUEST-READY"), "no history: {text}");
    stdin.write_all(b"\x1d").await.unwrap();
    let out = tokio::time::timeout(READ_TIMEOUT, child.wait_with_output())
        .await
        .expect("vmlet console detaches")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("[detached]"), "{stderr}");
}
