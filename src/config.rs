//! Settings: embedded defaults, then an optional TOML file, then environment
//! variables (`VMLET_*`), each overriding the one before.
//!
//! Why this file is long: every setting is declared, defaulted, read from
//! the environment and tested here, so one file says what can be set.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::qemu::accel::AccelChoice;
use crate::storage::fetch::parse_networks;
pub use crate::storage::images::ImageSettings;

/// Where the config file is looked for when none is given.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/vmlet/vmlet.toml";

/// The token file vmlet generates in the state directory when no
/// `auth_token_file` is configured.
pub const GENERATED_TOKEN_FILE: &str = "api-token";

/// vmlet's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Persistent state: VM records, images, volumes.
    pub state_dir: PathBuf,
    /// Runtime files: sockets, pidfiles, serial logs (`RUN_DIR/vms/UUID/`).
    pub run_dir: PathBuf,
    /// The QEMU system emulator.
    pub qemu_binary: PathBuf,
    /// `qemu-img`, for images, volumes, overlays and offline snapshots.
    pub qemu_img_binary: PathBuf,
    /// `swtpm`, the TPM emulator run for each VM with a `tpm`.
    pub swtpm_binary: PathBuf,
    /// Local files may be imported as images only from under this
    /// directory (checked after resolving symlinks). Unset:
    /// `STATE_DIR/import`.
    pub import_dir: Option<PathBuf>,
    /// Extra and overriding machine profiles (`*.toml`).
    pub profile_dir: PathBuf,
    /// Accelerator: `auto`, `kvm` or `tcg`.
    pub accel: AccelChoice,
    /// Seconds a graceful stop waits for the guest to power off after the
    /// ACPI power button before vmlet quits QEMU.
    pub stop_grace_s: u64,
    /// Seconds QEMU gets to set a VM up (before the guest runs); a QEMU stuck
    /// longer, e.g. on hung storage, is killed and the start fails.
    pub start_timeout_s: u64,
    /// The API's unix socket (mode 0660). Unset: `RUN_DIR/vmlet.sock`.
    pub socket: Option<PathBuf>,
    /// Group that owns the API socket, so its members may use the API
    /// without root (like libvirt's `unix_sock_group`). Unset: root's group.
    pub socket_group: Option<String>,
    /// A TCP address for the API, e.g. `127.0.0.1:8780`. Unset: no TCP.
    /// Every TCP client needs the bearer token (`auth_token_file`).
    pub tcp_listen: Option<SocketAddr>,
    /// File holding the bearer token TCP clients must send (mode 0600 or
    /// stricter, owned by root or the daemon's user). Unset: vmlet makes
    /// `STATE_DIR/api-token` (256 random bits) on first start and keeps it.
    /// The unix socket is guarded by its file mode instead.
    pub auth_token_file: Option<PathBuf>,
    /// Log format: `text` or `json`.
    pub log_format: LogFormat,
    /// How many events `/v1/events` keeps for clients that reconnect.
    pub event_buffer: usize,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Directories below which a spec's host files (disk `path`s, kernels,
    /// initrds) must lie. vmlet opens those files itself at every start,
    /// without following symlinks, and hands QEMU the fds. Each directory
    /// must hold nothing vmlet manages: it may not contain, or lie inside,
    /// the state or run directory (except the default, `STATE_DIR/host`,
    /// which vmlet creates and never writes to), so vmlet's own images,
    /// volumes, overlays and records can never be named by path.
    pub allowed_host_paths: Option<Vec<PathBuf>>,
    /// What the host offers the scheduler (`[capacity]` in the file).
    pub capacity: CapacitySettings,
    /// Consoles: tokens, the serial log, the browser page (`[console]`).
    pub console: ConsoleSettings,
    /// Image imports: what URLs may reach, and limits (`[images]`).
    pub images: ImageSettings,
    /// The API's listeners: accepted `Host` names, connection caps and
    /// timeouts (`[api]`).
    pub api: ApiSettings,
    /// How QEMU is confined: its user, jail and cgroup (`[qemu]`).
    pub qemu: QemuSettings,
    /// Live migrations: when one that stopped moving gives up
    /// (`[migration]`).
    pub migration: MigrationSettings,
    /// Where QEMU's firmware descriptors (`*.json`, QEMU's
    /// `docs/interop/firmware.json`) are read from, highest priority first:
    /// a file overrides (an empty one hides) the same name in a later
    /// directory. UEFI VMs get their firmware from them (Debian: `ovmf`).
    pub firmware_dirs: Vec<PathBuf>,
}

