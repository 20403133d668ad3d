//! Benchmark of live migration: two real `vmlet serve` daemons (the release
//! binary) on scratch directories, each with a TCP listener on loopback and
//! a token of its own, and a 256 MiB test guest (TCG) with a 64 MiB blank
//! disk full of data, moved from one daemon to the other and back. Prints
//! the median (and range) of the total time and the downtime as the source
//! daemon records them, and of the time the API caller waits. Run through
//! `scripts/bench-migration.sh`, which builds the binary and the test guest
//! and passes the guest's paths in `BENCH_KERNEL` and `BENCH_INITRD`
//! (`BENCH_VMLET` overrides the binary, `BENCH_RUNS` the number of
//! migrations, default 5). Asserts nothing about speed.
//!
//! Whatever happens, both scratch directories are removed and every
//! process naming them or running the guest (`-uuid`) is killed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;
use vmlet::client::{Client, Method};
use vmlet::spec::{MigrateRequest, Migration, MigrationTarget, Phase};

/// Guest memory (MiB).
const MEMORY_MIB: u64 = 256;
/// The blank disk's size, all of it written before the guest starts (MiB).
const DISK_MIB: u64 = 64;
/// Bound on any one wait: far above what anything should take, so a slow
/// machine is measured rather than failed.
const TIMEOUT: Duration = Duration::from_secs(300);

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{name} is not set: run scripts/bench-migration.sh"))
}

/// One figure, aligned like the other benchmarks'.
fn row(label: &str, value: String) {
    println!("{:<40}{value}", format!("{label}:"));
}

/// "median X ms (min–max)" of millisecond samples.
fn summary(mut samples: Vec<u64>) -> String {
    samples.sort_unstable();
    format!(
        "median {} ms ({}–{} ms, {} runs)",
        samples[samples.len() / 2],
        samples[0],
        samples[samples.len() - 1],
        samples.len()
    )
}

/// Pids of live processes (other than this one) whose command line
/// contains `needle`.
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
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let zombie = stat.rsplit(") ").next().unwrap_or("").starts_with('Z');
            (pid != me && !zombie && cmdline.contains(needle)).then_some(pid)
        })
        .collect()
}

/// SIGKILLs every process whose command line contains one of `needles`,
/// until none is left (10 s at most).
fn kill_all(needles: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<i32> = needles.iter().flat_map(|n| processes_with(n)).collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("bench_migration: processes {left:?} outlived SIGKILL");
            return;
        }
        for pid in left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One daemon on a scratch directory, with a TCP listener on loopback.
/// Dropping it (also on a panic) kills the daemon and the processes
/// naming its directory, then removes the directory.
struct Host {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    client: Client,
    url: String,
    token: String,
    /// `VMLET_QEMU_CGROUP_ROOT` (removed by [`Cleanup`]).
    cgroup_root: String,
}

