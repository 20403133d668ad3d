//! The files an operator installs: the systemd unit and the committed
//! OpenAPI document.

use std::collections::HashMap;
use std::path::Path;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `key=value` lines of a unit file section (last one wins).
fn section(text: &str, name: &str) -> HashMap<String, String> {
    let mut current = String::new();
    let mut keys = HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = section.to_string();
        } else if current == name {
            let (k, v) = line.split_once('=').expect("key=value");
            keys.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    keys
}

#[test]
fn systemd_unit_never_kills_vms_and_keeps_the_run_dir() {
    let text = std::fs::read_to_string(repo("systemd/vmlet.service")).unwrap();
    let service = section(&text, "Service");
    let get = |k: &str| service.get(k).map(String::as_str);
    assert_eq!(get("Type"), Some("notify"));
    assert_eq!(get("KillMode"), Some("process"));
    assert_eq!(get("Restart"), Some("on-failure"));
    // Without this, systemd removes /run/vmlet (QMP sockets, pidfiles) when
    // the daemon stops, and running VMs could not be reattached.
    assert_eq!(get("RuntimeDirectoryPreserve"), Some("yes"));
    assert_eq!(get("RuntimeDirectory"), Some("vmlet"));
    assert_eq!(get("StateDirectory"), Some("vmlet"));
    let exec = get("ExecStart").unwrap();
    assert!(exec.ends_with("vmlet serve"), "{exec}");
    assert_eq!(
        section(&text, "Install")
            .get("WantedBy")
            .map(String::as_str),
        Some("multi-user.target")
    );
}

/// `docs/openapi.json` must be what the code generates. Regenerate with
/// `VMLET_UPDATE_OPENAPI=1 cargo test --test packaging` (or
/// `vmlet openapi > docs/openapi.json`).
#[test]
fn committed_openapi_document_matches_the_code() {
    let generated = vmlet::api::openapi_json();
    let path = repo("docs/openapi.json");
    if std::env::var_os("VMLET_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json differs from the code: run `VMLET_UPDATE_OPENAPI=1 cargo test --test packaging`"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/vms",
        "/v1/vms/{id}",
        "/v1/vms/{id}/start",
        "/v1/vms/{id}/stop",
        "/v1/vms/{id}/reboot",
        "/v1/vms/{id}/pause",
        "/v1/vms/{id}/resume",
        "/v1/events",
        "/v1/node",
        "/v1/openapi.json",
        "/healthz",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is not documented");
    }
    for schema in [
        "Vm",
        "VmSpec",
        "Event",
        "NodeInfo",
        "ErrorBody",
        "PowerState",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "schema {schema} is missing"
        );
    }
}
