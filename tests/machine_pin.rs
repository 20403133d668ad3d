//! Pinned hardware: the QEMU capability probe against the real binary, and
//! a real daemon pinning each VM to a versioned machine type and CPU model
//! and listing what its QEMU offers on `/v1/node`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::api::{assert_invalid_field, call, create_vm, force_delete_vm, id_of, uuid_of};
use common::daemon::{guest_spec_json, unique_name, Daemon};
use common::Scratch;
use serde_json::Value;
use vmlet::client::Method;
use vmlet::qemu::accel::Accel;
use vmlet::qemu::capabilities::{self, CapabilitiesError, PROBE_DEADLINE};
use vmlet::qemu::profile::Profiles;

const QEMU: &str = "qemu-system-x86_64";

/// `pc-q35-<digits>.<digits>`.
fn is_versioned_q35(name: &str) -> bool {
    let Some(version) = name.strip_prefix("pc-q35-") else {
        return false;
    };
    let mut parts = version.split('.');
    let numeric =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    numeric(parts.next()) && numeric(parts.next()) && parts.next().is_none()
}

#[test]
fn versioned_q35_pattern() {
    assert!(is_versioned_q35("pc-q35-10.0"));
    assert!(is_versioned_q35("pc-q35-9.2"));
    for bad in [
        "q35",
        "pc-q35-10",
        "pc-q35-10.0.1",
        "pc-q35-a.0",
        "pc-q35-.1",
    ] {
        assert!(!is_versioned_q35(bad), "{bad}");
    }
}

#[tokio::test]
async fn probe_reads_the_real_qemu_under_tcg() {
    let caps = match capabilities::probe(Path::new(QEMU), Accel::Tcg, PROBE_DEADLINE).await {
        Ok(caps) => caps,
        Err(CapabilitiesError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            common::skip(
                "probe_reads_the_real_qemu_under_tcg",
                "no qemu-system-x86_64",
            );
            return;
        }
        Err(e) => panic!("probing {QEMU}: {e:?}"),
    };
    // The version is the one QEMU prints itself.
    let printed = std::process::Command::new(QEMU)
        .arg("--version")
        .output()
        .expect("qemu --version");
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.contains(&format!("version {} ", caps.version)),
        "{} vs {printed}",
        caps.version
    );

    let q35 = caps.resolve_machine("q35").expect("q35 resolves");
    assert!(is_versioned_q35(&q35), "{q35}");
    assert_eq!(caps.resolve_machine(&q35).as_deref(), Some(q35.as_str()));
    assert_eq!(caps.resolve_machine("microvm").as_deref(), Some("microvm"));
    assert_eq!(caps.resolve_machine("pc-q35-99.0"), None);
    let types = caps.machine_types();
    assert!(types.contains(&q35) && types.contains(&"microvm".to_string()));
    assert!(!types.contains(&"q35".to_string()), "aliases are resolved");

    // Under TCG: qemu64 and max run, host (a KVM model) does not.
    assert_eq!(caps.cpu_usable("qemu64"), Ok(()));
    assert_eq!(caps.cpu_usable("qemu64,+aes,+popcnt"), Ok(()));
    assert_eq!(caps.cpu_usable("max"), Ok(()));
    let err = caps.cpu_usable("host").unwrap_err();
    assert!(err.contains("\"host\""), "{err}");
    assert!(caps.usable_cpu_models().contains(&"qemu64".to_string()));
    assert!(!caps.usable_cpu_models().contains(&"host".to_string()));
    assert_eq!(caps.cpu_migration_blocker("qemu64,+aes"), None);
    // The feature names a flag may take, from the CPU's properties.
    for feature in ["aes", "x2apic", "popcnt", "lahf_lm", "lahf-lm", "sse4.1"] {
        assert!(caps.cpu_feature_known(feature), "{feature}");
    }
    for not_a_feature in ["aes2", "realized", "family", "x-force-features"] {
        assert!(!caps.cpu_feature_known(not_a_feature), "{not_a_feature}");
    }
    assert!(caps.cpu_migration_blocker("max").is_some());
    assert!(caps.cpu_migration_blocker("host").is_some());

    // The built-in profiles pin to what this QEMU has.
    let profiles = Profiles::built_in().unwrap();
    let pin = caps.pin(profiles.get("q35").unwrap(), Accel::Tcg).unwrap();
    assert_eq!(
        (pin.machine_type.as_str(), pin.cpu.as_str()),
        (q35.as_str(), "qemu64")
    );
    let pin = caps
        .pin(profiles.get("microvm").unwrap(), Accel::Tcg)
        .unwrap();
    assert_eq!(pin.machine_type, "microvm");
}

