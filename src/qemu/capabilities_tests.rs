//! Unit tests of `capabilities.rs`, in a file of their own so that the code
//! stays short enough to read in one go.

use super::*;

fn canned() -> QemuCapabilities {
    let version = json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "Debian"});
    let machines = json!([
        {"name": "pc-q35-9.2", "deprecated": false, "cpu-max": 4096},
        {"name": "pc-q35-10.0", "alias": "q35", "deprecated": false},
        {"name": "pc-i440fx-10.0", "alias": "pc", "is-default": true},
        {"name": "pc-q35-5.2", "deprecated": true},
        {"name": "microvm"},
        {"name": "none"}
    ]);
    let cpus = json!([
        {"name": "max", "unavailable-features": [], "migration-safe": false, "static": false},
        {"name": "host", "unavailable-features": ["kvm"], "migration-safe": false},
        {"name": "qemu64-v1", "unavailable-features": [], "migration-safe": true},
        {"name": "qemu64", "unavailable-features": [], "alias-of": "qemu64-v1", "migration-safe": true},
        {"name": "Skylake-Client", "unavailable-features": ["pcid", "xsavec"], "migration-safe": true},
        {"name": "weird"}
    ]);
    QemuCapabilities::from_replies(&version, &machines, &cpus).unwrap()
}

#[test]
fn parses_the_replies() {
    let caps = canned();
    assert_eq!(caps.version, "10.0.2");
    assert_eq!(caps.machines.len(), 6);
    assert_eq!(caps.default_machine(), Some("pc-i440fx-10.0"));
    assert!(caps
        .machines
        .iter()
        .any(|m| m.name == "pc-q35-5.2" && m.deprecated));
    let qemu64 = caps.cpu_models.iter().find(|c| c.name == "qemu64").unwrap();
    assert_eq!(qemu64.alias_of.as_deref(), Some("qemu64-v1"));
    assert!(qemu64.usable && qemu64.migration_safe);
    // No unavailable-features member: nothing reported missing; no
    // migration-safe member: not safe.
    let weird = caps.cpu_models.iter().find(|c| c.name == "weird").unwrap();
    assert!(weird.usable && !weird.migration_safe);
}

#[test]
fn malformed_replies_name_the_query() {
    let ok = json!([]);
    let err = QemuCapabilities::from_replies(&json!({"qemu": 1}), &ok, &ok).unwrap_err();
    assert!(err.starts_with("query-version"), "{err}");
    let version = json!({"qemu": {"major": 1, "minor": 2, "micro": 3}});
    let err = QemuCapabilities::from_replies(&version, &json!({}), &ok).unwrap_err();
    assert!(err.starts_with("query-machines"), "{err}");
    let err = QemuCapabilities::from_replies(&version, &ok, &json!([{"nom": "x"}])).unwrap_err();
    assert!(err.starts_with("query-cpu-definitions"), "{err}");
}

#[test]
fn aliases_resolve_to_versioned_machines() {
    let caps = canned();
    assert_eq!(caps.resolve_machine("q35").as_deref(), Some("pc-q35-10.0"));
    assert_eq!(
        caps.resolve_machine("pc").as_deref(),
        Some("pc-i440fx-10.0")
    );
    assert_eq!(
        caps.resolve_machine("pc-q35-9.2").as_deref(),
        Some("pc-q35-9.2")
    );
    assert_eq!(caps.resolve_machine("microvm").as_deref(), Some("microvm"));
    assert_eq!(caps.resolve_machine("pc-q35-11.0"), None);
    assert_eq!(caps.resolve_machine(""), None);
    assert!(caps.has_machine("q35") && caps.has_machine("pc-q35-9.2"));
    assert!(!caps.has_machine("virt"));
}

#[test]
fn machine_types_are_sorted_by_version_with_aliases_resolved() {
    assert_eq!(
        canned().machine_types(),
        [
            "microvm",
            "none",
            "pc-i440fx-10.0",
            "pc-q35-5.2",
            "pc-q35-9.2",
            "pc-q35-10.0"
        ]
    );
}

