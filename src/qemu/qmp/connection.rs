//! The owner task of a QMP connection: the only code that touches the
//! socket. It writes commands (with a descriptor as `SCM_RIGHTS` when one
//! rides along), reads lines, matches replies to commands by id, enforces
//! each command's deadline, broadcasts events, and closes the connection
//! with its reason (EOF, a timeout, a protocol error) for every handle.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, trace, warn};

use super::{
    CloseReason, QemuVersion, QmpError, QmpEvent, QmpTimestamp, MAX_LINE, MAX_UNANSWERED_QUERIES,
    READ_CHUNK,
};

/// What a command's expired deadline means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnExpiry {
    /// QEMU is hung or out of step: the connection closes.
    CloseLink,
    /// A monitoring read: only the read fails.
    FailQuery,
}

/// A command on its way to the owner task.
pub(super) struct Request {
    pub(super) command: String,
    pub(super) arguments: Option<Value>,
    pub(super) fd: Option<OwnedFd>,
    pub(super) deadline: Duration,
    pub(super) expires: Instant,
    pub(super) on_expiry: OnExpiry,
    pub(super) reply: oneshot::Sender<Result<Value, QmpError>>,
}

/// A command sent (or queued to send) and not yet answered.
struct Pending {
    command: String,
    deadline: Duration,
    expires: Instant,
    on_expiry: OnExpiry,
    /// When it was queued, for the latency metric.
    sent: Instant,
    reply: oneshot::Sender<Result<Value, QmpError>>,
}

/// Bytes queued for the socket; `fd` rides on the first byte sent.
struct Outgoing {
    bytes: Vec<u8>,
    written: usize,
    fd: Option<OwnedFd>,
}

/// The owner task's state: the only code that touches the socket.
pub(super) struct Connection {
    /// Socket path, for log lines.
    socket: String,
    stream: UnixStream,
    requests: mpsc::UnboundedReceiver<Request>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<Option<CloseReason>>,
    /// Present until the greeting has been read.
    greeting: Option<oneshot::Sender<Result<QemuVersion, QmpError>>>,
    pending: HashMap<u64, Pending>,
    /// Ids of monitoring reads that expired before QEMU answered; their
    /// replies are still due and are dropped when they come.
    expired_queries: HashSet<u64>,
    outgoing: VecDeque<Outgoing>,
    read_buf: Vec<u8>,
    /// How much of `read_buf` is known to hold no newline.
    scanned: usize,
    next_id: u64,
}

impl Connection {
    /// The owner task's state for a connection on `stream` (`socket`
    /// names it in log lines): commands come in on `requests`, events go
    /// out on `events`, the close reason on `closed`, and the version read
    /// from the greeting on `greeting`.
    pub(super) fn new(
        socket: String,
        stream: UnixStream,
        requests: mpsc::UnboundedReceiver<Request>,
        events: broadcast::Sender<QmpEvent>,
        closed: watch::Sender<Option<CloseReason>>,
        greeting: oneshot::Sender<Result<QemuVersion, QmpError>>,
    ) -> Connection {
        Connection {
            socket,
            stream,
            requests,
            events,
            closed,
            greeting: Some(greeting),
            pending: HashMap::new(),
            expired_queries: HashSet::new(),
            outgoing: VecDeque::new(),
            read_buf: Vec::new(),
            scanned: 0,
            next_id: 1,
        }
    }

    /// Serves the connection until it closes, then fails what is left.
    pub(super) async fn run(mut self) {
        let reason = self.serve().await;
        self.shut_down(reason);
    }

