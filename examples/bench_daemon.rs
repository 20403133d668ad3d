//! Benchmark of the daemon: a real `vmlet serve` (the release binary) on a
//! scratch state and run directory, driven over its unix socket with the
//! test guest under TCG. Run through `scripts/bench.sh`, which builds the
//! binary and the test guest and passes the guest's paths in `BENCH_KERNEL`
//! and `BENCH_INITRD` (`BENCH_VMLET` overrides the binary). Prints figures;
//! asserts nothing about speed.
//!
//! Whatever happens, the scratch directory is removed and every process
//! whose command line names it (the daemon and its QEMUs, and the QEMUs
//! launched directly) is killed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;
use vmlet::client::{Client, Method};
use vmlet::qemu::accel::Accel;
use vmlet::qemu::argv::RunPaths;
use vmlet::qemu::instance::{self, StopMode};
use vmlet::qemu::profile::{Profile, Profiles};
use vmlet::spec::VmSpec;
use vmlet::vm::state::PowerState;

/// Samples for the create+start comparison.
const SERIAL_RUNS: usize = 20;
/// VMs created and started at once.
const CONCURRENT_VMS: usize = 20;
/// `GET /v1/vms` requests timed.
const LIST_REQUESTS: usize = 1000;
/// Guest memory (MiB).
const MEMORY_MIB: u64 = 128;
/// Bound on any one API call or wait: far above what anything should take,
/// so a slow machine is measured rather than failed.
const TIMEOUT: Duration = Duration::from_secs(120);

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{name} is not set: run scripts/bench.sh"))
}

/// One figure, aligned with the other benchmark's.
fn row(label: &str, value: String) {
    println!("{:<40}{value}", format!("{label}:"));
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// VmRSS of `pid` in MiB.
fn rss_mib(pid: u32) -> f64 {
    vmlet::node::rss_kib(pid).unwrap_or_else(|| panic!("no VmRSS for pid {pid}")) as f64 / 1024.0
}

/// Pids of processes (other than this one) whose command line contains
/// `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (pid != me && cmdline.contains(needle)).then_some(pid)
        })
        .collect()
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
}

/// Awaits `future`, panicking with `what` after [`TIMEOUT`].
async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {TIMEOUT:?}"))
}

/// The scratch directory and the daemon. Dropping it (also on a panic)
/// kills the daemon and every process naming the scratch directory, then
/// removes the directory.
struct Scratch {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
}

impl Scratch {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn run_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    fn log(&self) -> PathBuf {
        self.path().join("daemon.log")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    fn daemon_pid(&self) -> u32 {
        self.daemon.as_ref().expect("the daemon runs").id()
    }

