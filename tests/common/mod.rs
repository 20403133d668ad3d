//! Shared helpers for integration tests: scratch directories, test-guest
//! specs, and guards that kill QEMU and remove files even when a test fails.
#![allow(dead_code)] // each test binary uses a different subset

pub mod api;
pub mod daemon;
pub mod esp;
pub mod guest;
pub mod netns;
pub mod serial_shell;
pub mod skip;
pub mod storage;
pub mod tls;
pub mod two_hosts;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uuid::Uuid;
use vmlet::qemu::accel::Accel;
use vmlet::qemu::argv::RunPaths;
use vmlet::qemu::instance::{self, LaunchError, QemuInstance};
use vmlet::qemu::profile::{Profile, Profiles};
use vmlet::spec::{Boot, ChannelSpec, DiskFormat, DiskSpec, SerialSpec, VmSpec};
use vmlet::vm::launch::LaunchFiles;

/// Every scratch path of the tests starts with this, so `scripts/test.sh`
/// can prove nothing is left behind.
pub const SCRATCH_PREFIX: &str = "vmlet-test-";

/// How long a test-guest boot may take under TCG on a loaded 2-core machine
/// (a boot takes about 3 s when idle).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Says that `test` cannot run its subject on this host, in one
/// `SKIPPED:` line that `scripts/test.sh` lists at the end of the run
/// ([`skip::skip`]); the caller then returns or leaves that part out.
pub fn skip(test: &str, reason: impl std::fmt::Display) {
    skip::skip(test, reason);
}

/// A scratch directory under /tmp, removed on drop.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// A fresh scratch directory.
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(SCRATCH_PREFIX)
            .tempdir_in("/tmp")
            .expect("creating scratch dir");
        Scratch { dir }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The run root for VMs of this test.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Creates a qcow2 image of `size` (e.g. `"64M"`) with real `qemu-img`.
    pub fn qcow2(&self, name: &str, size: &str) -> PathBuf {
        storage::create_image(self.dir.path(), name, "qcow2", size)
    }
}

impl Scratch {
    /// A raw disk that SeaBIOS boots: a FAT file system (no partition table)
    /// with syslinux, the test guest's kernel and initrd, and `cmdline`.
    /// Built with syslinux, mtools and dosfstools (`scripts/setup.sh --test`).
    pub fn bios_boot_disk(&self, name: &str, cmdline: &str) -> PathBuf {
        let guest = guest::test_guest();
        let disk = self.dir.path().join(name);
        let cfg = self.dir.path().join(format!("{name}.syslinux.cfg"));
        std::fs::write(
            &cfg,
            format!("DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n  INITRD initrd.img\n  APPEND {cmdline}\n"),
        )
        .unwrap();
        let file = std::fs::File::create(&disk).unwrap();
        file.set_len(64 * 1024 * 1024).unwrap();
        run(
            "mkfs.vfat",
            &["-n".as_ref(), "VMLETBOOT".as_ref(), disk.as_os_str()],
        );
        run("syslinux", &["--install".as_ref(), disk.as_os_str()]);
        let image = format!("{}", disk.display());
        run(
            "mcopy",
            &[
                "-i".as_ref(),
                image.as_ref(),
                guest.kernel.as_os_str(),
                guest.initrd.as_os_str(),
                cfg.as_os_str(),
                "::".as_ref(),
            ],
        );
        // mcopy keeps the source name; syslinux looks for syslinux.cfg.
        run(
            "mren",
            &[
                "-i".as_ref(),
                image.as_ref(),
                format!("::{name}.syslinux.cfg").as_ref(),
                "::syslinux.cfg".as_ref(),
            ],
        );
        disk
    }
}

fn run(program: &str, args: &[&std::ffi::OsStr]) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e} (scripts/setup.sh --test installs it)"));
    assert!(
        out.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kernel parameters every test guest gets, plus `extra`. For microvm under
/// TCG, `tsc_early_khz` avoids a hang at TSC calibration (TEST-GUEST.md).
pub fn guest_cmdline(profile: &str, extra: &str) -> String {
    let mut cmdline = format!("console=ttyS0 panic=-1 quiet {extra}");
    if profile == "microvm" {
        if let Some(mhz) = host_cpu_mhz() {
            cmdline.push_str(&format!(" tsc_early_khz={}", (mhz * 1000.0) as u64));
        }
    }
    cmdline.trim_end().to_string()
}

fn host_cpu_mhz() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
}

