//! Commands in a test guest booted with `guest.action=shell` (busybox `sh -i`
//! on ttyS0), through vmlet's serial console websocket.
//!
//! vmlet is the one client of QEMU's serial socket; a test types into the
//! guest through a `type: serial` console token's websocket, like any user.
//! QEMU appends everything the guest prints to the VM's console log (in its
//! state directory). A command's output is read back from that log, between
//! two unique markers the guest echoes around it: the log has all the output
//! from the start, whoever is connected. What the websocket sends back is
//! read and dropped.
//!
//! Synchronous on purpose: call it from a tokio test directly (it blocks the
//! thread for a few seconds at most) or through `tokio::task::spawn_blocking`.
//!
//! ```ignore
//! let token = serial_token(&d, &id).await;
//! let mut shell = SerialShell::connect(&d.socket, &token, &d.serial_log(uuid));
//! let cmdline = shell.run("cat /proc/cmdline", Duration::from_secs(10));
//! ```
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

/// One try of the readiness round trip in [`SerialShell::connect`].
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the log is re-read while waiting.
const POLL: Duration = Duration::from_millis(20);
/// How much of the log a panic message shows.
const TAIL_BYTES: usize = 4000;

/// A connection to the guest's shell on the serial console.
pub struct SerialShell {
    /// Input for the thread that owns the websocket; dropping it closes
    /// the websocket.
    input: Option<mpsc::Sender<Vec<u8>>>,
    pumping: Option<thread::JoinHandle<()>>,
    log: PathBuf,
    /// Per-connection random part of the markers.
    tag: String,
    /// Commands run so far (numbers the markers).
    count: u64,
}