#[test]
fn natural_order_compares_numbers_as_numbers() {
    let mut names = vec!["a10", "a9", "a09x", "a1.10", "a1.9", "b", "a"];
    names.sort_by(|a, b| natural_cmp(a, b));
    assert_eq!(names, ["a", "a1.9", "a1.10", "a9", "a09x", "a10", "b"]);
}

#[test]
fn cpu_usability_names_the_model() {
    let caps = canned();
    assert_eq!(caps.cpu_usable("qemu64"), Ok(()));
    assert_eq!(caps.cpu_usable("qemu64,+aes,-popcnt"), Ok(()));
    assert_eq!(caps.cpu_usable("max"), Ok(()));
    let err = caps.cpu_usable("host").unwrap_err();
    assert!(err.contains("\"host\"") && err.contains("kvm"), "{err}");
    let err = caps.cpu_usable("Skylake-Client,+aes").unwrap_err();
    assert!(
        err.contains("\"Skylake-Client\"") && err.contains("pcid, xsavec"),
        "{err}"
    );
    let err = caps.cpu_usable("Zen9").unwrap_err();
    assert!(err.contains("\"Zen9\"") && err.contains("unknown"), "{err}");
    assert!(caps.usable_cpu_models().contains(&"qemu64".to_string()));
    assert!(!caps.usable_cpu_models().contains(&"host".to_string()));
}

#[test]
fn host_dependent_and_unsafe_models_block_migration() {
    let caps = canned();
    assert_eq!(caps.cpu_migration_blocker("qemu64"), None);
    assert_eq!(caps.cpu_migration_blocker("qemu64,+aes,+sse4.2"), None);
    for model in ["host", "max", "host,+aes"] {
        let reason = caps.cpu_migration_blocker(model).expect(model);
        assert!(reason.contains("another host"), "{reason}");
    }
    let reason = caps.cpu_migration_blocker("weird").unwrap();
    assert!(reason.contains("not migration-safe"), "{reason}");
    let reason = caps.cpu_migration_blocker("Zen9").unwrap();
    assert!(reason.contains("unknown"), "{reason}");
}

#[test]
fn a_vm_pin_takes_the_specs_model_and_features() {
    let caps = canned();
    let profiles = crate::qemu::profile::Profiles::built_in().unwrap();
    let q35 = profiles.get("q35").unwrap();
    let cpu = |model: Option<&str>, features: &[&str]| CpuSpec {
        model: model.map(str::to_string),
        features: features.iter().map(|f| f.to_string()).collect(),
    };
    // Nothing asked: the profile's pin.
    assert_eq!(
        caps.pin_vm(q35, Accel::Tcg, None).unwrap(),
        caps.pin(q35, Accel::Tcg).unwrap()
    );
    let pin = caps
        .pin_vm(
            q35,
            Accel::Tcg,
            Some(&cpu(Some("max"), &["+aes", "-x2apic"])),
        )
        .unwrap();
    assert_eq!(pin.machine_type, "pc-q35-10.0");
    assert_eq!(pin.cpu, "max,+aes,-x2apic");
    // Features alone go after the profile's model and its flags.
    let pin = caps
        .pin_vm(q35, Accel::Tcg, Some(&cpu(None, &["+aes"])))
        .unwrap();
    assert_eq!(pin.cpu, format!("{},+aes", q35.cpu.tcg));
    // A model this host cannot run names cpu.model.
    for model in ["host", "Skylake-Client", "Zen9"] {
        let err = caps
            .pin_vm(q35, Accel::Tcg, Some(&cpu(Some(model), &[])))
            .unwrap_err();
        assert_eq!(err.field, "cpu.model");
        assert!(err.message.contains(model), "{err}");
    }
    // A spec's own model does not need the profile's to be usable.
    let mut odd = q35.clone();
    odd.cpu.tcg = "Zen9".into();
    assert!(caps.pin_vm(&odd, Accel::Tcg, None).is_err());
    assert_eq!(
        caps.pin_vm(&odd, Accel::Tcg, Some(&cpu(Some("qemu64"), &[])))
            .unwrap()
            .cpu,
        "qemu64"
    );
}

