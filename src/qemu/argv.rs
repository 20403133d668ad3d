//! The QEMU command line, built from a spec, a profile and the VM's run
//! directory. A pure function, pinned by the golden corpus in `tests/golden/`.
//!
//! QEMU starts paused (`-S`) as vmlet's child (never `-daemonize`); vmlet
//! configures it over QMP and then sends `cont`. Every value that lands inside a `key=value,…` option is
//! escaped (`,` → `,,`), so a path with a comma cannot add an option.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::qemu::accel::Accel;
use crate::qemu::disk::{self, DiskPlan, DiskSets, SCSI_CONTROLLER};
use crate::qemu::firmware::{self, PflashSets};
use crate::qemu::launch_files::{BootFiles, PassedFd, RunFds};
use crate::qemu::nic::{self, NicPlan};
use crate::qemu::profile::{DeviceBus, Profile};
use crate::spec::{Boot, DiskBus, MachinePin, VmSpec, GUEST_AGENT_PORT};

/// Where a VM's runtime files live: `RUN_DIR/vms/UUID/`. Named by UUID only,
/// so no caller-chosen string ever becomes part of a host path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    /// The VM's run directory.
    pub dir: PathBuf,
}

impl RunPaths {
    /// The run directory of VM `uuid` under the daemon's run root.
    pub fn new(run_root: &Path, uuid: Uuid) -> RunPaths {
        RunPaths {
            dir: run_root.join("vms").join(uuid.to_string()),
        }
    }

    /// QMP control socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// Serial console socket.
    pub fn serial_socket(&self) -> PathBuf {
        self.dir.join("serial.sock")
    }

    /// Serial console log for a VM run without the daemon (`vmlet run`);
    /// the daemon keeps its VMs' logs in their state directories.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// The root of the VM's jail (QEMU's `/`): everything QEMU itself
    /// creates lives under it, in `run/` ([`JAIL_RUN`]).
    pub fn jail_root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The one directory QEMU may write: `/run` in its jail.
    pub fn qemu_run_dir(&self) -> PathBuf {
        self.jail_root().join("run")
    }

    /// The VNC server's socket (profiles with a display adapter), which
    /// QEMU binds itself: in its own writable directory when it runs as a
    /// user of its own ([`RunPaths::qemu_run_dir`], made at launch), else
    /// in the run directory.
    pub fn vnc_socket(&self) -> PathBuf {
        if self.jail_root().is_dir() {
            self.qemu_run_dir().join(VNC_SOCKET_NAME)
        } else {
            self.dir.join(VNC_SOCKET_NAME)
        }
    }

    /// Socket of virtio-serial channel `index`.
    pub fn channel_socket(&self, index: usize) -> PathBuf {
        self.dir.join(format!("channel{index}.sock"))
    }

    /// Socket of the guest agent's port (`spec.guest_agent`): vmlet's own
    /// link to the agent, never handed to callers.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// Every unix socket `spec` needs, for checking their lengths.
    pub fn sockets(&self, spec: &VmSpec) -> Vec<PathBuf> {
        let mut sockets = vec![self.qmp_socket()];
        if spec.serial.enabled {
            sockets.push(self.serial_socket());
        }
        sockets.extend((0..spec.channels.len()).map(|i| self.channel_socket(i)));
        if spec.guest_agent {
            sockets.push(self.agent_socket());
        }
        sockets
    }

    /// The first socket path longer than a unix socket address can hold
    /// (`sun_path`, 108 bytes with the NUL): a run directory too deep for QEMU.
    pub fn overlong_socket(&self, spec: &VmSpec) -> Option<PathBuf> {
        self.sockets(spec)
            .into_iter()
            .find(|p| p.as_os_str().len() > MAX_SOCKET_PATH)
    }
}

/// `/run` inside a jail: the directory QEMU may write.
pub const JAIL_RUN: &str = "/run";
/// The VNC socket's file name in [`RunPaths::qemu_run_dir`].
pub const VNC_SOCKET_NAME: &str = "vnc.sock";

