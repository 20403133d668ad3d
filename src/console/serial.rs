//! The serial console of a running VM.
//!
//! QEMU serves the serial port as a unix socket (one client at a time) and
//! appends everything the guest prints to a log file in the VM's state
//! directory (`logfile=…,logappend=on`), whoever is connected and even while
//! vmlet is down. vmlet is that one socket client: a [`SerialHub`] reads the
//! stream into a 64 KiB history and fans it out to every attached session,
//! and writes sessions' input to the socket. It also keeps the log's size
//! under a cap by rotating it (`console.log` → `console.log.1` → …).
//!
//! QEMU keeps the log open (`O_APPEND`), so rotation cannot rename it.
//! vmlet copies the log's head, whole file-system blocks, to `console.log.1`
//! and cuts exactly those bytes from the front of the file with
//! `fallocate(FALLOC_FL_COLLAPSE_RANGE)`, which the kernel does atomically
//! with QEMU's appends: no byte is lost. On a file system without collapse
//! (tmpfs, …) it falls back to logrotate's `copytruncate`, where bytes QEMU
//! writes between the copy and the truncation are lost from the log (never
//! from the live stream).

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

/// History a new session gets first: the last 64 KiB of output.
pub const HISTORY_BYTES: usize = 64 * 1024;
/// Chunks a slow session may fall behind before it skips ahead.
const FANOUT_CHUNKS: usize = 1024;
/// How long [`SerialHub::open`] waits for QEMU's socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How vmlet's line before each boot in the serial log starts:
/// `--- vmlet: boot N started 2025-01-01T00:00:00Z`.
pub const BOOT_BANNER_PREFIX: &str = "--- vmlet: boot ";

/// The part of `log` from the last boot banner line on (the current boot);
/// all of `log` when it holds no banner (its start was rotated away, or
/// the log predates banners).
pub fn current_boot(log: &[u8]) -> &[u8] {
    let prefix = BOOT_BANNER_PREFIX.as_bytes();
    let mut start = 0;
    let mut line = 0;
    while line < log.len() {
        if log[line..].starts_with(prefix) {
            start = line;
        }
        match log[line..].iter().position(|&b| b == b'\n') {
            Some(end) => line += end + 1,
            None => break,
        }
    }
    &log[start..]
}

/// Where a VM's serial log lives and how big it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialLog {
    /// The current log (`…/console.log`).
    pub path: PathBuf,
    /// Size at which the log is rotated.
    pub max_bytes: u64,
    /// Rotated files kept (`console.log.1` … `console.log.N`); 0 keeps none.
    pub backups: u32,
}

impl SerialLog {
    /// The `n`th rotated file (`n` ≥ 1).
    pub fn backup(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Rotates the log when it has reached `max_bytes`: shifts the backups,
    /// moves the log's head to `.1` and cuts it from the log (see the module
    /// notes). True when it rotated.
    pub fn rotate_if_full(&self) -> std::io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let meta = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let size = meta.len();
        if size < self.max_bytes {
            return Ok(false);
        }
        // Collapse works on whole blocks and must leave at least one byte.
        let block = meta.blksize().max(1);
        let head = (size - 1) / block * block;
        let mut log = OpenOptions::new().read(true).write(true).open(&self.path)?;
        for n in (1..self.backups).rev() {
            match std::fs::rename(self.backup(n), self.backup(n + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        if head > 0 {
            if self.backups > 0 {
                let mut backup = std::fs::File::create(self.backup(1))?;
                std::io::copy(&mut (&log).take(head), &mut backup)?;
            }
            let collapsed = nix::fcntl::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&log),
                nix::fcntl::FallocateFlags::FALLOC_FL_COLLAPSE_RANGE,
                0,
                head as libc::off_t,
            );
            if collapsed.is_ok() {
                return Ok(true);
            }
        }
        // No collapse here: copy what is left and truncate (copytruncate).
        if self.backups > 0 {
            let mut backup = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.backup(1))?;
            if head == 0 {
                backup.set_len(0)?;
            }
            log.seek(SeekFrom::Start(head))?;
            std::io::copy(&mut log, &mut backup)?;
        }
        log.set_len(0)?;
        Ok(true)
    }

