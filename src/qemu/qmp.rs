//! QMP client: commands and events over QEMU's monitor socket.
//!
//! Our own transport, on tokio, with typed commands from the `qapi` crate's
//! schema types (`qapi::qmp::query_status`, …) and raw JSON for everything
//! else. The `qapi` crate's async transport is not used: an unknown event or
//! enum value kills its stream and a cancelled command panics the next one.
//!
//! How a connection works:
//!
//! - One owner task per connection reads lines from the socket, writes
//!   commands, matches replies to commands by our own numeric `id`, and
//!   enforces every command's deadline. [`QmpClient`] handles only talk to
//!   that task through channels, so they are cheap to clone and share.
//! - Every command has a deadline. A command that gets no reply in time means
//!   QEMU is hung or the stream is out of step, so the connection is declared
//!   dead: the timed-out command fails with [`QmpError::Timeout`], every other
//!   pending or later command fails at once with [`QmpError::Closed`], and
//!   [`QmpClient::closed`] resolves with [`CloseReason::Timeout`].
//! - Monitoring reads ([`QmpClient::query_raw`], for metrics) are the one
//!   exception: their deadline fails only that read
//!   ([`QmpError::QueryTimeout`]) and the connection stays open, so a
//!   scrape never costs a VM its control link. The late reply is dropped.
//!   At most [`MAX_UNANSWERED_QUERIES`] such reads may wait for a reply at
//!   once; more fail at once ([`QmpError::QueriesUnanswered`]) instead of
//!   piling up behind a QEMU that does not answer.
//! - Dropping a command's future (cancelling it) is safe: the command may
//!   still reach QEMU and run, but its late reply is discarded and later
//!   commands get their own replies. Its deadline still counts: QEMU answers
//!   commands in order, so a reply that never comes stalls everything after it.
//! - Events go to every subscriber through a tokio broadcast channel as
//!   [`QmpEvent`]s with raw JSON `data`; [`QmpEvent::parse`] turns one into a
//!   typed `qapi::qmp` event and reports a mismatch (such as an enum value
//!   newer than the schema) as an error for that event only. Unknown events,
//!   unknown fields and malformed lines never end the connection.
//! - End of file means QEMU exited: pending commands fail with
//!   [`QmpError::Closed`] and [`QmpClient::closed`] resolves with
//!   [`CloseReason::Eof`].
//! - [`QmpClient::execute_with_fd`] passes a file descriptor as `SCM_RIGHTS`
//!   ancillary data on the same `sendmsg` as the command (for `getfd` and
//!   `add-fd`).
//!
//! Subscribing without losing events: [`QmpClient::connect`] returns, with
//! the client, a receiver created before the owner task started, so it sees
//! every event of the connection. Later [`QmpClient::subscribe`] calls see
//! events from the moment they subscribe. The event stream ends
//! (`RecvError::Closed`) once the connection has closed and the buffered
//! events have been read.
//!
//! Why this file is long: it is one protocol's transport (the owner task,
//! framing, fd passing, per-command deadlines, the event stream, EOF as
//! "QEMU exited"); its invariants hold together and are read together.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, trace, warn};

/// Deadline of [`QmpClient::execute`] and [`QmpClient::execute_with_fd`].
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// Monitoring reads past their deadline that QEMU has not answered yet,
/// beyond which new reads fail at once.
pub const MAX_UNANSWERED_QUERIES: usize = 8;

/// How many events the broadcast channel keeps for a slow subscriber; one
/// that falls further behind gets `RecvError::Lagged` and should re-read the
/// VM's state (`query-status`) instead of trusting the events it missed.
pub const EVENT_BUFFER: usize = 256;

/// A line longer than this is taken as a broken stream rather than buffered
/// without bound (`query-qmp-schema`, one of the largest replies, is well
/// under 1 MiB).
const MAX_LINE: usize = 16 << 20;

