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
//! This file holds the handles' side: the errors, events and the client
//! that sends commands. `connection.rs` is the owner task: framing, fd
//! passing, per-command deadlines, the event stream, EOF as "QEMU exited".

use std::fmt;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::debug;

mod connection;

use connection::{Connection, OnExpiry, Request};

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
        let connection = Connection::new(
            path.display().to_string(),
            stream,
            requests_rx,
            events_tx,
            closed_tx,
            greeting_tx,
        );
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
