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

use crate::qemu::profile::Profile;
use crate::spec::{DiskBus, DiskFormat, DiskSpec, IoLimits, SEED_DISK};

/// The id of the SCSI controller (its bus is `scsi0.0`).
pub const SCSI_CONTROLLER: &str = "scsi0";

/// Where a disk's file comes from, which says how vmlet opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOrigin {
    /// A host file a spec names (`path`): opened below the allowed host
    /// directories without following symlinks; a qcow2 one must name no
    /// backing or data file.
    Host,
    /// One of vmlet's own files (overlay, blank disk, volume, seed).
    Managed,
}

/// One disk, resolved to its host files.
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
    /// For an overlay: the image it reads through (qcow2, read only). QEMU
    /// is given this node as the overlay's backing, never a name from a
    /// header.
    pub base: Option<PathBuf>,
    /// How vmlet opens the file.
    pub origin: FileOrigin,
}

/// The fd sets (`/dev/fdset/N`) QEMU reads a disk's files through: vmlet
/// opened them and QEMU never resolves a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSets {
    /// The disk's own file.
    pub file: u32,
    /// The overlay's image, when there is one.
    pub base: Option<u32>,
}

impl DiskPlan {
    /// The `opaque` tag of the disk's fd set (`disk:NAME`), by which an
    /// unplug finds the sets to remove.
    pub fn file_tag(&self) -> String {
        format!("disk:{}", self.name)
    }

    /// The `opaque` tag of the overlay image's fd set.
    pub fn base_tag(&self) -> String {
        format!("disk:{}:image", self.name)
    }
}

/// Fd sets for `plans` at launch: numbered from 1 in order, each disk's
/// file, then its image.
pub fn launch_sets(plans: &[DiskPlan]) -> Vec<DiskSets> {
    let mut next = 0;
    let mut take = || {
        next += 1;
        next
    };
    plans
        .iter()
        .map(|plan| DiskSets {
            file: take(),
            base: plan.base.as_ref().map(|_| take()),
        })
        .collect()
}

/// QEMU id of the format node of an overlay's image.
pub fn base_node(name: &str) -> String {
    format!("{name}-img")
}

/// QEMU id of the protocol node of an overlay's image.
pub fn base_file_node(name: &str) -> String {
    format!("{name}-imgf")
}

fn fdset_path(set: u32) -> String {
    format!("/dev/fdset/{set}")
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

/// The block nodes, bottom up (`-blockdev` / `blockdev-add`), reading
/// the files through fd sets `sets`. Every qcow2 node has its backing
/// stated: the image's node for an overlay, none otherwise, so no header a
/// guest could have written makes QEMU open another file. The seed disk has
/// no throttle node.
pub fn blockdevs(plan: &DiskPlan, sets: DiskSets) -> Vec<Value> {
    let (direct, no_flush, _) = plan.spec.cache.qemu_flags();
    let cache = json!({"direct": direct, "no-flush": no_flush});
    let read_only = plan.spec.read_only;
    let mut nodes = Vec::new();
    let backing = match (&plan.base, sets.base) {
        (Some(_), Some(base_set)) => {
            nodes.push(json!({
                "driver": "file",
                "node-name": base_file_node(&plan.name),
                "filename": fdset_path(base_set),
                "read-only": true,
                "cache": cache,
            }));
            nodes.push(json!({
                "driver": "qcow2",
                "node-name": base_node(&plan.name),
                "file": base_file_node(&plan.name),
                "backing": null,
                "read-only": true,
                "cache": cache,
            }));
            json!(base_node(&plan.name))
        }
        _ => Value::Null,
    };
    nodes.push(json!({
        "driver": "file",
        "node-name": file_node(&plan.name),
        "filename": fdset_path(sets.file),
        "read-only": read_only,
        "discard": "unmap",
        "cache": cache,
    }));
    let mut format = json!({
        "driver": plan.format.driver(),
        "node-name": format_node(&plan.name),
        "file": file_node(&plan.name),
        "read-only": read_only,
        "discard": "unmap",
        "cache": cache,
    });
    if plan.format == DiskFormat::Qcow2 {
        format["backing"] = backing;
    }
    nodes.push(format);
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