impl Host {
    async fn start(vmlet: &Path, guest_dir: &Path, uid_range: &str) -> Host {
        let dir = tempfile::Builder::new()
            .prefix("vmlet-bench-migration-")
            .tempdir_in("/tmp")
            .expect("creating a scratch directory in /tmp");
        let token = format!("tok-{}", Uuid::new_v4().simple());
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, &token).expect("writing the token");
        std::fs::set_permissions(
            &token_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod 0600 the token");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let listen = format!("127.0.0.1:{port}");
        let cgroup_root = format!("vmlet-bench-{}", Uuid::new_v4().simple());
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("the daemon log");
        let child = Command::new(vmlet)
            .arg("serve")
            .arg("--config")
            .arg("/dev/null")
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .env("VMLET_ACCEL", "tcg")
            .env("VMLET_ALLOWED_HOST_PATHS", guest_dir)
            .env("VMLET_TCP_LISTEN", &listen)
            .env("VMLET_AUTH_TOKEN_FILE", &token_file)
            // Measure, do not schedule.
            .env("VMLET_CAPACITY_ENFORCE", "false")
            // Two daemons on one host: each needs cgroups and uids of its
            // own (the guest's cgroup is named after its UUID, the same on
            // both ends).
            .env("VMLET_QEMU_CGROUP_ROOT", &cgroup_root)
            .env("VMLET_QEMU_UID_RANGE", uid_range)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", vmlet.display()));
        let mut host = Host {
            client: Client::unix(dir.path().join("run/vmlet.sock")),
            dir,
            daemon: Some(child),
            url: format!("http://{listen}"),
            token,
            cgroup_root,
        };
        let started = Instant::now();
        loop {
            if let Some(status) = host.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!("vmlet serve exited with {status}:\n{}", host.log_tail());
            }
            if host.client.health().await.is_ok() {
                return host;
            }
            assert!(
                started.elapsed() < TIMEOUT,
                "vmlet serve did not answer within {TIMEOUT:?}:\n{}",
                host.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn target(&self) -> MigrationTarget {
        MigrationTarget {
            url: self.url.clone(),
            token: self.token.clone(),
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        kill_all(&[self.dir.path().display().to_string()]);
        if std::thread::panicking() {
            eprintln!(
                "--- vmlet serve log {} (tail) ---\n{}",
                self.url,
                self.log_tail()
            );
        }
    }
}

/// Removes a daemon's cgroup root and the VM cgroups below it (empty
/// ones only: the kernel empties a cgroup a moment after its last task
/// exits, so this retries for a few seconds).
fn remove_cgroup_root(root: &str) {
    use vmlet::confine::cgroup::{Cgroups, Hierarchy};
    let Ok(cgroups) = Hierarchy::detect().and_then(|h| Cgroups::new(h, root)) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    for dir in cgroups.root_dirs() {
        while dir.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = std::fs::remove_dir(entry.path());
                    }
                }
            }
            if std::fs::remove_dir(&dir).is_ok() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Dropped after both hosts (also on a panic): kills the guest's QEMUs
/// (a confined QEMU names no path of the daemon's, only its `-uuid`), then
/// removes the daemons' cgroup roots, which only empty cgroups leave.
#[derive(Default)]
struct Cleanup {
    guest: Option<Uuid>,
    cgroup_roots: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(uuid) = self.guest {
            kill_all(&[format!("-uuid {uuid} ")]);
        }
        for root in &self.cgroup_roots {
            remove_cgroup_root(root);
        }
    }
}

/// Polls migration `id` on `host` until it is final.
async fn wait_final(host: &Host, id: Uuid) -> Migration {
    let started = Instant::now();
    loop {
        let m = host
            .client
            .get_migration(id)
            .await
            .unwrap_or_else(|e| panic!("GET /v1/migrations/{id}: {e}"));
        if m.phase.is_final() {
            return m;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "migration {id} did not end within {TIMEOUT:?}: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn run(a: &Host, b: &Host, kernel: &Path, initrd: &Path, cleanup: &mut Cleanup) {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(5);
    let spec = json!({
        "name": format!("bench-mig-{}", &Uuid::new_v4().simple().to_string()[..8]),
        "vcpus": 1,
        "memory_mib": MEMORY_MIB,
        "boot": {"type": "kernel", "kernel": kernel, "initrd": initrd,
                 "cmdline": "console=ttyS0 panic=-1 quiet guest.action=hold"},
        "disks": [{"name": "data", "size_mib": DISK_MIB}],
    });
    let (status, vm) = a
        .client
        .request_json(Method::POST, "/v1/vms", Some(&spec))
        .await
        .expect("POST /v1/vms");
    assert_eq!(status, 201, "{vm}");
    let id: Uuid = vm["id"].as_str().unwrap().parse().unwrap();
    cleanup.guest = Some(id);
    // Data in the whole disk, so the disk copy moves 64 MiB.
    let disk = a
        .state_dir()
        .join("vms")
        .join(id.to_string())
        .join("disks/data.qcow2");
    assert!(disk.exists(), "{} is missing", disk.display());
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &format!("write -P 0xa5 0 {DISK_MIB}M")])
        .arg(&disk)
        .output()
        .expect("running qemu-io");
    assert!(out.status.success(), "qemu-io: {out:?}");
    a.client.start(&id.to_string()).await.expect("start");
    let console = a
        .state_dir()
        .join("vms")
        .join(id.to_string())
        .join("console.log");
    let started = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("GUEST-READY")
    {
        assert!(started.elapsed() < TIMEOUT, "the guest did not boot");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (mut totals, mut downtimes, mut waits) = (Vec::new(), Vec::new(), Vec::new());
    let (mut from, mut to) = (a, b);
    for run in 0..runs {
        let asked = Instant::now();
        let request = MigrateRequest {
            target: to.target(),
            max_downtime_ms: vmlet::spec::DEFAULT_MAX_DOWNTIME_MS,
            max_bandwidth_mib_s: None,
        };
        let m = from
            .client
            .migrate_vm(&id.to_string(), &request)
            .await
            .unwrap_or_else(|e| panic!("migrate: {e}\n{}", from.log_tail()));
        let done = wait_final(from, m.id).await;
        let waited = asked.elapsed().as_millis() as u64;
        assert_eq!(
            done.phase,
            Phase::Completed,
            "run {run}: {done:?}\n{}",
            to.log_tail()
        );
        let total = done.total_ms.expect("a completed migration has total_ms");
        let downtime = done
            .downtime_ms
            .expect("a completed migration has downtime_ms");
        println!(
            "  run {}: {} -> {}: total {total} ms, downtime {downtime} ms, waited {waited} ms",
            run + 1,
            from.url,
            to.url
        );
        totals.push(total);
        downtimes.push(downtime);
        waits.push(waited);
        // The next run goes back once the guest runs on the other side and
        // left this one (the source may still list it for a moment after
        // its record says completed).
        let started = Instant::now();
        loop {
            let there = to.client.get_vm(&id.to_string()).await;
            let here = from.client.get_vm(&id.to_string()).await;
            if there.is_ok_and(|vm| vm.state.as_str() == "running")
                && here.is_err_and(|e| e.status() == Some(404))
            {
                break;
            }
            assert!(
                started.elapsed() < TIMEOUT,
                "the guest does not run on {}",
                to.url
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::mem::swap(&mut from, &mut to);
    }
    println!("  ({MEMORY_MIB} MiB guest, {DISK_MIB} MiB disk of data, no bandwidth cap)");
    row("migration total time", summary(totals));
    row("migration downtime", summary(downtimes));
    row("migration as the caller waits", summary(waits));
}

#[tokio::main]
async fn main() {
    let kernel = env_path("BENCH_KERNEL");
    let initrd = env_path("BENCH_INITRD");
    let guest_dir = kernel
        .parent()
        .expect("the kernel's directory")
        .to_path_buf();
    let vmlet = std::env::var_os("BENCH_VMLET")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/vmlet"));
    assert!(
        vmlet.exists(),
        "{} is missing: build it with cargo build --release",
        vmlet.display()
    );
    // Declared before the hosts: dropped after them, when the daemons can
    // no longer start the guest again.
    let mut cleanup = Cleanup::default();
    let a = Host::start(&vmlet, &guest_dir, "910000000-910000099").await;
    cleanup.cgroup_roots.push(a.cgroup_root.clone());
    let b = Host::start(&vmlet, &guest_dir, "910000100-910000199").await;
    cleanup.cgroup_roots.push(b.cgroup_root.clone());
    // On SIGINT or SIGTERM, panic so the guards still clean up.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        () = run(&a, &b, &kernel, &initrd, &mut cleanup) => {}
        _ = tokio::signal::ctrl_c() => panic!("interrupted (SIGINT)"),
        _ = sigterm.recv() => panic!("terminated (SIGTERM)"),
    }
}
