//! How QEMU is handed the files vmlet opened for it: disks and the serial
//! log go into fd sets (`-add-fd` + `/dev/fdset/N`), the QMP, serial and
//! channel sockets are bound by vmlet and passed listening (`fd=N`), the
//! kernel and initrd of a direct boot are inherited fds named
//! `/proc/self/fd/N` or, for a QEMU running as another user, copies in its
//! jail. QEMU never resolves a host path for them. (The VM layer opens the
//! disk files: `vm/launch.rs`.)

use std::os::fd::RawFd;

use crate::qemu::disk::{self, DiskPlan, DiskSets};
use crate::qemu::firmware::{self, PflashSets};
use crate::spec::{Boot, Firmware, VmSpec};

/// A file vmlet opened that QEMU inherits at `fd` and files into fd set
/// `set` (`-add-fd fd=FD,set=SET,opaque=OPAQUE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassedFd {
    /// The fd number QEMU inherits.
    pub fd: RawFd,
    /// The fd set it goes into.
    pub set: u32,
    /// A tag QEMU shows in `query-fdsets` (which disk it belongs to).
    pub opaque: String,
}

/// One file of a direct kernel boot, as QEMU is told to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootFile {
    /// An fd QEMU inherits, named `/proc/self/fd/N`: QEMU reopens the very
    /// file vmlet opened, which the kernel lets it do when its user may
    /// read that file (vmlet's own user, or a file readable by QEMU's).
    Fd(RawFd),
    /// A copy vmlet made for a QEMU running as another user that may not
    /// read the original, at this path as QEMU sees it (inside its jail).
    Copy(String),
}

impl BootFile {
    /// The fd QEMU inherits, if it is one.
    pub fn fd(&self) -> Option<RawFd> {
        match self {
            BootFile::Fd(fd) => Some(*fd),
            BootFile::Copy(_) => None,
        }
    }

    /// How `-kernel`/`-initrd` name it.
    pub fn arg(&self) -> String {
        match self {
            BootFile::Fd(fd) => proc_fd_path(*fd),
            BootFile::Copy(path) => path.clone(),
        }
    }
}

/// The kernel and initrd of a direct boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// The kernel.
    pub kernel: BootFile,
    /// The initrd, if any.
    pub initrd: Option<BootFile>,
}

impl BootFiles {
    /// The fds QEMU inherits for them.
    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        std::iter::once(&self.kernel)
            .chain(&self.initrd)
            .filter_map(BootFile::fd)
    }
}

/// The sockets vmlet binds for QEMU, passed as listening fds, and the fd
/// set holding the serial log QEMU appends to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunFds {
    /// The QMP socket.
    pub qmp: RawFd,
    /// The serial console socket (when the serial console is enabled).
    pub serial: Option<RawFd>,
    /// The fd set of the serial log (when the serial console is enabled).
    pub serial_log_set: Option<u32>,
    /// The virtio-serial channel sockets, in `spec.channels` order.
    pub channels: Vec<RawFd>,
    /// QEMU's end of the connected socket pair to the VM's `swtpm` (its
    /// control channel), when the spec has a TPM.
    pub tpm: Option<RawFd>,
    /// The guest agent's socket (when `spec.guest_agent`).
    pub agent: Option<RawFd>,
}

impl RunFds {
    /// The socket fds QEMU inherits.
    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        std::iter::once(self.qmp)
            .chain(self.serial)
            .chain(self.channels.iter().copied())
            .chain(self.tpm)
            .chain(self.agent)
    }
}

/// The opaque tag of the serial log's fd.
pub const SERIAL_LOG_TAG: &str = "serial-log";

/// How QEMU names an inherited fd as a file.
pub fn proc_fd_path(fd: RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}

