//! `vmlet serve`: reattach every VM, then serve the API on the unix socket
//! (and TCP when configured) until SIGTERM or SIGINT. Shutting down leaves
//! every VM running; the next `vmlet serve` reattaches to them.
//!
//! A TCP listener always needs the bearer token: from `auth_token_file`, or
//! generated once into `STATE_DIR/api-token`. Either file must be private
//! to its owner (root or the daemon's user), or the daemon refuses to start.
//! With `[api] tls_cert` and `tls_key` the TCP listener serves HTTPS only
//! (the key file gets the token file's checks).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::api::listener::{self, Limits, Listener};
use crate::api::middleware::{HostRules, TcpGuard, Token};
use crate::api::{self, App};
use crate::config::Settings;

use crate::vm::manager::{Manager, ManagerError};

/// How long in-flight requests get to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::api::tls::TlsError),
    /// VMs could not be loaded.
    #[error(transparent)]
    Manager(#[from] ManagerError),
    /// The migration records could not be opened.
    #[error("opening the migration records")]
    Migrations(#[source] std::io::Error),
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
    /// The token file is unusable.
    #[error("auth token file {path}")]
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
    /// Others than its owner may read or write the token file.
    #[error(
        "auth token file {path} has mode {mode:04o}: group and others must have no access \
         (chmod 600 {path})"
    )]
    TokenMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The token file belongs to someone else than root or the daemon's user.
    #[error("auth token file {path} is owned by uid {uid}: it must belong to root or uid {own}")]
    TokenOwner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// The daemon's user.
        own: u32,
    },
    /// The token file is a directory, device or the like.
    #[error("auth token file {0} is not a regular file")]
    TokenNotAFile(PathBuf),
    /// The connection caps do not fit the process's file descriptor limit.
    #[error(
        "tcp_max_connections ({tcp}) and unix_max_connections ({unix}) need up to {needed} \
         file descriptors with the room kept for VMs, but the limit (RLIMIT_NOFILE) is {limit}: \
         lower the caps or raise the limit (LimitNOFILE= in the systemd unit)"
    )]
    TooManyConnections {
        /// The TCP cap (0 without TCP).
        tcp: usize,
        /// The unix socket cap.
        unix: usize,
        /// Descriptors the caps may use, plus the reserve.
        needed: u64,
        /// The soft limit after raising it.
        limit: u64,
    },
}

/// File descriptors kept for everything but API connections: VMs' QMP and
/// serial sockets, logs, pidfds, taps being handed over, image imports.
const FD_RESERVE: u64 = 1024;

