//! Tests of the QMP client against an in-test fake QMP server on a unix
//! socket, plus one against a real QEMU when `qemu-system-x86_64` exists.

mod common;

use std::future::Future;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use qapi::qmp::{
    add_fd, cont, device_del, getfd, query_name, query_status, query_version, quit, RunState,
    ShutdownCause, RESUME, SHUTDOWN, STOP,
};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::{self, error::RecvError};
use vmlet::qemu::qmp::{CloseReason, QmpClient, QmpError, QmpEvent};

/// Every step of a test must finish well within this, so a bug shows as a
/// failure rather than a hung test run.
const STEP: Duration = Duration::from_secs(5);

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: did not finish within {STEP:?}"))
}

/// The server side of one QMP connection, driven step by step by a test.
struct FakeQemu {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Descriptors received with bytes not yet handed out as a command.
    fds: Vec<OwnedFd>,
}

/// A command the fake received, with any descriptors passed alongside.
struct Received {
    command: Value,
    fds: Vec<OwnedFd>,
}

impl Received {
    fn name(&self) -> &str {
        self.command["execute"]
            .as_str()
            .expect("execute is a string")
    }

    fn id(&self) -> Value {
        self.command["id"].clone()
    }
}

impl FakeQemu {
    fn greeting() -> Value {
        json!({"QMP": {
            "version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "fake-1"},
            "capabilities": ["oob"]
        }})
    }

    async fn send(&mut self, message: Value) {
        self.send_line(&message.to_string()).await;
    }

    /// QEMU ends its lines with CRLF; so do we.
    async fn send_line(&mut self, line: &str) {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("fake write");
    }

    async fn reply(&mut self, to: &Received, value: Value) {
        self.send(json!({"return": value, "id": to.id()})).await;
    }

    async fn event(&mut self, name: &str, data: Option<Value>) {
        let mut event = json!({
            "event": name,
            "timestamp": {"seconds": 1_700_000_000u64, "microseconds": 123_456u64}
        });
        if let Some(data) = data {
            event["data"] = data;
        }
        self.send(event).await;
    }

    /// The next command line, or `None` at end of file. Reads with
    /// `recvmsg` so that passed descriptors are received, not dropped.
    async fn recv(&mut self) -> Option<Received> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let command = serde_json::from_slice(&line).expect("client sent valid JSON");
                let fds = std::mem::take(&mut self.fds);
                return Some(Received { command, fds });
            }
            let (bytes, fds) = self.read_chunk().await;
            self.fds.extend(fds);
            if bytes.is_empty() {
                assert!(self.buf.is_empty(), "client left a partial line");
                return None;
            }
            self.buf.extend(bytes);
        }
    }

    async fn recv_command(&mut self) -> Received {
        within("fake waits for a command", self.recv())
            .await
            .expect("client closed the socket")
    }

    async fn read_chunk(&mut self) -> (Vec<u8>, Vec<OwnedFd>) {
        let socket = self.stream.as_raw_fd();
        self.stream
            .async_io(Interest::READABLE, || {
                let mut buf = [0u8; 4096];
                let mut iov = [IoSliceMut::new(&mut buf)];
                let mut space = nix::cmsg_space!([RawFd; 4]);
                let msg = recvmsg::<()>(
                    socket,
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )?;
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        // SAFETY: SCM_RIGHTS just installed these descriptors
                        // in this process; nothing else owns them.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                let len = msg.bytes;
                Ok((buf[..len].to_vec(), fds))
            })
            .await
            .expect("fake recvmsg")
    }
}

/// A socket path in a fresh tempdir, with a listener on it.
fn listen() -> (TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    (dir, path, listener)
}

/// A connected client and the fake on the other end, after the handshake.
async fn connected() -> (QmpClient, broadcast::Receiver<QmpEvent>, FakeQemu, TempDir) {
    let (dir, path, listener) = listen();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut fake = FakeQemu {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
        };
        fake.send(FakeQemu::greeting()).await;
        let negotiate = fake.recv_command().await;
        assert_eq!(negotiate.name(), "qmp_capabilities");
        assert_eq!(negotiate.command.get("arguments"), None);
        fake.reply(&negotiate, json!({})).await;
        fake
    });
    let (client, events) = within("connect", QmpClient::connect(&path, Duration::from_secs(2)))
        .await
        .expect("connect");
    let fake = within("fake handshake", server).await.expect("fake task");
    (client, events, fake, dir)
}

