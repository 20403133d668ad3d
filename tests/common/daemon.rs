//! A `vmlet serve` subprocess on a scratch state dir and socket, for tests
//! that drive the daemon over HTTP. Dropping it kills the daemon and every
//! QEMU it started, and removes the scratch directory, even when the test
//! failed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;
use vmlet::client::Client;

use super::netns::NetNs;
use super::{guest, guest_cmdline, processes_with, Scratch};

/// How long the daemon gets to answer after it is started (it reattaches
/// every VM first).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running daemon.
pub struct Daemon {
    child: Option<Child>,
    /// Its API client (unix socket).
    pub client: Client,
    /// The API socket.
    pub socket: PathBuf,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// `--run-dir`.
    pub run_dir: PathBuf,
    /// The daemon's log (stdout and stderr, appended across restarts).
    pub log: PathBuf,
    extra_env: Vec<(String, String)>,
    /// The network namespace the daemon runs in (`ip netns exec`), if any;
    /// restarts keep it.
    netns: Option<String>,
    /// The cgroup root of this daemon's VMs (`VMLET_QEMU_CGROUP_ROOT`):
    /// one per daemon, so parallel tests never share or remove each
    /// other's cgroups.
    pub cgroup_root: String,
    /// The uids of this daemon's VMs (`VMLET_QEMU_UID_RANGE`): a block of
    /// its own, as every daemon hands out the lowest free uid of its range
    /// and parallel tests would otherwise run QEMUs under the same uid.
    pub uid_range: String,
    scratch: Scratch,
}

impl Daemon {
    /// Starts a daemon on fresh scratch directories and waits until it
    /// answers.
    pub async fn start() -> Daemon {
        Daemon::start_with_env(&[]).await
    }

    /// [`Daemon::start`] with extra environment (e.g. `VMLET_STOP_GRACE_S`).
    pub async fn start_with_env(env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(env, None).await
    }

    /// [`Daemon::start_with_env`] inside the network namespace `ns` (the
    /// command is `ip netns exec NS vmlet serve ...`). The API socket is on
    /// the file system, so [`Daemon::client`] works from the host side.
    /// Drop the daemon before `ns`.
    pub async fn start_in_netns(ns: &NetNs, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(env, Some(ns.name.clone())).await
    }

    async fn start_with(env: &[(&str, &str)], netns: Option<String>) -> Daemon {
        let scratch = Scratch::new();
        let root = scratch.path().to_path_buf();
        let mut daemon = Daemon {
            child: None,
            client: Client::unix(root.join("run/vmlet.sock")),
            socket: root.join("run/vmlet.sock"),
            state_dir: root.join("state"),
            run_dir: root.join("run"),
            log: root.join("daemon.log"),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns,
            cgroup_root: format!("{}{}", super::SCRATCH_PREFIX, Uuid::new_v4().simple()),
            uid_range: unique_uid_range(),
            scratch,
        };
        daemon.spawn().await;
        daemon
    }

    /// The directory a spec's host files may come from
    /// (`allowed_host_paths`): a directory of its own beside the state and
    /// run directories, never containing them.
    pub fn scratch(&self) -> PathBuf {
        self.scratch.path().join("host")
    }

    async fn spawn(&mut self) {
        let guest = guest::test_guest();
        let guest_dir = guest.kernel.parent().unwrap();
        std::fs::create_dir_all(self.scratch()).unwrap();
        let allowed = format!("{}:{}", guest_dir.display(), self.scratch().display());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let vmlet = env!("CARGO_BIN_EXE_vmlet");
        // `ip netns exec` execs the program (same pid), so the child is the
        // daemon itself either way.
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str(), vmlet]);
                c
            }
            None => Command::new(vmlet),
        };
        command
            .arg("serve")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--config")
            .arg("/dev/null")
            .env("VMLET_ACCEL", "tcg")
            .env("VMLET_ALLOWED_HOST_PATHS", allowed)
            .env("VMLET_LOG", "info,vmlet=debug")
            .env("VMLET_QEMU_CGROUP_ROOT", &self.cgroup_root)
            .env("VMLET_QEMU_UID_RANGE", &self.uid_range)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.extra_env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("starting vmlet serve");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("vmlet serve exited with {status}:\n{}", self.log_text());
            }
            if self.client.health().await.is_ok() {
                break;
            }
            if started.elapsed() > READY_TIMEOUT {
                let _ = child.kill();
                panic!(
                    "vmlet serve did not answer within {READY_TIMEOUT:?}:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.child = Some(child);
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon runs").id() as i32
    }

    /// SIGKILLs the daemon (its QEMUs keep running) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the daemon and waits for it to exit; returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon runs");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }

    /// Starts the daemon again on the same directories.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Starts the daemon after [`Daemon::kill`] or [`Daemon::terminate`].
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "daemon still runs");
        self.spawn().await;
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// VM `id`'s serial console log (in its state directory; QEMU appends
    /// to it across starts).
    pub fn serial_log(&self, id: Uuid) -> PathBuf {
        self.state_dir
            .join("vms")
            .join(id.to_string())
            .join("console.log")
    }

    /// VM `id`'s record on disk.
    pub fn record(&self, id: Uuid) -> PathBuf {
        self.state_dir
            .join("vms")
            .join(id.to_string())
            .join("vm.json")
    }

    /// QEMU processes started by this daemon: those whose command line
    /// names the run directory or carries `-uuid UUID` of one of its VMs (a
    /// confined QEMU gets its sockets as fds and its kernel inside its jail,
    /// so its command line may name no path of the daemon's).
    pub fn qemu_pids(&self) -> Vec<i32> {
        let daemon = self.child.as_ref().map(|c| c.id() as i32);
        let mut pids = processes_with(&self.run_dir.display().to_string());
        let vms = std::fs::read_dir(self.state_dir.join("vms"))
            .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_else(|_| Vec::new());
        for vm in vms {
            let Some(uuid) = vm.to_str().and_then(|v| v.parse::<Uuid>().ok()) else {
                continue;
            };
            pids.extend(processes_with(&format!("-uuid {uuid} ")));
        }
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|pid| Some(*pid) != daemon);
        pids
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        for pid in self.qemu_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.qemu_pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        remove_cgroup_root(&self.cgroup_root);
        if std::thread::panicking() {
            eprintln!("--- vmlet serve log ---\n{}", self.log_text());
        }
    }
}

