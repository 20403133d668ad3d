//! How a disk looks to QEMU: its throttle group, its three block nodes and
//! its guest device, as JSON objects. The same objects go on the command
//! line (`-object`/`-blockdev`/`-device` take JSON) and into QMP hot-plug
//! commands (`object-add`, `blockdev-add`, `device_add`), so a hot-plugged
//! disk is exactly what a cold-plugged one would have been.
//!
//! Node graph of disk `NAME`: `NAME-file` (file protocol) ← `NAME` (format:
//! snapshots, resize and `query-blockstats` address it) ← `NAME-io` (throttle
//! filter in group `NAME-tg`) ← device `NAME-dev`.

use std::path::PathBuf;

use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::qemu::profile::Profile;
use crate::storage::Layout;
use crate::vm::spec::{DiskBus, DiskFormat, DiskSource, DiskSpec, IoLimits, SEED_DISK};

/// The id of the SCSI controller (its bus is `scsi0.0`).
pub const SCSI_CONTROLLER: &str = "scsi0";

/// One disk, resolved to a host file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// The disk's name in the VM.
    pub name: String,
    /// The host file.
    pub file: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// The spec (bus, cache, limits, …).
    pub spec: DiskSpec,
}

impl DiskPlan {
    /// Resolves disk `index` of VM `vm` to its host file.
    pub fn new(layout: &Layout, vm: Uuid, index: usize, disk: &DiskSpec) -> DiskPlan {
        let name = disk.name_or_default(index);
        let (file, format) = match disk.source() {
            Ok(DiskSource::File { path, format }) => (path.to_path_buf(), format),
            Ok(DiskSource::Volume { volume }) => (layout.volume_file(volume), DiskFormat::Qcow2),
            // Validation guarantees a source; an overlay or blank disk lives
            // in the VM's directory.
            _ => (layout.vm_disk(vm, &name), DiskFormat::Qcow2),
        };
        DiskPlan {
            name,
            file,
            format,
            spec: disk.clone(),
        }
    }

    /// The read-only raw cloud-init seed disk of VM `vm`.
    pub fn seed(layout: &Layout, vm: Uuid) -> DiskPlan {
        DiskPlan {
            name: SEED_DISK.to_string(),
            file: layout.seed(vm),
            format: DiskFormat::Raw,
            spec: DiskSpec {
                name: Some(SEED_DISK.to_string()),
                read_only: true,
                ..DiskSpec::file(layout.seed(vm), DiskFormat::Raw)
            },
        }
    }

    /// Every disk of a VM, the seed last.
    pub fn all(layout: &Layout, vm: Uuid, disks: &[DiskSpec], seed: bool) -> Vec<DiskPlan> {
        let mut plans: Vec<DiskPlan> = disks
            .iter()
            .enumerate()
            .map(|(i, d)| DiskPlan::new(layout, vm, i, d))
            .collect();
        if seed {
            plans.push(DiskPlan::seed(layout, vm));
        }
        plans
    }
}

/// QEMU id of a disk's format node.
pub fn format_node(name: &str) -> String {
    name.to_string()
}

/// QEMU id of a disk's protocol (file) node.
pub fn file_node(name: &str) -> String {
    format!("{name}-file")
}

/// QEMU id of a disk's throttle filter node (what its device reads from).
pub fn throttle_node(name: &str) -> String {
    format!("{name}-io")
}

/// QEMU id of a disk's throttle group object.
pub fn throttle_group_id(name: &str) -> String {
    format!("{name}-tg")
}

/// QEMU id of a disk's guest device.
pub fn device_id(name: &str) -> String {
    format!("{name}-dev")
}

/// `ThrottleLimits` with every field given (0: unlimited), so setting them
/// replaces the old limits entirely.
pub fn throttle_limits(limits: &IoLimits) -> Value {
    let mut map = Map::new();
    for (key, value) in limits.pairs() {
        map.insert(key.to_string(), json!(value.unwrap_or(0)));
    }
    Value::Object(map)
}