impl SerialShell {
    /// Opens the serial console websocket on the daemon's API socket
    /// `api_socket` with `token` (a `type: serial` console token), then
    /// waits for the guest's shell: for `GUEST-READY` in `log` (the VM's
    /// console log) and for an `echo` round trip to come back (tried again
    /// every 3 s, since input sent before the shell starts may be lost).
    /// Waits for the boot up to `BOOT_TIMEOUT`; panics with the log's tail
    /// when the shell does not answer by then (is the guest booted with
    /// `guest.action=shell`?).
    pub fn connect(api_socket: &Path, token: &str, log: &Path) -> SerialShell {
        let stream = UnixStream::connect(api_socket).unwrap_or_else(|e| {
            panic!(
                "serial shell: cannot connect to {}: {e}",
                api_socket.display()
            )
        });
        let request = format!("ws://localhost/v1/console?token={token}")
            .into_client_request()
            .expect("a websocket request");
        let (mut socket, response) = tungstenite::client::client(request, stream)
            .unwrap_or_else(|e| panic!("serial shell: opening the console websocket: {e}"));
        assert_eq!(response.status(), 101, "serial shell: no websocket upgrade");
        socket
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("a read timeout on the API socket");
        // One thread owns the websocket: it sends the input and reads (and
        // drops) the output, which the log has too.
        let (input, inputs) = mpsc::channel::<Vec<u8>>();
        let pumping = thread::spawn(move || loop {
            match inputs.try_recv() {
                Ok(bytes) => {
                    if socket.send(Message::Binary(bytes.into())).is_err() {
                        return;
                    }
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    let _ = socket.close(None);
                    let _ = socket.flush();
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            match socket.read() {
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        });
        let mut shell = SerialShell {
            input: Some(input),
            pumping: Some(pumping),
            log: log.to_path_buf(),
            tag: random_tag(),
            count: 0,
        };

        let deadline = Instant::now() + super::BOOT_TIMEOUT;
        while !read_lossy(log).contains("GUEST-READY") {
            if Instant::now() > deadline {
                shell.fail("no GUEST-READY in the serial log (did the guest boot?)");
            }
            thread::sleep(POLL);
        }
        loop {
            if let Some((out, _)) = shell.try_run("echo ready", PROBE_TIMEOUT) {
                if out.trim() == "ready" {
                    return shell;
                }
            }
            if Instant::now() > deadline {
                shell.fail("the guest shell does not answer (is the guest booted with guest.action=shell?)");
            }
        }
    }

    /// Runs `command` in the guest shell and returns its output (stdout and
    /// stderr, `\r\n` turned into `\n`; usually ends with a newline), waiting
    /// up to `timeout`. Panics with the log's tail on timeout.
    ///
    /// `command` goes on one line as `echo BEGIN; COMMAND; echo END`: it must
    /// be one line, and a complete command list that may be followed by `;`
    /// (no trailing `&`: use `(cmd &)` or `cmd & true`). The guest's own
    /// `GUEST-...` lines (e.g. `GUEST-DISK-ADDED`) may show up in the output
    /// as lines of their own when they happen while the command runs.
    pub fn run(&mut self, command: &str, timeout: Duration) -> String {
        self.run_with_status(command, timeout).0
    }

    /// [`run`](Self::run) that also returns the command's exit status (`$?`).
    pub fn run_with_status(&mut self, command: &str, timeout: Duration) -> (String, i32) {
        match self.try_run(command, timeout) {
            Some(result) => result,
            None => self.fail(&format!("no output of {command:?} within {timeout:?}")),
        }
    }

    /// Sends `command` between markers and waits for the end marker in the
    /// log; `None` after `timeout`.
    fn try_run(&mut self, command: &str, timeout: Duration) -> Option<(String, i32)> {
        assert!(
            !command.contains('\n') && !command.contains('\r'),
            "serial shell: the command must be one line: {command:?}"
        );
        self.count += 1;
        let begin = format!("BEGIN-{}-{}", self.count, self.tag);
        let end = format!("END-{}-{}", self.count, self.tag);
        // The shell echoes what it is sent; the empty quotes keep the markers
        // themselves out of that echo, so they appear in the log only as the
        // output of these echo commands.
        let line = format!(
            "echo BEGIN-{n}-''{tag}; {command}; echo END-{n}-''{tag}:$?\n",
            n = self.count,
            tag = self.tag,
        );

        let mut log = File::open(&self.log)
            .unwrap_or_else(|e| panic!("serial shell: cannot open {}: {e}", self.log.display()));
        // Only what comes after this point: the command has not been sent yet.
        log.seek(SeekFrom::End(0)).expect("seeking the serial log");
        self.input
            .as_ref()
            .expect("the websocket is open")
            .send(line.into_bytes())
            .unwrap_or_else(|_| panic!("serial shell: the console websocket closed"));

        let deadline = Instant::now() + timeout;
        let mut text = Vec::new();
        loop {
            log.read_to_end(&mut text).expect("reading the serial log");
            if let Some(result) = parse(&String::from_utf8_lossy(&text), &begin, &end) {
                return Some(result);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    fn fail(&self, what: &str) -> ! {
        let log = read_lossy(&self.log);
        let mut start = log.len().saturating_sub(TAIL_BYTES);
        while !log.is_char_boundary(start) {
            start += 1;
        }
        panic!(
            "serial shell: {what}; the tail of {}:\n{}",
            self.log.display(),
            &log[start..]
        );
    }
}

impl Drop for SerialShell {
    /// Closes the websocket and waits for its thread.
    fn drop(&mut self) {
        self.input.take();
        if let Some(pumping) = self.pumping.take() {
            let _ = pumping.join();
        }
    }
}

/// The output between the line ending in `begin` and the `end` marker in
/// `text` (the log from where the command was sent), and the exit status
/// after `end:`. The markers only occur as the output of their echo commands:
/// `begin` ends its line; `end` starts a line unless the command's output did
/// not end in a newline, and is followed by `:STATUS` and the end of the line.
fn parse(text: &str, begin: &str, end: &str) -> Option<(String, i32)> {
    let text = text.replace("\r\n", "\n");
    let begin_at = text.find(&format!("{begin}\n"))?;
    let body = &text[begin_at + begin.len() + 1..];
    let end_at = body.find(&format!("{end}:"))?;
    let status_line = &body[end_at + end.len() + 1..];
    // Wait for the whole status line.
    let status_end = status_line.find('\n')?;
    let status = status_line[..status_end].trim().parse().unwrap_or(-1);
    Some((body[..end_at].to_string(), status))
}

fn read_lossy(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Eight hex digits that differ from one connection to the next.
fn random_tag() -> String {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:08x}", hasher.finish() as u32)
}
