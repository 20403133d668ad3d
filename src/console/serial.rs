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
/// `--- vmlet: boot N started 2025-01-01T00:00:00Z #TOKEN`.
pub const BOOT_BANNER_PREFIX: &str = "--- vmlet: boot ";

/// The part of `log` from the last boot banner line on (the current boot);
/// all of `log` when it holds no banner (its start was rotated away, or
/// the log predates banners).
///
/// Any line starting with [`BOOT_BANNER_PREFIX`] counts, so the guest can
/// print one: where vmlet recorded the current boot's own banner (see
/// [`SerialLog::record_boot`]), [`current_boot_of`] is the one to use.
pub fn current_boot(log: &[u8]) -> &[u8] {
    last_line_from(log, |line| line.starts_with(BOOT_BANNER_PREFIX.as_bytes()))
}

/// The part of `log` from the last line that is exactly `banner` on (the
/// current boot, whose banner holds a random token the guest never sees,
/// so it cannot print it); all of `log` when the banner is not in it (the
/// part was rotated away).
pub fn current_boot_of<'a>(log: &'a [u8], banner: &[u8]) -> &'a [u8] {
    last_line_from(log, |line| {
        line.strip_prefix(banner)
            .is_some_and(|rest| rest.is_empty() || rest == b"\n")
    })
}

/// `log` from the start of its last line `matches` accepts (a line with its
/// `\n`, or the unfinished last one); all of it when none does.
fn last_line_from(log: &[u8], matches: impl Fn(&[u8]) -> bool) -> &[u8] {
    let mut start = 0;
    let mut line = 0;
    while line < log.len() {
        let end = log[line..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(log.len(), |e| line + e + 1);
        if matches(&log[line..end]) {
            start = line;
        }
        line = end;
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

    /// Where vmlet keeps the current boot's banner line (next to the log:
    /// `console.log.boot`), for [`SerialLog::current_boot_tail`].
    pub fn boot_file(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".boot");
        PathBuf::from(name)
    }

    /// Records `banner` as the current boot's banner line (written before
    /// the banner goes into the log), replacing the last boot's. Renamed
    /// into place but not synced: it names a boot of a QEMU that a crash of
    /// the host ends anyway, and a file lost or left empty by one reads as
    /// "no banner recorded", which the log's readers already handle.
    pub fn record_boot(&self, banner: &str) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = self.boot_file();
        let mut tmp = file.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        std::io::Write::write_all(&mut out, banner.trim_end_matches('\n').as_bytes())?;
        std::fs::rename(&tmp, &file)
    }

    /// The current boot's banner as [`SerialLog::record_boot`] recorded
    /// it; `None` when none was (a log of an older vmlet).
    fn recorded_boot(&self) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.boot_file()) {
            Ok(banner) if !banner.is_empty() => Ok(Some(banner)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The last `n` bytes of the current boot's part of the log (from its
    /// boot banner on), looking for the banner in at most the last
    /// `search` bytes. The banner is the one vmlet recorded, so a guest
    /// printing a line like it does not move the start; without a record,
    /// any banner-like line counts.
    pub fn current_boot_tail(&self, n: u64, search: u64) -> std::io::Result<Vec<u8>> {
        let all = self.tail(search.max(n))?;
        let boot = match self.recorded_boot()? {
            Some(banner) => current_boot_of(&all, &banner),
            None => current_boot(&all),
        };
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
        let _ = std::fs::remove_file(self.boot_file());
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
    fn a_banner_the_guest_printed_does_not_start_a_boot() {
        let real = b"--- vmlet: boot 2 started Y #0123456789abcdef";
        let log = b"--- vmlet: boot 1 started X #aaaa\none\n--- vmlet: boot 2 started Y #0123456789abcdef\ntwo\n--- vmlet: boot 3 started Z\nthree\n--- vmlet: boot 2 started Y #0123456789abcdef-not\n";
        let boot = current_boot_of(log, real);
        assert!(boot.starts_with(real), "{}", String::from_utf8_lossy(boot));
        assert!(boot.ends_with(b"-not\n"));
        // The prefix rule alone is fooled; the recorded banner is not.
        assert!(current_boot(log).starts_with(b"--- vmlet: boot 2 started Y #0123456789abcdef-not"));
        // Rotated away: all of it.
        assert_eq!(current_boot_of(b"x\ny\n", real), b"x\ny\n");
        // The banner as the unfinished last line.
        assert_eq!(
            current_boot_of(b"x\n--- vmlet: boot 2 started Y #0123456789abcdef", real),
            real
        );
    }

    #[test]
    fn the_current_boot_tail_uses_the_recorded_banner() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_in(dir.path(), 1 << 20, 1);
        std::fs::write(
            &log.path,
            b"--- vmlet: boot 1 started X #1111\nup\n--- vmlet: boot 2 started X #2222\nfake\n",
        )
        .unwrap();
        // No record (an older vmlet's log): the last banner-like line.
        assert_eq!(
            log.current_boot_tail(1000, 1000).unwrap(),
            b"--- vmlet: boot 2 started X #2222\nfake\n"
        );
        log.record_boot("--- vmlet: boot 1 started X #1111\n")
            .unwrap();
        assert_eq!(
            log.current_boot_tail(1000, 1000).unwrap(),
            b"--- vmlet: boot 1 started X #1111\nup\n--- vmlet: boot 2 started X #2222\nfake\n"
        );
        log.remove();
        assert!(!log.boot_file().exists());
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