/// The throttle group object (`-object` / `object-add`).
pub fn throttle_group(plan: &DiskPlan) -> Value {
    json!({
        "qom-type": "throttle-group",
        "id": throttle_group_id(&plan.name),
        "limits": throttle_limits(&plan.spec.limits),
    })
}

/// The block nodes, bottom up (`-blockdev` / `blockdev-add`). The seed disk
/// has no throttle node.
pub fn blockdevs(plan: &DiskPlan) -> Vec<Value> {
    let (direct, no_flush, _) = plan.spec.cache.qemu_flags();
    let cache = json!({"direct": direct, "no-flush": no_flush});
    let read_only = plan.spec.read_only;
    let mut nodes = vec![
        json!({
            "driver": "file",
            "node-name": file_node(&plan.name),
            "filename": plan.file,
            "read-only": read_only,
            "discard": "unmap",
            "cache": cache,
        }),
        json!({
            "driver": plan.format.driver(),
            "node-name": format_node(&plan.name),
            "file": file_node(&plan.name),
            "read-only": read_only,
            "discard": "unmap",
            "cache": cache,
        }),
    ];
    if has_throttle(plan) {
        nodes.push(json!({
            "driver": "throttle",
            "node-name": throttle_node(&plan.name),
            "throttle-group": throttle_group_id(&plan.name),
            "file": format_node(&plan.name),
            "read-only": read_only,
        }));
    }
    nodes
}

/// Whether the disk gets a throttle group and filter (all but the seed).
pub fn has_throttle(plan: &DiskPlan) -> bool {
    plan.name != SEED_DISK
}

/// The node the guest device reads from.
pub fn top_node(plan: &DiskPlan) -> String {
    if has_throttle(plan) {
        throttle_node(&plan.name)
    } else {
        format_node(&plan.name)
    }
}

/// The guest device (`-device` / `device_add`). `port`: the hot-plug root
/// port a virtio-blk device goes on (hot-plug on PCI only).
pub fn device(profile: &Profile, plan: &DiskPlan, port: Option<&str>) -> Value {
    let (_, _, write_cache) = plan.spec.cache.qemu_flags();
    let mut device = match plan.spec.bus {
        DiskBus::VirtioBlk => {
            let mut d = json!({"driver": profile.devices.disk});
            if let Some(port) = port {
                d["bus"] = json!(port);
            }
            d
        }
        DiskBus::VirtioScsi => {
            json!({"driver": "scsi-hd", "bus": format!("{SCSI_CONTROLLER}.0")})
        }
    };
    device["id"] = json!(device_id(&plan.name));
    device["drive"] = json!(top_node(plan));
    device["write-cache"] = json!(if write_cache { "on" } else { "off" });
    if let Some(order) = plan.spec.boot_order {
        device["bootindex"] = json!(order);
    }
    if let Some(serial) = &plan.spec.serial {
        device["serial"] = json!(serial);
    }
    device
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::profile::Profiles;
    use std::path::Path;

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
        let plans = DiskPlan::all(&layout, vm, &disks, true);
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
        assert_eq!(blockdevs(seed).len(), 2);
        assert_eq!(top_node(seed), "cidata");
    }

    #[test]
    fn devices_follow_bus_port_and_cache() {
        let profiles = Profiles::built_in().unwrap();
        let q35 = profiles.get("q35").unwrap();
        let layout = Layout::new(Path::new("/s"));
        let scsi = DiskPlan::new(
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
        let blk = DiskPlan::new(&layout, Uuid::nil(), 1, &disk(json!({"volume": "w"})));
        let device = super::device(q35, &blk, Some("hp3"));
        assert_eq!(device["driver"], "virtio-blk-pci");
        assert_eq!(device["bus"], "hp3");
        assert_eq!(device["id"], "disk1-dev");
    }

    #[test]
    fn throttle_limits_name_every_field() {
        let limits = IoLimits {
            iops_total: Some(7),
            ..IoLimits::default()
        };
        let value = throttle_limits(&limits);
        assert_eq!(value.as_object().unwrap().len(), 6);
        assert_eq!(value["iops-total"], 7);
        assert_eq!(value["bps-write"], 0);
    }
}
