//! Storage seen from inside the test guest, through a real `vmlet serve`
//! under TCG: disks made from an imported image (overlay) and blank, the
//! cloud-init seed, hot-plug and online resize of a volume, live I/O limits,
//! snapshot revert, and what deleting a VM or an image leaves behind.
//!
//! Boots are expensive (3-5 s each under TCG, more on a loaded machine), so
//! each test boots one guest and checks as much as is natural on it.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::api::{
    assert_error, call, create_vm, expect, force_delete_vm, id_of, serial_token, uuid_of,
};
use common::daemon::{guest_spec_json, unique_name, wait_until, Daemon};
use common::serial_shell::SerialShell;
use common::storage::{create_image, sha256_of};
use common::{guest_cmdline, wait_for_line, Scratch, BOOT_TIMEOUT};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use vmlet::client::Method;

/// How long an image import of a few MiB may take.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the guest gets to notice a hot-plug change (it polls every
/// 250 ms; a loaded TCG guest is much slower than that).
const GUEST_NOTICE: Duration = Duration::from_secs(30);

/// How long one shell command may take in the guest.
const SHELL_TIMEOUT: Duration = Duration::from_secs(60);

// ---- helpers ------------------------------------------------------------------

/// Creates the VM (201) and starts it (200, running); returns the VM.
async fn create_and_start(d: &Daemon, spec: &Value) -> Value {
    let vm = create_vm(d, spec).await;
    let id = id_of(&vm);
    let vm = expect(d, Method::POST, &format!("/v1/vms/{id}/start"), None, 200).await;
    assert_eq!(vm["state"], "running", "start: {vm}");
    vm
}

/// `POST /v1/vms/{id}/disks` with `body`, expecting a 409 whose message
/// contains `why`.
async fn attach_refused(d: &Daemon, id: &str, body: &Value, why: &str) {
    let answer = call(d, Method::POST, &format!("/v1/vms/{id}/disks"), Some(body)).await;
    let error = assert_error(&answer, 409, "conflict");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(why), "{message}");
}

async fn get_vm(d: &Daemon, id: &str) -> Value {
    expect(d, Method::GET, &format!("/v1/vms/{id}"), None, 200).await
}

/// The disk called `name` in a VM's spec.
fn spec_disk<'a>(vm: &'a Value, name: &str) -> Option<&'a Value> {
    vm["spec"]["disks"]
        .as_array()
        .and_then(|disks| disks.iter().find(|disk| disk["name"] == name))
}

/// The guest's `GUEST-READY` line (waits for it).
async fn ready_line(d: &Daemon, id: Uuid) -> String {
    wait_for_line(&d.serial_log(id), "GUEST-READY", BOOT_TIMEOUT).await
}

/// The `disks=` entries of a `GUEST-READY` line.
fn ready_disks(line: &str) -> Vec<String> {
    let list = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("disks="))
        .unwrap_or_else(|| panic!("no disks= in {line:?}"));
    if list == "-" {
        return vec![];
    }
    list.split(',').map(str::to_string).collect()
}

/// The value of `key=` in a line of `key=value` words.
fn word_value<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Makes a raw image of `mib` MiB with `qemu-img` (with some data in it, so
/// that it is not all holes), in `dir`.
fn raw_image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = create_image(dir, name, "raw", &format!("{mib}M"));
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.seek(SeekFrom::Start(1024 * 1024)).unwrap();
    file.write_all(&[0x5a; 64 * 1024]).unwrap();
    path
}

/// Imports `path` as image `name` and waits until it is ready; returns it.
async fn import_image(d: &Daemon, name: &str, path: &Path) -> Value {
    let body = json!({"name": name, "path": path});
    let image = expect(d, Method::POST, "/v1/images", Some(&body), 202).await;
    assert_eq!(image["name"], name, "{image}");
    let uri = format!("/v1/images/{name}");
    wait_until("the image import", IMPORT_TIMEOUT, || async {
        let image = expect(d, Method::GET, &uri, None, 200).await;
        match image["status"].as_str() {
            Some("ready") => Some(image),
            Some("importing") => None,
            _ => panic!("import failed: {image}"),
        }
    })
    .await
}