    /// The last `n` bytes the guest printed, across the log and its backups
    /// (oldest first). A missing log reads as empty.
    pub fn tail(&self, n: u64) -> std::io::Result<Vec<u8>> {
        let mut pieces = Vec::new();
        let mut wanted = n;
        let files =
            std::iter::once(self.path.clone()).chain((1..=self.backups).map(|i| self.backup(i)));
        for file in files {
            if wanted == 0 {
                break;
            }
            let mut f = match std::fs::File::open(&file) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(e),
            };
            let len = f.metadata()?.len();
            let take = len.min(wanted);
            f.seek(SeekFrom::Start(len - take))?;
            let mut piece = Vec::with_capacity(take as usize);
            f.take(take).read_to_end(&mut piece)?;
            wanted -= piece.len() as u64;
            pieces.push(piece);
        }
        pieces.reverse();
        Ok(pieces.concat())
    }

    /// The last `n` bytes of the current boot's part of the log (from its
    /// boot banner on), looking for the banner in at most the last
    /// `search` bytes.
    pub fn current_boot_tail(&self, n: u64, search: u64) -> std::io::Result<Vec<u8>> {
        let all = self.tail(search.max(n))?;
        let boot = current_boot(&all);
        let keep = boot.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        Ok(boot[boot.len() - keep..].to_vec())
    }

    /// When the log last grew (its modification time); `None` without a
    /// log.
    pub fn last_growth(&self) -> Option<std::time::SystemTime> {
        std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
    }

    /// Removes the log and its backups (the VM is being deleted).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
        for n in 1..=self.backups {
            let _ = std::fs::remove_file(self.backup(n));
        }
    }
}

struct Shared {
    history: VecDeque<u8>,
    /// `None` once the console has closed (QEMU exited or vmlet let go).
    output: Option<broadcast::Sender<Bytes>>,
}

/// One VM's serial console while its QEMU runs: history, live output to any
/// number of sessions, and input from them.
pub struct SerialHub {
    shared: Arc<Mutex<Shared>>,
    input: mpsc::Sender<Bytes>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for SerialHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialHub")
            .field("open", &self.is_open())
            .finish()
    }
}

/// What a session gets when it attaches.
#[derive(Debug)]
pub struct Attached {
    /// Up to the last 64 KiB of output, oldest first.
    pub history: Vec<u8>,
    /// Output from now on; ends (`Closed`) when the console closes.
    pub live: broadcast::Receiver<Bytes>,
}

/// The console has closed: QEMU exited or vmlet let go of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the serial console is closed (the VM is not running)")]
pub struct Closed;