    /// Starts `vmlet serve` on the scratch directories and waits until it
    /// answers; returns its client.
    async fn start_daemon(&mut self, vmlet: &Path, guest_dir: &Path) -> Client {
        let log = std::fs::File::create(self.log()).expect("creating the daemon log");
        // Host files come from a directory of their own (never one holding
        // the state or run directory).
        let host = self.path().join("host");
        std::fs::create_dir_all(&host).expect("creating the host-file directory");
        let allowed = format!("{}:{}", guest_dir.display(), host.display());
        let child = Command::new(vmlet)
            .arg("serve")
            .arg("--config")
            .arg("/dev/null")
            .arg("--state-dir")
            .arg(self.path().join("state"))
            .arg("--run-dir")
            .arg(self.run_dir())
            .env("VMLET_ACCEL", "tcg")
            .env("VMLET_ALLOWED_HOST_PATHS", allowed)
            .env("VMLET_IMPORT_DIR", self.path().join("import"))
            // 20 one-vCPU VMs on a small host: measure, do not schedule.
            .env("VMLET_CAPACITY_ENFORCE", "false")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", vmlet.display()));
        self.daemon = Some(child);
        let client = Client::unix(self.run_dir().join("vmlet.sock"));
        let started = Instant::now();
        loop {
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("vmlet serve exited with {status}:\n{}", self.log_tail());
            }
            if client.health().await.is_ok() {
                return client;
            }
            assert!(
                started.elapsed() < TIMEOUT,
                "vmlet serve did not answer within {TIMEOUT:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERMs the daemon and waits for it.
    fn stop_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let needle = self.path().display().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<i32> = processes_with(&needle)
                .into_iter()
                .filter(|p| pid_alive(*p))
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("bench_daemon: processes {left:?} outlived SIGKILL");
                break;
            }
            for pid in left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::thread::panicking() {
            eprintln!("--- vmlet serve log (tail) ---\n{}", self.log_tail());
        }
        // `dir` removes the directory after this.
    }
}

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Guest {
    /// The spec as API JSON (no `uuid`; the daemon picks it).
    fn spec_json(&self, name: &str) -> Value {
        json!({
            "name": name,
            "vcpus": 1,
            "memory_mib": MEMORY_MIB,
            "profile": "q35",
            "boot": {
                "type": "kernel",
                "kernel": self.kernel,
                "initrd": self.initrd,
                "cmdline": "console=ttyS0 panic=-1 quiet guest.action=hold",
            },
        })
    }

    /// The same spec as the daemon would hold it, with a fresh UUID.
    fn spec(&self, name: &str) -> VmSpec {
        let mut value = self.spec_json(name);
        value["uuid"] = json!(Uuid::new_v4());
        serde_json::from_value(value).expect("the bench spec parses as a VmSpec")
    }
}

/// POST /v1/vms then POST start; returns the VM's id once it is `running`.
async fn create_and_start(client: &Client, spec: &Value) -> Uuid {
    create_then_start(client, spec).await.0
}

/// POST /v1/vms then POST start; returns the VM's id once it is `running`,
/// and how long the start alone took (POST start until `running`).
async fn create_then_start(client: &Client, spec: &Value) -> (Uuid, Duration) {
    let name = spec["name"].as_str().unwrap_or("?").to_string();
    let vm = within(&format!("creating {name}"), client.create_vm(spec))
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    let id = vm.id.to_string();
    let start_sent = Instant::now();
    let vm = within(&format!("starting {name}"), client.start(&id))
        .await
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    if vm.state != PowerState::Running {
        // The start answer should already say running; wait if it does not.
        let started = Instant::now();
        loop {
            let vm = client
                .get_vm(&id)
                .await
                .unwrap_or_else(|e| panic!("getting {name}: {e}"));
            match vm.state.get() {
                PowerState::Running => break,
                PowerState::Starting => {}
                other => panic!("{name} is {other:?} after start: {:?}", vm.error),
            }
            assert!(
                started.elapsed() < TIMEOUT,
                "{name} not running {TIMEOUT:?} after start"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    (vm.id, start_sent.elapsed())
}

/// Force-deletes a VM and waits for its QEMU to be gone.
async fn delete(client: &Client, id: Uuid) {
    let pid = client
        .get_vm(&id.to_string())
        .await
        .ok()
        .and_then(|v| v.pid);
    within(
        &format!("deleting {id}"),
        client.delete_vm(&id.to_string(), true),
    )
    .await
    .unwrap_or_else(|e| panic!("deleting {id}: {e}"));
    if let Some(pid) = pid {
        let started = Instant::now();
        while pid_alive(pid) {
            assert!(
                started.elapsed() < TIMEOUT,
                "QEMU {pid} of deleted VM {id} still runs after {TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::main]
async fn main() {
    let guest = Guest {
        kernel: env_path("BENCH_KERNEL"),
        initrd: env_path("BENCH_INITRD"),
    };
    let vmlet = std::env::var_os("BENCH_VMLET")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/vmlet"));
    assert!(
        vmlet.exists(),
        "{} is missing: build it with cargo build --release",
        vmlet.display()
    );
    let profiles = Profiles::built_in().expect("built-in profiles");
    let profile = profiles.get("q35").expect("the q35 profile");
    // Pinned as the daemon pins its VMs.
    let machine = vmlet::qemu::capabilities::probe(
        Path::new("qemu-system-x86_64"),
        Accel::Tcg,
        vmlet::qemu::capabilities::PROBE_DEADLINE,
    )
    .await
    .expect("probing qemu-system-x86_64")
    .pin(profile, Accel::Tcg)
    .expect("the q35 profile runs with this QEMU");

    let mut scratch = Scratch {
        dir: tempfile::Builder::new()
            .prefix("vmlet-bench-daemon-")
            .tempdir_in("/tmp")
            .expect("creating a scratch directory in /tmp"),
        daemon: None,
    };
    // On SIGINT or SIGTERM, panic so the guard still cleans up.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        () = run(&mut scratch, &vmlet, &guest, profile, &machine) => {}
        _ = tokio::signal::ctrl_c() => panic!("interrupted (SIGINT)"),
        _ = sigterm.recv() => panic!("terminated (SIGTERM)"),
    }
}

/// Takes every figure and prints them.
async fn run(
    scratch: &mut Scratch,
    vmlet: &Path,
    guest: &Guest,
    profile: &Profile,
    machine: &vmlet::spec::MachinePin,
) {
    let guest_dir = guest.kernel.parent().expect("BENCH_KERNEL has a directory");
    let direct_root = scratch.path().join("direct");
    let client = scratch.start_daemon(vmlet, guest_dir).await;
    // Let the daemon settle before its idle size is taken.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = rss_mib(scratch.daemon_pid());

    // (a) create+start via the API vs launch + cont directly, interleaved
    // so drift affects both alike; one untimed warm-up round each.
    let mut via_api = Vec::new();
    let mut start_only = Vec::new();
    let mut direct = Vec::new();
    for round in 0..=SERIAL_RUNS {
        let spec = guest.spec_json(&format!("serial-{round}"));
        let started = Instant::now();
        let (id, took_start) = create_then_start(&client, &spec).await;
        let took = started.elapsed();
        delete(&client, id).await;

        let spec = guest.spec(&format!("direct-{round}"));
        let paths = RunPaths::new(&direct_root, spec.uuid);
        let started = Instant::now();
        let files = vmlet::vm::launch::LaunchFiles::open(
            &spec,
            &vmlet::storage::Layout::new(Path::new("/var/lib/vmlet")),
            &[std::path::PathBuf::from("/")],
        )
        .unwrap_or_else(|e| panic!("opening the guest's files: {e}"));
        let vm = within(
            "direct launch",
            instance::launch(instance::Launch {
                binary: Path::new("qemu-system-x86_64"),
                deadline: vmlet::qemu::process::SPAWN_DEADLINE,
                spec: &spec,
                profile,
                machine,
                accel: Accel::Tcg,
                paths: &paths,
                serial_log: &paths.serial_log(),
                serial_banner: None,
                qemu_log: &paths.dir.with_extension("qemu.log"),
                disks: &files.disks,
                disk_sets: &files.sets,
                passed_fds: &files.passed,
                boot_files: files.boot.as_ref(),
                nics: &[],
                pflash: files.pflash,
                confine: Default::default(),
                tpm: None,
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("launching QEMU directly: {e}"));
        within("QMP cont", vm.start_guest())
            .await
            .unwrap_or_else(|e| panic!("QMP cont: {e}"));
        let took_direct = started.elapsed();
        within("stopping the direct QEMU", vm.stop(StopMode::Force))
            .await
            .unwrap_or_else(|e| panic!("stopping the direct QEMU: {e}"));
        instance::remove_run_dir(&vm.paths);

        if round > 0 {
            via_api.push(took);
            start_only.push(took_start);
            direct.push(took_direct);
        }
    }
    let via_api = median(via_api);
    let start_only = median(start_only);
    let direct = median(direct);

    // (b) many VMs created and started at once.
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENT_VMS)
        .map(|i| {
            let client = client.clone();
            let spec = guest.spec_json(&format!("many-{i}"));
            tokio::spawn(async move { create_and_start(&client, &spec).await })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.expect("a create+start task panicked"));
    }
    let concurrent = started.elapsed();
    // Paused guests keep the machine quiet for the figures below.
    for id in &ids {
        within("pausing", client.pause(&id.to_string()))
            .await
            .unwrap_or_else(|e| panic!("pausing {id}: {e}"));
    }

    // (c) the daemon's size with them.
    let rss_loaded = rss_mib(scratch.daemon_pid());

    // (d) listing latency.
    let listed = within("listing VMs", client.list_vms())
        .await
        .unwrap_or_else(|e| panic!("listing VMs: {e}"));
    assert_eq!(listed.len(), CONCURRENT_VMS, "GET /v1/vms lists every VM");
    let mut latency = Vec::with_capacity(LIST_REQUESTS);
    for _ in 0..LIST_REQUESTS {
        let t = Instant::now();
        let response = within("GET /v1/vms", client.request(Method::GET, "/v1/vms", None))
            .await
            .unwrap_or_else(|e| panic!("GET /v1/vms: {e}"));
        latency.push(t.elapsed());
        assert_eq!(response.status, 200, "GET /v1/vms: {}", response.text());
    }
    latency.sort();

    // (e) a Prometheus scrape of them all (vCPU time, RSS, block and
    // balloon over QMP, NIC counters).
    let mut scrapes = Vec::with_capacity(SCRAPES);
    let mut scrape_bytes = 0;
    for _ in 0..SCRAPES {
        let t = Instant::now();
        let response = within(
            "GET /metrics",
            client.request(Method::GET, "/metrics", None),
        )
        .await
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        scrapes.push(t.elapsed());
        assert_eq!(response.status, 200, "GET /metrics: {}", response.text());
        scrape_bytes = response.body.len();
    }
    scrapes.sort();

    for id in ids {
        delete(&client, id).await;
    }
    let rss_after = rss_mib(scratch.daemon_pid());
    let storage = storage_figures(&client, scratch, guest).await;
    scratch.stop_daemon();

    row(
        &format!("create+start via API (median of {SERIAL_RUNS})"),
        ms(via_api),
    );
    row(
        &format!("direct launch+cont (median of {SERIAL_RUNS})"),
        ms(direct),
    );
    row(
        "ratio API / direct",
        format!("{:.2}x", via_api.as_secs_f64() / direct.as_secs_f64()),
    );
    row(
        &format!("start alone via API, POST start → running (median of {SERIAL_RUNS})"),
        ms(start_only),
    );
    row(
        "ratio API start / direct",
        format!("{:.2}x", start_only.as_secs_f64() / direct.as_secs_f64()),
    );
    row(
        &format!("{CONCURRENT_VMS} concurrent create+start"),
        format!(
            "{:.2} s  ({:.1} VMs/s)",
            concurrent.as_secs_f64(),
            CONCURRENT_VMS as f64 / concurrent.as_secs_f64()
        ),
    );
    row("daemon RSS idle", format!("{rss_idle:.1} MiB"));
    row(
        &format!("daemon RSS with {CONCURRENT_VMS} VMs"),
        format!("{rss_loaded:.1} MiB"),
    );
    row(
        "daemon RSS after deleting them",
        format!("{rss_after:.1} MiB"),
    );
    row(
        &format!("GET /v1/vms p50 / p99 ({CONCURRENT_VMS} VMs)"),
        format!(
            "{:.2} / {:.2} ms",
            percentile(&latency, 50.0).as_secs_f64() * 1000.0,
            percentile(&latency, 99.0).as_secs_f64() * 1000.0
        ),
    );
    row(
        &format!("GET /metrics p50 / p99 ({CONCURRENT_VMS} VMs)"),
        format!(
            "{:.1} / {:.1} ms  ({} KiB)",
            percentile(&scrapes, 50.0).as_secs_f64() * 1000.0,
            percentile(&scrapes, 99.0).as_secs_f64() * 1000.0,
            scrape_bytes / 1024
        ),
    );
    storage.print();
}

/// Scrapes of `/metrics` timed with every VM up.
const SCRAPES: usize = 20;

/// Size of the image imported by the storage figures.
const IMPORT_MIB: u64 = 256;
/// Snapshot and revert samples.
const SNAPSHOT_RUNS: usize = 5;

struct StorageFigures {
    import: Duration,
    create_with_overlay: Duration,
    snapshot: Duration,
    revert: Duration,
}

impl StorageFigures {
    fn print(&self) {
        row(
            &format!("import {IMPORT_MIB} MiB raw image"),
            format!(
                "{}  ({:.0} MiB/s)",
                ms(self.import),
                IMPORT_MIB as f64 / self.import.as_secs_f64()
            ),
        );
        row(
            "create VM with an overlay disk",
            ms(self.create_with_overlay),
        );
        row(
            &format!("live snapshot (median of {SNAPSHOT_RUNS})"),
            ms(self.snapshot),
        );
        row(
            &format!("live revert (median of {SNAPSHOT_RUNS})"),
            ms(self.revert),
        );
    }
}

async fn api(client: &Client, method: Method, path: &str, body: Option<&Value>) -> Value {
    let (status, value) = within(path, client.request_json(method.clone(), path, body))
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert!(status < 300, "{method} {path}: {status} {value}");
    value
}

/// Image import, a VM on an overlay, and live snapshot/revert times.
async fn storage_figures(client: &Client, scratch: &Scratch, guest: &Guest) -> StorageFigures {
    let import_dir = scratch.path().join("import");
    std::fs::create_dir_all(&import_dir).expect("creating the import directory");
    let raw = import_dir.join("bench.raw");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&raw).expect("creating the raw image");
        // Real bytes (not a sparse file), so the import reads and hashes
        // every one.
        let chunk: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..IMPORT_MIB {
            file.write_all(&chunk).expect("writing the raw image");
        }
    }
    let started = Instant::now();
    api(
        client,
        Method::POST,
        "/v1/images",
        Some(&json!({"name": "bench", "path": raw})),
    )
    .await;
    loop {
        let image = api(client, Method::GET, "/v1/images/bench", None).await;
        match image["status"].as_str() {
            Some("ready") => break,
            Some("importing") => {}
            _ => panic!("import failed: {image}"),
        }
        assert!(started.elapsed() < TIMEOUT, "import took over {TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let import = started.elapsed();

    let mut spec = guest.spec_json("storage");
    spec["disks"] = json!([{"image": "bench"}]);
    let started = Instant::now();
    let vm = api(client, Method::POST, "/v1/vms", Some(&spec)).await;
    let create_with_overlay = started.elapsed();
    let id: Uuid = serde_json::from_value(vm["id"].clone()).expect("a VM id");
    api(client, Method::POST, &format!("/v1/vms/{id}/start"), None).await;
    // Snapshots of a booted guest, not of one still loading its kernel.
    let serial = scratch
        .path()
        .join("state/vms")
        .join(id.to_string())
        .join("console.log");
    let booting = Instant::now();
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("GUEST-READY")
    {
        assert!(booting.elapsed() < TIMEOUT, "the guest did not boot");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut snapshots = Vec::new();
    let mut reverts = Vec::new();
    for round in 0..SNAPSHOT_RUNS {
        let name = format!("s{round}");
        let t = Instant::now();
        api(
            client,
            Method::POST,
            &format!("/v1/vms/{id}/snapshots"),
            Some(&json!({"name": name})),
        )
        .await;
        snapshots.push(t.elapsed());
        let t = Instant::now();
        api(
            client,
            Method::POST,
            &format!("/v1/vms/{id}/snapshots/{name}/revert"),
            None,
        )
        .await;
        reverts.push(t.elapsed());
    }
    delete(client, id).await;
    api(client, Method::DELETE, "/v1/images/bench", None).await;
    StorageFigures {
        import,
        create_with_overlay,
        snapshot: median(snapshots),
        revert: median(reverts),
    }
}
