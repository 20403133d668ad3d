//! Host files and qcow2 backing chains, attacked as an API caller and as a
//! guest would: the host-file directory holds nothing vmlet manages, vmlet's
//! own files can never be named by path, a qcow2 header can never make QEMU
//! open another file, and a symlink swapped in after create leads nowhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::api::{assert_invalid_field, call, create_vm, expect, force_delete_vm, id_of};
use common::daemon::{guest_spec_json, unique_name, Daemon};
use common::storage::{create_image, qemu_img};
use common::Scratch;
use serde_json::{json, Value};
use vmlet::client::Method;

/// A file outside every allowed directory, holding a marker a leak would
/// show.
fn secret_file(scratch: &Scratch) -> PathBuf {
    let secret = scratch.path().join("secret.raw");
    let mut bytes = b"HOST-SECRET-".repeat(1024);
    bytes.resize(1024 * 1024, 0);
    std::fs::write(&secret, bytes).unwrap();
    secret
}

/// The files QEMU process `pid` holds open.
fn open_files(pid: i32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Rewrites qcow2 `file`'s header to name `backing` (raw) as its backing
/// file, as a guest that once had the file raw could.
fn name_backing_file(file: &Path, backing: &Path) {
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        backing.to_str().unwrap(),
        "-F",
        "raw",
        file.to_str().unwrap(),
    ]);
}

async fn create_volume(d: &Daemon, name: &str) {
    let body = json!({"name": name, "size_mib": 8});
    expect(d, Method::POST, "/v1/volumes", Some(&body), 201).await;
}

fn with_disks(name: &str, disks: Value) -> Value {
    let mut spec = guest_spec_json(name, "guest.action=hold");
    spec["disks"] = disks;
    spec
}

async fn start(d: &Daemon, id: &str) -> (u16, Value) {
    call(d, Method::POST, &format!("/v1/vms/{id}/start"), None).await
}

async fn show(d: &Daemon, id: &str) -> Value {
    expect(d, Method::GET, &format!("/v1/vms/{id}"), None, 200).await
}

/// Finding (b), through the API alone: a VM names vmlet's own files by
/// path (a volume, another VM's record, the lock file). Every one is
/// refused, naming the field.
#[tokio::test]
async fn vmlets_own_files_cannot_be_named_by_path() {
    let d = Daemon::start().await;
    let volume = unique_name("v");
    create_volume(&d, &volume).await;
    let other = create_vm(&d, &guest_spec_json(&unique_name("other"), "")).await;
    let managed = [
        d.state_dir.join("volumes").join(format!("{volume}.qcow2")),
        d.state_dir.join("vms").join(id_of(&other)).join("vm.json"),
        d.state_dir.join("vmlet.lock"),
        // Through a `..` from the allowed directory.
        d.scratch().join("../state/vmlet.lock"),
        PathBuf::from("/proc/self/root/etc/passwd"),
        PathBuf::from("/etc/passwd"),
    ];
    for path in managed {
        let spec = with_disks(
            &unique_name("thief"),
            json!([{"path": path, "format": "raw"}]),
        );
        let answer = call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
        assert_invalid_field(&answer, "disks[0].path");
    }
    force_delete_vm(&d, &id_of(&other)).await;
}

/// The daemon refuses host-file directories that hold what it manages.
#[tokio::test]
async fn a_host_directory_holding_the_state_directory_is_refused_at_start() {
    let scratch = Scratch::new();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_vmlet"))
        .arg("serve")
        .arg("--config")
        .arg("/dev/null")
        .arg("--state-dir")
        .arg(scratch.path().join("state"))
        .arg("--run-dir")
        .arg(scratch.path().join("run"))
        .env("VMLET_ALLOWED_HOST_PATHS", scratch.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("allowed_host_paths") && stderr.contains("vmlet manages"),
        "{stderr}"
    );
}

/// Nor a host-file directory that holds the API token file (a VM could
/// read it as a raw disk): the daemon refuses to start, naming the
/// setting.
#[tokio::test]
async fn a_host_directory_holding_the_token_file_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new();
    let host = scratch.path().join("host");
    std::fs::create_dir(&host).unwrap();
    let token = host.join("api-token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_vmlet"))
        .arg("serve")
        .arg("--config")
        .arg("/dev/null")
        .arg("--state-dir")
        .arg(scratch.path().join("state"))
        .arg("--run-dir")
        .arg(scratch.path().join("run"))
        .env("VMLET_ALLOWED_HOST_PATHS", &host)
        .env("VMLET_AUTH_TOKEN_FILE", &token)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("allowed_host_paths") && stderr.contains("auth_token_file"),
        "{stderr}"
    );
}

