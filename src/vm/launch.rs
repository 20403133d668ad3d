//! From a spec to the files its QEMU gets: where each disk's files are
//! (its own file, and for an overlay the image it reads through), and
//! opening them, with the kernel and initrd, afresh at every start: host
//! files below the allowed directories without following symlinks (a qcow2
//! one must name no backing or data file), vmlet's own files without
//! following symlinks. QEMU then gets the fds (`qemu/launch_files.rs`), so
//! the checks hold for the files QEMU reads, not for what was there when
//! the spec was accepted.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::qemu::disk::{self, DiskPlan, DiskSets, FileOrigin};
use crate::qemu::firmware::{self, PflashSets, UefiFirmware};
use crate::qemu::launch_files::{self, BootFile, BootFiles, PassedFd};
use crate::spec::{Boot, DiskFormat, DiskSource, DiskSpec, VmSpec, SEED_DISK, UEFI_NODES};
use crate::storage::files::{self, OpenError, OpenMode};
use crate::storage::Layout;

/// Resolves disk `index` of VM `vm` to its host file.
pub fn disk_plan(layout: &Layout, vm: Uuid, index: usize, disk: &DiskSpec) -> DiskPlan {
    let name = disk.name_or_default(index);
    let (file, format, base, origin) = match disk.source() {
        Ok(DiskSource::File { path, format }) => {
            (path.to_path_buf(), format, None, FileOrigin::Host)
        }
        Ok(DiskSource::Volume { volume }) => (
            layout.volume_file(volume),
            DiskFormat::Qcow2,
            None,
            FileOrigin::Managed,
        ),
        Ok(DiskSource::Image { image, .. }) => (
            layout.vm_disk(vm, &name),
            DiskFormat::Qcow2,
            Some(layout.image_file(image)),
            FileOrigin::Managed,
        ),
        // Validation guarantees a source; a blank disk lives in the
        // VM's directory.
        _ => (
            layout.vm_disk(vm, &name),
            DiskFormat::Qcow2,
            None,
            FileOrigin::Managed,
        ),
    };
    DiskPlan {
        name,
        file,
        format,
        spec: disk.clone(),
        base,
        origin,
    }
}

/// The read-only raw cloud-init seed disk of VM `vm`.
pub fn seed_plan(layout: &Layout, vm: Uuid) -> DiskPlan {
    DiskPlan {
        name: SEED_DISK.to_string(),
        file: layout.seed(vm),
        format: DiskFormat::Raw,
        spec: DiskSpec {
            name: Some(SEED_DISK.to_string()),
            read_only: true,
            ..DiskSpec::file(layout.seed(vm), DiskFormat::Raw)
        },
        base: None,
        origin: FileOrigin::Managed,
    }
}

/// A UEFI VM's NVRAM as a disk of its own (never a guest device): for
/// snapshots, which take it with the disks. Its name is its block node's
/// ([`UEFI_NODES`], reserved for it).
pub fn nvram_plan(layout: &Layout, vm: Uuid) -> DiskPlan {
    let name = UEFI_NODES[1].to_string();
    DiskPlan {
        name: name.clone(),
        file: layout.nvram(vm),
        format: DiskFormat::Qcow2,
        spec: DiskSpec {
            name: Some(name),
            ..DiskSpec::file(layout.nvram(vm), DiskFormat::Qcow2)
        },
        base: None,
        origin: FileOrigin::Managed,
    }
}

/// Every disk of a VM, the seed last.
pub fn disk_plans(layout: &Layout, vm: Uuid, disks: &[DiskSpec], seed: bool) -> Vec<DiskPlan> {
    let mut plans: Vec<DiskPlan> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| disk_plan(layout, vm, i, d))
        .collect();
    if seed {
        plans.push(seed_plan(layout, vm));
    }
    plans
}

/// How the disk's own file is opened: writable unless read only,
/// `O_DIRECT` with `cache.direct` (QEMU matches fd-set members on both).
pub fn file_mode(plan: &DiskPlan) -> OpenMode {
    let (direct, _, _) = plan.spec.cache.qemu_flags();
    OpenMode {
        write: !plan.spec.read_only,
        direct,
    }
}