// ---- 1, 2, 5, 6: image overlay, blank disk, seed, limits, deletes ----------------

/// One guest with an overlay on an imported image, a blank disk and a
/// cloud-init seed: the guest sees the exact sizes and the seed; its writes
/// to the overlay never reach the image; I/O limits change live; deleting
/// the VM removes the overlays but keeps the image, which can only be
/// deleted once no VM uses it.
#[tokio::test]
async fn image_overlay_blank_disk_seed_and_live_limits() {
    let import = Scratch::new();
    let d =
        Daemon::start_with_env(&[("VMLET_IMPORT_DIR", &import.path().display().to_string())]).await;
    let image_name = unique_name("img");
    let image_uri = format!("/v1/images/{image_name}");
    let raw = raw_image(import.path(), "base.raw", 32);
    let image = import_image(&d, &image_name, &raw).await;
    assert_eq!(image["virtual_size"], 32 * 1024 * 1024, "{image}");
    let stored = d
        .state_dir
        .join("images")
        .join(format!("{image_name}.qcow2"));
    let image_sha = image["sha256"].as_str().expect("image sha256").to_string();
    assert_eq!(sha256_of(&stored), image_sha, "stored image vs sha256");

    let name = unique_name("ovl");
    let user_data = "#cloud-config\nhostname: storage-guest\nruncmd:\n  - [echo, hello]\n";
    let mut spec = guest_spec_json(&name, "guest.action=shell guest.seed=report");
    spec["disks"] = json!([
        {"name": "root", "image": image_name, "size_mib": 48},
        {"name": "data", "size_mib": 16},
    ]);
    spec["cloud_init"] = json!({"user_data": user_data});
    let vm = create_and_start(&d, &spec).await;
    let id = id_of(&vm);
    let uuid = uuid_of(&vm);
    let vm_dir = d.state_dir.join("vms").join(&id);
    let overlay = vm_dir.join("disks").join("root.qcow2");
    assert!(overlay.is_file(), "no overlay at {}", overlay.display());
    assert!(vm_dir.join("disks").join("data.qcow2").is_file());

    // 1. Exact sizes; the seed comes last, read-only.
    let ready = ready_line(&d, uuid).await;
    let disks = ready_disks(&ready);
    assert_eq!(disks.len(), 3, "{ready}");
    assert_eq!(disks[0], "vda:50331648", "{ready}");
    assert_eq!(disks[1], "vdb:16777216", "{ready}");
    assert!(
        disks[2].starts_with("vdc:") && disks[2].ends_with(":ro"),
        "the seed disk is not read-only: {ready}"
    );

    // 2. The seed's contents.
    let log = d.serial_log(uuid);
    let seed = wait_for_line(&log, "GUEST-SEED ", BOOT_TIMEOUT).await;
    assert_eq!(word_value(&seed, "dev"), "vdc", "{seed}");
    assert_eq!(
        word_value(&seed, "user-data-sha256"),
        sha256_hex(user_data.as_bytes()),
        "{seed}"
    );
    let meta = wait_for_line(&log, "GUEST-SEED-META", BOOT_TIMEOUT).await;
    assert_eq!(
        meta.trim(),
        format!("GUEST-SEED-META instance-id: {id}|local-hostname: {name}"),
    );

    // 1. The guest writes to its overlay; the image does not change.
    let mut shell = SerialShell::connect(&d.socket, &serial_token(&d, &id).await, &log);
    let (out, status) = shell.run_with_status(
        "echo MARKER-OVERLAY | dd of=/dev/vda bs=512 seek=100 conv=fsync",
        SHELL_TIMEOUT,
    );
    assert_eq!(status, 0, "dd: {out}");
    let out = shell.run(
        "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -n 1",
        SHELL_TIMEOUT,
    );
    assert_eq!(out.trim(), "MARKER-OVERLAY", "read back");
    assert!(
        contains_bytes(&std::fs::read(&overlay).unwrap(), b"MARKER-OVERLAY"),
        "the write did not land in the overlay"
    );
    assert_eq!(sha256_of(&stored), image_sha, "the image file changed");
    let image = expect(&d, Method::GET, &image_uri, None, 200).await;
    assert_eq!(image["sha256"], image_sha.as_str(), "{image}");

    // 6. I/O limits, live.
    let limits = json!({"bps_write": 1048576});
    let vm = expect(
        &d,
        Method::PUT,
        &format!("/v1/vms/{id}/disks/data/limits"),
        Some(&limits),
        200,
    )
    .await;
    let disk = spec_disk(&vm, "data").unwrap_or_else(|| panic!("no disk data in {vm}"));
    assert_eq!(disk["limits"]["bps_write"], 1048576, "{vm}");
    let disk = spec_disk(&get_vm(&d, &id).await, "data").cloned().unwrap();
    assert_eq!(disk["limits"]["bps_write"], 1048576, "{disk}");
    // 4 MiB at 1 MiB/s, in 64 KiB direct writes: about 3.8 s. (QEMU lets a
    // request through while the bucket is below its burst, a tenth of the
    // rate, and charges it afterwards; so small requests keep the bound
    // tight, where page-cache writeback may merge into big ones.)
    let started = Instant::now();
    let (out, status) = shell.run_with_status(
        "dd if=/dev/zero of=/dev/vdb bs=65536 count=64 oflag=direct 2>&1",
        SHELL_TIMEOUT,
    );
    let took = started.elapsed();
    assert_eq!(status, 0, "dd: {out}");
    eprintln!("4 MiB write at bps_write=1MiB/s took {took:?}");
    assert!(
        took >= Duration::from_secs(3),
        "4 MiB at 1 MiB/s took only {took:?}"
    );
    drop(shell);

    // 5. An image in use cannot go; deleting the VM removes its overlays
    // (the whole VM directory) but never the image.
    let answer = call(&d, Method::DELETE, &image_uri, None).await;
    assert_error(&answer, 409, "conflict");
    assert!(stored.is_file());
    force_delete_vm(&d, &id).await;
    assert!(!vm_dir.exists(), "{} left behind", vm_dir.display());
    let image = expect(&d, Method::GET, &image_uri, None, 200).await;
    assert_eq!(image["status"], "ready", "{image}");
    assert_eq!(sha256_of(&stored), image_sha, "the image file changed");
    // Unused now.
    expect(&d, Method::DELETE, &image_uri, None, 204).await;
    assert!(!stored.exists(), "image file left behind");
}

