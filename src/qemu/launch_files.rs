//! The files a QEMU launch needs, opened by vmlet and handed over as file
//! descriptors: every disk (into fd sets, `-add-fd` + `/dev/fdset/N`) and
//! the kernel and initrd of a direct boot (`/proc/self/fd/N`). QEMU never
//! resolves a host path for them, so a symlink swapped in after the VM was
//! created, or a path a guest wrote into an image header, leads nowhere.
//!
//! Opened afresh at every start: the checks hold for the files QEMU gets,
//! not for what was there when the spec was accepted.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::qemu::disk::{self, DiskPlan, DiskSets, FileOrigin};
use crate::spec::{Boot, DiskFormat, VmSpec};
use crate::storage::files::{self, OpenError, OpenMode};
use crate::storage::Layout;

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

/// A file that could not be opened, with the spec field that names it.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {source}")]
pub struct LaunchFileError {
    /// The spec field (`disks[1].path`, `boot.kernel`, …).
    pub field: String,
    /// Why.
    #[source]
    pub source: OpenError,
}

/// The opened files of one launch. Dropping it closes vmlet's copies
/// (after QEMU inherited them).
#[derive(Debug)]
pub struct LaunchFiles {
    /// The disks, the seed last.
    pub disks: Vec<DiskPlan>,
    /// Their fd sets.
    pub sets: Vec<DiskSets>,
    /// The fds QEMU files into those sets.
    pub passed: Vec<PassedFd>,
    /// Kernel and initrd of a direct boot.
    pub boot: Option<BootFiles>,
    fds: Vec<OwnedFd>,
}

impl LaunchFiles {
    /// Opens every file `spec` needs: host files below `host_roots`
    /// (canonical directories), vmlet's own under `layout`.
    pub fn open(
        spec: &VmSpec,
        layout: &Layout,
        host_roots: &[PathBuf],
    ) -> Result<LaunchFiles, LaunchFileError> {
        let disks = DiskPlan::all(layout, spec.uuid, &spec.disks, spec.cloud_init.is_some());
        let sets = disk::launch_sets(&disks);
        let mut fds = Vec::new();
        let mut passed = Vec::new();
        for (i, (plan, set)) in disks.iter().zip(&sets).enumerate() {
            let field = match plan.origin {
                FileOrigin::Host => format!("disks[{i}].path"),
                FileOrigin::Managed => format!("disks[{i}]"),
            };
            let fd = open_disk_file(plan, host_roots).map_err(|source| LaunchFileError {
                field: field.clone(),
                source,
            })?;
            passed.push(PassedFd {
                fd: fd.as_raw_fd(),
                set: set.file,
                opaque: plan.file_tag(),
            });
            fds.push(fd);
            if let (Some(base), Some(base_set)) = (&plan.base, set.base) {
                let fd = files::open_managed(base, plan.base_mode())
                    .map_err(|source| LaunchFileError { field, source })?;
                passed.push(PassedFd {
                    fd: fd.as_raw_fd(),
                    set: base_set,
                    opaque: plan.base_tag(),
                });
                fds.push(fd);
            }
        }
        let boot = match &spec.boot {
            Boot::Kernel { kernel, initrd, .. } => {
                let mut open = |field: &str, path: &Path| {
                    let fd = files::open_beneath(host_roots, path, OpenMode::READ).map_err(
                        |source| LaunchFileError {
                            field: field.to_string(),
                            source,
                        },
                    )?;
                    let raw = fd.as_raw_fd();
                    fds.push(fd);
                    Ok::<_, LaunchFileError>(raw)
                };
                let kernel = open("boot.kernel", kernel)?;
                let initrd = initrd
                    .as_deref()
                    .map(|i| open("boot.initrd", i))
                    .transpose()?;
                Some(BootFiles { kernel, initrd })
            }
            Boot::Firmware { .. } => None,
        };
        Ok(LaunchFiles {
            disks,
            sets,
            passed,
            boot,
            fds,
        })
    }

    /// The fd numbers QEMU must inherit.
    pub fn inherited(&self) -> Vec<RawFd> {
        self.fds.iter().map(AsRawFd::as_raw_fd).collect()
    }
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

/// Opens a disk's own file as `plan` says; a qcow2 host file must name no
/// backing or data file in its header.
pub fn open_disk_file(plan: &DiskPlan, host_roots: &[PathBuf]) -> Result<OwnedFd, OpenError> {
    match plan.origin {
        FileOrigin::Host => {
            let fd = files::open_beneath(host_roots, &plan.file, plan.file_mode())?;
            if plan.format == DiskFormat::Qcow2 {
                files::check_qcow2_header(&fd, &plan.file)?;
            }
            Ok(fd)
        }
        FileOrigin::Managed => files::open_managed(&plan.file, plan.file_mode()),
    }
}
