//! `vmlet serve`: reattach every VM, then serve the API on the unix socket
//! (and TCP when configured) until SIGTERM or SIGINT. Shutting down leaves
//! every VM running; the next `vmlet serve` reattaches to them.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::api::{self, middleware::Token, App};
use crate::config::Settings;
use crate::qemu::process;
use crate::vm::manager::{Manager, ManagerError};

/// How long in-flight requests get to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// VMs could not be loaded.
    #[error(transparent)]
    Manager(#[from] ManagerError),
    /// Another vmlet manages the same state directory.
    #[error("another vmlet already uses state directory {0} (it holds vmlet.lock)")]
    StateDirLocked(PathBuf),
    /// The state directory's lock file could not be opened.
    #[error("opening lock file {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another vmlet answers on the socket.
    #[error("another vmlet is already serving on {0}")]
    AlreadyRunning(PathBuf),
    /// A listener could not be set up.
    #[error("listening on {what}")]
    Listen {
        /// The socket path or address.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// TCP on a non-loopback address without a token would expose the API.
    #[error("tcp_listen {0} is not a loopback address: configure auth_token_file to serve it")]
    NeedsToken(SocketAddr),
    /// The token file is unusable.
    #[error("reading auth token file {path}")]
    Token {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket group does not exist.
    #[error("socket_group {0:?} is not a group on this host")]
    NoSuchGroup(String),
    /// The token file is empty.
    #[error("auth token file {0} is empty")]
    EmptyToken(PathBuf),
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn serve(settings: Settings) -> Result<(), DaemonError> {
    // Checked before anything else so a second daemon never touches VMs.
    let socket_path = settings.socket_path();
    let _lock = lock_state_dir(&settings.state_dir)?;
    ensure_not_running(&socket_path).await?;
    let token = load_token(&settings)?;
    if let Err(e) = process::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper: QEMU exit codes will be unknown");
    }
    let max_body_bytes = settings.max_body_bytes;
    let consoles = crate::console::tokens::TokenStore::new(std::time::Duration::from_secs(
        settings.console.token_ttl_s,
    ));
    let novnc_dir = settings.console.novnc_dir.clone();
    let settings_group = settings.socket_group.clone();
    let tcp = settings.tcp_listen;
    let manager = Manager::open(settings).await?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let app = Arc::new(App {
        manager,
        max_body_bytes,
        shutdown: shutdown_rx.clone(),
        consoles,
        novnc_dir,
    });
    let unix = bind_unix(&socket_path, settings_group.as_deref())?;
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(serve_until(
        unix,
        api::router(app.clone(), None),
        shutdown_rx.clone(),
    ));
    tracing::info!(socket = %socket_path.display(), "API listening");
    if let Some(addr) = tcp {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Listen {
                what: addr.to_string(),
                source,
            })?;
        servers.spawn(serve_until(
            listener,
            api::router(app.clone(), token),
            shutdown_rx.clone(),
        ));
        tracing::info!(%addr, "API listening on TCP");
    }
    sd_notify("READY=1");
    wait_for_signal().await;
    tracing::info!("shutting down; VMs keep running");
    sd_notify("STOPPING=1");
    let _ = shutdown_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("requests still running after {SHUTDOWN_GRACE:?}: leaving them");
    }
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

/// Takes `STATE_DIR/vmlet.lock` for as long as the returned lock lives: two
/// daemons on one state directory would fight over the same QEMUs.
fn lock_state_dir(state_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    let path = state_dir.join("vmlet.lock");
    let lock_error = |source| DaemonError::Lock {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(lock_error)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(lock_error)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => DaemonError::StateDirLocked(state_dir.to_path_buf()),
            other => lock_error(std::io::Error::from(other)),
        },
    )
}

/// Serves `router` on `listener` until `stop` turns true, then lets the
/// requests in flight finish.
async fn serve_until<L>(
    listener: L,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

async fn ensure_not_running(socket: &Path) -> Result<(), DaemonError> {
    if tokio::net::UnixStream::connect(socket).await.is_ok() {
        return Err(DaemonError::AlreadyRunning(socket.to_path_buf()));
    }
    Ok(())
}

fn bind_unix(path: &Path, group: Option<&str>) -> Result<UnixListener, DaemonError> {
    let listen_error = |source| DaemonError::Listen {
        what: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(listen_error)?;
    }
    // A socket file left by a daemon that died (nobody answered on it).
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(listen_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(listen_error)?;
    if let Some(name) = group {
        let gid = nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| DaemonError::NoSuchGroup(name.to_string()))?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| listen_error(std::io::Error::from(e)))?;
    }
    Ok(listener)
}

fn load_token(settings: &Settings) -> Result<Option<Token>, DaemonError> {
    let Some(addr) = settings.tcp_listen else {
        return Ok(None);
    };
    let Some(path) = &settings.auth_token_file else {
        if addr.ip().is_loopback() {
            return Ok(None);
        }
        return Err(DaemonError::NeedsToken(addr));
    };
    let text = std::fs::read_to_string(path).map_err(|source| DaemonError::Token {
        path: path.clone(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(DaemonError::EmptyToken(path.clone()));
    }
    Ok(Some(Token(Arc::new(token.as_bytes().to_vec()))))
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Tells systemd (`Type=notify`) about the daemon's state, when run under it.
pub fn sd_notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notify(&target, state) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

fn send_notify(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let bytes = target.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::from_abstract_name(name)?,
        None => UnixAddr::from_pathname(Path::new(target))?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_state_dir_takes_one_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_state_dir(dir.path()).unwrap();
        assert!(matches!(
            lock_state_dir(dir.path()),
            Err(DaemonError::StateDirLocked(_))
        ));
        drop(held);
        lock_state_dir(dir.path()).unwrap();
    }

    #[test]
    fn sd_notify_sends_a_datagram() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send_notify(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn a_public_tcp_address_needs_a_token() {
        let settings = Settings {
            tcp_listen: Some("0.0.0.0:8780".parse().unwrap()),
            ..Settings::default()
        };
        assert!(matches!(
            load_token(&settings),
            Err(DaemonError::NeedsToken(_))
        ));
        let settings = Settings {
            tcp_listen: Some("127.0.0.1:8780".parse().unwrap()),
            ..Settings::default()
        };
        assert!(load_token(&settings).unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let settings = Settings {
            tcp_listen: Some("0.0.0.0:8780".parse().unwrap()),
            auth_token_file: Some(file),
            ..Settings::default()
        };
        assert_eq!(
            load_token(&settings).unwrap().unwrap().0.as_slice(),
            b"s3cret"
        );
    }
}
