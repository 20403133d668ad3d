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

use super::{DiskSource, DiskSpec, FieldError, IoLimits, NicSpec, VmSpec};

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

/// Names `wanted`'s unnamed disks after `base`'s: an unnamed disk with the
/// same source as a disk of `base` keeps that disk's name, so removing the
/// first of two unnamed disks does not make the second one `disk0`. The
/// rest get `disk<i>`. `base` has named disks ([`name_disks`]).
pub fn adopt_disk_names(base: &VmSpec, wanted: &mut VmSpec) {
    let mut used: BTreeSet<String> = wanted.disks.iter().filter_map(|d| d.name.clone()).collect();
    for i in 0..wanted.disks.len() {
        if wanted.disks[i].name.is_some() {
            continue;
        }
        let adopted = base
            .disks
            .iter()
            .filter(|b| same_source(b, &wanted.disks[i]))
            .filter_map(|b| b.name.clone())
            .find(|name| !used.contains(name));
        let name = adopted.unwrap_or_else(|| wanted.disks[i].name_or_default(i));
        used.insert(name.clone());
        wanted.disks[i].name = Some(name);
    }
}

/// Whether two disks are the same storage (path and format, image, volume,
/// or size).
pub fn same_source(a: &DiskSpec, b: &DiskSpec) -> bool {
    (&a.path, a.format, &a.image, &a.volume, a.size_mib)
        == (&b.path, b.format, &b.image, &b.volume, b.size_mib)
}

/// What a change may not do to disks, beyond what validation checks (both
/// specs named): a disk keeps its storage (`disks[i]`: detach it and attach
/// another instead), disks made for the VM (from an image or blank) are
/// made only at create and never removed, since they go with the VM.
pub fn check_disk_changes(base: &VmSpec, wanted: &VmSpec) -> Vec<FieldError> {
    let mut errors = Vec::new();
    for (i, disk) in wanted.disks.iter().enumerate() {
        let name = disk.name.as_deref().unwrap_or_default();
        match base.disks.iter().find(|d| d.name.as_deref() == Some(name)) {
            Some(old) if !same_source(old, disk) => errors.push(FieldError {
                field: format!("disks[{i}]"),
                message: format!(
                    "disk {name} keeps its storage (path, format, image, volume, size_mib); detach it and attach another disk (resize grows a disk)"
                ),
            }),
            Some(_) => {}
            None if disk.owned_by_vm() => errors.push(FieldError {
                field: format!("disks[{i}]"),
                message: "a disk from an image or blank is made only with the VM; add a volume (POST /v1/volumes makes one)".into(),
            }),
            None => {}
        }
    }
    for old in &base.disks {
        let name = old.name.as_deref().unwrap_or_default();
        if old.owned_by_vm() && !wanted.disks.iter().any(|d| d.name.as_deref() == Some(name)) {
            errors.push(FieldError {
                field: "disks".into(),
                message: format!(
                    "disk {name} was made for this VM (from an image or blank) and goes only with it"
                ),
            });
        }
    }
    errors
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
            None if caps.hotplug && !disk.owned_by_vm() => live.push(LiveChange::DetachDisk(name)),
            None => {}
        }
    }
    let scsi = |d: &DiskSpec| d.bus == super::DiskBus::VirtioScsi;
    // The SCSI controller exists only when QEMU started with a SCSI disk.
    let has_scsi = running.disks.iter().any(scsi);
    for disk in &wanted.disks {
        let name = disk.name.as_deref().unwrap_or_default();
        let volume = matches!(disk.source(), Ok(DiskSource::Volume { .. }));
        if named(running, name).is_none() && caps.hotplug && volume && (has_scsi || !scsi(disk)) {
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
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
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
            diff(
                &json!({"a":1,"b":{"c":2,"d":3}}),
                &json!({"a":1,"b":{"c":5}})
            ),
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
            guest_agent: true,
            nics: vec![NicSpec {
                mac: Some("52:54:00:00:00:01".into()),
                ..serde_json::from_value(json!({"network": "n"})).unwrap()
            }],
            cloud_init: None,
            autostart: false,
            resources: Default::default(),
            tpm: None,
            cpu: None,
            topology: None,
            numa: vec![],
            memory: Default::default(),
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
    fn unnamed_disks_keep_their_names_and_owned_disks_their_storage() {
        let mut unnamed = spec();
        for d in &mut unnamed.disks {
            d.name = None;
        }
        let mut base = unnamed.clone();
        name_disks(&mut base);
        // The image disk removed: the volume stays disk1, and removing a
        // disk made for the VM is refused.
        let mut wanted = unnamed.clone();
        wanted.disks.remove(0);
        adopt_disk_names(&base, &mut wanted);
        assert_eq!(wanted.disks[0].name.as_deref(), Some("disk1"));
        let errors = check_disk_changes(&base, &wanted);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "disks");
        assert!(errors[0].message.contains("disk0"));

        // Another volume under an old name, and a new blank disk.
        let mut wanted = base.clone();
        wanted.disks[1].volume = Some("other".into());
        wanted
            .disks
            .push(serde_json::from_value(json!({"size_mib": 10})).unwrap());
        adopt_disk_names(&base, &mut wanted);
        assert_eq!(wanted.disks[2].name.as_deref(), Some("disk2"));
        let fields: Vec<String> = check_disk_changes(&base, &wanted)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, vec!["disks[1]", "disks[2]"]);

        // Limits and cache may change.
        let mut wanted = base.clone();
        wanted.disks[0].limits.bps_total = Some(1 << 20);
        assert!(check_disk_changes(&base, &wanted).is_empty());
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
