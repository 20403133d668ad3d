//! How QEMU is handed the files vmlet opened for it: disks go into fd sets
//! (`-add-fd` + `/dev/fdset/N`), the kernel and initrd of a direct boot are
//! inherited fds named `/proc/self/fd/N`. QEMU never resolves a host path
//! for them. (The VM layer opens the files: `vm/launch.rs`.)

use std::os::fd::RawFd;

use crate::qemu::disk::{self, DiskPlan, DiskSets};
use crate::spec::{Boot, VmSpec};

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

/// The kernel and initrd of a direct boot as fds QEMU inherits; `-kernel`
/// and `-initrd` name them as `/proc/self/fd/N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootFiles {
    /// The kernel's fd.
    pub kernel: RawFd,
    /// The initrd's fd, if any.
    pub initrd: Option<RawFd>,
}

impl BootFiles {
    /// The fds.
    pub fn fds(&self) -> impl Iterator<Item = RawFd> {
        std::iter::once(self.kernel).chain(self.initrd)
    }
}

/// How QEMU names an inherited fd as a file.
pub fn proc_fd_path(fd: RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}

/// The fd sets, passed fds and boot files a launch of `spec` with `disks`
/// would have, with fd numbers counted from `first_fd` instead of opened:
/// for showing an argv (`vmlet argv`, the golden corpus) without touching
/// any file.
pub fn numbered(
    spec: &VmSpec,
    disks: &[DiskPlan],
    first_fd: RawFd,
) -> (Vec<DiskSets>, Vec<PassedFd>, Option<BootFiles>) {
    let sets = disk::launch_sets(disks);
    let mut next = first_fd;
    let mut take = || {
        next += 1;
        next - 1
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
    let boot = match &spec.boot {
        Boot::Kernel { initrd, .. } => Some(BootFiles {
            kernel: take(),
            initrd: initrd.as_ref().map(|_| take()),
        }),
        Boot::Firmware { .. } => None,
    };
    (sets, passed, boot)
}