/// File descriptors one API connection may hold: its socket, and the VM
/// socket a console websocket is joined to.
const FDS_PER_CONNECTION: u64 = 2;

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn serve(settings: Settings) -> Result<(), DaemonError> {
    // Checked before anything else so a second daemon never touches VMs.
    let socket_path = settings.socket_path();
    let _lock = lock_state_dir(&settings.state_dir)?;
    ensure_not_running(&socket_path).await?;
    let token = load_token(&settings)?;
    // Read even without a TCP listener, so a bad file shows before TCP is
    // turned on.
    let tls = crate::api::tls::acceptor(
        settings.api.tls_cert.as_deref(),
        settings.api.tls_key.as_deref(),
    )?;
    check_fd_limit(&settings)?;
    let max_body_bytes = settings.max_body_bytes;
    let consoles = crate::console::tokens::TokenStore::new(std::time::Duration::from_secs(
        settings.console.token_ttl_s,
    ));
    let novnc_dir = settings.console.novnc_dir.clone();
    let settings_group = settings.socket_group.clone();
    let tcp = settings.tcp_listen;
    let api_settings = settings.api.clone();
    let limits = |max_connections| Limits {
        max_connections,
        header_read_timeout: Duration::from_secs(api_settings.header_read_timeout_s),
        idle_timeout: Duration::from_secs(api_settings.idle_timeout_s),
    };
    let manager = Arc::new(Manager::open(settings).await?);
    let migrations = crate::migration::Migrations::open(manager.clone())
        .await
        .map_err(DaemonError::Migrations)?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let app = Arc::new(App {
        manager,
        migrations,
        max_body_bytes,
        shutdown: shutdown_rx.clone(),
        consoles,
        novnc_dir,
    });
    // TCP is bound first: once the unix socket answers (what tests and
    // scripts wait for), every listener is up.
    let mut servers = tokio::task::JoinSet::new();
    if let (Some(addr), Some(token)) = (tcp, token) {
        let listen_error = |source| DaemonError::Listen {
            what: addr.to_string(),
            source,
        };
        let tcp_listener = TcpListener::bind(addr).await.map_err(listen_error)?;
        // The port actually bound (`:0` picks one).
        let bound = tcp_listener.local_addr().map_err(listen_error)?;
        let guard = TcpGuard {
            token,
            hosts: Arc::new(HostRules::new(bound, &api_settings.allowed_hosts)),
            https: tls.is_some(),
        };
        let https = tls.is_some();
        let tcp_listener = match tls {
            Some(acceptor) => Listener::Tls(tcp_listener, acceptor),
            None => Listener::Tcp(tcp_listener),
        };
        servers.spawn(listener::serve(
            tcp_listener,
            api::router(app.clone(), Some(guard)),
            limits(api_settings.tcp_max_connections),
            shutdown_rx.clone(),
        ));
        tracing::info!(
            addr = %bound,
            https,
            "API listening on TCP (bearer token required)"
        );
    }
    let unix = bind_unix(&socket_path, settings_group.as_deref())?;
    servers.spawn(listener::serve(
        Listener::Unix(unix),
        api::router(app.clone(), None),
        limits(api_settings.unix_max_connections),
        shutdown_rx.clone(),
    ));
    tracing::info!(socket = %socket_path.display(), "API listening");
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

/// The bearer token of the TCP listener (`None` without one): read from
/// [`Settings::auth_token_path`], which vmlet creates when no
/// `auth_token_file` is configured and it does not exist yet.
fn load_token(settings: &Settings) -> Result<Option<Token>, DaemonError> {
    if settings.tcp_listen.is_none() {
        return Ok(None);
    }
    let path = settings.auth_token_path();
    if settings.auth_token_file.is_none() {
        create_token_file(&path)?;
    }
    read_token_file(&path).map(Some)
}

/// Writes 256 random bits as hex to `path` unless it exists: created with
/// `O_EXCL` and mode 0600 (never readable by anyone else, not even for a
/// moment), synced, and its directory synced, so a crash leaves either no
/// file or the whole token.
fn create_token_file(path: &Path) -> Result<(), DaemonError> {
    let token_error = |source| DaemonError::Token {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(token_error)?;
    }
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        // Made by an earlier start: kept, so clients keep working.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(token_error(e)),
    };
    let mut secret = [0u8; 32];
    let written = getrandom::fill(&mut secret)
        .map_err(|e| std::io::Error::other(format!("no randomness for a token: {e}")))
        .and_then(|()| {
            let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            file.write_all(format!("{hex}\n").as_bytes())?;
            file.sync_all()?;
            match path.parent() {
                Some(dir) => std::fs::File::open(dir)?.sync_all(),
                None => Ok(()),
            }
        });
    if let Err(e) = written {
        // An empty or partial token file would fail every later start.
        let _ = std::fs::remove_file(path);
        return Err(token_error(e));
    }
    tracing::info!(path = %path.display(), "generated the API bearer token");
    Ok(())
}

