//! Unit tests of `validation.rs`, in a file of their own so that the code
//! stays short enough to read in one go.

use super::*;
use crate::spec::*;
use serde_json::json;
use uuid::Uuid;

fn caps(name: &str) -> Option<ProfileCaps> {
    match name {
        "q35" => Some(ProfileCaps {
            kernel_boot: true,
            firmware_boot: true,
            scsi: true,
            pci: true,
            tpm: true,
            uefi: true,
            secure_boot: true,
        }),
        "microvm" => Some(ProfileCaps {
            kernel_boot: true,
            firmware_boot: false,
            scsi: false,
            pci: false,
            tpm: false,
            uefi: false,
            secure_boot: false,
        }),
        // A PC with pflash but without SMM.
        "nosmm" => Some(ProfileCaps {
            kernel_boot: true,
            firmware_boot: true,
            scsi: true,
            pci: true,
            tpm: true,
            uefi: true,
            secure_boot: false,
        }),
        _ => None,
    }
}

fn base() -> serde_json::Value {
    json!({
        "uuid": "5b0c2d4e-8a51-4f3e-9b1c-2a7f4d6e8c10",
        "name": "web-1",
        "vcpus": 2,
        "memory_mib": 512,
        "boot": {"type": "kernel", "kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img", "cmdline": "console=ttyS0"},
        "disks": [{"path": "/var/lib/vmlet/a.qcow2", "format": "qcow2"}]
    })
}

fn parse(v: serde_json::Value) -> VmSpec {
    serde_json::from_value(v).expect("spec parses")
}

fn fields(v: serde_json::Value) -> Vec<String> {
    match parse(v).validate(caps) {
        Ok(()) => vec![],
        Err(e) => e.errors.into_iter().map(|e| e.field).collect(),
    }
}

#[test]
fn tpm_is_2_0_only_and_needs_a_profile_with_a_tpm_device() {
    let mut v = base();
    v["tpm"] = json!({"version": "2.0"});
    assert_eq!(
        parse(v.clone()).tpm.map(|t| t.version),
        Some(TpmVersion::V2_0)
    );
    assert_eq!(fields(v.clone()), Vec::<String>::new());
    v["profile"] = json!("microvm");
    assert_eq!(fields(v), vec!["tpm".to_string()]);
    for bad in [
        json!({"version": "1.2"}),
        json!({"version": 2}),
        json!({}),
        json!({"version": "2.0", "model": "tis"}),
    ] {
        let mut v = base();
        v["tpm"] = bad.clone();
        let err = serde_json::from_value::<VmSpec>(v).expect_err("refused");
        assert!(!err.to_string().is_empty(), "{bad}");
    }
    // Absent: no TPM, and nothing serialized.
    let spec = parse(base());
    assert_eq!(spec.tpm, None);
    assert!(serde_json::to_value(&spec).unwrap().get("tpm").is_none());
}

#[test]
fn good_spec_is_valid_and_gets_defaults() {
    let spec = parse(base());
    assert_eq!(spec.validate(caps), Ok(()));
    assert_eq!(spec.profile, "q35");
    assert!(spec.serial.enabled);
    assert_eq!(spec.disks[0].name_or_default(0), "disk0");
}

#[test]
fn unknown_fields_are_refused_at_every_level() {
    let mut v = base();
    v["colour"] = json!("red");
    assert!(serde_json::from_value::<VmSpec>(v).is_err());
    let mut v = base();
    v["disks"][0]["colour"] = json!("none");
    assert!(serde_json::from_value::<VmSpec>(v).is_err());
    let mut v = base();
    v["boot"]["bootloader"] = json!("grub");
    assert!(serde_json::from_value::<VmSpec>(v).is_err());
}

#[test]
fn bad_values_name_their_field() {
    let mut v = base();
    v["name"] = json!("../etc");
    v["vcpus"] = json!(0);
    v["memory_mib"] = json!(1);
    v["profile"] = json!("nope");
    assert_eq!(fields(v), ["name", "vcpus", "memory_mib", "profile"]);
}