/// Bytes to make room for before each read from the socket.
const READ_CHUNK: usize = 64 << 10;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be opened.
    #[error("cannot connect to the QMP socket")]
    Connect(#[source] io::Error),
    /// Greeting and capabilities negotiation did not finish within the
    /// connect deadline.
    #[error("no QMP handshake within {after:?}")]
    ConnectTimeout {
        /// The connect deadline.
        after: Duration,
    },
    /// The command got no reply within its deadline; the connection is now
    /// closed.
    #[error("QMP command `{command}` got no reply within {after:?}")]
    Timeout {
        /// The QMP command name.
        command: String,
        /// The command's deadline.
        after: Duration,
    },
    /// A monitoring read ([`QmpClient::query_raw`]) got no reply within
    /// its deadline; the connection stays open.
    #[error("QMP query `{command}` got no reply within {after:?}")]
    QueryTimeout {
        /// The QMP command name.
        command: String,
        /// The read's deadline.
        after: Duration,
    },
    /// A monitoring read was not sent: QEMU has not answered earlier ones
    /// (it is stopped or hung); the connection stays open.
    #[error("QMP query `{command}` not sent: {unanswered} earlier queries are unanswered")]
    QueriesUnanswered {
        /// The QMP command name.
        command: String,
        /// Earlier reads still without a reply.
        unanswered: usize,
    },
    /// The connection is closed (before or while the command ran).
    #[error("QMP connection closed")]
    Closed {
        /// Why the connection closed.
        #[source]
        reason: CloseReason,
    },
    /// QEMU answered the command with an error reply.
    #[error("{command}: {desc}")]
    Qemu {
        /// The QMP command name.
        command: String,
        /// QEMU's error class, such as `GenericError` or `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable message.
        desc: String,
    },
    /// QEMU sent something the protocol does not allow here.
    #[error("QMP protocol violation: {0}")]
    Protocol(String),
    /// The command's arguments could not be turned into JSON.
    #[error("cannot encode the arguments of `{command}`")]
    Encode {
        /// The QMP command name.
        command: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The reply did not match the command's typed result.
    #[error("unexpected reply to `{command}`")]
    Decode {
        /// The QMP command name.
        command: String,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The file descriptor to pass could not be duplicated.
    #[error("cannot duplicate the file descriptor to pass")]
    Fd(#[source] io::Error),
}

/// Why a QMP connection closed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CloseReason {
    /// QEMU closed the socket (end of file, or a reset because it did not
    /// read all we sent): it exited or closed the monitor.
    #[error("QEMU closed the socket")]
    Eof,
    /// Reading from or writing to the socket failed.
    #[error("socket error")]
    Io(#[source] Arc<io::Error>),
    /// A command got no reply within its deadline: QEMU is hung or the
    /// stream is out of step.
    #[error("`{command}` got no reply within {after:?}")]
    Timeout {
        /// The QMP command name.
        command: String,
        /// The command's deadline.
        after: Duration,
    },
    /// QEMU broke the protocol (no greeting, a line without end).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The connection task stopped with no cause on QEMU's side: every
    /// client handle was dropped, or the runtime shut down.
    #[error("the connection task stopped")]
    Aborted,
}

/// QEMU's version, from the QMP greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVersion {
    /// Major version (10 in 10.0.2).
    pub major: u64,
    /// Minor version (0 in 10.0.2).
    pub minor: u64,
    /// Micro version (2 in 10.0.2).
    pub micro: u64,
    /// Distribution package string (`--with-pkgversion`), often empty.
    pub package: String,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        let package = self.package.trim();
        if !package.is_empty() {
            write!(f, " ({package})")?;
        }
        Ok(())
    }
}

/// An asynchronous event from QEMU, kept as raw JSON so that events and
/// fields newer than the `qapi` schema pass through.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, such as `SHUTDOWN` or `STOP`.
    pub name: String,
    /// The event's `data` member, or an empty object when QEMU sent none
    /// (so that data-less events such as `STOP` still parse).
    pub data: Value,
    /// When QEMU emitted the event.
    pub timestamp: QmpTimestamp,
}

impl QmpEvent {
    /// Parses the event as the typed `qapi::qmp` event `E`.
    ///
    /// `None` when this is another event; `Some(Err(_))` when the data does
    /// not fit `E`'s schema, for example an enum value newer than the `qapi`
    /// crate. Unknown fields are ignored.
    pub fn parse<E: qapi::Event>(&self) -> Option<Result<E, serde_json::Error>> {
        (self.name == E::NAME).then(|| E::deserialize(&self.data))
    }

    /// Whether this is the event `E`.
    pub fn is<E: qapi::Event>(&self) -> bool {
        self.name == E::NAME
    }
}

/// An event's timestamp: time since the Unix epoch, as QEMU sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct QmpTimestamp {
    /// Whole seconds.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u64,
}

impl QmpTimestamp {
    /// The timestamp as a `SystemTime`; `None` if it does not fit.
    pub fn to_system_time(self) -> Option<SystemTime> {
        let micros = Duration::from_micros(self.microseconds);
        UNIX_EPOCH
            .checked_add(Duration::from_secs(self.seconds))?
            .checked_add(micros)
    }
}

/// A connection to one QEMU's QMP socket.
///
/// Cheap to clone: clones share the connection, so a VM actor and a metrics
/// collector can each hold one. The connection ends when QEMU goes away, when
/// a command times out, or when the last clone is dropped.
#[derive(Clone)]
pub struct QmpClient {
    shared: Arc<Shared>,
}