// ---- 3: hot-plug and online resize ------------------------------------------------

/// A volume hot-plugged into a running q35 guest, grown while attached, and
/// unplugged; a running microvm refuses hot-plug.
#[tokio::test]
async fn volume_hot_plug_resize_and_unplug() {
    let d = Daemon::start().await;
    let volume = unique_name("vol");
    let body = json!({"name": volume, "size_mib": 24});
    let created = expect(&d, Method::POST, "/v1/volumes", Some(&body), 201).await;
    assert_eq!(created["attached_to"], Value::Null, "{created}");
    let volume_uri = format!("/v1/volumes/{volume}");

    // microvm has no hot-plug: 409 and nothing attached.
    let mut micro = guest_spec_json(&unique_name("micro"), "");
    micro["profile"] = "microvm".into();
    micro["boot"]["cmdline"] = guest_cmdline("microvm", "guest.action=hold").into();
    let micro = create_and_start(&d, &micro).await;
    let micro_id = id_of(&micro);
    let attach = json!({"volume": volume});
    attach_refused(&d, &micro_id, &attach, "hot-plug").await;
    let vol = expect(&d, Method::GET, &volume_uri, None, 200).await;
    assert_eq!(vol["attached_to"], Value::Null, "{vol}");
    let micro = get_vm(&d, &micro_id).await;
    assert!(
        micro["spec"]["disks"]
            .as_array()
            .is_none_or(|disks| disks.is_empty()),
        "{micro}"
    );
    force_delete_vm(&d, &micro_id).await;

    // q35: hot-plug.
    let name = unique_name("hp");
    let vm = create_and_start(&d, &guest_spec_json(&name, "guest.action=hold")).await;
    let id = id_of(&vm);
    let uuid = uuid_of(&vm);
    let log = d.serial_log(uuid);
    let ready = ready_line(&d, uuid).await;
    assert!(ready_disks(&ready).is_empty(), "{ready}");

    // No SCSI controller on this VM (no disk used SCSI at start): 409.
    let scsi = json!({"volume": volume, "bus": "virtio_scsi"});
    attach_refused(&d, &id, &scsi, "SCSI controller").await;

    let vm = expect(
        &d,
        Method::POST,
        &format!("/v1/vms/{id}/disks"),
        Some(&attach),
        200,
    )
    .await;
    let disk = vm["spec"]["disks"]
        .as_array()
        .and_then(|disks| disks.iter().find(|disk| disk["volume"] == volume.as_str()))
        .unwrap_or_else(|| panic!("the volume is not in {vm}"))
        .clone();
    let disk_name = disk["name"]
        .as_str()
        .expect("the disk has a name")
        .to_string();
    let added = wait_for_line(&log, "GUEST-DISK-ADDED", GUEST_NOTICE).await;
    assert_eq!(added.trim(), "GUEST-DISK-ADDED vda:25165824");
    let vm = get_vm(&d, &id).await;
    assert!(spec_disk(&vm, &disk_name).is_some(), "{vm}");
    let vol = expect(&d, Method::GET, &volume_uri, None, 200).await;
    assert_eq!(vol["attached_to"]["vm"], id.as_str(), "{vol}");
    assert_eq!(vol["attached_to"]["vm_name"], name.as_str(), "{vol}");
    assert_eq!(vol["attached_to"]["disk"], disk_name.as_str(), "{vol}");
    // An attached volume cannot go.
    let answer = call(&d, Method::DELETE, &volume_uri, None).await;
    assert_error(&answer, 409, "conflict");

    // Online resize.
    let vol = expect(
        &d,
        Method::POST,
        &format!("{volume_uri}/resize"),
        Some(&json!({"size_mib": 40})),
        200,
    )
    .await;
    assert_eq!(vol["size_mib"], 40, "{vol}");
    assert_eq!(vol["virtual_size"], 41943040, "{vol}");
    let resized = wait_for_line(&log, "GUEST-DISK-RESIZED", GUEST_NOTICE).await;
    assert_eq!(resized.trim(), "GUEST-DISK-RESIZED vda:41943040");

    // Unplug.
    let vm = expect(
        &d,
        Method::DELETE,
        &format!("/v1/vms/{id}/disks/{disk_name}"),
        None,
        200,
    )
    .await;
    assert!(spec_disk(&vm, &disk_name).is_none(), "{vm}");
    let removed = wait_for_line(&log, "GUEST-DISK-REMOVED", GUEST_NOTICE).await;
    assert_eq!(removed.trim(), "GUEST-DISK-REMOVED vda");
    let vm = get_vm(&d, &id).await;
    assert!(spec_disk(&vm, &disk_name).is_none(), "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");
    let vol = expect(&d, Method::GET, &volume_uri, None, 200).await;
    assert_eq!(vol["attached_to"], Value::Null, "{vol}");
    expect(&d, Method::DELETE, &volume_uri, None, 204).await;
}