/// Longest unix socket path (`sun_path` is 108 bytes, NUL included).
pub const MAX_SOCKET_PATH: usize = 107;

/// Everything the argv depends on.
#[derive(Debug, Clone, Copy)]
pub struct LaunchInputs<'a> {
    /// The validated spec.
    pub spec: &'a VmSpec,
    /// Its profile.
    pub profile: &'a Profile,
    /// The machine type and CPU model the VM is pinned to: `-machine` (with
    /// the profile's machine options) and `-cpu`, in place of the profile's
    /// own, possibly unversioned, values.
    pub machine: &'a MachinePin,
    /// The accelerator, already resolved.
    pub accel: Accel,
    /// Runtime file locations.
    pub paths: &'a RunPaths,
    /// True when QEMU runs in its jail, where its own directory is
    /// [`JAIL_RUN`] rather than [`RunPaths::qemu_run_dir`].
    pub jailed: bool,
    /// The sockets vmlet bound for QEMU and the serial log's fd set.
    pub run_fds: &'a RunFds,
    /// The disks, resolved to their host files, the seed last.
    pub disks: &'a [DiskPlan],
    /// The fd sets each disk's files are read through (`disks` order).
    pub disk_sets: &'a [DiskSets],
    /// The files vmlet opened for QEMU, put into fd sets with `-add-fd`.
    pub passed_fds: &'a [PassedFd],
    /// What `-kernel`/`-initrd` name, for direct kernel boot: files vmlet
    /// opened (`/proc/self/fd/N`).
    pub boot_files: Option<&'a BootFiles>,
    /// The NICs, in `spec.nics` order, with their host side resolved (tap
    /// fds QEMU inherits, or user-mode networking).
    pub nics: &'a [NicPlan],
    /// The fd sets of a UEFI VM's firmware code and NVRAM (in
    /// `passed_fds`); None for BIOS.
    pub pflash: Option<PflashSets>,
}

/// Escapes a value for QEMU's `key=value,…` syntax: commas are doubled.
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_value(path: &Path) -> String {
    escape(&path.to_string_lossy())
}

/// The QMP chardev id.
pub const QMP_CHARDEV: &str = "qmp";
/// The serial console chardev id.
pub const SERIAL_CHARDEV: &str = "serial0";
/// The chardev of the TPM emulator's control channel.
pub const TPM_CHARDEV: &str = "tpm0-chr";
/// The TPM backend (`-tpmdev`) id.
pub const TPM_BACKEND: &str = "tpm0";
/// Id prefix of empty hot-plug root ports (`hp0`, `hp1`, …).
pub const HOTPLUG_PORT_PREFIX: &str = "hp";
/// The guest agent's chardev id.
pub const AGENT_CHARDEV: &str = "qga0";