/// Reads the token, refusing a file that is not private to root or the
/// daemon's user. The checks are made on the opened file, so what is
/// checked is what is read.
fn read_token_file(path: &Path) -> Result<Token, DaemonError> {
    let token_error = |source| DaemonError::Token {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(token_error)?;
    let meta = file.metadata().map_err(token_error)?;
    if !meta.is_file() {
        return Err(DaemonError::TokenNotAFile(path.to_path_buf()));
    }
    let own = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != own {
        return Err(DaemonError::TokenOwner {
            path: path.to_path_buf(),
            uid: meta.uid(),
            own,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(DaemonError::TokenMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(token_error)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(DaemonError::EmptyToken(path.to_path_buf()));
    }
    Ok(Token(Arc::new(token.as_bytes().to_vec())))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one, then checks that the
/// connection caps stay well below it: descriptors run out for connections
/// long before they run out for VMs and the unix socket.
fn check_fd_limit(settings: &Settings) -> Result<(), DaemonError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the file descriptor limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the file descriptor limit");
            return Ok(());
        }
    };
    let tcp = if settings.tcp_listen.is_some() {
        settings.api.tcp_max_connections
    } else {
        0
    };
    let unix = settings.api.unix_max_connections;
    let needed = (tcp as u64 + unix as u64)
        .saturating_mul(FDS_PER_CONNECTION)
        .saturating_add(FD_RESERVE);
    if needed > limit {
        return Err(DaemonError::TooManyConnections {
            tcp,
            unix,
            needed,
            limit,
        });
    }
    Ok(())
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
    fn every_tcp_listener_gets_a_private_generated_token_kept_across_starts() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_token(&Settings::default()).unwrap().is_none());
        let settings = Settings {
            state_dir: dir.path().join("state"),
            tcp_listen: Some("127.0.0.1:8780".parse().unwrap()),
            ..Settings::default()
        };
        let first = load_token(&settings).unwrap().unwrap();
        let path = dir.path().join("state/api-token");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert!(text.trim().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(first.0.as_slice(), text.trim().as_bytes());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_token(&settings).unwrap().unwrap();
        assert_eq!(again.0, first.0);
        let other = tempfile::tempdir().unwrap();
        let fresh = load_token(&Settings {
            state_dir: other.path().to_path_buf(),
            ..settings.clone()
        })
        .unwrap()
        .unwrap();
        assert_ne!(fresh.0, first.0);
    }

    #[test]
    fn a_configured_token_file_must_exist_be_private_and_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let settings = Settings {
            state_dir: dir.path().join("state"),
            tcp_listen: Some("0.0.0.0:8780".parse().unwrap()),
            auth_token_file: Some(file.clone()),
            ..Settings::default()
        };
        assert!(matches!(
            load_token(&settings),
            Err(DaemonError::Token { .. })
        ));
        // A configured file is never generated.
        assert!(!file.exists());
        std::fs::write(&file, "s3cret\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = load_token(&settings).unwrap_err();
            assert!(
                matches!(err, DaemonError::TokenMode { .. }),
                "{mode:o}: {err}"
            );
            let message = err.to_string();
            assert!(message.contains(&file.display().to_string()), "{message}");
            assert!(message.contains(&format!("{mode:04o}")), "{message}");
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(
            load_token(&settings).unwrap().unwrap().0.as_slice(),
            b"s3cret"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&file, " \n").unwrap();
        assert!(matches!(
            load_token(&settings),
            Err(DaemonError::EmptyToken(_))
        ));
        let not_a_file = Settings {
            auth_token_file: Some(dir.path().to_path_buf()),
            ..settings.clone()
        };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(
            load_token(&not_a_file),
            Err(DaemonError::TokenNotAFile(_))
        ));
    }

    #[test]
    fn a_token_file_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: changing a file's owner needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        nix::unistd::chown(&file, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let settings = Settings {
            tcp_listen: Some("127.0.0.1:8780".parse().unwrap()),
            auth_token_file: Some(file.clone()),
            ..Settings::default()
        };
        let err = load_token(&settings).unwrap_err();
        assert!(
            matches!(err, DaemonError::TokenOwner { uid: 65534, .. }),
            "{err}"
        );
    }

    #[test]
    fn connection_caps_must_fit_the_descriptor_limit() {
        let settings = Settings {
            tcp_listen: Some("127.0.0.1:8780".parse().unwrap()),
            ..Settings::default()
        };
        check_fd_limit(&settings).unwrap();
        let mut greedy = settings.clone();
        greedy.api.tcp_max_connections = usize::MAX / 4;
        let err = check_fd_limit(&greedy).unwrap_err();
        assert!(
            matches!(err, DaemonError::TooManyConnections { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("tcp_max_connections"), "{err}");
    }
}