/// Finding (a): a qcow2 in the allowed directory whose header names a
/// backing file outside it is refused at create, and also at start when the
/// header is rewritten after create (as a guest or a user could).
#[tokio::test]
async fn qcow2_host_files_naming_a_backing_file_are_refused() {
    let d = Daemon::start().await;
    let scratch = Scratch::new();
    let secret = secret_file(&scratch);
    let host = d.scratch();
    let leaky = host.join("leaky.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        secret.to_str().unwrap(),
        "-F",
        "raw",
        leaky.to_str().unwrap(),
    ]);
    let spec = with_disks(
        &unique_name("leak"),
        json!([{"path": leaky, "format": "qcow2"}]),
    );
    let answer = call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
    assert_invalid_field(&answer, "disks[0].path");
    assert!(answer.1.to_string().contains("backing"), "{}", answer.1);

    // Accepted while clean, rewritten before start: the start is refused.
    let clean = create_image(&host, "clean.qcow2", "qcow2", "16M");
    let vm = create_vm(
        &d,
        &with_disks(
            &unique_name("late"),
            json!([{"path": clean, "format": "qcow2"}]),
        ),
    )
    .await;
    let id = id_of(&vm);
    name_backing_file(&clean, &secret);
    let (status, body) = start(&d, &id).await;
    assert_ne!(status, 200, "{body}");
    let view = show(&d, &id).await;
    assert_ne!(view["state"], "running", "{view}");
    assert!(
        view.to_string().contains("disks[0].path") && view.to_string().contains("backing"),
        "{view}"
    );
    assert!(d.qemu_pids().is_empty(), "a QEMU runs: {:?}", d.qemu_pids());
    force_delete_vm(&d, &id).await;
}

/// Finding (b), the guest's half: a volume whose header was rewritten to
/// name a backing file outside (what a guest that once had the file raw
/// could write) is attached to another VM. QEMU opens the volume, and never
/// the file its header names.
#[tokio::test]
async fn a_backing_file_in_a_volume_header_is_never_opened() {
    let d = Daemon::start().await;
    let scratch = Scratch::new();
    let secret = secret_file(&scratch);
    let volume = unique_name("v");
    create_volume(&d, &volume).await;
    let file = d.state_dir.join("volumes").join(format!("{volume}.qcow2"));
    name_backing_file(&file, &secret);

    let vm = create_vm(
        &d,
        &with_disks(&unique_name("victim"), json!([{"volume": volume}])),
    )
    .await;
    let id = id_of(&vm);
    let (status, body) = start(&d, &id).await;
    assert_eq!(status, 200, "{body}");
    let pid = show(&d, &id).await["pid"].as_i64().unwrap() as i32;
    let files = open_files(pid);
    let secret_real = std::fs::canonicalize(&secret).unwrap();
    assert!(
        files.iter().any(|f| f == &file),
        "QEMU holds the volume: {files:?}"
    );
    assert!(
        !files.iter().any(|f| f == &secret_real),
        "QEMU opened the backing file a header named: {files:?}"
    );
    force_delete_vm(&d, &id).await;
}

/// Finding 6 (TOCTOU): a disk path that was a plain file at create and is
/// a symlink to an outside file at start is refused at start; QEMU never
/// sees the outside file.
#[tokio::test]
async fn a_symlink_swapped_in_after_create_is_refused_at_start() {
    let d = Daemon::start().await;
    let scratch = Scratch::new();
    let secret = secret_file(&scratch);
    let host = d.scratch();
    let disk = create_image(&host, "swap.raw", "raw", "1M");
    let vm = create_vm(
        &d,
        &with_disks(
            &unique_name("swap"),
            json!([{"path": disk, "format": "raw"}]),
        ),
    )
    .await;
    let id = id_of(&vm);
    std::fs::remove_file(&disk).unwrap();
    std::os::unix::fs::symlink(&secret, &disk).unwrap();

    let (status, body) = start(&d, &id).await;
    assert_ne!(status, 200, "{body}");
    let view = show(&d, &id).await;
    assert!(
        view.to_string().contains("disks[0].path") && view.to_string().contains("symlink"),
        "{view}"
    );
    assert!(d.qemu_pids().is_empty(), "a QEMU runs: {:?}", d.qemu_pids());

    // The same for the kernel: swapped for a symlink after create.
    let kernel = host.join("vmlinuz");
    std::fs::copy(&common::guest::test_guest().kernel, &kernel).unwrap();
    let mut spec = guest_spec_json(&unique_name("kswap"), "guest.action=hold");
    spec["boot"]["kernel"] = json!(kernel);
    let kvm = create_vm(&d, &spec).await;
    std::fs::remove_file(&kernel).unwrap();
    std::os::unix::fs::symlink(&secret, &kernel).unwrap();
    let (status, body) = start(&d, &id_of(&kvm)).await;
    assert_ne!(status, 200, "{body}");
    assert!(
        show(&d, &id_of(&kvm))
            .await
            .to_string()
            .contains("boot.kernel"),
        "the error names the kernel"
    );
    force_delete_vm(&d, &id).await;
    force_delete_vm(&d, &id_of(&kvm)).await;
}