// ---- 4: snapshot revert -----------------------------------------------------------

/// Asserts that the first line of the guest's /dev/vda, read past the page
/// cache, is `marker`; shows the end of the serial log when it is not.
fn assert_vda_starts_with(shell: &mut SerialShell, log: &Path, marker: &str) {
    let (out, status) = shell.run_with_status("echo 3 > /proc/sys/vm/drop_caches", SHELL_TIMEOUT);
    assert_eq!(status, 0, "drop_caches: {out}");
    let out = shell.run(
        "dd if=/dev/vda bs=16 count=1 2>/dev/null | head -n 1",
        SHELL_TIMEOUT,
    );
    if out.trim() != marker {
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        let tail: String = text
            .chars()
            .rev()
            .take(3000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        panic!("/dev/vda starts with {out:?}, not {marker:?}; the serial log ends with:\n{tail}");
    }
}

/// A live snapshot brings back both the disk and the guest's memory.
#[tokio::test]
async fn live_snapshot_revert_restores_the_disk() {
    let d = Daemon::start().await;
    let mut spec = guest_spec_json(&unique_name("snap"), "guest.action=shell");
    spec["disks"] = json!([{"name": "data", "size_mib": 16}]);
    let vm = create_and_start(&d, &spec).await;
    let id = id_of(&vm);
    let uuid = uuid_of(&vm);
    let log = d.serial_log(uuid);
    let ready = ready_line(&d, uuid).await;
    assert_eq!(ready_disks(&ready), ["vda:16777216"], "{ready}");

    let mut shell = SerialShell::connect(&d.socket, &serial_token(&d, &id).await, &log);
    let (out, status) = shell.run_with_status(
        "echo MARKER-A | dd of=/dev/vda conv=fsync 2>/dev/null",
        SHELL_TIMEOUT,
    );
    assert_eq!(status, 0, "dd: {out}");

    let snapshots = format!("/v1/vms/{id}/snapshots");
    let started = Instant::now();
    let snapshot = expect(
        &d,
        Method::POST,
        &snapshots,
        Some(&json!({"name": "a"})),
        201,
    )
    .await;
    eprintln!("live snapshot took {:?}", started.elapsed());
    assert_eq!(snapshot["name"], "a", "{snapshot}");
    assert_eq!(snapshot["vm_state"], true, "{snapshot}");
    let answer = call(&d, Method::POST, &snapshots, Some(&json!({"name": "a"}))).await;
    assert_error(&answer, 409, "conflict");
    let list = expect(&d, Method::GET, &snapshots, None, 200).await;
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .expect("snapshots is a list")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["a"], "{list}");

    let (out, status) = shell.run_with_status(
        "echo MARKER-B | dd of=/dev/vda conv=fsync 2>/dev/null",
        SHELL_TIMEOUT,
    );
    assert_eq!(status, 0, "dd: {out}");
    assert_vda_starts_with(&mut shell, &log, "MARKER-B");

    let started = Instant::now();
    let vm = expect(
        &d,
        Method::POST,
        &format!("{snapshots}/a/revert"),
        None,
        200,
    )
    .await;
    eprintln!("live revert took {:?}", started.elapsed());
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["task"], Value::Null, "{vm}");
    let answer = call(&d, Method::POST, &format!("{snapshots}/nope/revert"), None).await;
    assert_error(&answer, 404, "not_found");

    // The guest goes on from the moment of the snapshot; a fresh connection
    // resynchronises with its shell (the probe is retried until it answers).
    drop(shell);
    let mut shell = SerialShell::connect(&d.socket, &serial_token(&d, &id).await, &log);
    assert_vda_starts_with(&mut shell, &log, "MARKER-A");
    drop(shell);

    expect(&d, Method::DELETE, &format!("{snapshots}/a"), None, 204).await;
    let list = expect(&d, Method::GET, &snapshots, None, 200).await;
    assert_eq!(list["snapshots"], json!([]), "{list}");
}
