//! Changing a VM's spec: `PATCH /v1/vms/{id}` on a stopped VM (applied at
//! once) and on a running one (memory down through the balloon live,
//! memory up kept pending until the next start), stale generations,
//! invalid patches, identity, and `vmlet vm set` / `vmlet vm edit` through
//! the real binary. Each test runs its own daemon; dropping it kills the
//! daemon and its QEMUs.

mod common;

use std::path::Path;
use std::time::Duration;

use common::api::{assert_error, call, create_vm, force_delete_vm, id_of};
use common::daemon::{guest_spec_json, unique_name, wait_until, Daemon};
use common::BOOT_TIMEOUT;
use serde_json::{json, Value};
use vmlet::client::Method;

const MIB: u64 = 1024 * 1024;

async fn patch(d: &Daemon, id: &str, query: &str, body: &Value) -> (u16, Value) {
    call(
        d,
        Method::PATCH,
        &format!("/v1/vms/{id}{query}"),
        Some(body),
    )
    .await
}

/// A PATCH with `Content-Type: application/merge-patch+json` and `If-Match`.
async fn merge_patch(d: &Daemon, id: &str, if_match: &str, body: &Value) -> (u16, Value) {
    let socket = d.socket.to_str().unwrap();
    let output = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            socket,
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/merge-patch+json",
            "-H",
            &format!("If-Match: {if_match}"),
            "--data-binary",
            &body.to_string(),
            &format!("http://localhost/v1/vms/{id}"),
        ])
        .output()
        .await;
    let output = match output {
        Ok(o) => o,
        Err(e) => panic!("running curl: {e}"),
    };
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("curl printed a status");
    (
        status.trim().parse().expect("HTTP status"),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// The `ETag` header of `GET /v1/vms/{id}` (via curl: the test client
/// keeps no headers).
async fn etag(d: &Daemon, id: &str) -> String {
    let output = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-D", "-", "--unix-socket"])
        .arg(&d.socket)
        .arg(format!("http://localhost/v1/vms/{id}"))
        .output()
        .await
        .expect("running curl");
    let headers = String::from_utf8_lossy(&output.stdout).into_owned();
    headers
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("etag")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no ETag in {headers}"))
}

fn generation(vm: &Value) -> u64 {
    vm["generation"].as_u64().expect("generation")
}

async fn act(d: &Daemon, id: &str, action: &str) -> Value {
    let (status, vm) = call(d, Method::POST, &format!("/v1/vms/{id}/{action}"), None).await;
    assert_eq!(status, 200, "{action}: {vm}");
    vm
}

/// The VM's balloon size from `/metrics` (`query-balloon` `actual`).
async fn balloon_bytes(d: &Daemon, id: &str) -> Option<u64> {
    let response = d
        .client
        .request_bytes(Method::GET, "/metrics", None, Vec::new())
        .await
        .expect("GET /metrics");
    let text = String::from_utf8_lossy(&response.body).into_owned();
    let label = format!("id=\"{id}\"");
    text.lines()
        .find(|l| l.starts_with("vmlet_vm_balloon_actual_bytes{") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

#[tokio::test]
async fn patch_a_stopped_vm_applies_at_once_and_refuses_bad_changes() {
    let d = Daemon::start().await;
    let name = unique_name("edit-stopped");
    let vm = create_vm(&d, &guest_spec_json(&name, "")).await;
    let id = id_of(&vm);
    let g = generation(&vm);

    // GET gives the generation as the ETag, which If-Match takes back.
    let tag = etag(&d, &id).await;
    assert_eq!(tag, format!("\"{g}\""));

    // Merge patch: memory changes, a nested field is added, rest kept.
    let (status, after) = merge_patch(
        &d,
        &id,
        &tag,
        &json!({"memory_mib": 512, "resources": {"cpu_quota_percent": 50}}),
    )
    .await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["spec"]["memory_mib"], 512);
    assert_eq!(after["spec"]["resources"]["cpu_quota_percent"], 50);
    assert_eq!(after["spec"]["vcpus"], vm["spec"]["vcpus"]);
    assert_eq!(after["spec"]["boot"], vm["spec"]["boot"]);
    assert_eq!(generation(&after), g + 1);
    assert!(after.get("pending").is_none(), "{after}");
    // It is the VM's spec now, and in its record.
    let (_, shown) = call(&d, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(shown["spec"]["memory_mib"], 512);

    assert_eq!(etag(&d, &id).await, format!("\"{}\"", g + 1));
    // The ETag read before is stale now: 412, by header or query.
    let stale = merge_patch(&d, &id, &tag, &json!({"vcpus": 2})).await;
    assert_error(&stale, 412, "stale_generation");
    let stale = patch(&d, &id, &format!("?generation={g}"), &json!({"vcpus": 2})).await;
    assert_error(&stale, 412, "stale_generation");

    // `null` removes a field (its default comes back).
    let (status, after) = patch(&d, &id, "", &json!({"resources": null})).await;
    assert_eq!(status, 200, "{after}");
    assert!(after["spec"].get("resources").is_none(), "{after}");

    // Every invalid field at once, nothing changed.
    let answer = patch(
        &d,
        &id,
        "",
        &json!({"vcpus": 0, "memory_mib": 1, "profile": "nope"}),
    )
    .await;
    let error = assert_error(&answer, 422, "invalid_spec");
    let fields: Vec<&str> = error["fields"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["field"].as_str())
        .collect();
    for field in ["vcpus", "memory_mib", "profile"] {
        assert!(fields.contains(&field), "{field} in {error}");
    }
    // A wrongly typed or unknown field is named too.
    let answer = patch(&d, &id, "", &json!({"vcpus": "two"})).await;
    assert_eq!(assert_error(&answer, 422, "invalid_spec")["field"], "vcpus");
    let answer = patch(&d, &id, "", &json!({"memroy_mib": 1})).await;
    assert_error(&answer, 422, "invalid_spec");
    // The identity stays.
    let answer = patch(&d, &id, "", &json!({"name": "renamed"})).await;
    assert_eq!(assert_error(&answer, 422, "invalid_spec")["field"], "name");
    let answer = patch(
        &d,
        &id,
        "",
        &json!({"uuid": "6c1f2b4e-8a1d-4a57-9a51-2f3c0d9e8b11"}),
    )
    .await;
    assert_eq!(assert_error(&answer, 422, "invalid_spec")["field"], "uuid");
    // Not a patch object; a bad If-Match; another media type.
    let answer = patch(&d, &id, "", &json!([1])).await;
    assert_error(&answer, 422, "invalid_spec");
    let answer = merge_patch(&d, &id, "\"soon\"", &json!({"vcpus": 2})).await;
    assert_error(&answer, 400, "bad_request");
    let (_, shown) = call(&d, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(shown["spec"]["vcpus"], vm["spec"]["vcpus"]);
    assert_eq!(shown["spec"]["memory_mib"], 512);

    // An empty patch changes nothing, not even the generation.
    let before = generation(&shown);
    let (status, after) = patch(&d, &id, "", &json!({})).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(generation(&after), before);
    let missing = patch(&d, "no-such-vm", "", &json!({})).await;
    assert_error(&missing, 404, "not_found");
}

#[tokio::test]
async fn patch_a_running_vm_balloons_live_and_keeps_growth_pending() {
    let d = Daemon::start().await;
    let name = unique_name("edit-running");
    let vm = create_vm(&d, &guest_spec_json(&name, "")).await;
    let id = id_of(&vm);
    let running = act(&d, &id, "start").await;
    assert_eq!(running["state"], "running");
    let pid = running["pid"].as_i64().unwrap();

    // Down to 200 MiB: the balloon, live, no pending change.
    let (status, after) = patch(
        &d,
        &id,
        &format!("?generation={}", generation(&running)),
        &json!({"memory_mib": 200}),
    )
    .await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["spec"]["memory_mib"], 200);
    assert!(after.get("pending").is_none(), "{after}");
    assert_eq!(after["pid"].as_i64(), Some(pid), "same QEMU");
    wait_until("the balloon at 200 MiB", BOOT_TIMEOUT, || async {
        (balloon_bytes(&d, &id).await == Some(200 * MIB)).then_some(())
    })
    .await;

    // Up beyond the boot size (256 MiB) and more vCPUs: pending.
    let (status, after) = patch(&d, &id, "", &json!({"memory_mib": 512, "vcpus": 2})).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["spec"]["memory_mib"], 200, "{after}");
    assert_eq!(after["spec"]["vcpus"], 1);
    assert_eq!(after["pending"]["spec"]["memory_mib"], 512);
    assert_eq!(after["pending"]["fields"], json!(["memory_mib", "vcpus"]));
    // A further patch builds on the pending spec.
    let (status, after) = patch(&d, &id, "", &json!({"autostart": true})).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["spec"]["autostart"], true, "autostart is live");
    assert_eq!(after["pending"]["spec"]["memory_mib"], 512);
    assert_eq!(after["pending"]["spec"]["autostart"], true);

    // Stop and start: the pending spec becomes the spec.
    let (status, stopped) = call(
        &d,
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(&json!({"force": true})),
    )
    .await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["pending"]["fields"], json!(["memory_mib", "vcpus"]));
    let started = act(&d, &id, "start").await;
    assert_eq!(started["spec"]["memory_mib"], 512, "{started}");
    assert_eq!(started["spec"]["vcpus"], 2);
    assert!(started.get("pending").is_none(), "{started}");
    wait_until(
        "the new QEMU's balloon at 512 MiB",
        BOOT_TIMEOUT,
        || async { (balloon_bytes(&d, &id).await == Some(512 * MIB)).then_some(()) },
    )
    .await;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", started["pid"]))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    assert!(cmdline.contains("512"), "QEMU memory in {cmdline}");
    force_delete_vm(&d, &id).await;
}