/// A host file a VM gets is what it named, read through an fd: the guest
/// boots and QEMU's command line names no host path of a disk or kernel.
#[tokio::test]
async fn qemu_gets_fds_not_paths() {
    let d = Daemon::start().await;
    let disk = create_image(&d.scratch(), "plain.qcow2", "qcow2", "16M");
    let vm = create_vm(
        &d,
        &with_disks(
            &unique_name("fds"),
            json!([{"path": disk, "format": "qcow2"}]),
        ),
    )
    .await;
    let id = id_of(&vm);
    let (status, body) = start(&d, &id).await;
    assert_eq!(status, 200, "{body}");
    let pid = show(&d, &id).await["pid"].as_i64().unwrap() as i32;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let guest = common::guest::test_guest();
    for path in [
        disk.as_path(),
        guest.kernel.as_path(),
        guest.initrd.as_path(),
    ] {
        assert!(
            !cmdline.contains(path.to_str().unwrap()),
            "{} on QEMU's command line: {cmdline}",
            path.display()
        );
    }
    assert!(open_files(pid).iter().any(|f| f == &disk));
    wait_for_boot(&d, &id).await;
    force_delete_vm(&d, &id).await;
}

async fn wait_for_boot(d: &Daemon, id: &str) {
    let log = d.serial_log(id.parse().unwrap());
    common::wait_for_line(&log, "GUEST-READY", Duration::from_secs(60)).await;
}

/// Finding 6 for `qemu-img`: offline snapshots of a qcow2 host disk run on
/// the file vmlet opened (below the allowed directory, no symlinks, header
/// checked), not on whatever the path names. The disk swapped for a
/// symlink to another VM's overlay after create: listing, taking, reverting
/// and deleting snapshots are refused naming the disk, and the other
/// overlay stays byte-identical.
#[tokio::test]
async fn offline_snapshots_of_a_swapped_host_disk_touch_nothing_outside() {
    let d = Daemon::start().await;
    let mut other = guest_spec_json(&unique_name("owner"), "");
    other["disks"] = json!([{"name": "data", "size_mib": 16}]);
    let other = create_vm(&d, &other).await;
    let overlay = d
        .state_dir
        .join("vms")
        .join(common::api::uuid_of(&other).to_string())
        .join("disks/data.qcow2");
    let overlay_before = std::fs::read(&overlay).unwrap();

    let disk = create_image(&d.scratch(), "snapped.qcow2", "qcow2", "16M");
    let vm = create_vm(
        &d,
        &with_disks(
            &unique_name("snapped"),
            json!([{"path": disk, "format": "qcow2"}]),
        ),
    )
    .await;
    let id = id_of(&vm);
    let snapshots = format!("/v1/vms/{id}/snapshots");
    // While the path is the file it was, offline snapshots work.
    expect(
        &d,
        Method::POST,
        &snapshots,
        Some(&json!({"name": "s0"})),
        201,
    )
    .await;
    let list = expect(&d, Method::GET, &snapshots, None, 200).await;
    assert_eq!(list["snapshots"][0]["name"], "s0", "{list}");

    std::fs::rename(&disk, disk.with_extension("old")).unwrap();
    std::os::unix::fs::symlink(&overlay, &disk).unwrap();
    let refused = [
        (Method::GET, snapshots.clone(), None),
        (Method::POST, snapshots.clone(), Some(json!({"name": "s1"}))),
        (Method::POST, format!("{snapshots}/s0/revert"), None),
        (Method::DELETE, format!("{snapshots}/s0"), None),
    ];
    for (method, path, body) in refused {
        let (status, answer) = call(&d, method, &path, body.as_ref()).await;
        assert_eq!(status, 409, "{path}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("disk ") && message.contains("symlink"),
            "{path}: {answer}"
        );
    }
    assert_eq!(
        std::fs::read(&overlay).unwrap(),
        overlay_before,
        "the other VM's overlay changed"
    );
    force_delete_vm(&d, &id).await;
    force_delete_vm(&d, &id_of(&other)).await;
}

/// A qcow2 host disk whose header names an external data file (any host
/// path, which QAPI gives no way to pin) is refused at create, naming the
/// disk's field.
#[tokio::test]
async fn qcow2_host_files_naming_a_data_file_are_refused() {
    let d = Daemon::start().await;
    let host = d.scratch();
    let data = host.join("data.raw");
    let image = host.join("with-data-file.qcow2");
    let option = format!("data_file={}", data.display());
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        option.as_str(),
        image.to_str().unwrap(),
        "16M",
    ]);
    let spec = with_disks(
        &unique_name("datafile"),
        json!([{"path": image, "format": "qcow2"}]),
    );
    let answer = call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
    assert_invalid_field(&answer, "disks[0].path");
    assert!(answer.1.to_string().contains("data file"), "{}", answer.1);
}
