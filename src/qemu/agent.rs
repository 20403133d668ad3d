//! A client for the QEMU guest agent (`qemu-ga`) inside a guest, reached
//! through the VM's `org.qemu.guest_agent.0` virtio-serial port, whose
//! socket vmlet binds and keeps for itself (`RunPaths::agent_socket`).
//!
//! The agent speaks QMP-like JSON, one object per line, without a greeting.
//! Every exchange opens a session: connect, then the
//! `guest-sync-delimited` handshake, because the port may hold answers of
//! an earlier session the agent wrote after vmlet had stopped reading
//! (the agent puts a `0xFF` byte before its answer to the handshake, and
//! vmlet discards everything up to the answer carrying its own id).
//!
//! QEMU's socket takes one client at a time, so sessions of one VM are
//! serialised; and every operation has a deadline covering the wait for
//! that turn, the connect and every answer: a guest without an agent, or
//! with a hung one, costs its caller that deadline and nothing else.
//!
//! The guest is not trusted: answers are bounded in size, and what vmlet
//! keeps of them (names, addresses) is bounded in count and length and
//! stripped of control characters.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest answer line vmlet reads from an agent.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// Most interfaces vmlet keeps of a guest's answer.
pub const MAX_INTERFACES: usize = 64;
/// Most addresses vmlet keeps per interface.
pub const MAX_ADDRESSES: usize = 64;
/// Longest string (name, OS field, address) vmlet keeps, in characters.
pub const MAX_STRING_CHARS: usize = 256;
/// The byte the agent writes before its answer to `guest-sync-delimited`,
/// and that vmlet sends first so the agent drops any half-read request.
const DELIMITER: u8 = 0xFF;

/// Why talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The port's socket could not be reached (QEMU gone).
    #[error("connecting to the guest agent's socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("talking to the guest agent")]
    Io(#[source] std::io::Error),
    /// No answer within the deadline: no agent runs in the guest, or it hangs.
    #[error("the guest agent did not answer {what} within {after:?}")]
    Timeout {
        /// What vmlet was waiting for.
        what: String,
        /// The deadline.
        after: Duration,
    },
    /// The socket closed (QEMU exited).
    #[error("the guest agent's socket closed")]
    Closed,
    /// The agent answered something that is not its protocol.
    #[error("the guest agent's answer is not understood: {0}")]
    Protocol(String),
    /// The agent refused or failed the command.
    #[error("the guest agent failed {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// Its description.
        desc: String,
    },
}

/// What the guest agent tells of the guest, as `GET /v1/vms/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GuestInfo {
    /// The guest's hostname (`guest-get-host-name`).
    #[serde(default)]
    pub hostname: Option<String>,
    /// The guest's operating system (`guest-get-osinfo`); `null` when the
    /// agent does not tell.
    #[serde(default)]
    pub os: Option<GuestOs>,
    /// The guest's network interfaces (`guest-network-get-interfaces`).
    #[serde(default)]
    pub interfaces: Vec<GuestInterface>,
    /// When vmlet read this from the agent (RFC 3339, UTC).
    pub read_at: String,
}

/// The guest's operating system, as its agent reports it (on Linux, from
/// `/etc/os-release` and `uname`). Every field may be missing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GuestOs {
    /// `ID` (`debian`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `NAME` (`Debian GNU/Linux`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `PRETTY_NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretty_name: Option<String>,
    /// `VERSION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `VERSION_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// The kernel release (`uname -r`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
    /// The kernel version (`uname -v`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    /// The machine (`uname -m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
}

/// One network interface of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GuestInterface {
    /// The guest's name for it (`eth0`).
    pub name: String,
    /// Its MAC address, when it has one.
    #[serde(default)]
    pub mac: Option<String>,
    /// Its addresses, `ADDRESS/PREFIX`.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// vmlet's link to one VM's guest agent.
#[derive(Debug)]
pub struct GuestAgent {
    path: PathBuf,
    /// One session at a time: QEMU's socket serves one client.
    turn: Arc<tokio::sync::Mutex<()>>,
    next_id: AtomicU64,
}

/// A connected, synchronised exchange with the agent.
struct Session {
    stream: BufReader<UnixStream>,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl GuestAgent {
    /// The agent behind the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> GuestAgent {
        // Ids start from the clock, so that a session never takes an
        // answer of an earlier vmlet process for its own.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 & 0x000F_FFFF_FFFF_FFFF);
        GuestAgent {
            path: path.into(),
            turn: Arc::new(tokio::sync::Mutex::new(())),
            next_id: AtomicU64::new(seed.max(1)),
        }
    }

    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the agent answers the handshake within `deadline`.
    pub async fn ping(&self, deadline: Duration) -> Result<(), AgentError> {
        self.within(deadline, "the handshake", async {
            self.session().await.map(drop)
        })
        .await
    }