/// A spec that boots the test guest with `extra` kernel parameters.
pub fn guest_spec(profile: &str, extra: &str) -> VmSpec {
    let guest = guest::test_guest();
    let uuid = Uuid::new_v4();
    VmSpec {
        uuid,
        name: format!("t-{}", &uuid.to_string()[..8]),
        vcpus: 1,
        memory_mib: 256,
        profile: profile.to_string(),
        boot: Boot::Kernel {
            kernel: guest.kernel.clone(),
            initrd: Some(guest.initrd.clone()),
            cmdline: guest_cmdline(profile, extra),
            firmware: Default::default(),
        },
        disks: vec![],
        serial: SerialSpec::default(),
        channels: vec![],
        guest_agent: true,
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

/// A qcow2 disk entry for a spec.
pub fn disk(name: &str, path: &Path) -> DiskSpec {
    DiskSpec {
        name: Some(name.to_string()),
        ..DiskSpec::file(path, DiskFormat::Qcow2)
    }
}

/// The guest's report channel.
pub fn guest_channel() -> ChannelSpec {
    ChannelSpec {
        name: "org.vmlet.guest.0".to_string(),
    }
}

/// A launched QEMU that is killed (and its run directory removed) on drop.
#[derive(Debug)]
pub struct TestVm {
    /// The running instance.
    pub vm: QemuInstance,
    /// How it was confined, if it was: its cgroup and uid are given back
    /// when the guard drops.
    pub confiner: Option<vmlet::vm::confinement::Confiner>,
}

impl std::ops::Deref for TestVm {
    type Target = QemuInstance;
    fn deref(&self) -> &QemuInstance {
        &self.vm
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if self.vm.process.is_running() {
            self.vm.process.kill_blocking(Duration::from_secs(10));
        }
        instance::remove_run_dir(&self.vm.paths);
        let _ = std::fs::remove_file(self.vm.paths.dir.with_extension("qemu.log"));
        if let Some(c) = &self.confiner {
            c.release(self.vm.process.uuid());
        }
    }
}

/// Launches `spec` under TCG (the only accelerator that boots guests on
/// these machines) with run files under `scratch`.
pub async fn launch(spec: &VmSpec, scratch: &Scratch) -> Result<TestVm, LaunchError> {
    launch_in(spec, &scratch.run_dir()).await
}

/// [`launch`] with an explicit run root.
pub async fn launch_in(spec: &VmSpec, run_root: &Path) -> Result<TestVm, LaunchError> {
    launch_with(spec, run_root, None).await
}

/// [`launch`], confined as the daemon confines its VMs under `settings`.
pub async fn launch_confined(
    spec: &VmSpec,
    scratch: &Scratch,
    settings: &vmlet::config::QemuSettings,
) -> Result<TestVm, LaunchError> {
    let confiner = vmlet::vm::confinement::Confiner::new(settings).expect("confinement settings");
    launch_with(spec, &scratch.run_dir(), Some(confiner)).await
}

async fn launch_with(
    spec: &VmSpec,
    run_root: &Path,
    confiner: Option<vmlet::vm::confinement::Confiner>,
) -> Result<TestVm, LaunchError> {
    let profiles = Profiles::built_in().unwrap();
    spec.validate(|p| profiles.caps(p))
        .expect("test spec is valid");
    let paths = RunPaths::new(run_root, spec.uuid);
    // Opened as the daemon opens them (no symlinks on the way), with the
    // whole file system allowed: test specs name their own scratch files.
    let files = LaunchFiles::open(
        spec,
        &vmlet::storage::Layout::new(Path::new("/var/lib/vmlet")),
        &[PathBuf::from("/")],
    )
    .expect("opening the test VM's files");
    let serial_log = paths.serial_log();
    let qemu_log = paths.dir.with_extension("qemu.log");
    let confine = confiner
        .as_ref()
        .map(|c| c.prepare(spec, false).expect("preparing the confinement"));
    let plan = confine.as_ref().map(|c| c.plan()).unwrap_or_default();
    let profile = profiles.get(&spec.profile).unwrap();
    let machine = tcg_pin(profile).await;
    let vm = instance::launch(instance::Launch {
        binary: Path::new("qemu-system-x86_64"),
        deadline: vmlet::qemu::process::SPAWN_DEADLINE,
        spec,
        profile,
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
        confine: plan,
        tpm: None,
    })
    .await;
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            if let Some(c) = &confiner {
                c.release(spec.uuid);
            }
            return Err(e);
        }
    };
    Ok(TestVm { vm, confiner })
}

/// The machine type and CPU model `profile` gives under TCG, resolved
/// through the real `qemu-system-x86_64` as the daemon resolves them.
pub async fn tcg_pin(profile: &Profile) -> vmlet::spec::MachinePin {
    vmlet::qemu::capabilities::probe(
        Path::new("qemu-system-x86_64"),
        Accel::Tcg,
        vmlet::qemu::capabilities::PROBE_DEADLINE,
    )
    .await
    .expect("probing qemu-system-x86_64")
    .pin(profile, Accel::Tcg)
    .expect("the profile runs with this QEMU")
}

/// Waits until the file at `path` has a whole line (ended by a newline)
/// containing `needle`; returns it without the line end. (A guest may be
/// caught half-way through writing a line.) Panics with the file's content
/// after `timeout`.
pub async fn wait_for_line(path: &Path, needle: &str, timeout: Duration) -> String {
    let started = Instant::now();
    loop {
        let bytes = std::fs::read(path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        if let Some(line) = whole.lines().find(|l| l.contains(needle)) {
            return line.trim_end_matches('\r').to_string();
        }
        if started.elapsed() > timeout {
            panic!(
                "no line with {needle:?} in {} after {timeout:?}; it holds:\n{text}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pids of running processes whose command line contains `needle`.
pub fn processes_with(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && pid != std::process::id() as i32 {
            pids.push(pid);
        }
    }
    pids
}