/// How each VM's QEMU is confined (`[qemu]` in the file). Applies when vmlet
/// runs as root; without root, QEMU runs as vmlet's own user, unjailed and
/// without a cgroup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuSettings {
    /// Run every QEMU as this one user (a name from the user database, like
    /// libvirt's `qemu` user). Unset: each running VM gets a uid of its own
    /// from `uid_range` (gid = uid), so one VM's QEMU cannot touch another's.
    pub user: Option<String>,
    /// `FIRST-LAST`: the uids handed to VMs when `user` is unset. No entry
    /// in the user database is needed; pick a range no one else uses.
    pub uid_range: String,
    /// Run QEMU in a jail: a private mount namespace whose root holds only
    /// `/usr` (read-only), a few device nodes, its own `/proc` and a
    /// writable `/run` of its own.
    pub jail: bool,
    /// The cgroup (relative to each hierarchy's root) under which every
    /// VM gets `ROOT/UUID`. Empty: no cgroups.
    pub cgroup_root: String,
    /// MiB a QEMU may use beyond its guest's memory before its cgroup's
    /// memory limit stops it (a VM's `resources.memory_overhead_mib`
    /// overrides it).
    pub memory_overhead_mib: u64,
    /// Tasks (threads) a QEMU may have (`pids.max`).
    pub pids_max: u64,
    /// CPU weight of a VM (1–10000, cgroup v2 scale) when its spec sets none.
    pub cpu_weight: u32,
}

/// The default [`QemuSettings::uid_range`]: far above the uids Debian hands
/// to users and to subordinate-id ranges.
pub const DEFAULT_UID_RANGE: &str = "900000000-900009999";

impl Default for QemuSettings {
    fn default() -> Self {
        QemuSettings {
            user: None,
            uid_range: DEFAULT_UID_RANGE.into(),
            jail: true,
            cgroup_root: "vmlet".into(),
            memory_overhead_mib: 1024,
            pids_max: 1024,
            cpu_weight: 100,
        }
    }
}

/// Live migrations (`[migration]` in the file). Both limits apply before
/// the switch only: a migration that hits one fails and rolls back (the
/// guest runs on the source as before, the target removes what it made).
/// Once the target may run the guest, nothing gives up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationSettings {
    /// Seconds the copies (disks, then memory) may make no progress at all
    /// before the migration fails as stalled, e.g. when the target host
    /// froze or its network vanished. 0: never.
    pub stall_timeout_s: u64,
    /// Seconds a whole migration may take until its switch, however it
    /// progresses (a guest that dirties memory faster than it is sent
    /// never converges). 0: no limit.
    pub deadline_s: u64,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        MigrationSettings {
            stall_timeout_s: 60,
            deadline_s: 0,
        }
    }
}

/// The API's listeners (`[api]` in the file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// Names a TCP client may send in `Host` besides the listen address
    /// (and `localhost:PORT` on loopback), e.g. `node1.example.com`; an
    /// entry without a port also matches with the listen port. Anything else
    /// is refused (400 `bad_host`), which defeats DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// Connections the TCP listener serves at once; more are accepted and
    /// closed at once (with a best-effort 503 `busy`).
    pub tcp_max_connections: usize,
    /// Connections the unix socket serves at once, counted apart from TCP so
    /// a flood of TCP clients never locks out the socket.
    pub unix_max_connections: usize,
    /// Seconds a client gets to send a whole request head, counted from the
    /// connection's opening or the first byte after an idle spell
    /// (slowloris).
    pub header_read_timeout_s: u64,
    /// Seconds a keep-alive connection may sit idle between requests.
    /// Responses being streamed (`/v1/events`) and console websockets are
    /// not idle.
    pub idle_timeout_s: u64,
    /// PEM certificate (chain) of the TCP listener: with `tls_key`, TCP
    /// serves HTTPS only (the unix socket stays plain). Both or neither.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`; like the token file, it must be
    /// private to root or the daemon's user (mode 0600 or stricter).
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) trusted, besides the system's roots, when this
    /// daemon calls another vmlet daemon over `https://` (the target of a
    /// live migration).
    pub peer_ca_file: Option<PathBuf>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            allowed_hosts: Vec::new(),
            tcp_max_connections: 256,
            unix_max_connections: 128,
            header_read_timeout_s: 10,
            idle_timeout_s: 30,
            tls_cert: None,
            tls_key: None,
            peer_ca_file: None,
        }
    }
}

/// Consoles (`[console]` in the file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Seconds a console token stays valid.
    pub token_ttl_s: u64,
    /// Size at which a VM's serial log (`STATE_DIR/vms/UUID/console.log`)
    /// is rotated, in bytes.
    pub log_max_bytes: u64,
    /// Rotated serial logs kept per VM (`console.log.1` …).
    pub log_backups: u32,
    /// noVNC's files (`core/rfb.js` …), served under `/novnc/` for the
    /// console page: Debian's `novnc` package or npm's `@novnc/novnc`.
    pub novnc_dir: PathBuf,
    /// Seconds a running VM's serial log may stay unchanged before
    /// `GET /v1/vms/{id}` (and `vmlet vm show`) hints that the console is
    /// silent; 0 turns the hint off.
    pub silent_hint_s: u64,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        ConsoleSettings {
            token_ttl_s: 60,
            log_max_bytes: 2 * 1024 * 1024,
            log_backups: 3,
            novnc_dir: "/usr/share/novnc".into(),
            silent_hint_s: 120,
        }
    }
}