impl SerialHub {
    /// Connects to QEMU's serial socket (retrying while it is not there
    /// yet) and starts reading. The history starts with the log's tail, so
    /// a session sees what the guest printed before vmlet (re)connected.
    pub async fn open(socket: &Path, log: SerialLog) -> std::io::Result<Arc<SerialHub>> {
        let stream = connect(socket).await?;
        if let Err(e) = log.rotate_if_full() {
            tracing::warn!(log = %log.path.display(), error = %e, "rotating the serial log");
        }
        let seed = log.tail(HISTORY_BYTES as u64).unwrap_or_default();
        let (output, _) = broadcast::channel(FANOUT_CHUNKS);
        let shared = Arc::new(Mutex::new(Shared {
            history: seed.into_iter().collect(),
            output: Some(output),
        }));
        let (reader, mut writer) = stream.into_split();
        let (input, mut inputs) = mpsc::channel::<Bytes>(64);
        let reading = tokio::spawn(read_loop(reader, shared.clone(), log));
        let writing = tokio::spawn(async move {
            while let Some(bytes) = inputs.recv().await {
                if writer.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        });
        Ok(Arc::new(SerialHub {
            shared,
            input,
            tasks: vec![reading, writing],
        }))
    }

    /// Attaches a session: the history so far and the output after it, with
    /// nothing lost or repeated in between.
    pub fn attach(&self) -> Result<Attached, Closed> {
        let shared = self.shared.lock().expect("serial hub lock");
        let output = shared.output.as_ref().ok_or(Closed)?;
        Ok(Attached {
            history: shared.history.iter().copied().collect(),
            live: output.subscribe(),
        })
    }

    /// Sends input to the guest's serial port.
    pub async fn send(&self, bytes: Bytes) -> Result<(), Closed> {
        if !self.is_open() {
            return Err(Closed);
        }
        self.input.send(bytes).await.map_err(|_| Closed)
    }

    /// Whether the console still runs.
    pub fn is_open(&self) -> bool {
        self.shared
            .lock()
            .expect("serial hub lock")
            .output
            .is_some()
    }

    /// Closes the console: every session's stream ends.
    pub fn close(&self) {
        self.shared.lock().expect("serial hub lock").output = None;
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for SerialHub {
    fn drop(&mut self) {
        self.close();
    }
}

async fn connect(socket: &Path) -> std::io::Result<UnixStream> {
    let started = std::time::Instant::now();
    loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && started.elapsed() < CONNECT_TIMEOUT =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Bytes read between two checks of the log's size.
fn check_every(log: &SerialLog) -> u64 {
    (log.max_bytes / 16).clamp(1, 64 * 1024)
}

async fn read_loop(
    mut reader: tokio::net::unix::OwnedReadHalf,
    shared: Arc<Mutex<Shared>>,
    log: SerialLog,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut since_check = 0u64;
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut shared = shared.lock().expect("serial hub lock");
            let kept = shared.history.len();
            let overflow = (kept + n).saturating_sub(HISTORY_BYTES);
            shared.history.drain(..overflow.min(kept));
            let start = n.saturating_sub(HISTORY_BYTES);
            shared.history.extend(&buf[start..n]);
            match &shared.output {
                // No receivers is fine: nobody is attached.
                Some(output) => drop(output.send(Bytes::copy_from_slice(&buf[..n]))),
                None => break,
            }
        }
        since_check += n as u64;
        if since_check >= check_every(&log) {
            since_check = 0;
            let log = log.clone();
            let rotated = tokio::task::spawn_blocking(move || log.rotate_if_full()).await;
            if let Ok(Err(e)) = rotated {
                tracing::warn!(error = %e, "rotating the serial log");
            }
        }
    }
    shared.lock().expect("serial hub lock").output = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_boot_starts_at_the_last_banner_line() {
        let log = b"old\n--- vmlet: boot 1 started X\none\n--- vmlet: boot 2 started Y\ntwo\n";
        assert_eq!(current_boot(log), b"--- vmlet: boot 2 started Y\ntwo\n");
        // Only at the start of a line: a guest echoing it mid-line is not one.
        let log = b"--- vmlet: boot 1 started X\nsays --- vmlet: boot 9\n";
        assert_eq!(current_boot(log), &log[..]);
        // No banner at all: everything.
        assert_eq!(current_boot(b"plain\nlog"), b"plain\nlog");
        assert_eq!(current_boot(b""), b"");
        // A banner as the very last, unfinished line.
        assert_eq!(current_boot(b"a\n--- vmlet: boot 3"), b"--- vmlet: boot 3");
    }

    #[test]
    fn the_current_boot_tail_spans_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_in(dir.path(), 1 << 20, 2);
        std::fs::write(
            log.backup(1),
            b"--- vmlet: boot 1 started X\nfirst\n--- vmlet: boot 2 started Y\nsec",
        )
        .unwrap();
        std::fs::write(&log.path, b"ond\nmore\n").unwrap();
        let all = log.current_boot_tail(1 << 20, 1 << 20).unwrap();
        assert_eq!(all, b"--- vmlet: boot 2 started Y\nsecond\nmore\n");
        assert_eq!(log.current_boot_tail(5, 1 << 20).unwrap(), b"more\n");
    }

    fn log_in(dir: &Path, max_bytes: u64, backups: u32) -> SerialLog {
        SerialLog {
            path: dir.join("console.log"),
            max_bytes,
            backups,
        }
    }

    #[test]
    fn rotation_keeps_the_newest_backups() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_in(dir.path(), 10, 2);
        for round in ["aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc", "dd"] {
            std::fs::write(&log.path, round).unwrap();
            log.rotate_if_full().unwrap();
        }
        assert_eq!(std::fs::read(&log.path).unwrap(), b"dd");
        assert_eq!(std::fs::read(log.backup(1)).unwrap(), b"cccccccccc");
        assert_eq!(std::fs::read(log.backup(2)).unwrap(), b"bbbbbbbbbb");
        assert!(!log.backup(3).exists());
        assert_eq!(log.tail(5).unwrap(), b"cccdd");
        assert_eq!(log.tail(100).unwrap(), b"bbbbbbbbbbccccccccccdd");
    }