/// What every clone of a client shares.
struct Shared {
    requests: mpsc::UnboundedSender<Request>,
    closed: watch::Receiver<Option<CloseReason>>,
    /// Weak so that the owner task holds the only strong sender, which makes
    /// subscribers see the event stream end when the connection ends.
    events: broadcast::WeakSender<QmpEvent>,
    version: QemuVersion,
}

impl fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpClient")
            .field("qemu_version", &self.shared.version)
            .field("close_reason", &self.close_reason())
            .finish()
    }
}

impl QmpClient {
    /// Connects to the QMP socket at `path`: reads QEMU's greeting, negotiates
    /// capabilities, and returns the client with an event receiver that sees
    /// every event of the connection. `deadline` covers the whole handshake.
    pub async fn connect(
        path: &Path,
        deadline: Duration,
    ) -> Result<(Self, broadcast::Receiver<QmpEvent>), QmpError> {
        match tokio::time::timeout(deadline, Self::handshake(path, deadline)).await {
            Ok(result) => result,
            // Dropping the handshake drops the request sender, which stops
            // the owner task and closes the socket.
            Err(_) => Err(QmpError::ConnectTimeout { after: deadline }),
        }
    }

    async fn handshake(
        path: &Path,
        deadline: Duration,
    ) -> Result<(Self, broadcast::Receiver<QmpEvent>), QmpError> {
        let started = Instant::now();
        let stream = UnixStream::connect(path).await.map_err(QmpError::Connect)?;
        let (requests_tx, requests_rx) = mpsc::unbounded_channel();
        let (closed_tx, closed_rx) = watch::channel(None);
        // The first receiver exists before the owner task reads anything.
        let (events_tx, events_rx) = broadcast::channel(EVENT_BUFFER);
        let (greeting_tx, greeting_rx) = oneshot::channel();
        let weak_events = events_tx.downgrade();
        let connection = Connection {
            socket: path.display().to_string(),
            stream,
            requests: requests_rx,
            events: events_tx,
            closed: closed_tx,
            greeting: Some(greeting_tx),
            pending: HashMap::new(),
            expired_queries: HashSet::new(),
            outgoing: VecDeque::new(),
            read_buf: Vec::new(),
            scanned: 0,
            next_id: 1,
        };
        tokio::spawn(connection.run());

        let version = match greeting_rx.await {
            Ok(greeting) => greeting?,
            Err(_) => return Err(closed_error(&closed_rx)),
        };
        let client = QmpClient {
            shared: Arc::new(Shared {
                requests: requests_tx,
                closed: closed_rx,
                events: weak_events,
                version,
            }),
        };
        let remaining = deadline.saturating_sub(started.elapsed());
        client
            .execute_with_deadline(qapi::qmp::qmp_capabilities { enable: None }, remaining)
            .await?;
        debug!(socket = %path.display(), version = %client.shared.version, "QMP connected");
        Ok((client, events_rx))
    }

    /// Runs a typed command with the default deadline ([`DEFAULT_DEADLINE`]).
    pub async fn execute<C: qapi::Command>(&self, command: C) -> Result<C::Ok, QmpError> {
        self.execute_with_deadline(command, DEFAULT_DEADLINE).await
    }

    /// Runs a typed command that must be answered within `deadline`.
    pub async fn execute_with_deadline<C: qapi::Command>(
        &self,
        command: C,
        deadline: Duration,
    ) -> Result<C::Ok, QmpError> {
        let arguments = encode_arguments(&command)?;
        let reply = self.call(C::NAME, arguments, None, deadline).await?;
        decode_reply::<C>(reply)
    }

    /// Runs a command by name with raw JSON arguments (for commands the
    /// `qapi` schema lacks or gets wrong) and returns the raw `return` value.
    pub async fn execute_raw(
        &self,
        name: &str,
        arguments: Option<Value>,
        deadline: Duration,
    ) -> Result<Value, QmpError> {
        self.call(name, arguments, None, deadline).await
    }

    /// A monitoring read by name (`query-blockstats`, …): like
    /// [`QmpClient::execute_raw`], but a `deadline` that passes without a
    /// reply fails only this read ([`QmpError::QueryTimeout`]) and leaves
    /// the connection open; QEMU's late reply is dropped. For reads whose
    /// failure must never change the VM (metrics): a stopped or slow QEMU
    /// is found out by the commands that control it, not by a scrape.
    pub async fn query_raw(
        &self,
        name: &str,
        arguments: Option<Value>,
        deadline: Duration,
    ) -> Result<Value, QmpError> {
        self.send(name, arguments, None, deadline, OnExpiry::FailQuery)
            .await
    }

