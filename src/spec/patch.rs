//! Changing a VM's spec: JSON merge patches (RFC 7386), the patch that
//! turns one spec into another (what `vmlet vm edit` sends), and which part
//! of a change a running VM can take at once.
//!
//! A running QEMU can take few changes: memory down to its boot size
//! through the balloon, disk I/O limits, disks and NICs plugged in or out,
//! and anything only vmlet reads (`autostart`). The rest waits for the next
//! start, as Proxmox's "pending" changes do.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::{DiskSource, DiskSpec, IoLimits, NicSpec, VmSpec};

/// Applies merge patch `patch` to `target` (RFC 7386): objects merge key by
/// key, `null` removes a key, anything else (arrays included) replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let object = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The merge patch that turns `from` into `to` (`{}` when they are equal).
/// A `null` in `to` cannot be said in a merge patch; it becomes a removal,
/// which for a spec means the same (the field's default).
pub fn diff(from: &Value, to: &Value) -> Value {
    match (from, to) {
        (Value::Object(from), Value::Object(to)) => {
            let mut patch = Map::new();
            for key in from.keys() {
                if !to.contains_key(key) {
                    patch.insert(key.clone(), Value::Null);
                }
            }
            for (key, value) in to {
                match from.get(key) {
                    Some(old) if old == value => {}
                    Some(old) if old.is_object() && value.is_object() => {
                        patch.insert(key.clone(), diff(old, value));
                    }
                    _ => {
                        patch.insert(key.clone(), value.clone());
                    }
                }
            }
            Value::Object(patch)
        }
        _ => to.clone(),
    }
}

/// The fields in which two specs differ, as the API spells them: top-level
/// names, one level deeper inside objects (`resources.cpu_quota_percent`,
/// `boot.cmdline`); lists are named whole (`disks`).
pub fn changed_fields(from: &VmSpec, to: &VmSpec) -> Vec<String> {
    let from = serde_json::to_value(from).expect("a spec serializes");
    let to = serde_json::to_value(to).expect("a spec serializes");
    let empty = Map::new();
    let from = from.as_object().unwrap_or(&empty);
    let to = to.as_object().unwrap_or(&empty);
    let keys: BTreeSet<&String> = from.keys().chain(to.keys()).collect();
    let mut fields = Vec::new();
    for key in keys {
        let (a, b) = (from.get(key), to.get(key));
        if a == b {
            continue;
        }
        // A section left out when default (`resources`) is an empty object.
        match (a.unwrap_or(&Value::Null), b.unwrap_or(&Value::Null)) {
            (Value::Object(a), Value::Object(b)) => {
                let inner: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for sub in inner {
                    if a.get(sub) != b.get(sub) {
                        fields.push(format!("{key}.{sub}"));
                    }
                }
            }
            (Value::Object(a), Value::Null) | (Value::Null, Value::Object(a)) => {
                fields.extend(a.keys().map(|sub| format!("{key}.{sub}")));
            }
            _ => fields.push(key.clone()),
        }
    }
    fields
}

/// Gives every disk its name (`disk<i>` when it had none), so that
/// removing one never renames the others and disks compare by name.
pub fn name_disks(spec: &mut VmSpec) {
    for (i, disk) in spec.disks.iter_mut().enumerate() {
        disk.name = Some(disk.name_or_default(i));
    }
}

/// One change a running VM takes at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveChange {
    /// Set the balloon's target (memory the guest keeps), in MiB.
    Memory(u64),
    /// Replace disk `disk`'s I/O limits.
    Limits {
        /// The disk's name.
        disk: String,
        /// Its new limits.
        limits: IoLimits,
    },
    /// Unplug the disk with this name.
    DetachDisk(String),
    /// Plug this disk in (named, last).
    AttachDisk(DiskSpec),
    /// Unplug the NIC with this MAC.
    DetachNic(String),
    /// Plug this NIC in (last).
    AttachNic(NicSpec),
    /// Fields only vmlet reads (`autostart`): they take effect at once.
    Record {
        /// The new `autostart`.
        autostart: bool,
    },
}

impl LiveChange {
    /// The change's effect on the spec, once QEMU took it.
    pub fn apply(&self, spec: &mut VmSpec) {
        match self {
            LiveChange::Memory(mib) => spec.memory_mib = *mib,
            LiveChange::Limits { disk, limits } => {
                if let Some(d) = spec
                    .disks
                    .iter_mut()
                    .find(|d| d.name.as_deref() == Some(disk))
                {
                    d.limits = *limits;
                }
            }
            LiveChange::DetachDisk(name) => spec.disks.retain(|d| d.name.as_deref() != Some(name)),
            LiveChange::AttachDisk(disk) => spec.disks.push(disk.clone()),
            LiveChange::DetachNic(mac) => spec.nics.retain(|n| !same_mac(n, mac)),
            LiveChange::AttachNic(nic) => spec.nics.push(nic.clone()),
            LiveChange::Record { autostart } => spec.autostart = *autostart,
        }
    }
}