#[test]
fn paths_must_be_absolute_and_normal() {
    for bad in [
        "relative.qcow2",
        "/var/../etc/shadow",
        "/a/./b",
        "/a/b/",
        "/a//b",
        "/a\nb",
        "",
    ] {
        let mut v = base();
        v["disks"] = json!([
            {"path": "/ok.qcow2", "format": "qcow2"},
            {"path": bad, "format": "raw"}
        ]);
        assert_eq!(fields(v), ["disks[1].path"], "path {bad:?}");
    }
    let mut v = base();
    v["boot"]["kernel"] = json!("vmlinuz");
    v["boot"]["initrd"] = json!("/x/../y");
    assert_eq!(fields(v), ["boot.kernel", "boot.initrd"]);
}

#[test]
fn commas_and_spaces_in_paths_are_allowed() {
    let mut v = base();
    v["disks"][0]["path"] = json!("/srv/my disks/a,b.qcow2");
    assert_eq!(fields(v), Vec::<String>::new());
}

#[test]
fn disk_names_orders_and_serials() {
    let mut v = base();
    v["disks"] = json!([
        {"name": "root", "path": "/a", "format": "raw", "boot_order": 1},
        {"name": "root", "path": "/b", "format": "raw", "boot_order": 1},
        {"name": "9lives", "path": "/c", "format": "raw", "serial": "has space"},
    ]);
    assert_eq!(
        fields(v),
        [
            "disks[1].name",
            "disks[1].boot_order",
            "disks[2].name",
            "disks[2].serial"
        ]
    );
    // A default name colliding with an explicit one is a duplicate too.
    let mut v = base();
    v["disks"] = json!([
        {"path": "/a", "format": "raw"},
        {"name": "disk0", "path": "/b", "format": "raw"},
    ]);
    assert_eq!(fields(v), ["disks[1].name"]);
}

#[test]
fn uefi_needs_pflash_and_secure_boot_needs_smm() {
    // Both boot types take a firmware; bios stays the default.
    let mut v = base();
    assert_eq!(parse(v.clone()).boot.firmware(), Firmware::Bios);
    v["boot"]["firmware"] = json!("uefi");
    assert_eq!(parse(v.clone()).boot.firmware(), Firmware::Uefi);
    assert_eq!(fields(v.clone()), Vec::<String>::new());
    v["boot"]["firmware"] = json!("uefi-secure");
    assert_eq!(parse(v.clone()).boot.firmware(), Firmware::UefiSecure);
    assert_eq!(fields(v.clone()), Vec::<String>::new());
    // microvm has no pflash; a machine without SMM cannot keep Secure
    // Boot's variables from the guest.
    v["profile"] = json!("microvm");
    assert_eq!(fields(v.clone()), ["boot.firmware"]);
    let err = parse(v.clone()).validate(caps).unwrap_err();
    assert!(err.errors[0].message.contains("pflash"), "{err:?}");
    v["boot"]["firmware"] = json!("uefi");
    assert_eq!(fields(v.clone()), ["boot.firmware"]);
    v["profile"] = json!("nosmm");
    assert_eq!(fields(v.clone()), Vec::<String>::new());
    v["boot"]["firmware"] = json!("uefi-secure");
    assert_eq!(fields(v.clone()), ["boot.firmware"]);
    let err = parse(v.clone()).validate(caps).unwrap_err();
    assert!(err.errors[0].message.contains("SMM"), "{err:?}");
    // Firmware boot takes them too.
    let mut v = base();
    v["boot"] = json!({"type": "firmware", "firmware": "uefi-secure"});
    v["disks"][0]["boot_order"] = json!(1);
    assert_eq!(fields(v.clone()), Vec::<String>::new());
    // Unknown names are refused at parse time (snake_case is not it).
    v["boot"]["firmware"] = json!("uefi_secure");
    assert!(serde_json::from_value::<VmSpec>(v.clone()).is_err());
    v["boot"]["firmware"] = json!("UEFI");
    assert!(serde_json::from_value::<VmSpec>(v).is_err());
    // A kernel boot with bios serializes as before (no firmware key).
    let spec = parse(base());
    let out = serde_json::to_value(&spec).unwrap();
    assert!(out["boot"].get("firmware").is_none(), "{out}");
}

