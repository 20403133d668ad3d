//! The byte streams of a migration. QEMU only ever sees unix sockets in its
//! own run directory; vmlet joins each to an upgraded connection on the
//! other daemon's authenticated API, so no QEMU port is open on the network.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};

use crate::qemu::argv::{RunPaths, JAIL_RUN, MAX_SOCKET_PATH};

/// The `Upgrade` protocol of migration streams between daemons.
pub const PROTOCOL: &str = crate::client::STREAM_PROTOCOL;

/// The memory stream's socket file name (in QEMU's run directory).
pub const MEMORY_SOCKET: &str = "mig-memory.sock";
/// The target QEMU's NBD server socket file name.
pub const NBD_SOCKET: &str = "mig-nbd.sock";

/// The socket file name of disk copy `index` on the source.
pub fn disk_socket(index: usize) -> String {
    format!("mig-disk{index}.sock")
}

/// Where QEMU's own run directory is, on the host and as QEMU sees it.
#[derive(Debug, Clone)]
pub struct QemuDir {
    /// The host path.
    pub host: PathBuf,
    /// The path QEMU uses: `/run` in its jail, else the host path.
    pub inside: PathBuf,
    /// QEMU's uid (sockets vmlet binds are given to it).
    pub uid: Option<u32>,
}

impl QemuDir {
    /// QEMU `pid`'s run directory (`paths`): inside a jail when its root is
    /// the jail's (`/proc/PID/root` is the jail root), else the host path.
    pub fn of(paths: &RunPaths, pid: i32) -> QemuDir {
        use std::os::unix::fs::MetadataExt;
        let run = paths.qemu_run_dir();
        let own_user = run.is_dir();
        let jailed = match (
            std::fs::metadata(format!("/proc/{pid}/root/")),
            std::fs::metadata(paths.jail_root()),
        ) {
            (Ok(root), Ok(jail)) => root.dev() == jail.dev() && root.ino() == jail.ino(),
            _ => false,
        };
        let host = if own_user { run } else { paths.dir.clone() };
        let inside = if jailed {
            PathBuf::from(JAIL_RUN)
        } else {
            host.clone()
        };
        let uid = crate::confine::ids::process_uid(pid);
        QemuDir { host, inside, uid }
    }

    /// Socket `name` on the host.
    pub fn host_path(&self, name: &str) -> PathBuf {
        self.host.join(name)
    }

    /// Socket `name` as QEMU names it.
    pub fn qemu_path(&self, name: &str) -> String {
        self.inside.join(name).to_string_lossy().into_owned()
    }

    /// Binds socket `name` for QEMU to connect to: only QEMU's user (and
    /// root) may. A stale file of that name is replaced.
    pub fn listen(&self, name: &str) -> std::io::Result<UnixListener> {
        let path = self.host_path(name);
        check_length(&path)?;
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        if let Some(uid) = self.uid {
            std::os::unix::fs::chown(&path, Some(uid), None)?;
        }
        Ok(listener)
    }

    /// Removes socket `name`, if there.
    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.host_path(name));
    }
}

fn check_length(path: &Path) -> std::io::Result<()> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(std::io::Error::other(format!(
            "socket path {} is longer than a unix socket address holds",
            path.display()
        )));
    }
    Ok(())
}

/// Connects to a socket QEMU listens on, retrying until it is there (QEMU
/// binds it when told to over QMP) or `deadline` passed.
pub async fn connect(path: &Path, deadline: Duration) -> std::io::Result<UnixStream> {
    check_length(path)?;
    let started = Instant::now();
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e) if started.elapsed() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Accepts QEMU's one connection on `listener` and joins it to `remote`
/// until both ends are done. Returns the bytes sent each way.
pub async fn accept_and_join<R>(listener: UnixListener, remote: R) -> std::io::Result<(u64, u64)>
where
    R: AsyncRead + AsyncWrite + Unpin,
{
    let (local, _) = listener.accept().await?;
    drop(listener);
    join(local, remote).await
}

/// Copies bytes both ways between `a` and `b` until both directions ended.
pub async fn join<A, B>(mut a: A, mut b: B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional(&mut a, &mut b).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_socket_bound_for_qemu_is_joined_to_a_remote_stream() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = QemuDir {
            host: dir.path().to_path_buf(),
            inside: dir.path().to_path_buf(),
            uid: None,
        };
        let listener = qemu.listen("s.sock").unwrap();
        let mode = std::fs::metadata(qemu.host_path("s.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (remote, mut far) = tokio::io::duplex(1 << 16);
        let joined = tokio::spawn(accept_and_join(listener, remote));
        let mut local = connect(&qemu.host_path("s.sock"), Duration::from_secs(5))
            .await
            .unwrap();
        let payload = vec![7u8; 300_000];
        let p = payload.clone();
        let writer = tokio::spawn(async move {
            local.write_all(&p).await.unwrap();
            local.shutdown().await.unwrap();
            let mut back = Vec::new();
            local.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = vec![0u8; payload.len()];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(got, payload);
        far.write_all(b"reply").await.unwrap();
        far.shutdown().await.unwrap();
        drop(far);
        assert_eq!(writer.await.unwrap(), b"reply");
        let (up, down) = joined.await.unwrap().unwrap();
        assert_eq!((up, down), (300_000, 5));
    }

    #[test]
    fn overlong_socket_paths_are_refused_with_the_path() {
        let long = PathBuf::from(format!("/{}", "d".repeat(120)));
        let qemu = QemuDir {
            host: long.clone(),
            inside: long,
            uid: None,
        };
        let e = qemu.listen("x.sock").unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }
}

/// A stream that counts the bytes read through it (what arrived).
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<S> Counted<S> {
    /// `inner`, adding what is read to `count`.
    pub fn new(inner: S, count: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Counted<S> {
        Counted { inner, count }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.count
            .fetch_add(read as u64, std::sync::atomic::Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