    /// Runs a typed command (`getfd`, `add-fd`) with `fd` passed to QEMU as
    /// `SCM_RIGHTS` ancillary data on the same write, with the default
    /// deadline. The descriptor is duplicated first, so the caller keeps
    /// ownership of `fd` whatever happens.
    pub async fn execute_with_fd<C: qapi::Command>(
        &self,
        command: C,
        fd: BorrowedFd<'_>,
    ) -> Result<C::Ok, QmpError> {
        let fd = fd.try_clone_to_owned().map_err(QmpError::Fd)?;
        let arguments = encode_arguments(&command)?;
        let reply = self
            .call(C::NAME, arguments, Some(fd), DEFAULT_DEADLINE)
            .await?;
        decode_reply::<C>(reply)
    }

    /// A new receiver of the events that arrive from now on. After the
    /// connection has closed, the receiver reports `RecvError::Closed`.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        match self.shared.events.upgrade() {
            Some(sender) => sender.subscribe(),
            None => {
                // The owner task is gone: hand out a receiver that is
                // already closed rather than one that waits forever.
                let (_, receiver) = broadcast::channel(1);
                receiver
            }
        }
    }

    /// Resolves when the connection has ended, with the reason.
    pub async fn closed(&self) -> CloseReason {
        let mut closed = self.shared.closed.clone();
        let reason = match closed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            // The owner task vanished without recording a reason (runtime
            // shutdown); it cannot come back.
            Err(_) => None,
        };
        reason.unwrap_or(CloseReason::Aborted)
    }

    /// Whether the connection has ended; commands then fail at once.
    pub fn is_closed(&self) -> bool {
        self.close_reason().is_some()
    }

    /// Why the connection ended, or `None` while it is open.
    pub fn close_reason(&self) -> Option<CloseReason> {
        if let Some(reason) = self.shared.closed.borrow().clone() {
            return Some(reason);
        }
        self.shared
            .requests
            .is_closed()
            .then_some(CloseReason::Aborted)
    }

    /// The QEMU version announced in the greeting.
    pub fn qemu_version(&self) -> &QemuVersion {
        &self.shared.version
    }

    /// Hands a command to the owner task and waits for its outcome; the
    /// owner task enforces the deadline and always answers or is gone.
    async fn call(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<OwnedFd>,
        deadline: Duration,
    ) -> Result<Value, QmpError> {
        self.send(command, arguments, fd, deadline, OnExpiry::CloseLink)
            .await
    }

    async fn send(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<OwnedFd>,
        deadline: Duration,
        on_expiry: OnExpiry,
    ) -> Result<Value, QmpError> {
        if let Some(reason) = self.close_reason() {
            return Err(QmpError::Closed { reason });
        }
        let (reply, outcome) = oneshot::channel();
        let request = Request {
            command: command.to_owned(),
            arguments,
            fd,
            deadline,
            expires: expiry(deadline),
            on_expiry,
            reply,
        };
        if self.shared.requests.send(request).is_err() {
            return Err(closed_error(&self.shared.closed));
        }
        match outcome.await {
            Ok(result) => result,
            Err(_) => Err(closed_error(&self.shared.closed)),
        }
    }
}

/// The error for a command that meets a closed connection.
fn closed_error(closed: &watch::Receiver<Option<CloseReason>>) -> QmpError {
    let reason = closed.borrow().clone().unwrap_or(CloseReason::Aborted);
    QmpError::Closed { reason }
}

/// When a command with `deadline` issued now expires; deadlines too large
/// for the clock mean "practically never" instead of an overflow panic.
fn expiry(deadline: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(deadline)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// A typed command's `arguments`, left out when empty as people write it.
fn encode_arguments<C: qapi::Command>(command: &C) -> Result<Option<Value>, QmpError> {
    let value = serde_json::to_value(command).map_err(|source| QmpError::Encode {
        command: C::NAME.to_owned(),
        source,
    })?;
    Ok(match value {
        Value::Object(map) if map.is_empty() => None,
        Value::Null => None,
        other => Some(other),
    })
}

fn decode_reply<C: qapi::Command>(reply: Value) -> Result<C::Ok, QmpError> {
    serde_json::from_value(reply).map_err(|source| QmpError::Decode {
        command: C::NAME.to_owned(),
        source,
    })
}

/// What a command's expired deadline means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnExpiry {
    /// QEMU is hung or out of step: the connection closes.
    CloseLink,
    /// A monitoring read: only the read fails.
    FailQuery,
}

/// A command on its way to the owner task.
struct Request {
    command: String,
    arguments: Option<Value>,
    fd: Option<OwnedFd>,
    deadline: Duration,
    expires: Instant,
    on_expiry: OnExpiry,
    reply: oneshot::Sender<Result<Value, QmpError>>,
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
struct Connection {
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
    async fn run(mut self) {
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