    /// Reads the guest's hostname, OS and interfaces, all within `deadline`.
    /// An agent without `guest-get-osinfo` (older agents) gives `os: null`.
    pub async fn info(&self, deadline: Duration) -> Result<GuestInfo, AgentError> {
        self.within(deadline, "guest-get-host-name/osinfo/network", async {
            let mut session = self.session().await?;
            let hostname = session.call("guest-get-host-name", None).await?;
            let os = match session.call("guest-get-osinfo", None).await {
                Ok(os) => Some(parse_os(&os)),
                Err(AgentError::Command { .. }) => None,
                Err(e) => return Err(e),
            };
            let interfaces = session.call("guest-network-get-interfaces", None).await?;
            Ok(GuestInfo {
                hostname: hostname.get("host-name").and_then(Value::as_str).map(clean),
                os,
                interfaces: parse_interfaces(&interfaces),
                read_at: crate::persist::timestamp(std::time::SystemTime::now()),
            })
        })
        .await
    }

    /// Asks the guest to power off (`guest-shutdown`, mode `powerdown`).
    /// The agent does not answer a shutdown it carries out, so this returns
    /// once the request was sent and the agent, given `deadline`, did not
    /// answer with an error.
    pub async fn shutdown(&self, deadline: Duration) -> Result<(), AgentError> {
        self.guest_shutdown("powerdown", deadline).await
    }

    /// Asks the guest to reboot (`guest-shutdown`, mode `reboot`), as
    /// [`GuestAgent::shutdown`] asks it to power off.
    pub async fn reboot(&self, deadline: Duration) -> Result<(), AgentError> {
        self.guest_shutdown("reboot", deadline).await
    }

