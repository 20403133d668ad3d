//! Benchmark of the QEMU runtime; run through `scripts/bench.sh`, which
//! builds the test guest and passes its paths in `BENCH_KERNEL` and
//! `BENCH_INITRD`. Prints figures (medians over `BENCH_RUNS`, default 5);
//! asserts nothing about speed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uuid::Uuid;
use vmlet::qemu::accel::Accel;
use vmlet::qemu::argv::{LaunchInputs, RunPaths};
use vmlet::qemu::instance::{self, QemuInstance, StopMode, StopOutcome};
use vmlet::qemu::launch_files::{PassedFd, RunFds};
use vmlet::qemu::profile::Profiles;
use vmlet::spec::{Boot, SerialSpec, VmSpec};
use vmlet::vm::confinement::Confiner;

struct Bench {
    kernel: PathBuf,
    initrd: PathBuf,
    run_root: PathBuf,
    profiles: Profiles,
    /// What the QEMU binary offers, probed once: VMs are pinned through it.
    qemu: vmlet::qemu::capabilities::QemuCapabilities,
}

impl Bench {
    /// The machine type and CPU model `spec`'s profile gives under TCG.
    fn pin(&self, spec: &VmSpec) -> vmlet::spec::MachinePin {
        self.qemu
            .pin(self.profiles.get(&spec.profile).unwrap(), Accel::Tcg)
            .expect("the profile runs with this QEMU")
    }
}

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{name} is not set: run scripts/bench.sh"))
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// One figure, aligned with the others (and with scripts/bench.sh's).
fn row(label: &str, value: String) {
    println!("{:<40}{value}", format!("{label}:"));
}

fn mib(samples: &[f64]) -> String {
    format!(
        "{:.0} MiB",
        samples.iter().sum::<f64>() / samples.len() as f64
    )
}

fn rss_mib(pid: i32) -> f64 {
    vmlet::node::rss_kib(pid as u32).unwrap_or(0) as f64 / 1024.0
}

