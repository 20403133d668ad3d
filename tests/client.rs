//! The API client and the `vmlet vm|node|events` commands against a fake
//! daemon: a unix (or TCP) listener that records each request and answers
//! with canned bytes, written in pieces to exercise incremental parsing.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Scratch;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uuid::Uuid;
use vmlet::cli::{self, ClientOptions, Output, VmCommand};
use vmlet::client::{Client, ClientError, Endpoint, Method};
use vmlet::vm::events::EventBody;
use vmlet::vm::state::PowerState;
use vmlet::vm::Vm;

/// What the fake daemon answers to one request: byte pieces written one
/// after another with a pause between them.
type Reply = Vec<Vec<u8>>;

/// A fake daemon listening on a unix socket in a scratch directory.
struct FakeDaemon {
    _scratch: Scratch,
    socket: PathBuf,
    /// Each request received: head and body, as text.
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeDaemon {
    /// Starts a daemon that answers every request with `reply(request)`.
    fn start(reply: impl Fn(&str) -> Reply + Send + Sync + 'static) -> FakeDaemon {
        let scratch = Scratch::new();
        let socket = scratch.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let reply = Arc::new(reply);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, seen.clone(), reply.clone()));
            }
        });
        FakeDaemon {
            _scratch: scratch,
            socket,
            requests,
        }
    }

    fn client(&self) -> Client {
        Client::unix(&self.socket)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Reads one request, records it, writes the reply's pieces and closes.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    seen: Arc<Mutex<Vec<String>>>,
    reply: Arc<impl Fn(&str) -> Reply>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    // The request line keeps its case; headers are compared lowercased.
    let text = String::from_utf8_lossy(&buf).into_owned();
    seen.lock().unwrap().push(text.clone());
    for piece in reply(&text) {
        if stream.write_all(&piece).await.is_err() {
            return;
        }
        let _ = stream.flush().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = stream.shutdown().await;
}

/// A whole response with a `content-length` body, in one piece.
fn response(status: u16, body: &str) -> Reply {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        404 => "Not Found",
        409 => "Conflict",
        422 => "Unprocessable Entity",
        _ => "Whatever",
    };
    let content_type = if body.is_empty() {
        String::new()
    } else {
        "content-type: application/json\r\n".to_string()
    };
    vec![format!(
        "HTTP/1.1 {status} {reason}\r\n{content_type}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()]
}

/// An error body as the API writes it.
fn api_error(code: &str, message: &str, extra: Value) -> String {
    let mut error = json!({ "code": code, "message": message });
    error
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({ "error": error }).to_string()
}

fn sample_vm(name: &str) -> Vm {
    let spec = serde_json::from_value(json!({
        "uuid": Uuid::new_v4(),
        "name": name,
        "vcpus": 1,
        "memory_mib": 256,
        "boot": {"type": "kernel", "kernel": "/k/vmlinuz"},
    }))
    .unwrap();
    Vm::new(spec)
}

fn request_line(request: &str) -> &str {
    request.lines().next().unwrap()
}

fn has_header(request: &str, header: &str) -> bool {
    request
        .to_lowercase()
        .lines()
        .any(|l| l == header.to_lowercase())
}

#[tokio::test]
async fn an_api_error_body_becomes_an_api_error_with_its_field() {
    let daemon = FakeDaemon::start(|_| {
        response(
            422,
            &api_error(
                "invalid_spec",
                "must be an absolute path",
                json!({"field": "disks[0].path"}),
            ),
        )
    });
    let spec = json!({"name": "web"});
    let err = daemon.client().create_vm(&spec).await.unwrap_err();
    match &err {
        ClientError::Api {
            status,
            code,
            message,
            field,
            task,
        } => {
            assert_eq!(*status, 422);
            assert_eq!(code, "invalid_spec");
            assert_eq!(message, "must be an absolute path");
            assert_eq!(field.as_deref(), Some("disks[0].path"));
            assert_eq!(*task, None);
        }
        other => panic!("not an API error: {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "422 invalid_spec: must be an absolute path (field disks[0].path)"
    );
    let requests = daemon.requests();
    let request = &requests[0];
    assert_eq!(request_line(request), "POST /v1/vms HTTP/1.1");
    assert!(has_header(request, "host: localhost"), "{request}");
    assert!(
        has_header(request, "content-type: application/json"),
        "{request}"
    );
    assert!(request.ends_with(r#"{"name":"web"}"#), "{request}");
}

#[tokio::test]
async fn a_conflict_names_the_task_and_raw_requests_see_every_status() {
    let daemon = FakeDaemon::start(|request| {
        if request.starts_with("POST /v1/vms/web/start ") {
            response(
                409,
                &api_error(
                    "conflict",
                    "VM is busy with task stop",
                    json!({"task": "stop"}),
                ),
            )
        } else {
            response(404, "")
        }
    });
    let client = daemon.client();
    let err = client.start("web").await.unwrap_err();
    assert_eq!(err.to_string(), "409 conflict: VM is busy with task stop");
    assert!(matches!(err, ClientError::Api { task: Some(ref t), .. } if t == "stop"));
    assert_eq!((err.status(), err.code()), (Some(409), Some("conflict")));

    let (status, body) = client
        .request_json(Method::POST, "/v1/vms/web/start", None)
        .await
        .unwrap();
    assert_eq!(status, 409);
    assert_eq!(body["error"]["task"], "stop");
    let (status, body) = client
        .request_json(Method::GET, "/v1/nothing?x=1", None)
        .await
        .unwrap();
    assert_eq!((status, body), (404, Value::Null));
    assert_eq!(
        request_line(&daemon.requests()[2]),
        "GET /v1/nothing?x=1 HTTP/1.1"
    );
    // Malformed bodies go out as they are.
    let raw = client
        .request_bytes(
            Method::POST,
            "/v1/vms",
            Some("application/json"),
            b"{not json".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(raw.status, 404);
    assert!(daemon.requests()[3].ends_with("{not json"));
}

#[tokio::test]
async fn typed_calls_send_the_right_requests_and_decode_vms() {
    let web = sample_vm("web");
    let id = web.id;
    let vm_json = serde_json::to_string(&web).unwrap();
    let list_json = json!({ "vms": [web.clone()] }).to_string();
    let daemon = FakeDaemon::start(move |request| match request_line(request) {
        "GET /v1/vms HTTP/1.1" => response(200, &list_json),
        "GET /v1/vms/web HTTP/1.1" => response(200, &vm_json),
        "DELETE /v1/vms/web?force=true HTTP/1.1" => response(204, ""),
        "POST /v1/vms/web/stop HTTP/1.1" => response(200, &vm_json),
        line if line.starts_with("PUT /v1/vms/") => {
            // Created the first time, found the same afterwards.
            let status = if request.contains("\"first\":true") {
                201
            } else {
                200
            };
            response(status, &vm_json)
        }
        "GET /healthz HTTP/1.1" => response(200, r#"{"status":"ok"}"#),
        _ => response(404, &api_error("not_found", "no such route", json!({}))),
    });
    let client = daemon.client();
    assert_eq!(client.list_vms().await.unwrap(), vec![web.clone()]);
    assert_eq!(client.get_vm("web").await.unwrap(), web);
    client.health().await.unwrap();
    client.delete_vm("web", true).await.unwrap();

    let (created, vm) = client.put_vm(id, &json!({"first": true})).await.unwrap();
    assert!(created);
    assert_eq!(vm.id, id);
    let (created, _) = client.put_vm(id, &json!({"first": false})).await.unwrap();
    assert!(!created);

    client.stop("web", true, Some(7)).await.unwrap();
    let stop = daemon
        .requests()
        .into_iter()
        .find(|r| r.starts_with("POST /v1/vms/web/stop"))
        .unwrap();
    let body: Value = serde_json::from_str(stop.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body, json!({"force": true, "timeout_s": 7}));
    assert!(daemon
        .requests()
        .iter()
        .any(|r| request_line(r) == format!("PUT /v1/vms/{id} HTTP/1.1")));

    let err = client.node().await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"));
    // Odd ids never reach the request line.
    let err = client.get_vm("../node").await.unwrap_err();
    assert!(matches!(err, ClientError::BadSegment { .. }), "{err:?}");
}

/// Wraps SSE bytes in HTTP chunked encoding, cut into `piece`-byte chunks,
/// each written separately.
fn sse_response(payload: &str, piece: usize) -> Reply {
    let mut reply = vec![b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n".to_vec()];
    for chunk in payload.as_bytes().chunks(piece) {
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(chunk);
        framed.extend_from_slice(b"\r\n");
        reply.push(framed);
    }
    reply.push(b"0\r\n\r\n".to_vec());
    reply
}

fn sse_payload(web: &Vm) -> String {
    let mut running = web.clone();
    // A view as a daemon would send it.
    running.state = serde_json::from_value(json!(PowerState::Running)).unwrap();
    running.generation = 5;
    let vm_event =
        json!({"seq": 101, "time": "2024-05-01T10:00:00.000Z", "type": "vm", "vm": running});
    // Pretty-printed JSON spans several `data:` lines, joined by newlines.
    let vm_data: String = serde_json::to_string_pretty(&vm_event)
        .unwrap()
        .lines()
        .map(|l| format!("data: {l}\n"))
        .collect();
    let deleted = json!({"seq": 102, "time": "2024-05-01T10:00:01.000Z", "type": "vm_deleted", "id": web.id, "name": web.name});
    format!(
        ": keep-alive\n\nid: 101\nevent: vm\n{vm_data}\n:ping\n\nid: 102\r\nevent: vm_deleted\r\ndata: {deleted}\r\n\r\n"
    )
}

#[tokio::test]
async fn an_sse_stream_in_odd_chunks_yields_whole_events() {
    let web = sample_vm("web");
    let payload = sse_payload(&web);
    for piece in [3, 7, 64, 4096] {
        let payload = payload.clone();
        let daemon = FakeDaemon::start(move |_| sse_response(&payload, piece));
        let mut stream = daemon.client().events(Some(100)).await.unwrap();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.seq, 101);
        match &first.body {
            EventBody::Vm { vm } => {
                assert_eq!(vm.name, "web");
                assert_eq!(vm.state, PowerState::Running);
                assert_eq!(vm.generation, 5);
            }
            other => panic!("piece {piece}: {other:?}"),
        }
        let second = stream.next().await.unwrap().unwrap();
        assert_eq!(second.seq, 102);
        assert_eq!(
            second.body,
            EventBody::VmDeleted {
                id: web.id,
                name: "web".into()
            }
        );
        assert!(stream.next().await.is_none(), "piece {piece}");
        let request = &daemon.requests()[0];
        assert_eq!(request_line(request), "GET /v1/events?since=100 HTTP/1.1");
        assert!(has_header(request, "accept: text/event-stream"));
    }
}

#[tokio::test]
async fn events_refused_or_not_an_event_stream_are_errors() {
    let daemon = FakeDaemon::start(|request| {
        if request.contains("since=") {
            response(
                400,
                &api_error("bad_request", "since: not a number", json!({})),
            )
        } else {
            response(200, "{}")
        }
    });
    let err = daemon.client().events(Some(1)).await.unwrap_err();
    assert_eq!(err.to_string(), "400 bad_request: since: not a number");
    let err = daemon.client().events(None).await.unwrap_err();
    assert!(err.to_string().contains("text/event-stream"), "{err}");
}

#[tokio::test]
async fn a_missing_socket_says_to_start_the_daemon() {
    let scratch = Scratch::new();
    let socket = scratch.path().join("vmlet.sock");
    let err = Client::unix(&socket).list_vms().await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("vmlet serve"), "{message}");
    assert!(message.contains(&socket.display().to_string()), "{message}");
}

#[tokio::test]
async fn tcp_requests_carry_the_host_and_the_bearer_token() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let requests = seen.clone();
    tokio::spawn(async move {
        let reply = Arc::new(|_: &str| response(200, r#"{"status":"ok"}"#));
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, seen.clone(), reply.clone()));
        }
    });
    let client = Client::new(Endpoint::Tcp {
        url: format!("http://127.0.0.1:{port}/"),
        token: Some("s3cret".into()),
    });
    client.health().await.unwrap();
    let request = requests.lock().unwrap()[0].clone();
    assert_eq!(request_line(&request), "GET /healthz HTTP/1.1");
    assert!(
        has_header(&request, &format!("host: 127.0.0.1:{port}")),
        "{request}"
    );
    assert!(
        has_header(&request, "authorization: Bearer s3cret"),
        "{request}"
    );

    // https:// is served by TLS (tests/tls.rs); other schemes are refused
    // before any connection.
    let other = Client::new(Endpoint::Tcp {
        url: format!("ftp://127.0.0.1:{port}"),
        token: None,
    });
    let err = other.health().await.unwrap_err();
    assert!(matches!(err, ClientError::BadEndpoint { .. }), "{err:?}");
}

#[tokio::test]
async fn cli_prints_tables_json_and_events() {
    let web = sample_vm("web");
    let list_json = json!({ "vms": [web.clone()] }).to_string();
    let payload = sse_payload(&web);
    let daemon = FakeDaemon::start(move |request| match request_line(request) {
        "GET /v1/vms HTTP/1.1" => response(200, &list_json),
        "GET /v1/events HTTP/1.1" => sse_response(&payload, 5),
        // Where `vmlet events` resumes when the stream ends: refused here,
        // so the run ends (a real daemon would stream on).
        "GET /v1/events?since=102 HTTP/1.1" => response(
            400,
            &api_error("bad_request", "resumed after 102", json!({})),
        ),
        _ => response(404, &api_error("not_found", "no VM named nope", json!({}))),
    });
    let mut opts = ClientOptions::unix(&daemon.socket);

    let mut out = Vec::new();
    cli::run_vm(VmCommand::List, &opts, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("ID "), "{text}");
    let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        row,
        [
            &web.id.to_string(),
            "web",
            "stopped",
            "-",
            "stopped",
            "1",
            "256MiB",
            "-"
        ],
        "{text}"
    );

    // The stream ends; `vmlet events` reconnects with since= the last
    // event printed, which this fake refuses.
    let mut out = Vec::new();
    let err = cli::run_events(None, &opts, &mut out).await.unwrap_err();
    assert_eq!(err.to_string(), "400 bad_request: resumed after 102");
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec![
            "101 2024-05-01T10:00:00.000Z vm web state=running task=- gen=5".to_string(),
            format!("102 2024-05-01T10:00:01.000Z vm_deleted web id={}", web.id),
        ]
    );

    opts.output = Output::Json;
    let mut out = Vec::new();
    cli::run_vm(VmCommand::List, &opts, &mut out).await.unwrap();
    let value: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(value["vms"][0]["name"], "web");
    let mut out = Vec::new();
    cli::run_events(None, &opts, &mut out).await.unwrap_err();
    let seqs: Vec<u64> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![101, 102]);

    let err = cli::run_vm(
        VmCommand::Show { vm: "nope".into() },
        &opts,
        &mut Vec::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.to_string(), "404 not_found: no VM named nope");
}

#[tokio::test]
async fn the_vmlet_binary_exits_one_with_the_error_on_stderr() {
    let daemon = FakeDaemon::start(|_| {
        response(
            409,
            &api_error(
                "conflict",
                "VM is busy with task stop",
                json!({"task": "stop"}),
            ),
        )
    });
    let run = |args: &[&str], socket: &std::path::Path| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"));
        cmd.args(args)
            .arg("--socket")
            .arg(socket)
            .env_remove("VMLET_URL")
            .env_remove("VMLET_TOKEN_FILE")
            .kill_on_drop(true);
        cmd.output()
    };
    let out = run(&["vm", "start", "web"], &daemon.socket).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Exit 4: a conflict.
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("409 conflict: VM is busy with task stop"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    let missing = daemon.socket.with_file_name("missing.sock");
    let out = run(&["node"], &missing).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Exit 6: the daemon is unavailable.
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("is `vmlet serve` running?"), "{stderr}");
    assert!(stderr.contains("No such file or directory"), "{stderr}");
}