    /// `guest-shutdown` with `mode`; see [`GuestAgent::shutdown`].
    async fn guest_shutdown(&self, mode: &str, deadline: Duration) -> Result<(), AgentError> {
        let reply_wait = deadline / 2;
        let sent = self
            .within(deadline, "the handshake before guest-shutdown", async {
                let mut session = self.session().await?;
                session
                    .send("guest-shutdown", Some(serde_json::json!({ "mode": mode })))
                    .await?;
                Ok(session)
            })
            .await?;
        let mut session = sent;
        match tokio::time::timeout(reply_wait, session.answer("guest-shutdown")).await {
            // No answer: the agent is shutting the guest down.
            Err(_) | Ok(Err(AgentError::Closed)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Freezes the guest's filesystems (`guest-fsfreeze-freeze`): the number
    /// frozen. The caller must [`GuestAgent::thaw`] whatever happens next.
    pub async fn freeze(&self, deadline: Duration) -> Result<u64, AgentError> {
        self.within(deadline, "guest-fsfreeze-freeze", async {
            let mut session = self.session().await?;
            let frozen = session.call("guest-fsfreeze-freeze", None).await?;
            frozen
                .as_u64()
                .ok_or_else(|| AgentError::Protocol(format!("freeze answered {frozen}")))
        })
        .await
    }

    /// Thaws the guest's filesystems (`guest-fsfreeze-thaw`): the number
    /// thawed.
    pub async fn thaw(&self, deadline: Duration) -> Result<u64, AgentError> {
        self.within(deadline, "guest-fsfreeze-thaw", async {
            let mut session = self.session().await?;
            let thawed = session.call("guest-fsfreeze-thaw", None).await?;
            thawed
                .as_u64()
                .ok_or_else(|| AgentError::Protocol(format!("thaw answered {thawed}")))
        })
        .await
    }

    async fn within<T>(
        &self,
        deadline: Duration,
        what: &str,
        work: impl std::future::Future<Output = Result<T, AgentError>>,
    ) -> Result<T, AgentError> {
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| AgentError::Timeout {
                what: what.to_string(),
                after: deadline,
            })?
    }

    /// Waits for the turn, connects and synchronises. Callers bound it with
    /// their deadline.
    async fn session(&self) -> Result<Session, AgentError> {
        let turn = self.turn.clone().lock_owned().await;
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|source| AgentError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
        let mut session = Session {
            stream: BufReader::new(stream),
            _turn: turn,
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // The leading 0xFF makes the agent drop a half-received request.
        let mut request = vec![DELIMITER];
        request.extend_from_slice(
            serde_json::json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        request.push(b'\n');
        session
            .stream
            .get_mut()
            .write_all(&request)
            .await
            .map_err(AgentError::Io)?;
        loop {
            session.skip_to_delimiter().await?;
            let line = session.line().await?;
            // An answer to an earlier session's handshake: keep looking.
            if let Ok(answer) = serde_json::from_slice::<Value>(&line) {
                if answer.get("return").and_then(Value::as_u64) == Some(id) {
                    return Ok(session);
                }
            }
        }
    }
}

impl Session {
    async fn call(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, AgentError> {
        self.send(command, arguments).await?;
        self.answer(command).await
    }

    async fn send(&mut self, command: &str, arguments: Option<Value>) -> Result<(), AgentError> {
        let mut request = serde_json::json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        self.stream
            .get_mut()
            .write_all(&bytes)
            .await
            .map_err(AgentError::Io)
    }

    /// The next answer: its `return`, or the agent's error.
    async fn answer(&mut self, command: &str) -> Result<Value, AgentError> {
        loop {
            let line = self.line().await?;
            // A stray delimiter before the JSON (none is expected after
            // the handshake, but it is not JSON either).
            let text = trim_line(&line);
            if text.is_empty() {
                continue;
            }
            let answer: Value = serde_json::from_slice(text)
                .map_err(|e| AgentError::Protocol(format!("{command}: {e}")))?;
            if let Some(value) = answer.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = answer.get("error") {
                let field = |k: &str| {
                    error
                        .get(k)
                        .and_then(Value::as_str)
                        .map(clean)
                        .unwrap_or_default()
                };
                return Err(AgentError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(AgentError::Protocol(format!(
                "{command}: neither return nor error in the answer"
            )));
        }
    }

    /// Discards input up to and including the next 0xFF.
    async fn skip_to_delimiter(&mut self) -> Result<(), AgentError> {
        loop {
            let available = self.stream.fill_buf().await.map_err(AgentError::Io)?;
            if available.is_empty() {
                return Err(AgentError::Closed);
            }
            match available.iter().position(|&b| b == DELIMITER) {
                Some(at) => {
                    self.stream.consume(at + 1);
                    return Ok(());
                }
                None => {
                    let n = available.len();
                    self.stream.consume(n);
                }
            }
        }
    }

    /// One line, without its newline, at most [`MAX_ANSWER_BYTES`].
    async fn line(&mut self) -> Result<Vec<u8>, AgentError> {
        let mut line = Vec::new();
        let limit = (MAX_ANSWER_BYTES + 1) as u64;
        let read = (&mut self.stream)
            .take(limit)
            .read_until(b'\n', &mut line)
            .await
            .map_err(AgentError::Io)?;
        if read == 0 {
            return Err(AgentError::Closed);
        }
        if line.last() != Some(&b'\n') {
            if line.len() > MAX_ANSWER_BYTES {
                return Err(AgentError::Protocol(format!(
                    "an answer longer than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            return Err(AgentError::Closed);
        }
        line.pop();
        Ok(line)
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    let start = line
        .iter()
        .position(|b| !b.is_ascii_whitespace() && *b != DELIMITER)
        .unwrap_or(line.len());
    &line[start..]
}

/// A string from the guest as vmlet keeps it: no control characters, at
/// most [`MAX_STRING_CHARS`] characters.
fn clean(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_STRING_CHARS)
        .collect()
}

fn string_field(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(clean)
}

fn parse_os(value: &Value) -> GuestOs {
    GuestOs {
        id: string_field(value, "id"),
        name: string_field(value, "name"),
        pretty_name: string_field(value, "pretty-name"),
        version: string_field(value, "version"),
        version_id: string_field(value, "version-id"),
        kernel_release: string_field(value, "kernel-release"),
        kernel_version: string_field(value, "kernel-version"),
        machine: string_field(value, "machine"),
    }
}

fn parse_interfaces(value: &Value) -> Vec<GuestInterface> {
    let Some(list) = value.as_array() else {
        return vec![];
    };
    list.iter()
        .filter_map(|iface| {
            let name = string_field(iface, "name")?;
            let addresses = iface
                .get("ip-addresses")
                .and_then(Value::as_array)
                .map(|addresses| {
                    addresses
                        .iter()
                        .filter_map(|a| {
                            let ip: std::net::IpAddr =
                                a.get("ip-address")?.as_str()?.parse().ok()?;
                            let prefix = a.get("prefix").and_then(Value::as_u64);
                            let max = if ip.is_ipv4() { 32 } else { 128 };
                            Some(match prefix {
                                Some(p) if p <= max => format!("{ip}/{p}"),
                                _ => ip.to_string(),
                            })
                        })
                        .take(MAX_ADDRESSES)
                        .collect()
                })
                .unwrap_or_default();
            Some(GuestInterface {
                name,
                mac: string_field(iface, "hardware-address"),
                addresses,
            })
        })
        .take(MAX_INTERFACES)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixListener;

    /// A scripted agent on a real unix socket: for each connection, it
    /// reads requests line by line (after dropping a leading 0xFF) and
    /// writes what `reply` makes of them (`None`: say nothing).
    fn fake_agent(
        reply: impl Fn(&Value) -> Option<Vec<u8>> + Send + 'static,
        preamble: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let mut writer = conn.try_clone().unwrap();
                writer.write_all(preamble).unwrap();
                let mut reader = std::io::BufReader::new(conn);
                let mut line = Vec::new();
                while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                    let request: Value = serde_json::from_slice(trim_line(&line)).unwrap();
                    line.clear();
                    if let Some(out) = reply(&request) {
                        if writer.write_all(&out).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        (dir, path)
    }

    fn answer(request: &Value) -> Option<Vec<u8>> {
        let command = request["execute"].as_str().unwrap();
        let value = match command {
            "guest-sync-delimited" => {
                let mut out = vec![DELIMITER];
                out.extend(
                    format!("{{\"return\": {}}}\n", request["arguments"]["id"]).into_bytes(),
                );
                return Some(out);
            }
            "guest-get-host-name" => serde_json::json!({"host-name": "web\u{1b}[31m-1"}),
            "guest-get-osinfo" => {
                serde_json::json!({"id": "debian", "version-id": "12", "kernel-release": "6.1.0"})
            }
            "guest-network-get-interfaces" => serde_json::json!([
                {"name": "lo", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
                {"name": "eth0", "hardware-address": "52:54:00:12:34:56", "ip-addresses": [
                    {"ip-address-type": "ipv4", "ip-address": "10.0.0.2", "prefix": 24},
                    {"ip-address-type": "ipv6", "ip-address": "not an address", "prefix": 64},
                    {"ip-address-type": "ipv6", "ip-address": "fe80::1", "prefix": 999}]},
                {"hardware-address": "nameless"}
            ]),
            "guest-fsfreeze-freeze" => serde_json::json!(2),
            "guest-fsfreeze-thaw" => {
                return Some(
                    b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"not frozen\"}}\n"
                        .to_vec(),
                )
            }
            "guest-shutdown" => return None,
            other => panic!("unexpected {other}"),
        };
        Some(format!("{}\n", serde_json::json!({ "return": value })).into_bytes())
    }

    #[tokio::test]
    async fn info_survives_stale_answers_and_cleans_what_the_guest_says() {
        // Stale output of an earlier session, including an old handshake
        // answer, precedes the real one.
        let (_dir, path) = fake_agent(answer, b"{\"return\": 7}\n\xff{\"return\": 1}\n garbage");
        let agent = GuestAgent::new(&path);
        let info = agent.info(Duration::from_secs(5)).await.unwrap();
        assert_eq!(info.hostname.as_deref(), Some("web[31m-1"));
        let os = info.os.unwrap();
        assert_eq!(os.id.as_deref(), Some("debian"));
        assert_eq!(os.version_id.as_deref(), Some("12"));
        assert_eq!(os.name, None);
        assert_eq!(info.interfaces.len(), 2, "{:?}", info.interfaces);
        let eth0 = &info.interfaces[1];
        assert_eq!(eth0.mac.as_deref(), Some("52:54:00:12:34:56"));
        assert_eq!(eth0.addresses, ["10.0.0.2/24", "fe80::1"]);
        // A second session on the same agent works too.
        assert_eq!(agent.freeze(Duration::from_secs(5)).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn agent_errors_are_reported_with_their_class() {
        let (_dir, path) = fake_agent(answer, b"");
        let agent = GuestAgent::new(&path);
        match agent.thaw(Duration::from_secs(5)).await {
            Err(AgentError::Command { class, desc, .. }) => {
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "not frozen");
            }
            other => panic!("{other:?}"),
        }
        // No answer to guest-shutdown means it is being carried out.
        agent.shutdown(Duration::from_millis(400)).await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_agent_costs_its_deadline_and_no_more() {
        let (_dir, path) = fake_agent(|_| None, b"");
        let agent = Arc::new(GuestAgent::new(&path));
        let started = std::time::Instant::now();
        let err = agent.info(Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(err, AgentError::Timeout { .. }), "{err:?}");
        // A second caller waiting for its turn is bounded by its own
        // deadline too.
        let (a, b) = tokio::join!(
            agent.ping(Duration::from_millis(300)),
            agent.ping(Duration::from_millis(300))
        );
        assert!(a.is_err() && b.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn an_overlong_answer_is_refused() {
        let (_dir, path) = fake_agent(
            |request| {
                if request["execute"] == "guest-sync-delimited" {
                    return answer(request);
                }
                let mut out = vec![b'"'; MAX_ANSWER_BYTES + 10];
                out.push(b'\n');
                Some(out)
            },
            b"",
        );
        let agent = GuestAgent::new(&path);
        let err = agent.info(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, AgentError::Protocol(_)), "{err:?}");
    }

    #[tokio::test]
    async fn no_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let agent = GuestAgent::new(dir.path().join("none.sock"));
        let err = agent.ping(Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, AgentError::Connect { .. }), "{err:?}");
    }
}