/// What the running QEMU offers for live changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveCaps {
    /// Guest memory QEMU booted with, in MiB: the balloon never goes above.
    pub boot_memory_mib: u64,
    /// The VM has a memory balloon.
    pub balloon: bool,
    /// Its profile can hot-plug disks and NICs.
    pub hotplug: bool,
}

/// How a change to a running VM splits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// What to do now, in order.
    pub live: Vec<LiveChange>,
    /// The spec once those are done.
    pub applied: VmSpec,
    /// Fields where `applied` still differs from the wanted spec: they
    /// wait for the next start.
    pub pending: Vec<String>,
}

/// Splits the change from `running` (the spec QEMU runs, as changed live
/// so far) to `wanted` into what QEMU takes now and what waits. Both specs
/// have named disks and NICs with MACs ([`name_disks`], MACs settled).
pub fn split(running: &VmSpec, wanted: &VmSpec, caps: LiveCaps) -> Split {
    let mut live = Vec::new();
    if wanted.memory_mib != running.memory_mib
        && caps.balloon
        && wanted.memory_mib <= caps.boot_memory_mib
    {
        live.push(LiveChange::Memory(wanted.memory_mib));
    }
    if wanted.autostart != running.autostart {
        live.push(LiveChange::Record {
            autostart: wanted.autostart,
        });
    }
    let named = |spec: &VmSpec, name: &str| {
        spec.disks
            .iter()
            .find(|d| d.name.as_deref() == Some(name))
            .cloned()
    };
    for disk in &running.disks {
        let name = disk.name.clone().unwrap_or_default();
        match named(wanted, &name) {
            Some(new) if new.limits != disk.limits => live.push(LiveChange::Limits {
                disk: name,
                limits: new.limits,
            }),
            Some(_) => {}
            // Disks made for the VM go only with it (the caller refuses
            // removing them); volumes and host files unplug.
            None if caps.hotplug && !disk.owned_by_vm() => {
                live.push(LiveChange::DetachDisk(name))
            }
            None => {}
        }
    }
    let scsi = |d: &DiskSpec| d.bus == super::DiskBus::VirtioScsi;
    // The SCSI controller exists only when QEMU started with a SCSI disk.
    let has_scsi = running.disks.iter().any(scsi);
    for disk in &wanted.disks {
        let name = disk.name.as_deref().unwrap_or_default();
        let volume = matches!(disk.source(), Ok(DiskSource::Volume { .. }));
        if named(running, name).is_none()
            && caps.hotplug
            && volume
            && (has_scsi || !scsi(disk))
        {
            live.push(LiveChange::AttachDisk(disk.clone()));
        }
    }
    let mac = |n: &NicSpec| n.mac.clone().unwrap_or_default();
    if caps.hotplug {
        for nic in &running.nics {
            if !wanted.nics.iter().any(|n| same_mac(n, &mac(nic))) {
                live.push(LiveChange::DetachNic(mac(nic)));
            }
        }
        for nic in &wanted.nics {
            if !running.nics.iter().any(|n| same_mac(n, &mac(nic))) {
                live.push(LiveChange::AttachNic(nic.clone()));
            }
        }
    }
    let mut applied = running.clone();
    for change in &live {
        change.apply(&mut applied);
    }
    let pending = changed_fields(&applied, wanted);
    Split {
        live,
        applied,
        pending,
    }
}