/// Builds the arguments after the QEMU binary name.
pub fn build(input: LaunchInputs<'_>) -> Vec<String> {
    let LaunchInputs {
        spec,
        profile,
        machine,
        accel,
        paths,
        jailed,
        run_fds,
        disks,
        disk_sets,
        passed_fds,
        boot_files,
        nics,
        pflash,
    } = input;
    let mut argv = Argv::default();

    argv.push(
        "-name",
        format!("guest={},debug-threads=on", escape(&spec.name)),
    );
    argv.push("-uuid", spec.uuid.to_string());
    argv.flag("-S");
    argv.flag("-nodefaults");
    argv.flag("-no-user-config");
    // The full seccomp filter: QEMU may not run obsolete system calls, gain
    // privileges (setuid & co.), spawn processes or threads-as-processes,
    // or change scheduling and resource limits. vmlet did all of that
    // before the exec.
    argv.push(
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    );
    argv.push("-msg", "timestamp=on");
    argv.push("-display", "none");
    if profile.devices.display.is_some() {
        // The only VNC server is a unix socket in QEMU's own directory:
        // never TCP. Guests cannot power the VM off through it.
        let socket = if jailed {
            Path::new(JAIL_RUN).join(VNC_SOCKET_NAME)
        } else {
            paths.vnc_socket()
        };
        argv.push(
            "-vnc",
            format!("unix:{},power-control=off", path_value(&socket)),
        );
    }
    let mut machine_arg = machine_value(machine, profile);
    if let Some(sets) = pflash {
        // The firmware and NVRAM are block nodes on fd sets, like disks:
        // QEMU never opens the firmware files by path.
        machine_arg.push_str(&firmware::machine_options(PflashSets {
            // A profile that turns SMM on itself needs no second `smm=`.
            secure: sets.secure && !profile.machine.options.contains_key("smm"),
            ..sets
        }));
    }
    if spec.numa.is_empty() && spec.memory.hugepages.is_some() {
        // One backend for all guest memory, so it can be huge pages.
        machine_arg.push_str(&format!(",memory-backend={RAM_BACKEND}"));
    }
    argv.push("-machine", machine_arg);
    argv.push("-accel", accel.as_str());
    argv.push("-cpu", &machine.cpu);
    argv.push("-smp", smp_value(spec));
    argv.push("-m", format!("size={}M", spec.memory_mib));
    for (option, value) in memory_options(spec) {
        argv.push(option, value);
    }

    // Every socket is bound by vmlet and handed over listening: QEMU needs
    // no path to them, and vmlet can connect the moment QEMU runs.
    argv.push(
        "-chardev",
        format!(
            "socket,id={QMP_CHARDEV},fd={},server=on,wait=off",
            run_fds.qmp
        ),
    );
    argv.push("-mon", format!("chardev={QMP_CHARDEV},mode=control"));

    if let (true, Some(serial), Some(log_set)) =
        (spec.serial.enabled, run_fds.serial, run_fds.serial_log_set)
    {
        argv.push(
            "-chardev",
            format!(
                "socket,id={SERIAL_CHARDEV},fd={serial},server=on,wait=off,logfile=/dev/fdset/{log_set},logappend=on",
            ),
        );
        argv.push(
            "-device",
            format!(
                "{},chardev={SERIAL_CHARDEV},id={SERIAL_CHARDEV}-dev",
                profile.devices.serial_port
            ),
        );
    }

    match &spec.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
            ..
        } => {
            // The daemon names the files it opened (`/proc/self/fd/N`) or
            // the copies it made in the jail, so no path from a spec reaches
            // QEMU, and no comma (QEMU splits a multiboot `-initrd` on
            // commas). Without them (argv tests), the spec's paths. -append
            // is a plain string; validation refused control characters.
            let kernel = boot_files
                .map_or_else(|| kernel.to_string_lossy().into_owned(), |b| b.kernel.arg());
            argv.push("-kernel", kernel);
            let initrd = match boot_files {
                Some(b) => b.initrd.as_ref().map(|i| i.arg()),
                None => initrd.as_ref().map(|i| i.to_string_lossy().into_owned()),
            };
            if let Some(initrd) = initrd {
                argv.push("-initrd", initrd);
            }
            if !cmdline.is_empty() {
                argv.push("-append", cmdline.as_str());
            }
        }
        Boot::Firmware { .. } => {
            // Boot only from the devices given a bootindex; never fall back
            // to a network boot nobody asked for.
            argv.push("-boot", "strict=on");
        }
    }

    for passed in passed_fds {
        argv.push(
            "-add-fd",
            format!(
                "fd={},set={},opaque={}",
                passed.fd,
                passed.set,
                escape(&passed.opaque)
            ),
        );
    }
    if let Some(sets) = pflash {
        for node in firmware::blockdevs(sets) {
            argv.push("-blockdev", node.to_string());
        }
        if sets.secure {
            // Only SMM code may write the variable store: the guest OS
            // cannot turn Secure Boot off behind the firmware's back.
            argv.push("-global", firmware::SECURE_FLASH_GLOBAL);
            // A kernel that fails verification is refused, not handed to
            // OVMF's legacy loader (which skips verification).
            argv.push("-fw_cfg", firmware::NO_LEGACY_LOADER_FW_CFG);
        }
    }
    if disks.iter().any(|p| p.spec.bus == DiskBus::VirtioScsi) {
        if let Some(controller) = &profile.devices.scsi {
            argv.push("-device", format!("{controller},id={SCSI_CONTROLLER}"));
        }
    }
    for (plan, sets) in disks.iter().zip(disk_sets) {
        if disk::has_throttle(plan) {
            argv.push("-object", disk::throttle_group(plan).to_string());
        }
        for node in disk::blockdevs(plan, *sets) {
            argv.push("-blockdev", node.to_string());
        }
        argv.push("-device", disk::device(profile, plan, None).to_string());
    }

    for plan in nics {
        argv.push("-netdev", nic::netdev(plan).to_string());
        argv.push("-device", nic::device(profile, plan, None).to_string());
    }

    let agent_fd = run_fds.agent.filter(|_| spec.guest_agent);
    if !spec.channels.is_empty() || agent_fd.is_some() {
        argv.push(
            "-device",
            format!("{},id=vser0", profile.devices.virtio_serial),
        );
        for (index, (channel, fd)) in spec.channels.iter().zip(&run_fds.channels).enumerate() {
            argv.push(
                "-chardev",
                format!("socket,id=channel{index},fd={fd},server=on,wait=off"),
            );
            argv.push(
                "-device",
                format!(
                    "virtserialport,bus=vser0.0,chardev=channel{index},id=channel{index}-port,name={}",
                    escape(&channel.name)
                ),
            );
        }
        // The agent's port comes after the caller's channels, so adding it
        // never renumbers theirs.
        if let Some(fd) = agent_fd {
            argv.push(
                "-chardev",
                format!("socket,id={AGENT_CHARDEV},fd={fd},server=on,wait=off"),
            );
            argv.push(
                "-device",
                format!(
                    "virtserialport,bus=vser0.0,chardev={AGENT_CHARDEV},id={AGENT_CHARDEV}-port,name={GUEST_AGENT_PORT}"
                ),
            );
        }
    }

    // The TPM: QEMU's emulator backend talks to the VM's swtpm over a
    // socket pair vmlet made (QEMU's end inherited as a connected socket),
    // so neither process needs a path to the other.
    if let (Some(_), Some(model), Some(fd)) = (&spec.tpm, &profile.devices.tpm, run_fds.tpm) {
        argv.push("-chardev", format!("socket,id={TPM_CHARDEV},fd={fd}"));
        argv.push(
            "-tpmdev",
            format!("emulator,id={TPM_BACKEND},chardev={TPM_CHARDEV}"),
        );
        argv.push(
            "-device",
            format!("{model},tpmdev={TPM_BACKEND},id={TPM_BACKEND}-dev"),
        );
    }

    if let Some(display) = &profile.devices.display {
        argv.push("-device", format!("{display},id=video0"));
    }

    if profile.defaults.rng {
        argv.push("-object", "rng-random,id=rng0,filename=/dev/urandom");
        argv.push(
            "-device",
            format!("{},rng=rng0,id=rng0-dev", profile.devices.rng),
        );
    }
    if profile.defaults.balloon {
        argv.push(
            "-device",
            format!("{},id=balloon0", profile.devices.balloon),
        );
    }
    // With a panic device, a guest panic reaches QEMU even when the guest
    // reboots on panic. QEMU's default `-action panic=shutdown` is what vmlet
    // wants, so no `-action` is given: QEMU emits GUEST_PANICKED (action
    // poweroff) and SHUTDOWN (reason guest-panic), then exits; the VM actor
    // records a crash.
    if profile.defaults.panic {
        if let Some(model) = &profile.devices.panic {
            argv.push("-device", format!("{model},id=panic0"));
        }
    }

    if profile.devices.bus == DeviceBus::Pci {
        // Empty root ports, last so cold-plugged devices keep the same PCI
        // slots whatever the number of ports. Chassis numbers must be unique.
        for port in 0..profile.hotplug.root_ports {
            argv.push(
                "-device",
                format!(
                    "pcie-root-port,id={HOTPLUG_PORT_PREFIX}{port},bus=pcie.0,chassis={}",
                    port + 1
                ),
            );
        }
    }

    argv.0
}