#[tokio::test]
async fn probe_failures_name_the_binary() {
    let scratch = Scratch::new();
    let missing = scratch.path().join("no-qemu");
    let err = capabilities::probe(&missing, Accel::Tcg, PROBE_DEADLINE)
        .await
        .unwrap_err();
    assert!(matches!(err, CapabilitiesError::Spawn { .. }), "{err:?}");
    assert!(err.to_string().contains("no-qemu"), "{err}");

    // Exits at once, saying something on stderr.
    let quits = scratch.path().join("quits");
    std::fs::write(
        &quits,
        "#!/bin/sh\necho 'no such accelerator' >&2\nexit 1\n",
    )
    .unwrap();
    make_executable(&quits);
    let err = probe_written(&quits).await;
    let text = err.to_string();
    assert!(
        text.contains("quits") && text.contains("no such accelerator"),
        "{text}"
    );

    // Replies of the wrong shape, then a line that is not JSON.
    for (name, script, says) in [
        (
            "shapes",
            "echo '{\"id\": 1, \"return\": 7}'; echo '{\"id\": 2, \"return\": []}'; echo '{\"id\": 3, \"return\": []}'; echo '{\"id\": 4, \"return\": []}'; exec sleep 30",
            "query-version",
        ),
        ("notjson", "echo 'QEMU 10 monitor'; exec sleep 30", "not a QMP message"),
        (
            "refuses",
            "echo '{\"id\": 2, \"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}'; exec sleep 30",
            "query-machines: nope",
        ),
    ] {
        let path = scratch.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        make_executable(&path);
        let err = probe_written(&path).await;
        let text = err.to_string();
        assert!(text.contains(name) && text.contains(says), "{text}");
    }

    // The CPU's properties are optional: a QEMU that will not list them
    // is probed all the same, and its flags are checked for form only.
    let no_properties = scratch.path().join("no-properties");
    std::fs::write(
        &no_properties,
        "#!/bin/sh
\
         echo '{\"id\": 1, \"return\": {\"qemu\": {\"major\": 9, \"minor\": 2, \"micro\": 0}}}'
\
         echo '{\"id\": 2, \"return\": [{\"name\": \"microvm\"}]}'
\
         echo '{\"id\": 3, \"return\": [{\"name\": \"qemu64\"}]}'
\
         echo '{\"id\": 4, \"error\": {\"class\": \"GenericError\", \"desc\": \"no such type\"}}'
\
         exec sleep 30
",
    )
    .unwrap();
    make_executable(&no_properties);
    let caps = probe_ok(&no_properties).await;
    assert_eq!(caps.version, "9.2.0");
    assert!(caps.cpu_features.is_empty());
    assert!(caps.cpu_feature_known("anything"));

    // Never answers: killed at the deadline.
    let hangs = scratch.path().join("hangs");
    let pid_file = scratch.path().join("hangs.pid");
    std::fs::write(
        &hangs,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 60\n",
            pid_file.display()
        ),
    )
    .unwrap();
    make_executable(&hangs);
    let started = std::time::Instant::now();
    let err = capabilities::probe(&hangs, Accel::Tcg, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, CapabilitiesError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("hangs"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the hung probe {pid} was not killed and reaped"
    );
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A copy of the built-in q35 profile with another machine type.
fn q35_with_type(machine_type: &str) -> String {
    let q35 = include_str!("../qemu-profiles/q35.toml");
    let changed = q35.replace("type = \"q35\"", &format!("type = \"{machine_type}\""));
    assert_ne!(q35, changed, "the q35 profile names its type");
    changed
}

#[tokio::test]
async fn created_vms_are_pinned_and_the_node_lists_machine_types() {
    let profiles = Scratch::new();
    std::fs::write(
        profiles.path().join("older.toml"),
        q35_with_type("pc-q35-9.2"),
    )
    .unwrap();
    std::fs::write(
        profiles.path().join("future.toml"),
        q35_with_type("pc-q35-99.0"),
    )
    .unwrap();
    let dir = profiles.path().display().to_string();
    let d = Daemon::start_with_env(&[("VMLET_PROFILE_DIR", dir.as_str())]).await;

    let (status, node) = call(&d, Method::GET, "/v1/node", None).await;
    assert_eq!(status, 200, "{node}");
    assert_eq!(node["accel"], "tcg", "{node}");
    let listed = |key: &str| -> Vec<String> {
        node[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} is a list: {node}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let machine_types = listed("machine_types");
    let cpu_models = listed("cpu_models");
    assert!(cpu_models.contains(&"qemu64".to_string()), "{node}");
    assert!(
        !cpu_models.contains(&"host".to_string()),
        "host is KVM only: {node}"
    );
    assert!(!machine_types.contains(&"q35".to_string()), "{node}");
    assert!(machine_types.contains(&"microvm".to_string()), "{node}");

    // The default profile: the alias, resolved.
    let vm = create_vm(&d, &guest_spec_json(&unique_name("pin"), "")).await;
    let machine_type = vm["machine"]["type"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(is_versioned_q35(&machine_type), "{vm}");
    assert_eq!(vm["machine"]["cpu"], "qemu64", "{vm}");
    assert!(
        machine_types.contains(&machine_type),
        "{machine_type} not in {node}"
    );
    assert_eq!(
        node["default_machine_type"],
        machine_type.as_str(),
        "{node}"
    );
    // Kept in the record, so a restarted (or upgraded) daemon keeps it.
    let record: Value =
        serde_json::from_slice(&std::fs::read(d.record(uuid_of(&vm))).unwrap()).unwrap();
    assert_eq!(record["machine"], vm["machine"], "{record}");

    // A versioned machine type stays itself.
    let mut spec = guest_spec_json(&unique_name("older"), "");
    spec["profile"] = "older".into();
    let older = create_vm(&d, &spec).await;
    assert_eq!(older["machine"]["type"], "pc-q35-9.2", "{older}");

    // Another profile is another machine: the pin goes with the old
    // profile, and the next start pins the VM to the new one.
    let id = id_of(&vm);
    let patch = serde_json::json!({"profile": "older"});
    let (status, edited) = call(&d, Method::PATCH, &format!("/v1/vms/{id}"), Some(&patch)).await;
    assert_eq!(status, 200, "{edited}");
    assert!(edited["machine"].is_null(), "{edited}");
    let (status, started) = call(&d, Method::POST, &format!("/v1/vms/{id}/start"), None).await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["machine"]["type"], "pc-q35-9.2", "{started}");
    force_delete_vm(&d, &id).await;

    // A machine type this QEMU lacks: refused, naming the profile.
    let mut spec = guest_spec_json(&unique_name("future"), "");
    spec["profile"] = "future".into();
    let answer = call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
    assert_invalid_field(&answer, "profile");
    let message = answer.1["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("pc-q35-99.0"), "{}", answer.1);

    // Callers cannot choose the pin: it is not part of the spec.
    let mut spec = guest_spec_json(&unique_name("chooser"), "");
    spec["machine"] = serde_json::json!({"type": "pc-q35-9.2", "cpu": "host"});
    let (status, body) = call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
    assert!((400..500).contains(&status), "{status} {body}");
}

#[tokio::test]
async fn a_record_without_a_pin_is_pinned_at_its_next_start() {
    let mut d = Daemon::start().await;
    let vm = create_vm(&d, &guest_spec_json(&unique_name("unpinned"), "")).await;
    let pinned = vm["machine"].clone();
    assert!(pinned.is_object(), "{vm}");
    let id = id_of(&vm);

    // As an older vmlet wrote it: no `machine`.
    d.kill();
    let path = d.record(uuid_of(&vm));
    let mut record: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    record.as_object_mut().unwrap().remove("machine").unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
    d.start_again().await;

    let (status, view) = call(&d, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(status, 200, "{view}");
    assert!(view["machine"].is_null(), "{view}");

    let (status, started) = call(&d, Method::POST, &format!("/v1/vms/{id}/start"), None).await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["machine"], pinned, "{started}");
    // QEMU runs with the pin on its command line.
    let pid = started["pid"].as_i64().expect("a running VM has a pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let after = |flag: &str| {
        let at = args.iter().position(|a| a == flag).expect(flag);
        args[at + 1].clone()
    };
    let machine_type = pinned["type"].as_str().unwrap();
    assert!(
        after("-machine").starts_with(&format!("{machine_type},")),
        "{args:?}"
    );
    assert_eq!(after("-cpu"), pinned["cpu"].as_str().unwrap(), "{args:?}");
    force_delete_vm(&d, &id).await;
}

/// Probes a script this test just wrote that answers well (retrying
/// ETXTBSY as [`probe_written`] does).
async fn probe_ok(script: &Path) -> capabilities::QemuCapabilities {
    for _ in 0..20 {
        match capabilities::probe(script, Accel::Tcg, PROBE_DEADLINE).await {
            Ok(caps) => return caps,
            Err(CapabilitiesError::Spawn { source, .. })
                if source.raw_os_error() == Some(libc::ETXTBSY) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("probing {}: {e}", script.display()),
        }
    }
    panic!("{} stayed busy (ETXTBSY)", script.display());
}

/// Probes a script this test just wrote. Another test's fork may still hold
/// the file open for writing for an instant (until its exec closes it), and
/// exec then fails with ETXTBSY: that is retried, nothing else.
async fn probe_written(script: &Path) -> CapabilitiesError {
    for _ in 0..20 {
        let err = capabilities::probe(script, Accel::Tcg, PROBE_DEADLINE)
            .await
            .unwrap_err();
        let busy = matches!(
            &err,
            CapabilitiesError::Spawn { source, .. } if source.raw_os_error() == Some(libc::ETXTBSY)
        );
        if !busy {
            return err;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} stayed busy (ETXTBSY)", script.display());
}