    #[test]
    fn rotation_keeps_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_in(dir.path(), 8192, 1);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&log.path, &data).unwrap();
        assert!(log.rotate_if_full().unwrap());
        let kept = std::fs::read(&log.path).unwrap();
        // With collapse (ext4, xfs) whole blocks moved and the rest stayed;
        // without it, everything moved.
        assert!(kept.len() < 8192, "{} bytes left", kept.len());
        let mut both = std::fs::read(log.backup(1)).unwrap();
        both.extend_from_slice(&kept);
        assert_eq!(both, data);
        assert_eq!(log.tail(10_000).unwrap(), data);
    }

    #[test]
    fn without_backups_rotation_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_in(dir.path(), 4, 0);
        std::fs::write(&log.path, "12345").unwrap();
        assert!(log.rotate_if_full().unwrap());
        assert_eq!(std::fs::read(&log.path).unwrap(), b"");
        assert!(!log.backup(1).exists());
    }

    #[test]
    fn tail_of_a_missing_log_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_in(dir.path(), 4, 3);
        assert_eq!(log.tail(10).unwrap(), b"");
        assert!(!log.rotate_if_full().unwrap());
    }

    #[tokio::test]
    async fn sessions_get_history_then_live_output_and_input_reaches_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("serial.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let log = log_in(dir.path(), 1 << 20, 1);
        std::fs::write(&log.path, "before\n").unwrap();
        let hub_task = tokio::spawn({
            let socket = socket.clone();
            async move { SerialHub::open(&socket, log).await.unwrap() }
        });
        let (mut qemu, _) = listener.accept().await.unwrap();
        let hub = hub_task.await.unwrap();

        let mut first = hub.attach().unwrap();
        assert_eq!(first.history, b"before\n");
        qemu.write_all(b"live\n").await.unwrap();
        assert_eq!(&first.live.recv().await.unwrap()[..], b"live\n");
        // A second session sees everything so far as history.
        let second = hub.attach().unwrap();
        assert_eq!(second.history, b"before\nlive\n");

        hub.send(Bytes::from_static(b"typed")).await.unwrap();
        let mut got = [0u8; 5];
        qemu.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"typed");

        // QEMU goes away: sessions' streams end, new ones are refused.
        drop(qemu);
        assert!(matches!(
            first.live.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        assert!(hub.attach().is_err());
    }

    #[tokio::test]
    async fn history_keeps_only_the_last_64_kib() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("serial.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let log = log_in(dir.path(), 1 << 30, 0);
        let hub_task = tokio::spawn({
            let socket = socket.clone();
            async move { SerialHub::open(&socket, log).await.unwrap() }
        });
        let (mut qemu, _) = listener.accept().await.unwrap();
        let hub = hub_task.await.unwrap();
        let mut watcher = hub.attach().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        qemu.write_all(&data).await.unwrap();
        let mut seen = 0;
        while seen < data.len() {
            seen += watcher.live.recv().await.unwrap().len();
        }
        let history = hub.attach().unwrap().history;
        assert_eq!(history.len(), HISTORY_BYTES);
        assert_eq!(history, data[data.len() - HISTORY_BYTES..]);
    }
}