/// A block of 100 uids picked at random between 1e9 and 4e9 (`FIRST-LAST`),
/// for one test daemon or confined launch: 30 million blocks, so tests
/// running at once practically never share one.
pub fn unique_uid_range() -> String {
    let block = u32::try_from(Uuid::new_v4().as_u128() % 30_000_000).unwrap();
    let first = 1_000_000_000 + block * 100;
    format!("{first}-{}", first + 99)
}

/// Removes the cgroup root `root` of a test daemon, with the VM cgroups
/// left below it, in every hierarchy. Only empty directories go (`rmdir`):
/// a cgroup still holding a process stays, and is named on stderr. The
/// kernel empties a cgroup a moment after its last task exits, so busy
/// directories are retried for a few seconds.
pub fn remove_cgroup_root(root: &str) {
    use vmlet::confine::cgroup::{Cgroups, Hierarchy};
    let Ok(cgroups) = Hierarchy::detect().and_then(|h| Cgroups::new(h, root)) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    for dir in cgroups.root_dirs() {
        if !dir.is_dir() {
            continue;
        }
        loop {
            let children: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            let mut result = Ok(());
            for child in children.iter().chain(std::iter::once(&dir)) {
                if let Err(e) = std::fs::remove_dir(child) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        result = Err((child.clone(), e));
                    }
                }
            }
            match result {
                Ok(()) => break,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((path, e)) => {
                    eprintln!("cannot remove test cgroup {}: {e}", path.display());
                    break;
                }
            }
        }
    }
}

/// A unique VM name for a test.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", &Uuid::new_v4().simple().to_string()[..8])
}

/// A spec (as API JSON, without `uuid`) that boots the test guest with
/// `extra` kernel parameters on the q35 profile.
pub fn guest_spec_json(name: &str, extra: &str) -> Value {
    let guest = guest::test_guest();
    serde_json::json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 256,
        "boot": {
            "type": "kernel",
            "kernel": guest.kernel,
            "initrd": guest.initrd,
            "cmdline": guest_cmdline("q35", extra),
        },
    })
}

/// Counts lines containing `needle` in `path`.
pub fn count_lines(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Waits until `path` has at least `n` lines containing `needle`.
pub async fn wait_for_count(path: &Path, needle: &str, n: usize, timeout: Duration) {
    let started = Instant::now();
    while count_lines(path, needle) < n {
        if started.elapsed() > timeout {
            panic!(
                "fewer than {n} lines with {needle:?} in {} after {timeout:?}; it holds:\n{}",
                path.display(),
                std::fs::read_to_string(path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after
/// `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if started.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free loopback TCP port (bound and released: another test could take
/// it in between, which would fail this test loudly, not silently).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon whose TCP API listens on a free loopback port with a bearer
/// token of its own: the target of a migration from another daemon on this
/// host.
pub struct TcpTarget {
    /// The daemon.
    pub daemon: Daemon,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its bearer token.
    pub token: String,
    /// The file holding the token (mode 0600).
    pub token_file: PathBuf,
    _token_dir: Scratch,
}

impl TcpTarget {
    /// Starts it with bearer token `token`.
    pub async fn start(token: &str) -> TcpTarget {
        let token_dir = Scratch::new();
        let token_file = token_dir.path().join("token");
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        std::fs::set_permissions(
            &token_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let daemon = Daemon::start_with_env(&[
            ("VMLET_TCP_LISTEN", &addr),
            ("VMLET_AUTH_TOKEN_FILE", token_file.to_str().unwrap()),
        ])
        .await;
        TcpTarget {
            daemon,
            url: format!("http://{addr}"),
            token: token.to_string(),
            token_file,
            _token_dir: token_dir,
        }
    }

    /// A migration request to it (no bandwidth cap, the default downtime).
    pub fn request(&self) -> vmlet::spec::MigrateRequest {
        vmlet::spec::MigrateRequest {
            target: vmlet::spec::MigrationTarget {
                url: self.url.clone(),
                token: self.token.clone(),
            },
            max_downtime_ms: vmlet::spec::DEFAULT_MAX_DOWNTIME_MS,
            max_bandwidth_mib_s: None,
        }
    }
}

/// Migration `id` as `client`'s daemon shows it once it ended.
pub async fn wait_for_migration(client: &Client, id: Uuid) -> vmlet::spec::Migration {
    wait_until("the migration to end", Duration::from_secs(120), || async {
        let m = client.get_migration(id).await.unwrap();
        m.phase.is_final().then_some(m)
    })
    .await
}