/// The host's capacity as the scheduler sees it, like Nova's placement
/// inventory: for each resource, `free = total × allocation_ratio −
/// reserved − allocated`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapacitySettings {
    /// vCPUs on offer. Unset: the host's online CPUs.
    pub vcpus_total: Option<u64>,
    /// Memory on offer, in MiB. Unset: the host's physical memory.
    pub memory_mib_total: Option<u64>,
    /// Disk on offer for VMs' own disks, in GiB. Unset: the size of the
    /// file system holding the state directory.
    pub disk_gib_total: Option<u64>,
    /// vCPUs kept for the host.
    pub reserved_vcpus: u64,
    /// Memory kept for the host, in MiB.
    pub reserved_memory_mib: u64,
    /// Disk kept for the host, in GiB.
    pub reserved_disk_gib: u64,
    /// vCPU overcommit (Nova's default: 4.0).
    pub cpu_allocation_ratio: f64,
    /// Memory overcommit.
    pub ram_allocation_ratio: f64,
    /// Disk overcommit (qcow2 overlays and blank disks are sparse).
    pub disk_allocation_ratio: f64,
    /// Refuse to create a VM that does not fit (409 naming the resource).
    pub enforce: bool,
}

impl Default for CapacitySettings {
    fn default() -> Self {
        CapacitySettings {
            vcpus_total: None,
            memory_mib_total: None,
            disk_gib_total: None,
            reserved_vcpus: 0,
            reserved_memory_mib: 512,
            reserved_disk_gib: 0,
            cpu_allocation_ratio: 4.0,
            ram_allocation_ratio: 1.0,
            disk_allocation_ratio: 1.0,
            enforce: true,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format (text, json)")),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            state_dir: "/var/lib/vmlet".into(),
            run_dir: "/run/vmlet".into(),
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_img_binary: "qemu-img".into(),
            swtpm_binary: "swtpm".into(),
            import_dir: None,
            profile_dir: "/etc/vmlet/qemu-profiles".into(),
            accel: AccelChoice::Auto,
            stop_grace_s: 60,
            start_timeout_s: 60,
            socket: None,
            socket_group: None,
            tcp_listen: None,
            auth_token_file: None,
            log_format: LogFormat::Text,
            event_buffer: 4096,
            max_body_bytes: 1024 * 1024,
            allowed_host_paths: None,
            capacity: CapacitySettings::default(),
            console: ConsoleSettings::default(),
            images: ImageSettings::default(),
            api: ApiSettings::default(),
            qemu: QemuSettings::default(),
            migration: MigrationSettings::default(),
            firmware_dirs: vec![
                "/etc/qemu/firmware".into(),
                "/usr/share/qemu/firmware".into(),
            ],
        }
    }
}

/// Why `root` (canonical) cannot be a host-file directory, if it cannot:
/// it may not be a pseudo file system, nor contain or lie inside a directory
/// vmlet manages (`managed`), except for `default` (`STATE_DIR/host`),
/// which lies inside the state directory but holds nothing vmlet made.
pub fn host_root_refusal(root: &Path, managed: &[PathBuf], default: &Path) -> Option<String> {
    if ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| root.starts_with(p))
    {
        return Some("a pseudo file system".into());
    }
    if root.starts_with(default) {
        return None;
    }
    managed.iter().find_map(|dir| {
        if dir.starts_with(root) {
            Some(format!(
                "contains {}, which vmlet manages: name a directory of its own",
                dir.display()
            ))
        } else if root.starts_with(dir) {
            Some(format!(
                "lies inside {}, which vmlet manages: name a directory of its own",
                dir.display()
            ))
        } else {
            None
        }
    })
}