/// Runs `vmlet ARGS --socket SOCK` with `EDITOR`; returns (ok, stdout,
/// stderr).
async fn vmlet(d: &Daemon, args: &[&str], editor: Option<&Path>) -> (bool, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"));
    command
        .args(args)
        .args(["--socket", d.socket.to_str().unwrap()])
        .env_remove("VMLET_URL")
        .env_remove("VMLET_TOKEN_FILE")
        .stdin(std::process::Stdio::null());
    match editor {
        Some(e) => command.env("EDITOR", e),
        None => command.env_remove("EDITOR"),
    };
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("vmlet finished")
        .expect("running vmlet");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// An editor script: `sed -i EXPR` on the file, after noting the file's
/// mode in `mode_file`.
fn editor_script(dir: &Path, name: &str, expr: &str, mode_file: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nstat -c %a \"$1\" > '{}'\nsed -i '{expr}' \"$1\"\n",
            mode_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test]
async fn vm_set_and_vm_edit_through_the_cli() {
    let d = Daemon::start().await;
    let name = unique_name("edit-cli");
    let vm = create_vm(&d, &guest_spec_json(&name, "")).await;
    let id = id_of(&vm);

    let (ok, out, err) = vmlet(
        &d,
        &[
            "vm",
            "set",
            &name,
            "memory_mib=384",
            "resources.cpu_quota_percent=50",
            "autostart=true",
        ],
        None,
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("applied: "), "{out}");
    for field in ["memory_mib", "resources.cpu_quota_percent", "autostart"] {
        assert!(out.contains(field), "{field} in {out}");
    }
    let (_, shown) = call(&d, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(shown["spec"]["memory_mib"], 384);
    assert_eq!(shown["spec"]["resources"]["cpu_quota_percent"], 50);
    assert_eq!(shown["spec"]["autostart"], true);

    let (ok, out, err) = vmlet(&d, &["vm", "set", &name, "vcpus=0"], None).await;
    assert!(!ok, "{out}");
    assert!(err.contains("vcpus"), "{err}");
    let (ok, _, err) = vmlet(&d, &["vm", "set", &name, "vcpus"], None).await;
    assert!(!ok);
    assert!(err.contains("key=value"), "{err}");

    // vm edit: the editor rewrites the file; the change is sent.
    let scratch = d.scratch();
    let mode = scratch.join("mode");
    let editor = editor_script(
        &scratch,
        "grow.sh",
        r#"s/"memory_mib": 384/"memory_mib": 448/"#,
        &mode,
    );
    let (ok, out, err) = vmlet(&d, &["vm", "edit", &name], Some(&editor)).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("memory_mib"), "{out}");
    assert_eq!(std::fs::read_to_string(&mode).unwrap().trim(), "600");
    let (_, shown) = call(&d, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(shown["spec"]["memory_mib"], 448);

    // Unchanged: "no changes", same generation.
    let unchanged = editor_script(&scratch, "same.sh", "s/^//", &mode);
    let (ok, out, err) = vmlet(&d, &["vm", "edit", &name], Some(&unchanged)).await;
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), "no changes");
    let (_, again) = call(&d, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(generation(&again), generation(&shown));

    // Invalid: refused with the field named (no terminal: not reopened).
    let bad = editor_script(&scratch, "bad.sh", r#"s/"vcpus": 1/"vcpus": 0/"#, &mode);
    let (ok, out, err) = vmlet(&d, &["vm", "edit", &name], Some(&bad)).await;
    assert!(!ok, "{out}");
    assert!(err.contains("vcpus"), "{err}");
    // The temporary files are gone.
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("vmlet-edit-{name}-"))
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