    /// Serves until the connection ends, and says why.
    async fn serve(&mut self) -> CloseReason {
        loop {
            let next_expiry = self.pending.values().map(|p| p.expires).min();
            let expired = async {
                match next_expiry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let step = tokio::select! {
                request = self.requests.recv() => match request {
                    Some(request) => {
                        self.enqueue(request);
                        Ok(())
                    }
                    // Every client handle is gone: nobody can send commands
                    // or watch events any more.
                    None => Err(CloseReason::Aborted),
                },
                ready = self.stream.readable() => match ready {
                    Ok(()) => self.read(),
                    Err(e) => Err(CloseReason::Io(Arc::new(e))),
                },
                ready = self.stream.writable(), if !self.outgoing.is_empty() => match ready {
                    Ok(()) => self.write(),
                    Err(e) => Err(CloseReason::Io(Arc::new(e))),
                },
                () = expired => self.expire().map_or(Ok(()), Err),
            };
            if let Err(reason) = step {
                return reason;
            }
        }
    }

    /// Records the reason, then fails everything still waiting, so that a
    /// caller that sees `Closed` can always read why.
    fn shut_down(&mut self, reason: CloseReason) {
        match &reason {
            CloseReason::Eof | CloseReason::Aborted => {
                debug!(socket = %self.socket, reason = %reason, "QMP connection closed")
            }
            _ => warn!(socket = %self.socket, reason = %reason, "QMP connection closed"),
        }
        self.closed.send_replace(Some(reason.clone()));
        let closed = || QmpError::Closed {
            reason: reason.clone(),
        };
        if let Some(greeting) = self.greeting.take() {
            let _ = greeting.send(Err(closed()));
        }
        for (_, pending) in self.pending.drain() {
            let _ = pending.reply.send(Err(closed()));
        }
        // Commands handed over but not yet picked up fail the same way;
        // after close() no new ones can arrive.
        self.requests.close();
        while let Ok(request) = self.requests.try_recv() {
            let _ = request.reply.send(Err(closed()));
        }
    }

    /// Assigns an id, registers the command's deadline and queues its line.
    fn enqueue(&mut self, request: Request) {
        if request.on_expiry == OnExpiry::FailQuery
            && self.expired_queries.len() >= MAX_UNANSWERED_QUERIES
        {
            let _ = request.reply.send(Err(QmpError::QueriesUnanswered {
                command: request.command,
                unanswered: self.expired_queries.len(),
            }));
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut message = Map::new();
        message.insert("execute".into(), Value::String(request.command.clone()));
        if let Some(arguments) = request.arguments {
            message.insert("arguments".into(), arguments);
        }
        message.insert("id".into(), Value::from(id));
        let mut bytes = match serde_json::to_vec(&message) {
            Ok(bytes) => bytes,
            Err(source) => {
                let _ = request.reply.send(Err(QmpError::Encode {
                    command: request.command,
                    source,
                }));
                return;
            }
        };
        bytes.push(b'\n');
        trace!(socket = %self.socket, id, line = %String::from_utf8_lossy(&bytes).trim_end(), "QMP ->");
        self.pending.insert(
            id,
            Pending {
                command: request.command,
                deadline: request.deadline,
                expires: request.expires,
                on_expiry: request.on_expiry,
                sent: Instant::now(),
                reply: request.reply,
            },
        );
        self.outgoing.push_back(Outgoing {
            bytes,
            written: 0,
            fd: request.fd,
        });
    }

    /// Writes queued lines until the socket would block.
    fn write(&mut self) -> Result<(), CloseReason> {
        let socket = self.stream.as_raw_fd();
        while let Some(out) = self.outgoing.front_mut() {
            match self
                .stream
                .try_io(Interest::WRITABLE, || send_chunk(socket, out))
            {
                // A stream socket never accepts zero bytes of a non-empty
                // buffer unless it is broken; do not spin on it.
                Ok(0) => {
                    let stuck = io::Error::from(io::ErrorKind::WriteZero);
                    return Err(CloseReason::Io(Arc::new(stuck)));
                }
                Ok(sent) => {
                    out.written += sent;
                    // The kernel attached the descriptor to the bytes just
                    // sent; our duplicate can go.
                    out.fd = None;
                    if out.written == out.bytes.len() {
                        self.outgoing.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if peer_gone(&e) => return Err(CloseReason::Eof),
                Err(e) => return Err(CloseReason::Io(Arc::new(e))),
            }
        }
        Ok(())
    }

    /// Reads what the socket has and handles every complete line.
    fn read(&mut self) -> Result<(), CloseReason> {
        self.read_buf.reserve(READ_CHUNK);
        match self.stream.try_read_buf(&mut self.read_buf) {
            Ok(0) => {
                if !self.read_buf.is_empty() {
                    debug!(socket = %self.socket, bytes = self.read_buf.len(), "QMP: partial line at end of stream");
                }
                Err(CloseReason::Eof)
            }
            Ok(_) => self.handle_lines(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if peer_gone(&e) => Err(CloseReason::Eof),
            Err(e) => Err(CloseReason::Io(Arc::new(e))),
        }
    }

    fn handle_lines(&mut self) -> Result<(), CloseReason> {
        let mut start = 0;
        let mut from = self.scanned;
        while let Some(offset) = self.read_buf[from..].iter().position(|&b| b == b'\n') {
            let end = from + offset;
            let line = self.read_buf[start..end].to_vec();
            self.handle_line(&line)?;
            start = end + 1;
            from = start;
        }
        self.read_buf.drain(..start);
        self.scanned = self.read_buf.len();
        if self.read_buf.len() > MAX_LINE {
            return Err(CloseReason::Protocol(format!(
                "line longer than {MAX_LINE} bytes"
            )));
        }
        Ok(())
    }

    fn handle_line(&mut self, line: &[u8]) -> Result<(), CloseReason> {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        trace!(socket = %self.socket, line = %text, "QMP <-");
        let message = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(message)) => message,
            Ok(_) => {
                warn!(socket = %self.socket, line = %text, "QMP: skipping a line that is not a JSON object");
                return Ok(());
            }
            Err(e) => {
                warn!(socket = %self.socket, line = %text, error = %e, "QMP: skipping malformed line");
                return Ok(());
            }
        };
        if let Some(greeting) = self.greeting.take() {
            return match parse_greeting(&message) {
                Some(version) => {
                    let _ = greeting.send(Ok(version));
                    Ok(())
                }
                None => {
                    let problem = format!("expected the QMP greeting, got {text}");
                    let _ = greeting.send(Err(QmpError::Protocol(problem.clone())));
                    Err(CloseReason::Protocol(problem))
                }
            };
        }
        if message.contains_key("event") {
            self.publish_event(message);
        } else if message.contains_key("return") || message.contains_key("error") {
            self.complete(message);
        } else {
            warn!(socket = %self.socket, line = %text, "QMP: skipping a message that is neither event nor reply");
        }
        Ok(())
    }

    fn publish_event(&mut self, mut message: Map<String, Value>) {
        let Some(Value::String(name)) = message.remove("event") else {
            warn!(socket = %self.socket, "QMP: skipping an event without a name");
            return;
        };
        let data = match message.remove("data") {
            Some(Value::Null) | None => Value::Object(Map::new()),
            Some(data) => data,
        };
        let timestamp = message
            .get("timestamp")
            .map(parse_timestamp)
            .unwrap_or_default();
        debug!(socket = %self.socket, event = %name, "QMP event");
        // No subscriber is not an error: events are fire-and-forget.
        let _ = self.events.send(QmpEvent {
            name,
            data,
            timestamp,
        });
    }

    /// Hands a reply to the command with its id.
    fn complete(&mut self, mut message: Map<String, Value>) {
        let id = message.get("id").and_then(Value::as_u64);
        if let Some(late) = id.filter(|id| self.expired_queries.remove(id)) {
            debug!(socket = %self.socket, id = late, "QMP: dropping the late reply to an expired query");
            return;
        }
        let Some(pending) = id.and_then(|id| self.pending.remove(&id)) else {
            // QEMU answers a line it could not parse without an id; with
            // well-formed lines from us this should not happen.
            warn!(socket = %self.socket, id = ?message.get("id"), "QMP: skipping a reply to no pending command");
            return;
        };
        crate::metrics::observe_qmp_command(&pending.command, pending.sent.elapsed());
        let outcome = match message.remove("error") {
            Some(error) => Err(qemu_error(pending.command, error)),
            None => Ok(message.remove("return").unwrap_or(Value::Null)),
        };
        if pending.reply.send(outcome).is_err() {
            debug!(socket = %self.socket, id, "QMP: discarding the reply to a cancelled command");
        }
    }

    /// Fails the command whose deadline passed and says why the connection
    /// must close: it cannot be trusted after that. An expired monitoring
    /// read fails alone and the connection stays (`None`).
    fn expire(&mut self) -> Option<CloseReason> {
        let now = Instant::now();
        let expired = self
            .pending
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .min_by_key(|(_, p)| p.expires)
            .map(|(&id, _)| id);
        // Nothing due only if the timer woke a hair early; the next loop
        // sets it again.
        let id = expired?;
        let pending = self.pending.remove(&id)?;
        if pending.on_expiry == OnExpiry::FailQuery {
            // QEMU will still answer (in order, by id): keep the id so the
            // late reply is recognised, and keep the link.
            self.expired_queries.insert(id);
            debug!(socket = %self.socket, id, command = %pending.command, "QMP: query expired; the connection stays open");
            let _ = pending.reply.send(Err(QmpError::QueryTimeout {
                command: pending.command,
                after: pending.deadline,
            }));
            return None;
        }
        crate::metrics::count_qmp_timeout(&pending.command);
        let reason = CloseReason::Timeout {
            command: pending.command.clone(),
            after: pending.deadline,
        };
        // Mark the link dead before the caller hears of the timeout, so that
        // a caller who then checks `is_closed()` never sees it still open.
        self.closed.send_replace(Some(reason.clone()));
        let _ = pending.reply.send(Err(QmpError::Timeout {
            command: pending.command,
            after: pending.deadline,
        }));
        Some(reason)
    }
}

/// Whether a socket error just means QEMU closed its end. QEMU's monitor
/// reads one byte at a time, so when it exits on `quit` the newline after the
/// command is often still unread, and Linux then reports `ECONNRESET` (after
/// the data QEMU did send) instead of a clean end of file.
fn peer_gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// One `sendmsg` of the unsent part of `out`, with its descriptor if it
/// still has one. `MSG_NOSIGNAL`: a dead QEMU must give `EPIPE`, not SIGPIPE.
fn send_chunk(socket: RawFd, out: &Outgoing) -> io::Result<usize> {
    let iov = [IoSlice::new(&out.bytes[out.written..])];
    let fds: Vec<RawFd> = out.fd.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(socket, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
}

/// Reads the version from a greeting (`{"QMP": {"version": …}}`); lenient
/// about everything else in it.
fn parse_greeting(message: &Map<String, Value>) -> Option<QemuVersion> {
    #[derive(Deserialize)]
    struct Version {
        qemu: Triple,
        #[serde(default)]
        package: String,
    }
    #[derive(Deserialize)]
    struct Triple {
        major: u64,
        minor: u64,
        micro: u64,
    }
    let version = message.get("QMP")?.get("version")?;
    let version = Version::deserialize(version).ok()?;
    Some(QemuVersion {
        major: version.qemu.major,
        minor: version.qemu.minor,
        micro: version.qemu.micro,
        package: version.package,
    })
}

fn parse_timestamp(value: &Value) -> QmpTimestamp {
    let field = |name| value.get(name).and_then(Value::as_u64).unwrap_or(0);
    QmpTimestamp {
        seconds: field("seconds"),
        microseconds: field("microseconds"),
    }
}

/// Turns `{"class": …, "desc": …}` into [`QmpError::Qemu`], keeping whatever
/// QEMU said even if the shape is off.
fn qemu_error(command: String, error: Value) -> QmpError {
    let text = |name| error.get(name).and_then(Value::as_str).map(str::to_owned);
    QmpError::Qemu {
        command,
        class: text("class").unwrap_or_else(|| "GenericError".to_owned()),
        desc: text("desc").unwrap_or_else(|| error.to_string()),
    }
}