/// How the overlay's image is opened (read only).
pub fn base_mode(plan: &DiskPlan) -> OpenMode {
    OpenMode {
        write: false,
        ..file_mode(plan)
    }
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
    /// The fd sets of a UEFI VM's firmware code and NVRAM, once
    /// [`LaunchFiles::open_firmware`] opened them.
    pub pflash: Option<PflashSets>,
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
        let disks = disk_plans(layout, spec.uuid, &spec.disks, spec.cloud_init.is_some());
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
                let fd = files::open_managed(base, base_mode(plan))
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
                Some(BootFiles {
                    kernel: BootFile::Fd(kernel),
                    initrd: initrd.map(BootFile::Fd),
                })
            }
            Boot::Firmware { .. } => None,
        };
        Ok(LaunchFiles {
            disks,
            sets,
            passed,
            boot,
            pflash: None,
            fds,
        })
    }

    /// Opens a UEFI VM's firmware code (read only, from the descriptor
    /// the daemon chose: system files, symlinks allowed) and its NVRAM
    /// (vmlet's own file, writable, no symlinks), for QEMU's `pflash0` and
    /// `pflash1`.
    pub fn open_firmware(
        &mut self,
        firmware: &UefiFirmware,
        nvram: &Path,
    ) -> Result<(), LaunchFileError> {
        let field = |source| LaunchFileError {
            field: "boot.firmware".into(),
            source,
        };
        let code: OwnedFd = std::fs::File::open(&firmware.code)
            .map_err(|e| {
                field(OpenError::Open {
                    path: firmware.code.clone(),
                    reason: format!("the firmware code (from {})", firmware.descriptor.display()),
                    source: e,
                })
            })?
            .into();
        let vars = files::open_managed(
            nvram,
            OpenMode {
                write: true,
                direct: false,
            },
        )
        .map_err(field)?;
        let sets = launch_files::pflash_sets(&self.sets, firmware.secure);
        for (fd, set, tag) in [
            (code, sets.code, firmware::CODE_TAG),
            (vars, sets.vars, firmware::VARS_TAG),
        ] {
            self.passed.push(PassedFd {
                fd: fd.as_raw_fd(),
                set,
                opaque: tag.into(),
            });
            self.fds.push(fd);
        }
        self.pflash = Some(sets);
        Ok(())
    }

    /// The fd numbers QEMU must inherit.
    pub fn inherited(&self) -> Vec<RawFd> {
        self.fds.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

/// Opens a disk's own file as `plan` says; a qcow2 host file must name no
/// backing or data file in its header.
pub fn open_disk_file(plan: &DiskPlan, host_roots: &[PathBuf]) -> Result<OwnedFd, OpenError> {
    match plan.origin {
        FileOrigin::Host => open_host_file(host_roots, &plan.file, file_mode(plan), plan.format),
        FileOrigin::Managed => files::open_managed(&plan.file, file_mode(plan)),
    }
}

/// Opens host file `path` below `host_roots` as `mode`; read as `format`
/// qcow2, its header must name no backing or data file. The one check a
/// spec's host files pass, at create and at every start.
pub fn open_host_file(
    host_roots: &[PathBuf],
    path: &Path,
    mode: OpenMode,
    format: DiskFormat,
) -> Result<OwnedFd, OpenError> {
    let fd = files::open_beneath(host_roots, path, mode)?;
    if format == DiskFormat::Qcow2 {
        files::check_qcow2_header(&fd, path)?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::disk::{blockdevs, device, has_throttle, launch_sets, top_node};
    use crate::qemu::profile::Profiles;
    use serde_json::{json, Value};

    fn disk(v: Value) -> DiskSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn plans_resolve_to_files_under_the_state_dir() {
        let layout = Layout::new(Path::new("/var/lib/vmlet"));
        let vm = Uuid::nil();
        let disks = [
            disk(json!({"image": "debian"})),
            disk(json!({"name": "data", "volume": "pg"})),
            disk(json!({"size_mib": 4})),
            disk(json!({"path": "/srv/a.img", "format": "raw"})),
        ];
        let plans = disk_plans(&layout, vm, &disks, true);
        let files: Vec<String> = plans.iter().map(|p| p.file.display().to_string()).collect();
        let vm_dir = format!("/var/lib/vmlet/vms/{vm}");
        assert_eq!(
            files,
            [
                format!("{vm_dir}/disks/disk0.qcow2"),
                "/var/lib/vmlet/volumes/pg.qcow2".to_string(),
                format!("{vm_dir}/disks/disk2.qcow2"),
                "/srv/a.img".to_string(),
                format!("{vm_dir}/cidata.img"),
            ]
        );
        assert_eq!(plans[3].format, DiskFormat::Raw);
        let seed = &plans[4];
        assert!(seed.spec.read_only && !has_throttle(seed));
        let sets = DiskSets {
            file: 1,
            base: None,
        };
        assert_eq!(blockdevs(seed, sets).len(), 2);
        assert_eq!(top_node(seed), "cidata");
    }

    #[test]
    fn devices_follow_bus_port_and_cache() {
        let profiles = Profiles::built_in().unwrap();
        let q35 = profiles.get("q35").unwrap();
        let layout = Layout::new(Path::new("/s"));
        let scsi = disk_plan(
            &layout,
            Uuid::nil(),
            0,
            &disk(json!({"volume": "v", "bus": "virtio_scsi", "cache": "writethrough"})),
        );
        let device = device(q35, &scsi, Some("hp3"));
        assert_eq!(device["driver"], "scsi-hd");
        assert_eq!(device["bus"], "scsi0.0");
        assert_eq!(device["drive"], "disk0-io");
        assert_eq!(device["write-cache"], "off");
        let blk = disk_plan(&layout, Uuid::nil(), 1, &disk(json!({"volume": "w"})));
        let device = disk::device(q35, &blk, Some("hp3"));
        assert_eq!(device["driver"], "virtio-blk-pci");
        assert_eq!(device["bus"], "hp3");
        assert_eq!(device["id"], "disk1-dev");
    }

    #[test]
    fn every_qcow2_node_has_its_backing_pinned_and_reads_an_fd_set() {
        let layout = Layout::new(Path::new("/s"));
        let vm = Uuid::nil();
        let disks = [
            disk(json!({"name": "root", "image": "debian"})),
            disk(json!({"name": "data", "volume": "pg"})),
            disk(json!({"name": "host", "path": "/srv/h.qcow2", "format": "qcow2"})),
            disk(json!({"name": "raw", "path": "/srv/r.img", "format": "raw"})),
        ];
        let plans = disk_plans(&layout, vm, &disks, false);
        let sets = launch_sets(&plans);
        assert_eq!(
            sets,
            [
                DiskSets {
                    file: 1,
                    base: Some(2)
                },
                DiskSets {
                    file: 3,
                    base: None
                },
                DiskSets {
                    file: 4,
                    base: None
                },
                DiskSets {
                    file: 5,
                    base: None
                },
            ]
        );
        assert_eq!(
            plans[0].base.as_deref(),
            Some(Path::new("/s/images/debian.qcow2"))
        );
        assert_eq!(plans[2].origin, FileOrigin::Host);
        assert_eq!(plans[1].origin, FileOrigin::Managed);
        for (plan, sets) in plans.iter().zip(&sets) {
            let nodes = blockdevs(plan, *sets);
            for node in &nodes {
                if node["driver"] == "file" {
                    assert!(
                        node["filename"]
                            .as_str()
                            .unwrap()
                            .starts_with("/dev/fdset/"),
                        "{node}"
                    );
                }
                if node["driver"] == "qcow2" {
                    let backing = &node["backing"];
                    if node["node-name"] == "root" {
                        assert_eq!(backing, "root-img");
                    } else {
                        assert!(backing.is_null() && node.get("backing").is_some(), "{node}");
                    }
                }
                if node["driver"] == "raw" {
                    assert!(node.get("backing").is_none(), "{node}");
                }
            }
        }
        // The overlay's image comes first, read only, backing pinned too.
        let root = blockdevs(&plans[0], sets[0]);
        assert_eq!(root[0]["node-name"], "root-imgf");
        assert_eq!(root[0]["filename"], "/dev/fdset/2");
        assert_eq!(root[1]["node-name"], "root-img");
        assert_eq!(root[1]["read-only"], true);
        assert!(root[1]["backing"].is_null());
    }
}