async fn next_event(events: &mut broadcast::Receiver<QmpEvent>) -> QmpEvent {
    within("event", events.recv()).await.expect("an event")
}

#[tokio::test]
async fn negotiates_capabilities_and_exposes_the_version() {
    let (client, _events, _fake, _dir) = connected().await;
    let version = client.qemu_version();
    assert_eq!((version.major, version.minor, version.micro), (10, 0, 2));
    assert_eq!(version.package, "fake-1");
    assert_eq!(version.to_string(), "10.0.2 (fake-1)");
    assert!(!client.is_closed());
    assert!(client.close_reason().is_none());
}

#[tokio::test]
async fn connect_reports_missing_socket_bad_greeting_and_silence() {
    let dir = tempfile::tempdir().unwrap();
    let missing = QmpClient::connect(&dir.path().join("nope.sock"), STEP).await;
    assert!(matches!(missing, Err(QmpError::Connect(_))), "{missing:?}");

    // A server that says something other than a greeting.
    let (_dir, path, listener) = listen();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"{\"return\": {}}\r\n").await.unwrap();
        stream
    });
    let bad = within("connect", QmpClient::connect(&path, STEP)).await;
    match bad {
        Err(QmpError::Protocol(message)) => assert!(message.contains("greeting"), "{message}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    drop(server.await.unwrap());

    // A server that accepts and never speaks.
    let (_dir, path, listener) = listen();
    let server = tokio::spawn(async move { listener.accept().await.unwrap().0 });
    let started = Instant::now();
    let silent = QmpClient::connect(&path, Duration::from_millis(200)).await;
    assert!(
        matches!(silent, Err(QmpError::ConnectTimeout { after }) if after == Duration::from_millis(200)),
        "{silent:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(server.await.unwrap());
}

#[tokio::test]
async fn typed_command_gets_typed_reply() {
    let (client, _events, mut fake, _dir) = connected().await;
    let script = async {
        let cmd = fake.recv_command().await;
        assert_eq!(cmd.name(), "query-status");
        // Empty typed arguments are left out, and our id is a number.
        assert_eq!(cmd.command.get("arguments"), None);
        assert!(cmd.id().is_u64(), "{:?}", cmd.command);
        // `singlestep` is a field the schema dropped: must be ignored.
        fake.reply(
            &cmd,
            json!({"status": "running", "running": true, "singlestep": false}),
        )
        .await;

        let cmd = fake.recv_command().await;
        assert_eq!(cmd.name(), "device_del");
        assert_eq!(cmd.command["arguments"], json!({"id": "nic9"}));
        fake.reply(&cmd, json!({})).await;
    };
    let (status, deleted, ()) = tokio::join!(
        client.execute(query_status {}),
        client.execute(device_del { id: "nic9".into() }),
        script
    );
    let status = status.expect("query-status");
    assert_eq!(status.status, RunState::running);
    assert!(status.running);
    deleted.expect("device_del");
}

#[tokio::test]
async fn replies_are_matched_by_id_among_events() {
    let (client, mut events, mut fake, _dir) = connected().await;
    // A clone on another task: handles are shareable and their futures Send.
    let other = client.clone();
    let name = tokio::spawn(async move { other.execute(query_name {}).await });
    let script = async {
        let first = fake.recv_command().await;
        let second = fake.recv_command().await;
        let (status_cmd, name_cmd) = if first.name() == "query-status" {
            (first, second)
        } else {
            (second, first)
        };
        assert_eq!(name_cmd.name(), "query-name");
        assert_ne!(status_cmd.id(), name_cmd.id());
        fake.event("STOP", None).await;
        // Answer the later command first.
        fake.reply(&name_cmd, json!({"name": "vm-a"})).await;
        fake.event("RESUME", None).await;
        fake.reply(&status_cmd, json!({"status": "paused", "running": false}))
            .await;
    };
    let (status, ()) = tokio::join!(client.execute(query_status {}), script);
    assert_eq!(status.expect("query-status").status, RunState::paused);
    let name = within("spawned command", name).await.unwrap();
    assert_eq!(name.expect("query-name").name.as_deref(), Some("vm-a"));

    let stop = next_event(&mut events).await;
    assert_eq!(stop.name, "STOP");
    assert!(stop.is::<STOP>());
    assert!(matches!(stop.parse::<STOP>(), Some(Ok(_))));
    assert_eq!(stop.data, json!({}));
    assert_eq!(stop.timestamp.seconds, 1_700_000_000);
    assert_eq!(stop.timestamp.microseconds, 123_456);
    let resume = next_event(&mut events).await;
    assert_eq!(resume.name, "RESUME");
    assert!(matches!(resume.parse::<RESUME>(), Some(Ok(_))));
    assert!(resume.parse::<STOP>().is_none());
}

#[tokio::test]
async fn unknown_events_values_and_junk_do_not_break_the_stream() {
    let (client, mut events, mut fake, _dir) = connected().await;
    fake.event("VMLET_FROM_THE_FUTURE", Some(json!({"warp": 9})))
        .await;
    fake.event(
        "SHUTDOWN",
        Some(json!({"guest": true, "reason": "host-quantum-tunnel"})),
    )
    .await;
    fake.send_line("this is not JSON {").await;
    fake.send_line("[1, 2, 3]").await;
    fake.send_line("").await;
    fake.send(json!({"neither": "event nor reply"})).await;
    // Replies to nobody: no id, and an id we never used.
    fake.send(json!({"return": {}})).await;
    fake.send(json!({"return": {}, "id": 987_654})).await;
    fake.event(
        "SHUTDOWN",
        Some(json!({"guest": true, "reason": "guest-shutdown", "new-field": [1]})),
    )
    .await;

    let unknown = next_event(&mut events).await;
    assert_eq!(unknown.name, "VMLET_FROM_THE_FUTURE");
    assert_eq!(unknown.data, json!({"warp": 9}));
    assert!(unknown.parse::<SHUTDOWN>().is_none());

    let odd = next_event(&mut events).await;
    assert_eq!(odd.data["reason"], "host-quantum-tunnel");
    match odd.parse::<SHUTDOWN>() {
        Some(Err(e)) => assert!(e.to_string().contains("host-quantum-tunnel"), "{e}"),
        other => panic!("expected a parse error, got {other:?}"),
    }

    // The junk lines produced no events; unknown fields parse fine.
    let normal = next_event(&mut events).await;
    let shutdown = normal.parse::<SHUTDOWN>().expect("is SHUTDOWN").unwrap();
    assert!(shutdown.guest);
    assert_eq!(shutdown.reason, ShutdownCause::guest_shutdown);

    // A typed reply with an unknown enum value fails that command only.
    let script = async {
        let cmd = fake.recv_command().await;
        fake.reply(&cmd, json!({"status": "hibernating", "running": false}))
            .await;
        let cmd = fake.recv_command().await;
        fake.reply(&cmd, json!({"status": "running", "running": true}))
            .await;
    };
    let ((undecodable, status), ()) = tokio::join!(
        async {
            let first = client.execute(query_status {}).await;
            (first, client.execute(query_status {}).await)
        },
        script
    );
    match undecodable {
        Err(QmpError::Decode { command, .. }) => assert_eq!(command, "query-status"),
        other => panic!("expected a decode error, got {other:?}"),
    }
    assert_eq!(status.expect("query-status").status, RunState::running);
    assert!(!client.is_closed());
}

#[tokio::test]
async fn error_reply_carries_class_and_desc() {
    let (client, _events, mut fake, _dir) = connected().await;
    let script = async {
        let cmd = fake.recv_command().await;
        fake.send(json!({
            "error": {"class": "DeviceNotFound", "desc": "Device 'nic9' not found"},
            "id": cmd.id()
        }))
        .await;
        let cmd = fake.recv_command().await;
        fake.reply(&cmd, json!({"status": "running", "running": true}))
            .await;
    };
    let ((refused, status), ()) = tokio::join!(
        async {
            let refused = client.execute(device_del { id: "nic9".into() }).await;
            (refused, client.execute(query_status {}).await)
        },
        script
    );
    let error = refused.expect_err("QEMU refused");
    assert_eq!(error.to_string(), "device_del: Device 'nic9' not found");
    match error {
        QmpError::Qemu {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "device_del");
            assert_eq!(class, "DeviceNotFound");
            assert_eq!(desc, "Device 'nic9' not found");
        }
        other => panic!("expected a QEMU error, got {other:?}"),
    }
    // An error reply is a normal answer: the connection goes on.
    assert!(status.is_ok());
    assert!(!client.is_closed());
}

#[tokio::test]
async fn silent_server_times_out_and_closes_the_connection() {
    let (client, mut events, mut fake, _dir) = connected().await;
    let deadline = Duration::from_millis(200);
    let started = Instant::now();
    let (timed_out, other, received) = tokio::join!(
        client.execute_with_deadline(query_status {}, deadline),
        client.execute_with_deadline(query_version {}, Duration::from_secs(30)),
        async {
            let a = fake.recv_command().await;
            let b = fake.recv_command().await;
            (a, b)
        }
    );
    let elapsed = started.elapsed();
    assert!(elapsed >= deadline, "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    match timed_out {
        Err(QmpError::Timeout { command, after }) => {
            assert_eq!(command, "query-status");
            assert_eq!(after, deadline);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    // The other pending command fails with the reason, not its own 30 s.
    match other {
        Err(QmpError::Closed {
            reason: CloseReason::Timeout { command, .. },
        }) => assert_eq!(command, "query-status"),
        other => panic!("expected closed by timeout, got {other:?}"),
    }
    assert!(client.is_closed());
    assert!(matches!(
        within("closed", client.closed()).await,
        CloseReason::Timeout { .. }
    ));

    // Later commands fail at once, without touching the socket.
    let started = Instant::now();
    let later = client.execute(query_status {}).await;
    assert!(matches!(later, Err(QmpError::Closed { .. })), "{later:?}");
    assert!(started.elapsed() < Duration::from_millis(100));

    // The client dropped the socket: the fake sees end of file, having
    // received only the two commands above.
    drop(received);
    assert!(within("fake sees EOF", fake.recv()).await.is_none());
    assert!(matches!(
        within("event stream ends", events.recv()).await,
        Err(RecvError::Closed)
    ));
}

/// A monitoring read that QEMU does not answer in time fails alone: the
/// connection stays open, the late reply is dropped (the next command gets
/// its own), and reads stop being sent once too many are unanswered.
#[tokio::test]
async fn an_expired_query_leaves_the_connection_open() {
    let (client, _events, mut fake, _dir) = connected().await;
    let deadline = Duration::from_millis(200);
    let started = Instant::now();
    let (expired, first) = tokio::join!(
        client.query_raw("query-blockstats", None, deadline),
        fake.recv_command()
    );
    let elapsed = started.elapsed();
    assert!(elapsed >= deadline, "{elapsed:?}");
    match expired {
        Err(QmpError::QueryTimeout { command, after }) => {
            assert_eq!(command, "query-blockstats");
            assert_eq!(after, deadline);
        }
        other => panic!("expected a query timeout, got {other:?}"),
    }
    assert!(!client.is_closed(), "{:?}", client.close_reason());

    // QEMU answers late, then a real command runs and gets its own reply.
    fake.reply(&first, json!([{"device": "late"}])).await;
    let (status, second) = tokio::join!(client.execute(query_name {}), async {
        let second = fake.recv_command().await;
        fake.reply(&second, json!({"name": "vm1"})).await;
        second
    });
    assert_eq!(second.name(), "query-name");
    assert_eq!(
        status.expect("query-name answered").name.as_deref(),
        Some("vm1")
    );

    // A silent QEMU: reads expire one after another without closing the
    // link, and once MAX_UNANSWERED_QUERIES wait, the next is not sent.
    let max = vmlet::qemu::qmp::MAX_UNANSWERED_QUERIES;
    for i in 0..max {
        let (result, received) = tokio::join!(
            client.query_raw("query-balloon", None, Duration::from_millis(20)),
            fake.recv_command()
        );
        assert!(
            matches!(result, Err(QmpError::QueryTimeout { .. })),
            "{i}: {result:?}"
        );
        assert_eq!(received.name(), "query-balloon");
    }
    let refused = within(
        "refused query",
        client.query_raw("query-balloon", None, Duration::from_secs(30)),
    )
    .await;
    match refused {
        Err(QmpError::QueriesUnanswered { unanswered, .. }) => assert_eq!(unanswered, max),
        other => panic!("expected the query refused, got {other:?}"),
    }
    assert!(!client.is_closed());
    // A command that controls the VM still closes the link when it expires.
    let (timed_out, _received) = tokio::join!(
        client.execute_with_deadline(query_status {}, Duration::from_millis(50)),
        fake.recv_command()
    );
    assert!(
        matches!(timed_out, Err(QmpError::Timeout { .. })),
        "{timed_out:?}"
    );
    assert!(client.is_closed());
}

#[tokio::test]
async fn cancelled_command_does_not_disturb_the_next() {
    let (client, _events, mut fake, _dir) = connected().await;
    // The caller gives up on the first command before QEMU answers.
    let (abandoned, cancelled) = tokio::join!(
        tokio::time::timeout(Duration::from_millis(50), client.execute(query_status {})),
        fake.recv_command()
    );
    assert!(abandoned.is_err(), "the first command was answered?");
    let script = async {
        let second = fake.recv_command().await;
        assert_ne!(second.id(), cancelled.id());
        // The late reply to the cancelled command comes first.
        fake.reply(&cancelled, json!({"status": "paused", "running": false}))
            .await;
        fake.reply(&second, json!({"status": "running", "running": true}))
            .await;
    };
    let (status, ()) = tokio::join!(client.execute(query_status {}), script);
    assert_eq!(status.expect("second command").status, RunState::running);
    assert!(!client.is_closed());
}

#[tokio::test]
async fn eof_fails_pending_commands_and_resolves_closed() {
    let (client, mut events, mut fake, _dir) = connected().await;
    let mut late_subscriber = client.subscribe();
    let script = async move {
        let _cmd = fake.recv_command().await;
        fake.event(
            "SHUTDOWN",
            Some(json!({"guest": false, "reason": "host-signal"})),
        )
        .await;
        // QEMU exits: the socket closes with the command unanswered.
        drop(fake);
    };
    let (pending, reason, ()) = tokio::join!(
        client.execute_with_deadline(query_status {}, Duration::from_secs(30)),
        client.closed(),
        script
    );
    assert!(
        matches!(
            pending,
            Err(QmpError::Closed {
                reason: CloseReason::Eof
            })
        ),
        "{pending:?}"
    );
    assert!(matches!(reason, CloseReason::Eof), "{reason:?}");
    assert!(client.is_closed());

    // Events sent before the end are still delivered, then the stream ends.
    for receiver in [&mut events, &mut late_subscriber] {
        assert_eq!(next_event(receiver).await.name, "SHUTDOWN");
        assert!(matches!(receiver.recv().await, Err(RecvError::Closed)));
    }
    assert!(matches!(
        client.subscribe().recv().await,
        Err(RecvError::Closed)
    ));
    let error = client.execute(query_status {}).await.unwrap_err();
    assert_eq!(error.to_string(), "QMP connection closed");
    let source = std::error::Error::source(&error).expect("a source");
    assert_eq!(source.to_string(), "QEMU closed the socket");
}

#[tokio::test]
async fn passes_file_descriptors_with_the_command() {
    let (client, _events, mut fake, _dir) = connected().await;
    let (reader, mut writer) = std::io::pipe().expect("pipe");
    let (other_reader, _other_writer) = std::io::pipe().expect("pipe");
    let script = async {
        let cmd = fake.recv_command().await;
        assert_eq!(cmd.name(), "getfd");
        assert_eq!(cmd.command["arguments"], json!({"fdname": "tap0"}));
        assert_eq!(cmd.fds.len(), 1, "one descriptor with getfd");
        fake.reply(&cmd, json!({})).await;

        let add = fake.recv_command().await;
        assert_eq!(add.name(), "add-fd");
        assert_eq!(add.fds.len(), 1);
        fake.reply(&add, json!({"fdset-id": 3, "fd": 42})).await;

        let plain = fake.recv_command().await;
        assert!(plain.fds.is_empty(), "no descriptor with a plain command");
        fake.reply(&plain, json!({"status": "running", "running": true}))
            .await;
        let mut fds = cmd.fds;
        fds.pop().unwrap()
    };
    let ((got, added, status), received) = tokio::join!(
        async {
            let got = client
                .execute_with_fd(
                    getfd {
                        fdname: "tap0".into(),
                    },
                    reader.as_fd(),
                )
                .await;
            let added = client
                .execute_with_fd(
                    add_fd {
                        fdset_id: None,
                        opaque: None,
                    },
                    other_reader.as_fd(),
                )
                .await;
            (got, added, client.execute(query_status {}).await)
        },
        script
    );
    got.expect("getfd");
    let added = added.expect("add-fd");
    assert_eq!((added.fdset_id, added.fd), (3, 42));
    status.expect("query-status");

    // The received descriptor is the pipe's read end: bytes written to our
    // end come out of it. And we still own our descriptor.
    writer.write_all(b"through the socket").unwrap();
    drop(writer);
    let mut passed = std::fs::File::from(received);
    let mut text = String::new();
    passed.read_to_string(&mut text).unwrap();
    assert_eq!(text, "through the socket");
    assert!(nix::fcntl::fcntl(reader.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).is_ok());
}

/// A QEMU child process, killed when the test ends however it ends.
struct QemuGuard(Child);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for_socket(path: &Path, qemu: &mut QemuGuard) {
    let started = Instant::now();
    while !path.exists() {
        if let Some(status) = qemu.0.try_wait().unwrap() {
            panic!("QEMU exited early: {status}");
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no QMP socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn real_qemu_prelaunch_cont_quit() {
    const QEMU: &str = "qemu-system-x86_64";
    if let Err(e) = Command::new(QEMU).arg("--version").output() {
        common::skip(
            "real_qemu_prelaunch_cont_quit",
            format!("{QEMU} cannot be run ({e})"),
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qmp.sock");
    let child = Command::new(QEMU)
        .args([
            "-S",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "128",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn QEMU");
    let mut qemu = QemuGuard(child);
    wait_for_socket(&socket, &mut qemu).await;

    let (client, mut events) = QmpClient::connect(&socket, Duration::from_secs(10))
        .await
        .expect("connect to QEMU");
    assert!(
        client.qemu_version().major >= 2,
        "{}",
        client.qemu_version()
    );

    let status = client.execute(query_status {}).await.expect("query-status");
    assert_eq!(status.status, RunState::prelaunch);
    assert!(!status.running);
    let version = client
        .execute(query_version {})
        .await
        .expect("query-version");
    assert_eq!(version.qemu.major as u64, client.qemu_version().major);

    client.execute(cont {}).await.expect("cont");
    let status = client.execute(query_status {}).await.expect("query-status");
    assert_eq!(status.status, RunState::running);
    let resume = next_event(&mut events).await;
    assert!(
        matches!(resume.parse::<RESUME>(), Some(Ok(_))),
        "{resume:?}"
    );

    // A real error reply from QEMU.
    let refused = client
        .execute(device_del {
            id: "no-such-device".into(),
        })
        .await;
    match refused {
        Err(QmpError::Qemu { class, desc, .. }) => {
            assert_eq!(class, "DeviceNotFound");
            assert!(desc.contains("no-such-device"), "{desc}");
        }
        other => panic!("expected DeviceNotFound, got {other:?}"),
    }

    client.execute(quit {}).await.expect("quit");
    let reason = within("QEMU exits", client.closed()).await;
    assert!(matches!(reason, CloseReason::Eof), "{reason:?}");
    let shutdown = next_event(&mut events).await;
    let shutdown = shutdown.parse::<SHUTDOWN>().expect("SHUTDOWN").unwrap();
    assert!(!shutdown.guest);
    assert_eq!(shutdown.reason, ShutdownCause::host_qmp_quit);
    let exit = within("QEMU process ends", async {
        loop {
            if let Some(status) = qemu.0.try_wait().unwrap() {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(exit.success(), "{exit}");
}