async fn wait_for(path: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(
            Instant::now() < deadline,
            "{needle} never appeared in {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Bench {
    fn spec(&self, profile: &str, action: &str) -> VmSpec {
        let mut cmdline = format!("console=ttyS0 panic=-1 quiet guest.action={action}");
        if profile == "microvm" {
            let mhz = std::fs::read_to_string("/proc/cpuinfo")
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok());
            if let Some(mhz) = mhz {
                cmdline.push_str(&format!(" tsc_early_khz={}", (mhz * 1000.0) as u64));
            }
        }
        VmSpec {
            uuid: Uuid::new_v4(),
            name: "bench".into(),
            vcpus: 1,
            memory_mib: 128,
            profile: profile.into(),
            boot: Boot::Kernel {
                kernel: self.kernel.clone(),
                initrd: Some(self.initrd.clone()),
                cmdline,
                firmware: Default::default(),
            },
            disks: vec![],
            serial: SerialSpec::default(),
            channels: vec![],
            // The boot benchmark measures the bare guest, as before the
            // agent's port existed.
            guest_agent: false,
            cloud_init: None,
            nics: vec![],
            autostart: false,
            resources: Default::default(),
            tpm: None,
            cpu: None,
            topology: None,
            numa: vec![],
            memory: Default::default(),
        }
    }

    async fn launch(&self, spec: &VmSpec) -> QemuInstance {
        self.launch_with(spec, None).await
    }

    /// Launches `spec` as vmlet does; `confiner`: confined as the daemon
    /// confines its VMs (as root: own uid, jail, cgroup).
    async fn launch_with(&self, spec: &VmSpec, confiner: Option<&Confiner>) -> QemuInstance {
        let paths = RunPaths::new(&self.run_root, spec.uuid);
        let files = vmlet::vm::launch::LaunchFiles::open(
            spec,
            &vmlet::storage::Layout::new(Path::new("/var/lib/vmlet")),
            &[std::path::PathBuf::from("/")],
        )
        .expect("opening the VM's files");
        let confined = confiner.map(|c| c.prepare(spec, false).expect("confinement"));
        let serial_log = paths.serial_log();
        let qemu_log = paths.dir.with_extension("qemu.log");
        let machine = self.pin(spec);
        let vm = instance::launch(instance::Launch {
            binary: Path::new("qemu-system-x86_64"),
            deadline: vmlet::qemu::process::SPAWN_DEADLINE,
            spec,
            profile: self.profiles.get(&spec.profile).unwrap(),
            machine: &machine,
            accel: Accel::Tcg,
            paths: &paths,
            serial_log: &serial_log,
            serial_banner: None,
            qemu_log: &qemu_log,
            disks: &files.disks,
            disk_sets: &files.sets,
            passed_fds: &files.passed,
            boot_files: files.boot.as_ref(),
            nics: &[],
            pflash: files.pflash,
            confine: confined.as_ref().map(|c| c.plan()).unwrap_or_default(),
            tpm: None,
        })
        .await
        .expect("launch");
        let _ = std::fs::remove_file(qemu_log);
        vm
    }

    /// The same argv (unjailed, the spec's own kernel paths) started the
    /// plain way: fork and exec QEMU, connect, `cont`. The time to the
    /// answered `cont` is the baseline of vmlet's start.
    async fn bare_until_running(&self, spec: &VmSpec) -> Duration {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let started = Instant::now();
        let paths = RunPaths::new(&self.run_root, spec.uuid);
        std::fs::create_dir_all(&paths.dir).unwrap();
        let qmp = std::os::unix::net::UnixListener::bind(paths.qmp_socket()).unwrap();
        let serial = std::os::unix::net::UnixListener::bind(paths.serial_socket()).unwrap();
        let log = std::fs::File::create(paths.serial_log()).unwrap();
        let run = RunFds {
            qmp: qmp.as_raw_fd(),
            serial: Some(serial.as_raw_fd()),
            serial_log_set: Some(1),
            channels: vec![],
            tpm: None,
            agent: None,
        };
        let passed = [PassedFd {
            fd: log.as_raw_fd(),
            set: 1,
            opaque: "serial-log".into(),
        }];
        let machine = self.pin(spec);
        let argv = vmlet::qemu::argv::build(LaunchInputs {
            spec,
            profile: self.profiles.get(&spec.profile).unwrap(),
            machine: &machine,
            accel: Accel::Tcg,
            paths: &paths,
            jailed: false,
            run_fds: &run,
            disks: &[],
            disk_sets: &[],
            passed_fds: &passed,
            boot_files: None,
            nics: &[],
            pflash: None,
        });
        let fds = [qmp.as_raw_fd(), serial.as_raw_fd(), log.as_raw_fd()];
        let mut command = std::process::Command::new("qemu-system-x86_64");
        command.args(&argv);
        // SAFETY: only fcntl between fork and exec.
        unsafe {
            command.pre_exec(move || {
                for fd in fds {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawning QEMU");
        drop((qmp, serial, log));
        let (client, _events) =
            vmlet::qemu::qmp::QmpClient::connect(&paths.qmp_socket(), Duration::from_secs(60))
                .await
                .expect("QMP");
        client.execute(qapi::qmp::cont {}).await.unwrap();
        let took = started.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&paths.dir);
        took
    }
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let scratch = tempfile::Builder::new()
        .prefix("vmlet-bench-")
        .tempdir()
        .unwrap();
    let bench = Bench {
        kernel: env_path("BENCH_KERNEL"),
        initrd: env_path("BENCH_INITRD"),
        run_root: scratch.path().to_path_buf(),
        profiles: Profiles::built_in().unwrap(),
        qemu: vmlet::qemu::capabilities::probe(
            Path::new("qemu-system-x86_64"),
            Accel::Tcg,
            vmlet::qemu::capabilities::PROBE_DEADLINE,
        )
        .await
        .expect("probing qemu-system-x86_64"),
    };

    // Launch (spawn, daemonize, QMP negotiated) and QMP round trips, paused.
    let mut launch = Vec::new();
    let mut rtt = Vec::new();
    let mut rss_paused = Vec::new();
    for _ in 0..runs {
        let spec = bench.spec("q35", "hold");
        let started = Instant::now();
        let vm = bench.launch(&spec).await;
        launch.push(started.elapsed());
        for _ in 0..100 {
            let t = Instant::now();
            vm.qmp.execute(qapi::qmp::query_status {}).await.unwrap();
            rtt.push(t.elapsed());
        }
        rss_paused.push(rss_mib(vm.process.pid()));
        vm.stop(StopMode::Force).await.unwrap();
        instance::remove_run_dir(&vm.paths);
    }
    row("launch to paused + QMP ready (q35)", ms(median(launch)));

    // Request to a running guest (`cont` answered): vmlet's confined start
    // against the same argv started the plain way.
    let settings = vmlet::config::QemuSettings {
        cgroup_root: format!("vmlet-bench-{}", std::process::id()),
        ..Default::default()
    };
    let confiner = Confiner::new(&settings).expect("confinement");
    let mut confined = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..runs {
        let spec = bench.spec("q35", "hold");
        bare.push(bench.bare_until_running(&spec).await);
        let spec = bench.spec("q35", "hold");
        let started = Instant::now();
        let vm = bench.launch_with(&spec, Some(&confiner)).await;
        vm.start_guest().await.unwrap();
        confined.push(started.elapsed());
        vm.stop(StopMode::Force).await.unwrap();
        instance::remove_run_dir(&vm.paths);
        confiner.release(spec.uuid);
    }
    let (bare, confined) = (median(bare), median(confined));
    row("bare QEMU to running guest (q35)", ms(bare));
    row("vmlet confined start to running (q35)", ms(confined));
    row(
        "  ratio vmlet / bare",
        format!("{:.2}x", confined.as_secs_f64() / bare.as_secs_f64()),
    );
    for dir in confiner_roots(&settings.cgroup_root) {
        let _ = std::fs::remove_dir(dir);
    }
    row("QMP query-status round trip", ms(median(rtt)));
    row("QEMU RSS paused at -S (q35, 128 MiB)", mib(&rss_paused));

    for profile in ["q35", "microvm"] {
        let mut boot = Vec::new();
        let mut stop = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..runs {
            let spec = bench.spec(profile, "hold");
            let started = Instant::now();
            let vm = bench.launch(&spec).await;
            vm.start_guest().await.unwrap();
            wait_for(&vm.paths.serial_log(), "GUEST-READY").await;
            boot.push(started.elapsed());
            rss.push(rss_mib(vm.process.pid()));
            let t = Instant::now();
            let outcome = vm
                .stop(StopMode::Graceful {
                    grace: Duration::from_secs(30),
                })
                .await
                .unwrap();
            assert_eq!(outcome, StopOutcome::GuestPoweredOff);
            stop.push(t.elapsed());
            instance::remove_run_dir(&vm.paths);
        }
        row(
            &format!("launch to GUEST-READY ({profile}, TCG)"),
            ms(median(boot)),
        );
        row(
            &format!("graceful stop, ACPI ({profile})"),
            ms(median(stop)),
        );
        row(&format!("QEMU RSS booted ({profile}, TCG)"), mib(&rss));
    }
}

/// The cgroup roots the bench's confiner made, one per v1 hierarchy.
fn confiner_roots(root: &str) -> Vec<PathBuf> {
    vmlet::confine::cgroup::Hierarchy::detect()
        .and_then(|h| vmlet::confine::cgroup::Cgroups::new(h, root))
        .map(|c| c.root_dirs())
        .unwrap_or_default()
}