#[test]
fn uefi_node_names_are_reserved() {
    for name in UEFI_NODES {
        let mut v = base();
        v["disks"][0]["name"] = json!(name);
        assert_eq!(fields(v), ["disks[0].name"], "{name}");
    }
}

#[test]
fn firmware_boot_needs_a_boot_disk_and_a_capable_profile() {
    let mut v = base();
    v["boot"] = json!({"type": "firmware"});
    assert_eq!(fields(v.clone()), ["disks"]);
    v["disks"][0]["boot_order"] = json!(1);
    assert_eq!(fields(v.clone()), Vec::<String>::new());
    v["profile"] = json!("microvm");
    assert_eq!(fields(v), ["boot.type"]);
}

#[test]
fn cmdline_limits() {
    let mut v = base();
    v["boot"]["cmdline"] = json!("a".repeat(limits::MAX_CMDLINE_LEN + 1));
    assert_eq!(fields(v), ["boot.cmdline"]);
    let mut v = base();
    v["boot"]["cmdline"] = json!("console=ttyS0\nrm");
    assert_eq!(fields(v), ["boot.cmdline"]);
}

#[test]
fn channels_are_checked() {
    let mut v = base();
    v["channels"] =
        json!([{"name": "org.vmlet.guest.0"}, {"name": "org.vmlet.guest.0"}, {"name": "a,b"}]);
    assert_eq!(fields(v), ["channels[1].name", "channels[2].name"]);
}

#[test]
fn agent_port_is_not_a_channel_while_the_agent_is_on() {
    let mut v = base();
    v["channels"] = json!([{"name": "org.qemu.guest_agent.0"}]);
    assert_eq!(fields(v.clone()), ["channels[0].name"]);
    v["guest_agent"] = json!(false);
    assert!(fields(v).is_empty());
}

#[test]
fn guest_agent_defaults_to_on_and_must_be_a_bool() {
    assert!(parse(base()).guest_agent);
    let mut v = base();
    v["guest_agent"] = json!("yes");
    assert!(serde_json::from_value::<VmSpec>(v).is_err());
}

#[test]
fn disk_sources_are_exactly_one() {
    let cases = [
        (json!({"image": "debian", "size_mib": 10240}), vec![]),
        (json!({"volume": "data"}), vec![]),
        (json!({"size_mib": 64}), vec![]),
        (json!({"path": "/a"}), vec!["disks[0].format"]),
        (
            json!({"format": "raw"}),
            vec!["disks[0].path", "disks[0].format"],
        ),
        (json!({}), vec!["disks[0].path"]),
        (json!({"image": "a", "volume": "b"}), vec!["disks[0].path"]),
        (
            json!({"path": "/a", "format": "raw", "image": "x"}),
            vec!["disks[0].path"],
        ),
        (
            json!({"volume": "v", "size_mib": 5}),
            vec!["disks[0].size_mib"],
        ),
        (
            json!({"path": "/a", "format": "raw", "size_mib": 5}),
            vec!["disks[0].size_mib"],
        ),
        (json!({"size_mib": 0}), vec!["disks[0].size_mib"]),
        (json!({"image": "../etc"}), vec!["disks[0].image"]),
        (json!({"volume": "a/b"}), vec!["disks[0].volume"]),
    ];
    for (disk, expected) in cases {
        let mut v = base();
        v["disks"] = json!([disk.clone()]);
        assert_eq!(fields(v), expected, "{disk}");
    }
}

#[test]
fn a_volume_is_used_once_and_cidata_is_reserved() {
    let mut v = base();
    v["disks"] = json!([
        {"volume": "data"},
        {"volume": "data"},
        {"name": "cidata", "size_mib": 1},
    ]);
    assert_eq!(fields(v), ["disks[1].volume", "disks[2].name"]);
}