/// Settings that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for [`Settings`].
    #[error("{path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's message (names the key).
        message: String,
    },
    /// An environment variable has a bad value.
    #[error("environment variable {name}: {message}")]
    Env {
        /// Variable name.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Settings {
    /// Loads settings. `file`: an explicit config file (must exist); without
    /// one, [`DEFAULT_CONFIG_FILE`] is read if present.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut settings = match file {
            Some(path) => Settings::from_file(path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                Settings::from_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => Settings::default(),
        };
        settings.apply_env(|name| std::env::var(name).ok())?;
        Ok(settings)
    }

    fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The API's unix socket path.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.run_dir.join("vmlet.sock"))
    }

    /// The CA file trusted, besides the system's roots, for `https://`
    /// calls to other vmlet daemons (`[api] peer_ca_file`).
    pub fn peer_ca_file(&self) -> Option<&Path> {
        self.api.peer_ca_file.as_deref()
    }

    /// The bearer token file of TCP listeners: `auth_token_file`, or the
    /// one vmlet generates, `STATE_DIR/api-token`.
    pub fn auth_token_path(&self) -> PathBuf {
        self.auth_token_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join(GENERATED_TOKEN_FILE))
    }

    /// The directory images may be imported from.
    pub fn import_dir(&self) -> PathBuf {
        self.import_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("import"))
    }

    /// Directories a spec's host files must lie under.
    pub fn host_path_roots(&self) -> Vec<PathBuf> {
        self.allowed_host_paths
            .clone()
            .unwrap_or_else(|| vec![self.default_host_dir()])
    }

    /// `STATE_DIR/host`: where host files go when `allowed_host_paths` is
    /// not set.
    pub fn default_host_dir(&self) -> PathBuf {
        self.state_dir.join("host")
    }

    /// The host-file directories, canonical, after checking that none
    /// overlaps what vmlet manages (the default one is created, mode 0700).
    pub fn checked_host_roots(&self) -> Result<Vec<PathBuf>, String> {
        if self.allowed_host_paths.is_none() {
            use std::os::unix::fs::DirBuilderExt;
            let dir = self.default_host_dir();
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
        }
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let managed = [canonical(&self.state_dir), canonical(&self.run_dir)];
        let default = canonical(&self.default_host_dir());
        let mut roots = Vec::new();
        for root in self.host_path_roots() {
            let real = std::fs::canonicalize(&root)
                .map_err(|e| format!("allowed_host_paths: {}: {e}", root.display()))?;
            if let Some(reason) = host_root_refusal(&real, &managed, &default) {
                return Err(format!("allowed_host_paths: {}: {reason}", root.display()));
            }
            roots.push(real);
        }
        Ok(roots)
    }

    /// Applies `VMLET_STATE_DIR`, `VMLET_RUN_DIR`, `VMLET_QEMU`,
    /// `VMLET_QEMU_IMG`, `VMLET_SWTPM`, `VMLET_IMPORT_DIR`, `VMLET_PROFILE_DIR`, `VMLET_ACCEL`, `VMLET_STOP_GRACE_S`, `VMLET_START_TIMEOUT_S`,
    /// `VMLET_SOCKET`, `VMLET_SOCKET_GROUP`, `VMLET_TCP_LISTEN`, `VMLET_AUTH_TOKEN_FILE`,
    /// `VMLET_LOG_FORMAT`, `VMLET_ALLOWED_HOST_PATHS` (`:`-separated), and for
    /// `[capacity]` `VMLET_CAPACITY_VCPUS`, `VMLET_CAPACITY_MEMORY_MIB`,
    /// `VMLET_CAPACITY_DISK_GIB`, `VMLET_RESERVED_MEMORY_MIB`,
    /// `VMLET_CPU_ALLOCATION_RATIO` and `VMLET_CAPACITY_ENFORCE`, and for
    /// `[console]` `VMLET_CONSOLE_TOKEN_TTL_S`, `VMLET_CONSOLE_LOG_MAX_BYTES`
    /// `VMLET_NOVNC_DIR` and `VMLET_CONSOLE_SILENT_HINT_S`, and for `[images]`
    /// `VMLET_IMPORT_ALLOWED_NETWORKS` (comma-separated CIDRs),
    /// `VMLET_IMPORT_CONNECT_TIMEOUT_S`, `VMLET_IMPORT_IDLE_TIMEOUT_S`,
    /// `VMLET_IMPORT_TIMEOUT_S`, `VMLET_IMPORT_MAX_BYTES`,
    /// `VMLET_IMAGE_MAX_VIRTUAL_BYTES` and `VMLET_IMAGE_CONVERT_TIMEOUT_S`, and for `[api]` `VMLET_ALLOWED_HOSTS`
    /// (`,`-separated), `VMLET_TCP_MAX_CONNECTIONS`,
    /// `VMLET_UNIX_MAX_CONNECTIONS`, `VMLET_HEADER_READ_TIMEOUT_S`,
    /// `VMLET_IDLE_TIMEOUT_S`, `VMLET_TLS_CERT`, `VMLET_TLS_KEY` and `VMLET_PEER_CA_FILE` (empty:
    /// unset), and for `[qemu]` `VMLET_QEMU_CGROUP_ROOT`
    /// (empty: no cgroups), `VMLET_QEMU_JAIL` (`true`/`false`) and
    /// `VMLET_QEMU_UID_RANGE` (`FIRST-LAST`), for `[migration]`
    /// `VMLET_MIGRATION_STALL_TIMEOUT_S` and `VMLET_MIGRATION_DEADLINE_S`,
    /// and `VMLET_FIRMWARE_DIRS`
    /// (`:`-separated).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = var("VMLET_STATE_DIR") {
            self.state_dir = v.into();
        }
        if let Some(v) = var("VMLET_RUN_DIR") {
            self.run_dir = v.into();
        }
        if let Some(v) = var("VMLET_QEMU") {
            self.qemu_binary = v.into();
        }
        if let Some(v) = var("VMLET_QEMU_IMG") {
            self.qemu_img_binary = v.into();
        }
        if let Some(v) = var("VMLET_SWTPM") {
            self.swtpm_binary = v.into();
        }
        if let Some(v) = var("VMLET_IMPORT_DIR") {
            self.import_dir = Some(v.into());
        }
        if let Some(v) = var("VMLET_PROFILE_DIR") {
            self.profile_dir = v.into();
        }
        if let Some(v) = var("VMLET_ACCEL") {
            self.accel = v.parse().map_err(|message| ConfigError::Env {
                name: "VMLET_ACCEL",
                message,
            })?;
        }
        if let Some(v) = var("VMLET_STOP_GRACE_S") {
            self.stop_grace_s = v.parse().map_err(|_| ConfigError::Env {
                name: "VMLET_STOP_GRACE_S",
                message: format!("{v:?} is not a number of seconds"),
            })?;
        }
        if let Some(v) = var("VMLET_START_TIMEOUT_S") {
            self.start_timeout_s = v.parse().map_err(|_| ConfigError::Env {
                name: "VMLET_START_TIMEOUT_S",
                message: format!("{v:?} is not a number of seconds"),
            })?;
        }
        if let Some(v) = var("VMLET_SOCKET") {
            self.socket = Some(v.into());
        }
        if let Some(v) = var("VMLET_SOCKET_GROUP") {
            self.socket_group = Some(v);
        }
        if let Some(v) = var("VMLET_TCP_LISTEN") {
            self.tcp_listen = Some(v.parse().map_err(|_| ConfigError::Env {
                name: "VMLET_TCP_LISTEN",
                message: format!("{v:?} is not an address like 127.0.0.1:8780"),
            })?);
        }
        if let Some(v) = var("VMLET_AUTH_TOKEN_FILE") {
            self.auth_token_file = Some(v.into());
        }
        if let Some(v) = var("VMLET_LOG_FORMAT") {
            self.log_format = v.parse().map_err(|message| ConfigError::Env {
                name: "VMLET_LOG_FORMAT",
                message,
            })?;
        }
        let number = |name: &'static str, v: &str| -> Result<u64, ConfigError> {
            v.parse().map_err(|_| ConfigError::Env {
                name,
                message: format!("{v:?} is not a whole number"),
            })
        };
        if let Some(v) = var("VMLET_CAPACITY_VCPUS") {
            self.capacity.vcpus_total = Some(number("VMLET_CAPACITY_VCPUS", &v)?);
        }
        if let Some(v) = var("VMLET_CAPACITY_MEMORY_MIB") {
            self.capacity.memory_mib_total = Some(number("VMLET_CAPACITY_MEMORY_MIB", &v)?);
        }
        if let Some(v) = var("VMLET_CAPACITY_DISK_GIB") {
            self.capacity.disk_gib_total = Some(number("VMLET_CAPACITY_DISK_GIB", &v)?);
        }
        if let Some(v) = var("VMLET_RESERVED_MEMORY_MIB") {
            self.capacity.reserved_memory_mib = number("VMLET_RESERVED_MEMORY_MIB", &v)?;
        }
        if let Some(v) = var("VMLET_CPU_ALLOCATION_RATIO") {
            self.capacity.cpu_allocation_ratio = v.parse().map_err(|_| ConfigError::Env {
                name: "VMLET_CPU_ALLOCATION_RATIO",
                message: format!("{v:?} is not a number"),
            })?;
        }
        if let Some(v) = var("VMLET_CAPACITY_ENFORCE") {
            self.capacity.enforce = match v.as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => {
                    return Err(ConfigError::Env {
                        name: "VMLET_CAPACITY_ENFORCE",
                        message: format!("{v:?} is not true or false"),
                    })
                }
            };
        }
        if let Some(v) = var("VMLET_ALLOWED_HOST_PATHS") {
            self.allowed_host_paths = Some(std::env::split_paths(&v).collect());
        }
        if let Some(v) = var("VMLET_FIRMWARE_DIRS") {
            self.firmware_dirs = std::env::split_paths(&v).collect();
        }
        if let Some(v) = var("VMLET_CONSOLE_TOKEN_TTL_S") {
            self.console.token_ttl_s = number("VMLET_CONSOLE_TOKEN_TTL_S", &v)?;
        }
        if let Some(v) = var("VMLET_CONSOLE_LOG_MAX_BYTES") {
            self.console.log_max_bytes = number("VMLET_CONSOLE_LOG_MAX_BYTES", &v)?;
        }
        if let Some(v) = var("VMLET_NOVNC_DIR") {
            self.console.novnc_dir = v.into();
        }
        if let Some(v) = var("VMLET_CONSOLE_SILENT_HINT_S") {
            self.console.silent_hint_s = number("VMLET_CONSOLE_SILENT_HINT_S", &v)?;
        }
        if let Some(v) = var("VMLET_IMPORT_ALLOWED_NETWORKS") {
            self.images.import_allowed_networks =
                parse_networks(&v).map_err(|message| ConfigError::Env {
                    name: "VMLET_IMPORT_ALLOWED_NETWORKS",
                    message,
                })?;
        }
        let images = &mut self.images;
        for (name, field) in [
            (
                "VMLET_IMPORT_CONNECT_TIMEOUT_S",
                &mut images.import_connect_timeout_s,
            ),
            (
                "VMLET_IMPORT_IDLE_TIMEOUT_S",
                &mut images.import_idle_timeout_s,
            ),
            ("VMLET_IMPORT_TIMEOUT_S", &mut images.import_timeout_s),
            ("VMLET_IMPORT_MAX_BYTES", &mut images.import_max_bytes),
            (
                "VMLET_IMAGE_MAX_VIRTUAL_BYTES",
                &mut images.max_virtual_bytes,
            ),
            (
                "VMLET_IMAGE_CONVERT_TIMEOUT_S",
                &mut images.convert_timeout_s,
            ),
        ] {
            if let Some(v) = var(name) {
                *field = number(name, &v)?;
            }
        }
        if let Some(v) = var("VMLET_MIGRATION_STALL_TIMEOUT_S") {
            self.migration.stall_timeout_s = number("VMLET_MIGRATION_STALL_TIMEOUT_S", &v)?;
        }
        if let Some(v) = var("VMLET_MIGRATION_DEADLINE_S") {
            self.migration.deadline_s = number("VMLET_MIGRATION_DEADLINE_S", &v)?;
        }
        self.apply_qemu_env(&var)?;
        self.apply_api_env(&var, number)
    }

    /// The `[qemu]` part of [`Settings::apply_env`].
    fn apply_qemu_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = var("VMLET_QEMU_CGROUP_ROOT") {
            // Checked here, not only when the daemon builds its cgroups, so
            // a bad value is named by its variable.
            // (The daemon itself only warns and runs without cgroups when
            // it cannot build them.) An empty hierarchy: `Cgroups::new`
            // checks the root before it looks for controllers.
            if !v.is_empty() {
                use crate::confine::cgroup::{CgroupError, Cgroups, Hierarchy};
                let empty = Hierarchy::V1 { mounts: vec![] };
                if let Err(e @ CgroupError::InvalidRoot { .. }) = Cgroups::new(empty, &v) {
                    return Err(ConfigError::Env {
                        name: "VMLET_QEMU_CGROUP_ROOT",
                        message: e.to_string(),
                    });
                }
            }
            self.qemu.cgroup_root = v;
        }
        if let Some(v) = var("VMLET_QEMU_JAIL") {
            self.qemu.jail = match v.as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => {
                    return Err(ConfigError::Env {
                        name: "VMLET_QEMU_JAIL",
                        message: format!("{v:?} is not true or false"),
                    })
                }
            };
        }
        if let Some(v) = var("VMLET_QEMU_UID_RANGE") {
            crate::confine::ids::IdRange::parse(&v).map_err(|e| ConfigError::Env {
                name: "VMLET_QEMU_UID_RANGE",
                message: e.to_string(),
            })?;
            self.qemu.uid_range = v;
        }
        Ok(())
    }

    /// The `[api]` part of [`Settings::apply_env`].
    fn apply_api_env(
        &mut self,
        var: impl Fn(&str) -> Option<String>,
        number: impl Fn(&'static str, &str) -> Result<u64, ConfigError>,
    ) -> Result<(), ConfigError> {
        if let Some(v) = var("VMLET_ALLOWED_HOSTS") {
            self.api.allowed_hosts = v
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect();
        }
        let count = |name: &'static str, v: &str| -> Result<usize, ConfigError> {
            let n = number(name, v)?;
            usize::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ConfigError::Env {
                    name,
                    message: format!("{v:?} is not a positive number of connections"),
                })
        };
        if let Some(v) = var("VMLET_TCP_MAX_CONNECTIONS") {
            self.api.tcp_max_connections = count("VMLET_TCP_MAX_CONNECTIONS", &v)?;
        }
        if let Some(v) = var("VMLET_UNIX_MAX_CONNECTIONS") {
            self.api.unix_max_connections = count("VMLET_UNIX_MAX_CONNECTIONS", &v)?;
        }
        if let Some(v) = var("VMLET_HEADER_READ_TIMEOUT_S") {
            self.api.header_read_timeout_s = number("VMLET_HEADER_READ_TIMEOUT_S", &v)?;
        }
        if let Some(v) = var("VMLET_IDLE_TIMEOUT_S") {
            self.api.idle_timeout_s = number("VMLET_IDLE_TIMEOUT_S", &v)?;
        }
        // Empty: unset (overrides a file that turns TLS on).
        if let Some(v) = var("VMLET_TLS_CERT") {
            self.api.tls_cert = (!v.is_empty()).then(|| v.into());
        }
        if let Some(v) = var("VMLET_TLS_KEY") {
            self.api.tls_key = (!v.is_empty()).then(|| v.into());
        }
        if let Some(v) = var("VMLET_PEER_CA_FILE") {
            self.api.peer_ca_file = (!v.is_empty()).then(|| v.into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vmlet.toml");
        std::fs::write(&file, "run_dir = \"/tmp/r\"\naccel = \"tcg\"\n").unwrap();
        let mut s = Settings::from_file(&file).unwrap();
        assert_eq!(s.run_dir, Path::new("/tmp/r"));
        assert_eq!(s.accel, AccelChoice::Tcg);
        assert_eq!(s.state_dir, Settings::default().state_dir);
        s.apply_env(|n| (n == "VMLET_ACCEL").then(|| "kvm".to_string()))
            .unwrap();
        assert_eq!(s.accel, AccelChoice::Kvm);
    }

    #[test]
    fn migration_limits_come_from_the_file_and_the_environment() {
        assert_eq!(Settings::default().migration.stall_timeout_s, 60);
        assert_eq!(Settings::default().migration.deadline_s, 0);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vmlet.toml");
        std::fs::write(
            &file,
            "[migration]\nstall_timeout_s = 15\ndeadline_s = 600\n",
        )
        .unwrap();
        let mut s = Settings::from_file(&file).unwrap();
        assert_eq!(s.migration.stall_timeout_s, 15);
        assert_eq!(s.migration.deadline_s, 600);
        s.apply_env(|n| (n == "VMLET_MIGRATION_STALL_TIMEOUT_S").then(|| "5".to_string()))
            .unwrap();
        assert_eq!(s.migration.stall_timeout_s, 5);
        let err = s
            .apply_env(|n| (n == "VMLET_MIGRATION_DEADLINE_S").then(|| "soon".to_string()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("VMLET_MIGRATION_DEADLINE_S"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vmlet.toml");
        std::fs::write(&file, "run_dri = \"/tmp/r\"\n").unwrap();
        let err = Settings::from_file(&file).unwrap_err().to_string();
        assert!(err.contains("run_dri"), "{err}");
        let err = Settings::default()
            .apply_env(|n| (n == "VMLET_ACCEL").then(|| "fast".to_string()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("VMLET_ACCEL"), "{err}");
    }

    #[test]
    fn host_roots_may_not_overlap_what_vmlet_manages() {
        let managed = [PathBuf::from("/var/lib/vmlet"), PathBuf::from("/run/vmlet")];
        let default = Path::new("/var/lib/vmlet/host");
        let refusal = |root: &str| host_root_refusal(Path::new(root), &managed, default);
        assert_eq!(refusal("/srv/vm-files"), None);
        assert_eq!(refusal("/var/lib/vmlet/host"), None);
        assert_eq!(refusal("/var/lib/vmlet/host/kernels"), None);
        for bad in [
            "/var/lib/vmlet",
            "/var/lib",
            "/",
            "/var/lib/vmlet/volumes",
            "/var/lib/vmlet/vms/x",
            "/run",
            "/run/vmlet/vms",
            "/proc/self",
            "/dev",
        ] {
            assert!(refusal(bad).is_some(), "{bad} accepted");
        }
        assert!(refusal("/var/lib/vmlet")
            .unwrap()
            .contains("contains /var/lib/vmlet"));
    }

    #[test]
    fn the_default_host_dir_is_made_and_an_overlapping_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            ..Settings::default()
        };
        std::fs::create_dir_all(&s.state_dir).unwrap();
        let roots = s.checked_host_roots().unwrap();
        assert_eq!(
            roots,
            vec![std::fs::canonicalize(s.state_dir.join("host")).unwrap()]
        );
        s.allowed_host_paths = Some(vec![dir.path().to_path_buf()]);
        let err = s.checked_host_roots().unwrap_err();
        assert!(
            err.contains("allowed_host_paths") && err.contains("manages"),
            "{err}"
        );
    }

    #[test]
    fn image_import_settings_from_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vmlet.toml");
        std::fs::write(
            &file,
            "[images]\nimport_allowed_networks = [\"10.20.0.0/16\"]\nimport_max_bytes = 1024\n",
        )
        .unwrap();
        let mut s = Settings::from_file(&file).unwrap();
        assert_eq!(
            s.images.import_allowed_networks,
            vec!["10.20.0.0/16"
                .parse::<crate::storage::fetch::IpNet>()
                .unwrap()]
        );
        assert_eq!(s.images.import_max_bytes, 1024);
        assert_eq!(s.images.import_timeout_s, 6 * 3600);
        s.apply_env(|n| match n {
            "VMLET_IMPORT_ALLOWED_NETWORKS" => Some("127.0.0.0/8,::1".into()),
            "VMLET_IMPORT_TIMEOUT_S" => Some("5".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(s.images.import_allowed_networks.len(), 2);
        assert_eq!(s.images.import_timeout_s, 5);

        // A bad network is named, in the file and in the environment.
        std::fs::write(
            &file,
            "[images]\nimport_allowed_networks = [\"10.0.0.1/8\"]\n",
        )
        .unwrap();
        let err = Settings::from_file(&file).unwrap_err().to_string();
        assert!(
            err.contains("import_allowed_networks") && err.contains("host bits"),
            "{err}"
        );
        let err = Settings::default()
            .apply_env(|n| (n == "VMLET_IMPORT_ALLOWED_NETWORKS").then(|| "intranet".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("VMLET_IMPORT_ALLOWED_NETWORKS"), "{err}");
    }

    #[test]
    fn api_settings_come_from_the_file_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vmlet.toml");
        std::fs::write(
            &file,
            "[api]\nallowed_hosts = [\"node1.example.com\"]\ntcp_max_connections = 16\n",
        )
        .unwrap();
        let mut s = Settings::from_file(&file).unwrap();
        assert_eq!(s.api.allowed_hosts, vec!["node1.example.com".to_string()]);
        assert_eq!(s.api.tcp_max_connections, 16);
        assert_eq!(s.api.unix_max_connections, 128);
        let env = |n: &str| match n {
            "VMLET_ALLOWED_HOSTS" => Some("a.example, b.example:8780 ,".to_string()),
            "VMLET_UNIX_MAX_CONNECTIONS" => Some("8".to_string()),
            "VMLET_HEADER_READ_TIMEOUT_S" => Some("2".to_string()),
            "VMLET_IDLE_TIMEOUT_S" => Some("5".to_string()),
            _ => None,
        };
        s.apply_env(env).unwrap();
        assert_eq!(s.api.allowed_hosts, ["a.example", "b.example:8780"]);
        assert_eq!(
            (
                s.api.unix_max_connections,
                s.api.header_read_timeout_s,
                s.api.idle_timeout_s
            ),
            (8, 2, 5)
        );
        let err = Settings::default()
            .apply_env(|n| (n == "VMLET_TCP_MAX_CONNECTIONS").then(|| "0".to_string()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("VMLET_TCP_MAX_CONNECTIONS"), "{err}");
        assert_eq!(s.auth_token_path(), s.state_dir.join("api-token"));
    }

    #[test]
    fn tls_files_come_from_the_file_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vmlet.toml");
        std::fs::write(
            &file,
            "[api]\ntls_cert = \"/etc/vmlet/cert.pem\"\ntls_key = \"/etc/vmlet/key.pem\"\n",
        )
        .unwrap();
        let mut s = Settings::from_file(&file).unwrap();
        assert_eq!(
            s.api.tls_cert.as_deref(),
            Some(Path::new("/etc/vmlet/cert.pem"))
        );
        assert_eq!(
            s.api.tls_key.as_deref(),
            Some(Path::new("/etc/vmlet/key.pem"))
        );
        s.apply_env(|n| match n {
            "VMLET_TLS_CERT" => Some("/srv/cert.pem".to_string()),
            "VMLET_TLS_KEY" => Some(String::new()),
            _ => None,
        })
        .unwrap();
        assert_eq!(s.api.tls_cert.as_deref(), Some(Path::new("/srv/cert.pem")));
        assert_eq!(s.api.tls_key, None);
        assert_eq!(Settings::default().api.tls_cert, None);
    }

    #[test]
    fn qemu_confinement_settings_come_from_the_environment() {
        let mut s = Settings::default();
        assert_eq!((s.qemu.cgroup_root.as_str(), s.qemu.jail), ("vmlet", true));
        s.apply_env(|n| match n {
            "VMLET_QEMU_CGROUP_ROOT" => Some("vmlet-test-1/a".to_string()),
            "VMLET_QEMU_JAIL" => Some("false".to_string()),
            "VMLET_QEMU_UID_RANGE" => Some("800000-800099".to_string()),
            _ => None,
        })
        .unwrap();
        assert_eq!(s.qemu.cgroup_root, "vmlet-test-1/a");
        assert!(!s.qemu.jail);
        assert_eq!(s.qemu.uid_range, "800000-800099");
        s.apply_env(|n| (n == "VMLET_QEMU_CGROUP_ROOT").then(String::new))
            .unwrap();
        assert_eq!(s.qemu.cgroup_root, "", "empty turns cgroups off");
        for (name, bad) in [
            ("VMLET_QEMU_CGROUP_ROOT", "/abs"),
            ("VMLET_QEMU_CGROUP_ROOT", "a/../b"),
            ("VMLET_QEMU_JAIL", "maybe"),
            ("VMLET_QEMU_UID_RANGE", "0-10"),
            ("VMLET_QEMU_UID_RANGE", "65000-66000"),
            ("VMLET_QEMU_UID_RANGE", "many"),
        ] {
            let err = Settings::default()
                .apply_env(|n| (n == name).then(|| bad.to_string()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(name), "{name}={bad}: {err}");
        }
    }
}