#[test]
fn feature_flags_must_be_features_of_this_qemu_once_they_are_known() {
    let profiles = crate::qemu::profile::Profiles::built_in().unwrap();
    let q35 = profiles.get("q35").unwrap();
    let spec = |features: &[&str]| CpuSpec {
        model: Some("qemu64".into()),
        features: features.iter().map(|f| f.to_string()).collect(),
    };
    // Unknown (an older QEMU would not list them): form only.
    let caps = canned();
    assert!(caps.cpu_features.is_empty());
    assert!(caps
        .pin_vm(q35, Accel::Tcg, Some(&spec(&["+aes2"])))
        .is_ok());

    let caps = canned().with_cpu_properties(&json!([
        {"name": "aes", "type": "bool"},
        {"name": "x2apic", "type": "bool"},
        {"name": "lahf-lm", "type": "bool"},
        {"name": "sse4.1", "type": "bool"},
        {"name": "realized", "type": "bool"},
        {"name": "x-force-features", "type": "bool"},
        {"name": "family", "type": "int"},
        {"name": "model-id", "type": "string"}
    ]));
    let known: Vec<&str> = caps.cpu_features.iter().map(String::as_str).collect();
    assert_eq!(known, ["aes", "lahf-lm", "sse4.1", "x2apic"]);
    let pin = caps
        .pin_vm(
            q35,
            Accel::Tcg,
            Some(&spec(&["+aes", "-x2apic", "+lahf_lm", "+sse4.1"])),
        )
        .unwrap();
    assert_eq!(pin.cpu, "qemu64,+aes,-x2apic,+lahf_lm,+sse4.1");
    for (flags, index, name) in [
        (&["+aes", "+aes2"][..], 1, "aes2"),
        (&["-family"][..], 0, "family"),
        (&["+realized"][..], 0, "realized"),
        (&["+x-force-features"][..], 0, "x-force-features"),
    ] {
        let err = caps
            .pin_vm(q35, Accel::Tcg, Some(&spec(flags)))
            .unwrap_err();
        assert_eq!(err.field, format!("cpu.features[{index}]"), "{flags:?}");
        assert!(
            err.message
                .contains(&format!("{name:?} is not a CPU feature")),
            "{err}"
        );
    }
    // Flags on the profile's model are checked the same way.
    let features_only = CpuSpec {
        model: None,
        features: vec!["+nope".into()],
    };
    let err = caps
        .pin_vm(q35, Accel::Tcg, Some(&features_only))
        .unwrap_err();
    assert_eq!(err.field, "cpu.features[0]");
}

#[test]
fn pin_resolves_the_profile() {
    let caps = canned();
    let profiles = crate::qemu::profile::Profiles::built_in().unwrap();
    let q35 = profiles.get("q35").unwrap();
    let pin = caps.pin(q35, Accel::Tcg).unwrap();
    assert_eq!(pin.machine_type, "pc-q35-10.0");
    assert_eq!(pin.cpu, q35.cpu.tcg);
    let micro = caps
        .pin(profiles.get("microvm").unwrap(), Accel::Tcg)
        .unwrap();
    assert_eq!(micro.machine_type, "microvm");

    let mut odd = q35.clone();
    odd.machine.machine_type = "virt".into();
    let err = caps.pin(&odd, Accel::Tcg).unwrap_err();
    assert!(err.contains("profile q35: machine.type \"virt\""), "{err}");
    let mut odd = q35.clone();
    odd.cpu.kvm = "Skylake-Client".into();
    let err = caps.pin(&odd, Accel::Kvm).unwrap_err();
    assert!(
        err.contains("cpu.kvm") && err.contains("Skylake-Client"),
        "{err}"
    );
}