#[test]
fn io_limits_and_buses_are_checked() {
    let mut v = base();
    v["disks"][0]["limits"] = json!({"iops_total": 100, "iops_read": 5, "bps_write": 1});
    assert_eq!(fields(v), ["disks[0].limits.iops_total"]);
    let mut v = base();
    v["disks"][0]["limits"] = json!({"bps_total": 0, "bps_read": 5});
    assert_eq!(fields(v.clone()), Vec::<String>::new());
    let spec = parse(v);
    assert!(!spec.disks[0].limits.is_unlimited());
    assert!(IoLimits::default().is_unlimited());
    let mut v = base();
    v["disks"][0]["bus"] = json!("virtio_scsi");
    assert_eq!(fields(v.clone()), Vec::<String>::new());
    v["profile"] = json!("microvm");
    assert_eq!(fields(v), ["disks[0].bus"]);
    assert!(validate_limits(&IoLimits {
        bps_total: Some(1),
        bps_write: Some(1),
        ..IoLimits::default()
    })
    .is_err());
}

#[test]
fn cloud_init_sizes_are_capped() {
    let mut v = base();
    v["cloud_init"] = json!({"user_data": "#cloud-config\n"});
    assert_eq!(fields(v.clone()), Vec::<String>::new());
    v["cloud_init"]["network_config"] = json!("x".repeat(limits::MAX_CLOUD_INIT_BYTES + 1));
    assert_eq!(fields(v), ["cloud_init.network_config"]);
}

#[test]
fn cache_modes_map_like_libvirt() {
    // (direct, no-flush, write-cache)
    assert_eq!(CacheMode::None.qemu_flags(), (true, false, true));
    assert_eq!(CacheMode::Writeback.qemu_flags(), (false, false, true));
    assert_eq!(CacheMode::Writethrough.qemu_flags(), (false, false, false));
    assert_eq!(CacheMode::Directsync.qemu_flags(), (true, false, false));
    assert_eq!(CacheMode::Unsafe.qemu_flags(), (false, true, true));
    assert_eq!(CacheMode::default(), CacheMode::Writeback);
}

#[test]
fn owned_disks_are_overlays_and_blank_ones() {
    let disk = |v: serde_json::Value| serde_json::from_value::<DiskSpec>(v).unwrap();
    assert!(disk(json!({"image": "a"})).owned_by_vm());
    assert!(disk(json!({"size_mib": 1})).owned_by_vm());
    assert!(!disk(json!({"volume": "a"})).owned_by_vm());
    assert!(!disk(json!({"path": "/a", "format": "raw"})).owned_by_vm());
}

#[test]
fn nics_are_checked() {
    let mut v = base();
    v["nics"] = json!([
        {"network": "lan"},
        {"network": "lan", "mac": "52:54:00:AB:cd:ef", "queues": 4},
        {"network": "lan", "mac": "01:00:5e:00:00:01"},
        {"network": "lan", "mac": "00:00:00:00:00:00"},
        {"network": "lan", "mac": "52:54:00:ab:cd"},
        {"network": "lan", "mac": "52:54:00:ab:cd:ef"},
        {"network": "a b"},
        {"network": "lan", "queues": 0},
        {"network": "lan", "model": "e1000", "queues": 2},
    ]);
    assert_eq!(
        fields(v.clone()),
        [
            "nics[2].mac",
            "nics[3].mac",
            "nics[4].mac",
            "nics[5].mac",
            "nics[6].network",
            "nics[7].queues",
            "nics[8].queues"
        ]
    );
    let mut v = base();
    v["profile"] = json!("microvm");
    v["nics"] = json!([{"network": "lan", "model": "rtl8139"}]);
    assert_eq!(fields(v), ["nics[0].model"]);
}

#[test]
fn derived_macs_are_stable_local_unicast_and_distinct() {
    let uuid = Uuid::parse_str("5b0c2d4e-8a51-4f3e-9b1c-2a7f4d6e8c10").unwrap();
    let a = derived_mac(uuid, 0, 0);
    assert_eq!(a, derived_mac(uuid, 0, 0));
    assert_ne!(a, derived_mac(uuid, 1, 0));
    assert_ne!(a, derived_mac(uuid, 0, 1));
    let bytes = parse_mac(&a).unwrap();
    assert_eq!(bytes[0] & 0b11, 0b10, "locally administered unicast: {a}");
    assert!(a.starts_with("52:54:"), "{a}");
    assert_eq!(format_mac(bytes), a);
}

#[test]
fn nil_uuid_is_refused() {
    let mut v = base();
    v["uuid"] = json!("00000000-0000-0000-0000-000000000000");
    assert_eq!(fields(v), ["uuid"]);
}