fn same_mac(nic: &NicSpec, mac: &str) -> bool {
    nic.mac
        .as_deref()
        .is_some_and(|m| m.eq_ignore_ascii_case(mac))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Boot, Firmware, SerialSpec};
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386_examples() {
        // The examples of RFC 7386, appendix A.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (
                json!({"a":[{"b":"c"}]}),
                json!({"a":[1]}),
                json!({"a":[1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, expected) in cases {
            let mut got = target.clone();
            merge_patch(&mut got, &patch);
            assert_eq!(got, expected, "{target} + {patch}");
        }
    }

    #[test]
    fn diff_is_the_patch_that_turns_one_into_the_other() {
        let pairs = [
            (json!({"a":1,"b":{"c":2,"d":3}}), json!({"a":1,"b":{"c":5}})),
            (json!({"a":[1,2]}), json!({"a":[2],"e":"x"})),
            (json!({"a":1}), json!({"a":1})),
            (json!({"a":{"b":1}}), json!({"a":7})),
        ];
        for (from, to) in pairs {
            let patch = diff(&from, &to);
            let mut got = from.clone();
            merge_patch(&mut got, &patch);
            assert_eq!(got, to, "{from} -> {to} via {patch}");
        }
        assert_eq!(diff(&json!({"a":1}), &json!({"a":1})), json!({}));
        assert_eq!(
            diff(&json!({"a":1,"b":{"c":2,"d":3}}), &json!({"a":1,"b":{"c":5}})),
            json!({"b":{"c":5,"d":null}})
        );
    }

    fn spec() -> VmSpec {
        let mut spec = VmSpec {
            uuid: uuid::Uuid::from_u128(7),
            name: "a".into(),
            vcpus: 1,
            memory_mib: 512,
            profile: "q35".into(),
            boot: Boot::Firmware {
                firmware: Firmware::Bios,
            },
            disks: vec![
                serde_json::from_value(json!({"image": "base", "size_mib": 100})).unwrap(),
                serde_json::from_value(json!({"volume": "data"})).unwrap(),
            ],
            serial: SerialSpec::default(),
            channels: vec![],
            nics: vec![NicSpec {
                mac: Some("52:54:00:00:00:01".into()),
                ..serde_json::from_value(json!({"network": "n"})).unwrap()
            }],
            cloud_init: None,
            autostart: false,
            resources: Default::default(),
        };
        name_disks(&mut spec);
        spec
    }

    const CAPS: LiveCaps = LiveCaps {
        boot_memory_mib: 512,
        balloon: true,
        hotplug: true,
    };

    #[test]
    fn memory_up_to_the_boot_size_is_live_above_it_pending() {
        let running = spec();
        let mut wanted = running.clone();
        wanted.memory_mib = 256;
        let s = split(&running, &wanted, CAPS);
        assert_eq!(s.live, vec![LiveChange::Memory(256)]);
        assert!(s.pending.is_empty());
        assert_eq!(s.applied, wanted);

        // Ballooned down, back up to the boot size: live.
        let s = split(&wanted, &running, CAPS);
        assert_eq!(s.live, vec![LiveChange::Memory(512)]);

        let mut bigger = running.clone();
        bigger.memory_mib = 1024;
        let s = split(&running, &bigger, CAPS);
        assert!(s.live.is_empty());
        assert_eq!(s.pending, vec!["memory_mib"]);
        assert_eq!(s.applied, running);

        // No balloon: every memory change waits.
        let no_balloon = LiveCaps {
            balloon: false,
            ..CAPS
        };
        let s = split(&running, &wanted, no_balloon);
        assert!(s.live.is_empty());
        assert_eq!(s.pending, vec!["memory_mib"]);
    }

    #[test]
    fn limits_autostart_and_devices_are_live_the_rest_pending() {
        let running = spec();
        let mut wanted = running.clone();
        wanted.autostart = true;
        wanted.vcpus = 4;
        wanted.resources.cpu_quota_percent = Some(50);
        wanted.disks[1].limits.iops_total = Some(100);
        wanted.disks[1].cache = crate::spec::CacheMode::Writethrough;
        let s = split(&running, &wanted, CAPS);
        assert_eq!(
            s.live,
            vec![
                LiveChange::Record { autostart: true },
                LiveChange::Limits {
                    disk: "disk1".into(),
                    limits: wanted.disks[1].limits
                },
            ]
        );
        assert_eq!(
            s.pending,
            vec!["disks", "resources.cpu_quota_percent", "vcpus"]
        );
        assert!(s.applied.autostart);
        assert_eq!(s.applied.disks[1].limits.iops_total, Some(100));
        assert_eq!(s.applied.disks[1].cache, running.disks[1].cache);
    }

    #[test]
    fn volumes_and_nics_plug_in_and_out_owned_disks_stay() {
        let running = spec();
        let mut wanted = running.clone();
        wanted.disks.remove(1);
        let mut extra: DiskSpec = serde_json::from_value(json!({"volume": "more"})).unwrap();
        extra.name = Some("more".into());
        wanted.disks.push(extra.clone());
        wanted.nics = vec![NicSpec {
            mac: Some("52:54:00:00:00:02".into()),
            ..running.nics[0].clone()
        }];
        let s = split(&running, &wanted, CAPS);
        assert_eq!(
            s.live,
            vec![
                LiveChange::DetachDisk("disk1".into()),
                LiveChange::AttachDisk(extra),
                LiveChange::DetachNic("52:54:00:00:00:01".into()),
                LiveChange::AttachNic(wanted.nics[0].clone()),
            ]
        );
        assert!(s.pending.is_empty(), "{:?}", s.pending);
        assert_eq!(s.applied, wanted);

        // Without hot-plug all of it waits; a reorder waits too.
        let no_hotplug = LiveCaps {
            hotplug: false,
            ..CAPS
        };
        let s = split(&running, &wanted, no_hotplug);
        assert!(s.live.is_empty());
        assert_eq!(s.pending, vec!["disks", "nics"]);
        let mut reordered = running.clone();
        reordered.disks.reverse();
        let s = split(&running, &reordered, CAPS);
        assert!(s.live.is_empty());
        assert_eq!(s.pending, vec!["disks"]);
    }

    #[test]
    fn changed_fields_names_nested_objects_one_level_deep() {
        let a = spec();
        let mut b = a.clone();
        b.serial.enabled = false;
        b.name = "b".into();
        assert_eq!(changed_fields(&a, &b), vec!["name", "serial.enabled"]);
        assert!(changed_fields(&a, &a).is_empty());
    }
}