/// The id of the backend of all guest memory when there is one (huge
/// pages without NUMA nodes); NUMA node `i`'s backend is `ram-node{i}`.
pub const RAM_BACKEND: &str = "ram0";

/// `-smp`: the vCPUs, with the spec's topology when it has one.
fn smp_value(spec: &VmSpec) -> String {
    match &spec.topology {
        Some(t) => format!(
            "{},sockets={},cores={},threads={}",
            spec.vcpus, t.sockets, t.cores, t.threads
        ),
        None => spec.vcpus.to_string(),
    }
}

/// The memory backends (`-object`) and NUMA nodes (`-numa`) of `spec`.
/// Huge pages come from `memory-backend-memfd` with `hugetlb=on`: an
/// anonymous file, so QEMU opens no hugetlbfs path (it has none in its
/// jail); preallocated, so a short pool fails the start rather than the
/// guest later.
fn memory_options(spec: &VmSpec) -> Vec<(&'static str, String)> {
    let backend = |id: &str, size_mib: u64| -> String {
        match spec.memory.hugepages {
            Some(size) => format!(
                "memory-backend-memfd,id={id},size={size_mib}M,hugetlb=on,hugetlbsize={},prealloc=on",
                size.bytes()
            ),
            None => format!("memory-backend-ram,id={id},size={size_mib}M"),
        }
    };
    let mut options = Vec::new();
    if spec.numa.is_empty() {
        if spec.memory.hugepages.is_some() {
            options.push(("-object", backend(RAM_BACKEND, spec.memory_mib)));
        }
        return options;
    }
    for (i, node) in spec.numa.iter().enumerate() {
        let id = format!("ram-node{i}");
        options.push(("-object", backend(&id, node.memory_mib)));
        // Validated: a list of vCPUs; one `cpus=` per range.
        let cpus = crate::spec::parse_cpu_list(&node.cpus).unwrap_or_default();
        let mut value = format!("node,nodeid={i}");
        for (first, last) in cpu_ranges(&cpus) {
            if first == last {
                value.push_str(&format!(",cpus={first}"));
            } else {
                value.push_str(&format!(",cpus={first}-{last}"));
            }
        }
        value.push_str(&format!(",memdev={id}"));
        options.push(("-numa", value));
    }
    options
}

/// Sorted CPU numbers as runs of consecutive numbers: `[0,1,2,5]` →
/// `[(0,2),(5,5)]`.
fn cpu_ranges(cpus: &[u32]) -> Vec<(u32, u32)> {
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for &cpu in cpus {
        match ranges.last_mut() {
            Some((_, last)) if cpu == *last + 1 => *last = cpu,
            _ => ranges.push((cpu, cpu)),
        }
    }
    ranges
}

fn machine_value(machine: &MachinePin, profile: &Profile) -> String {
    let mut value = machine.machine_type.clone();
    for (key, option) in &profile.machine.options {
        value.push_str(&format!(",{key}={}", escape(option)));
    }
    value
}

#[derive(Default)]
struct Argv(Vec<String>);

impl Argv {
    fn flag(&mut self, flag: &str) {
        self.0.push(flag.to_string());
    }

    fn push(&mut self, option: &str, value: impl AsRef<str>) {
        self.0.push(option.to_string());
        self.0.push(value.as_ref().to_string());
    }
}

#[cfg(test)]
#[path = "argv_tests.rs"]
mod tests;