/// What a launch hands QEMU besides its argv, numbered instead of opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbered {
    /// The fd sets of each disk.
    pub sets: Vec<DiskSets>,
    /// The disks' fds and the serial log's.
    pub passed: Vec<PassedFd>,
    /// The kernel and initrd.
    pub boot: Option<BootFiles>,
    /// The sockets and the serial log's set.
    pub run: RunFds,
    /// The firmware code's and NVRAM's fd sets (UEFI VMs).
    pub pflash: Option<PflashSets>,
}

/// The fd sets, passed fds, sockets and boot files a launch of `spec` with
/// `disks` would have, with fd numbers counted from `first_fd` instead of
/// opened: for showing an argv (`vmlet argv`, the golden corpus) without
/// touching any file. `jailed`: the kernel and initrd are copies in the jail
/// (a QEMU running as its own user), else inherited fds.
pub fn numbered(spec: &VmSpec, disks: &[DiskPlan], first_fd: RawFd, jailed: bool) -> Numbered {
    let sets = disk::launch_sets(disks);
    let mut next = first_fd;
    let mut take = || {
        next += 1;
        next - 1
    };
    let mut run = RunFds {
        qmp: take(),
        ..RunFds::default()
    };
    let mut passed = Vec::new();
    for (plan, set) in disks.iter().zip(&sets) {
        passed.push(PassedFd {
            fd: take(),
            set: set.file,
            opaque: plan.file_tag(),
        });
        if let Some(base) = set.base {
            passed.push(PassedFd {
                fd: take(),
                set: base,
                opaque: plan.base_tag(),
            });
        }
    }
    if spec.serial.enabled {
        run.serial = Some(take());
        let set = next_set(&sets);
        run.serial_log_set = Some(set);
        passed.push(PassedFd {
            fd: take(),
            set,
            opaque: SERIAL_LOG_TAG.into(),
        });
    }
    run.channels = spec.channels.iter().map(|_| take()).collect();
    run.tpm = spec.tpm.map(|_| take());
    let boot = match &spec.boot {
        Boot::Kernel { initrd, .. } if jailed => Some(BootFiles {
            kernel: BootFile::Copy(JAIL_KERNEL.into()),
            initrd: initrd.as_ref().map(|_| BootFile::Copy(JAIL_INITRD.into())),
        }),
        Boot::Kernel { initrd, .. } => Some(BootFiles {
            kernel: BootFile::Fd(take()),
            initrd: initrd.as_ref().map(|_| BootFile::Fd(take())),
        }),
        Boot::Firmware { .. } => None,
    };
    let firmware = spec.boot.firmware();
    let pflash = firmware.is_uefi().then(|| {
        let pflash = pflash_sets(&sets, firmware == Firmware::UefiSecure);
        passed.push(PassedFd {
            fd: take(),
            set: pflash.code,
            opaque: firmware::CODE_TAG.into(),
        });
        passed.push(PassedFd {
            fd: take(),
            set: pflash.vars,
            opaque: firmware::VARS_TAG.into(),
        });
        pflash
    });
    // Last, so that the other fds keep their numbers with or without it.
    if spec.guest_agent {
        run.agent = Some(take());
    }
    Numbered {
        sets,
        passed,
        boot,
        run,
        pflash,
    }
}

/// The fd sets of a UEFI VM's firmware code and NVRAM: the two after the
/// serial log's ([`next_set`]), whether or not the serial port is on.
pub fn pflash_sets(sets: &[DiskSets], secure: bool) -> PflashSets {
    let after = next_set(sets);
    PflashSets {
        code: after + 1,
        vars: after + 2,
        secure,
    }
}

/// The first fd set number no disk uses.
pub fn next_set(sets: &[DiskSets]) -> u32 {
    sets.iter()
        .flat_map(|s| std::iter::once(s.file).chain(s.base))
        .max()
        .map_or(1, |m| m + 1)
}

/// Where a jailed QEMU finds the copy of its kernel.
pub const JAIL_KERNEL: &str = "/boot/kernel";
/// Where a jailed QEMU finds the copy of its initrd.
pub const JAIL_INITRD: &str = "/boot/initrd";
