//! The storage API of `vmlet serve` over HTTP, with real `qemu-img`: image
//! imports (local files and URLs, conversion, checksums, refusals, progress
//! events), volumes, VM disks made from images/volumes/blank, offline
//! snapshots, and a full disk (507). No guest boots: every VM stays stopped.
//! Each test runs its own daemon on scratch directories.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::{
    assert_error, assert_invalid_field, call, create_vm, expect_event_within, id_of,
};
use common::daemon::{guest_spec_json, unique_name, wait_until, Daemon};
use common::storage::{
    dir_entries, files_under, image_info, images_identical, qemu_img, sha256_of, write_pattern_raw,
    write_random, HttpServer, Reply, TmpfsMount, MIB,
};
use common::Scratch;
use serde_json::{json, Value};
use vmlet::client::{EventStream, Method};
use vmlet::storage::images::{Image, ImageStatus, ImportPhase};
use vmlet::vm::events::EventBody;

/// How long an import of a few MiB may take on a loaded 2-core machine.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long to wait for an event that should come promptly.
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

// ---- helpers ------------------------------------------------------------------

/// A daemon whose import directory is `import` (a separate scratch dir).
async fn daemon_importing_from(import: &Scratch) -> Daemon {
    Daemon::start_with_env(&[("VMLET_IMPORT_DIR", s(import.path()))]).await
}

fn s(path: &Path) -> &str {
    path.to_str().expect("scratch paths are UTF-8")
}

async fn get(d: &Daemon, path: &str) -> (u16, Value) {
    call(d, Method::GET, path, None).await
}

async fn post(d: &Daemon, path: &str, body: &Value) -> (u16, Value) {
    call(d, Method::POST, path, Some(body)).await
}

async fn delete(d: &Daemon, path: &str) -> (u16, Value) {
    call(d, Method::DELETE, path, None).await
}

/// Asserts a 404 whose message names `what` (and not a VM, for a
/// storage object).
fn assert_not_found(answer: &(u16, Value), what: &str) {
    let error = assert_error(answer, 404, "not_found");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(what) && !message.contains("no VM"),
        "404 message {message:?} should name {what:?}"
    );
}

/// `POST /v1/images`, expecting 202 and the image `importing`.
async fn start_import(d: &Daemon, body: &Value) -> Value {
    let (status, image) = post(d, "/v1/images", body).await;
    assert_eq!(status, 202, "import {body}: {image}");
    assert_eq!(image["name"], body["name"], "{image}");
    assert_eq!(image["status"], "importing", "{image}");
    assert_eq!(image["format"], "qcow2", "{image}");
    image
}

/// Polls image `name` until its import ends; returns it.
async fn wait_import(d: &Daemon, name: &str) -> Value {
    let what = format!("the import of image {name} to end");
    wait_until(&what, IMPORT_TIMEOUT, || async {
        let (status, image) = get(d, &format!("/v1/images/{name}")).await;
        assert_eq!(status, 200, "GET image {name}: {image}");
        (image["status"] != "importing").then_some(image)
    })
    .await
}

/// Imports `path` as `name` and waits until it is ready.
async fn import_ready(d: &Daemon, name: &str, path: &Path) -> Value {
    start_import(d, &json!({"name": name, "path": path})).await;
    let image = wait_import(d, name).await;
    assert_eq!(image["status"], "ready", "{image}");
    image
}

/// Imports `body` and waits until it failed; returns its error message.
async fn import_failing(d: &Daemon, body: &Value) -> String {
    let name = body["name"].as_str().unwrap().to_string();
    start_import(d, body).await;
    let image = wait_import(d, &name).await;
    assert_eq!(image["status"], "failed", "{image}");
    assert_eq!(image["progress"], Value::Null, "{image}");
    image["error"]
        .as_str()
        .unwrap_or_else(|| panic!("a failed image has an error: {image}"))
        .to_string()
}

fn image_file(d: &Daemon, name: &str) -> PathBuf {
    d.state_dir.join("images").join(format!("{name}.qcow2"))
}

fn volume_file(d: &Daemon, name: &str) -> PathBuf {
    d.state_dir.join("volumes").join(format!("{name}.qcow2"))
}

/// Asserts that the failed import of image `name` left nothing in the
/// store but its record (saying `failed`, so it survives restarts until
/// deleted): no file, no import leftovers.
fn assert_nothing_stored(d: &Daemon, name: &str) {
    let images = d.state_dir.join("images");
    assert!(!image_file(d, name).exists(), "{name}.qcow2 was left");
    let record = images.join(format!("{name}.json"));
    if let Ok(text) = std::fs::read_to_string(&record) {
        let image: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(image["status"], "failed", "{name}.json holds {image}");
    }
    let tmp = dir_entries(&images.join(".tmp"));
    assert!(tmp.is_empty(), "images/.tmp holds {tmp:?}");
}

async fn image_names(d: &Daemon) -> Vec<String> {
    let (status, body) = get(d, "/v1/images").await;
    assert_eq!(status, 200, "{body}");
    body["images"]
        .as_array()
        .expect("images is a list")
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

async fn volume_names(d: &Daemon) -> Vec<String> {
    let (status, body) = get(d, "/v1/volumes").await;
    assert_eq!(status, 200, "{body}");
    body["volumes"]
        .as_array()
        .expect("volumes is a list")
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// `POST /v1/volumes`, expecting 201.
async fn create_volume(d: &Daemon, body: &Value) -> Value {
    let (status, volume) = post(d, "/v1/volumes", body).await;
    assert_eq!(status, 201, "create volume {body}: {volume}");
    volume
}

/// A stopped test-guest VM spec with `disks`.
fn spec_with_disks(name: &str, disks: Value) -> Value {
    let mut spec = guest_spec_json(name, "");
    spec["disks"] = disks;
    spec
}

fn vm_disk_file(d: &Daemon, id: &str, disk: &str) -> PathBuf {
    d.state_dir
        .join("vms")
        .join(id)
        .join("disks")
        .join(format!("{disk}.qcow2"))
}

fn virtual_size(path: &Path) -> u64 {
    image_info(path)["virtual-size"]
        .as_u64()
        .expect("qemu-img info has virtual-size")
}

/// The next event, which must come within [`EVENT_TIMEOUT`].
async fn expect_event(stream: &mut EventStream) -> vmlet::vm::events::Event {
    expect_event_within(stream, EVENT_TIMEOUT).await
}

// ---- 1. imports: conversion and checksums ----------------------------------------

#[tokio::test]
async fn imports_raw_and_qcow2_files_as_qcow2_with_checksums() {
    let import = Scratch::new();
    let d = daemon_importing_from(&import).await;
    let raw = write_pattern_raw(&import.path().join("disk.raw"), 8 * MIB);
    let qcow = import.path().join("disk.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow)]);
    let raw_sha = sha256_of(&raw);
    let qcow_sha = sha256_of(&qcow);

    let from_raw = unique_name("raw");
    let from_qcow = unique_name("qcow");
    let checked = unique_name("checked");
    let first = start_import(&d, &json!({"name": from_raw, "path": raw})).await;
    assert_eq!(first["source"], s(&raw), "{first}");
    assert_eq!(first["error"], Value::Null, "{first}");
    start_import(
        &d,
        &json!({"name": from_qcow, "path": qcow, "sha256": qcow_sha}),
    )
    .await;
    // The expected checksum may be given in upper case.
    start_import(
        &d,
        &json!({"name": checked, "path": raw, "sha256": raw_sha.to_ascii_uppercase()}),
    )
    .await;

    for (name, source, source_format, source_sha) in [
        (&from_raw, &raw, "raw", &raw_sha),
        (&from_qcow, &qcow, "qcow2", &qcow_sha),
        (&checked, &raw, "raw", &raw_sha),
    ] {
        let image = wait_import(&d, name).await;
        assert_eq!(image["status"], "ready", "{image}");
        assert_eq!(image["error"], Value::Null, "{image}");
        assert_eq!(image["progress"], Value::Null, "{image}");
        assert_eq!(image["format"], "qcow2", "{image}");
        assert_eq!(image["source_format"], source_format, "{image}");
        assert_eq!(image["source"], s(source), "{image}");
        assert_eq!(image["virtual_size"], 8 * MIB, "{image}");
        assert!(image["actual_size"].as_u64().is_some(), "{image}");
        assert!(image["created_at"].as_str().is_some(), "{image}");

        let stored = image_file(&d, name);
        let info = image_info(&stored);
        assert_eq!(info["format"], "qcow2", "{info}");
        assert_eq!(info["virtual-size"], 8 * MIB, "{info}");
        assert!(info.get("backing-filename").is_none(), "{info}");
        assert_eq!(
            image["sha256"],
            sha256_of(&stored),
            "sha256 of the stored file"
        );
        assert_eq!(image["source_sha256"], *source_sha, "sha256 of the source");
        assert!(
            images_identical(&raw, "raw", &stored, "qcow2"),
            "the stored {name} differs from the source"
        );
        // The metadata on disk says the same as the API.
        let meta: Value = serde_json::from_slice(
            &std::fs::read(d.state_dir.join("images").join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(meta, image, "NAME.json");
    }
    let tmp = dir_entries(&d.state_dir.join("images/.tmp"));
    assert!(tmp.is_empty(), "images/.tmp holds {tmp:?}");

    let mut expected = vec![from_raw.clone(), from_qcow.clone(), checked.clone()];
    expected.sort();
    assert_eq!(image_names(&d).await, expected);

    // A ready name cannot be imported again.
    let again = post(&d, "/v1/images", &json!({"name": from_raw, "path": raw})).await;
    assert_error(&again, 409, "conflict");

    // Delete: 204, files gone, 404 afterwards.
    let (status, body) = delete(&d, &format!("/v1/images/{from_raw}")).await;
    assert_eq!(status, 204, "{body}");
    assert_nothing_stored(&d, &from_raw);
    assert_not_found(&get(&d, &format!("/v1/images/{from_raw}")).await, &from_raw);
    assert_error(
        &delete(&d, &format!("/v1/images/{from_raw}")).await,
        404,
        "not_found",
    );
    assert!(!image_names(&d).await.contains(&from_raw));
}

// ---- 2. a wrong checksum -----------------------------------------------------------

#[tokio::test]
async fn wrong_sha256_fails_and_stores_nothing() {
    let import = Scratch::new();
    let d = daemon_importing_from(&import).await;
    let raw = write_pattern_raw(&import.path().join("disk.raw"), 2 * MIB);
    let name = unique_name("badsum");

    let error = import_failing(
        &d,
        &json!({"name": name, "path": raw, "sha256": "0".repeat(64)}),
    )
    .await;
    assert!(error.contains("checksum"), "error: {error}");
    assert!(
        error.contains(&sha256_of(&raw)),
        "error names the actual sum: {error}"
    );
    assert_nothing_stored(&d, &name);
    // The failed import stays listed.
    assert!(image_names(&d).await.contains(&name));

    // It can be deleted: 204, then gone.
    let (status, body) = delete(&d, &format!("/v1/images/{name}")).await;
    assert_eq!(status, 204, "{body}");
    assert!(!image_names(&d).await.contains(&name));
    assert_error(
        &get(&d, &format!("/v1/images/{name}")).await,
        404,
        "not_found",
    );

    // A failed name can be imported again (here, right).
    let retried = unique_name("retry");
    import_failing(
        &d,
        &json!({"name": retried, "path": raw, "sha256": "f".repeat(64)}),
    )
    .await;
    let image = import_ready(&d, &retried, &raw).await;
    assert_eq!(image["source_sha256"], sha256_of(&raw), "{image}");
    assert_eq!(image["error"], Value::Null, "{image}");

    // A malformed checksum is refused at once.
    let answer = post(
        &d,
        "/v1/images",
        &json!({"name": unique_name("x"), "path": raw, "sha256": "abc"}),
    )
    .await;
    assert_invalid_field(&answer, "sha256");
}

// ---- 3. refused sources ---------------------------------------------------------------

#[tokio::test]
async fn backing_files_and_paths_outside_the_import_dir_are_refused() {
    let import = Scratch::new();
    let outside = Scratch::new();
    let d = daemon_importing_from(&import).await;

    // An overlay (with a backing file) is refused after fetching.
    let base = import.path().join("base.qcow2");
    let overlay = import.path().join("overlay.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&overlay),
    ]);
    let name = unique_name("overlay");
    let error = import_failing(&d, &json!({"name": name, "path": overlay})).await;
    assert!(error.contains("backing file"), "error: {error}");
    assert_nothing_stored(&d, &name);

    // A file outside the import directory.
    let foreign = write_pattern_raw(&outside.path().join("foreign.raw"), MIB);
    let answer = post(
        &d,
        "/v1/images",
        &json!({"name": unique_name("x"), "path": foreign}),
    )
    .await;
    assert_invalid_field(&answer, "path");

    // A symlink inside it to a file outside.
    let link = import.path().join("link.raw");
    std::os::unix::fs::symlink(&foreign, &link).unwrap();
    let answer = post(
        &d,
        "/v1/images",
        &json!({"name": unique_name("x"), "path": link}),
    )
    .await;
    assert_invalid_field(&answer, "path");

    // `..` out of it.
    let dotdot = import
        .path()
        .join("..")
        .join(outside.path().file_name().unwrap())
        .join("foreign.raw");
    let answer = post(
        &d,
        "/v1/images",
        &json!({"name": unique_name("x"), "path": dotdot}),
    )
    .await;
    assert_invalid_field(&answer, "path");

    // A relative path, a directory, a missing file.
    let raw = write_pattern_raw(&import.path().join("disk.raw"), MIB);
    for path in [
        json!("disk.raw"),
        json!(import.path()),
        json!(import.path().join("missing.raw")),
    ] {
        let answer = post(
            &d,
            "/v1/images",
            &json!({"name": unique_name("x"), "path": path}),
        )
        .await;
        assert_invalid_field(&answer, "path");
    }

    // Both path and url, or neither.
    let answer = post(
        &d,
        "/v1/images",
        &json!({"name": unique_name("x"), "path": raw, "url": "http://127.0.0.1:1/x"}),
    )
    .await;
    assert_invalid_field(&answer, "path");
    let answer = post(&d, "/v1/images", &json!({"name": unique_name("x")})).await;
    assert_invalid_field(&answer, "path");

    // A URL that is not http(s), or not a URL.
    for url in ["file:///etc/passwd", "ftp://127.0.0.1/x", "not a url"] {
        let answer = post(
            &d,
            "/v1/images",
            &json!({"name": unique_name("x"), "url": url}),
        )
        .await;
        assert_invalid_field(&answer, "url");
    }

    // A bad name.
    let answer = post(&d, "/v1/images", &json!({"name": "../x", "path": raw})).await;
    assert_invalid_field(&answer, "name");
    // An unknown field.
    let answer = post(
        &d,
        "/v1/images",
        &json!({"name": unique_name("x"), "path": raw, "format": "raw"}),
    )
    .await;
    assert_eq!(answer.0, 422, "{}", answer.1);

    // None of the refused requests is listed or left anything; the failed
    // import left only its record.
    assert_eq!(image_names(&d).await, vec![name.clone()]);
    let images = dir_entries(&d.state_dir.join("images"));
    assert!(
        images
            .iter()
            .all(|e| e == ".tmp" || *e == format!("{name}.json")),
        "images/ holds {images:?}"
    );
}

// ---- 4. imports over HTTP --------------------------------------------------------------

#[tokio::test]
async fn imports_from_a_url() {
    let scratch = Scratch::new();
    let raw = write_pattern_raw(&scratch.path().join("served.raw"), 4 * MIB);
    let bytes = std::sync::Arc::new(std::fs::read(&raw).unwrap());
    let server = HttpServer::start(vec![
        ("/images/served.raw".to_string(), Reply::File(bytes.clone())),
        (
            "/images/short.raw".to_string(),
            Reply::Truncated {
                body: std::sync::Arc::new(bytes[..100_000].to_vec()),
                announced: bytes.len() as u64,
            },
        ),
    ]);
    let d = Daemon::start_with_env(&[
        ("VMLET_IMPORT_DIR", s(scratch.path())),
        // Loopback is denied unless allowed.
        ("VMLET_IMPORT_ALLOWED_NETWORKS", "127.0.0.0/8"),
        // Proxies of the environment are not used: they would connect to
        // addresses that were never checked (nothing listens on port 9).
        ("http_proxy", "http://127.0.0.1:9"),
        ("HTTP_PROXY", "http://127.0.0.1:9"),
        ("all_proxy", "http://127.0.0.1:9"),
    ])
    .await;

    let name = unique_name("web");
    let url = server.url("/images/served.raw");
    let first = start_import(
        &d,
        &json!({"name": name, "url": url, "sha256": sha256_of(&raw)}),
    )
    .await;
    assert_eq!(first["source"], url, "{first}");
    let image = wait_import(&d, &name).await;
    assert_eq!(image["status"], "ready", "{image}");
    assert_eq!(image["source_format"], "raw", "{image}");
    assert_eq!(image["virtual_size"], 4 * MIB, "{image}");
    assert_eq!(image["source_sha256"], sha256_of(&raw), "{image}");
    let stored = image_file(&d, &name);
    assert_eq!(image["sha256"], sha256_of(&stored), "{image}");
    assert!(images_identical(&raw, "raw", &stored, "qcow2"));

    // 404: failed, naming the status.
    let missing = unique_name("missing");
    let error = import_failing(
        &d,
        &json!({"name": missing, "url": server.url("/images/nothing.raw")}),
    )
    .await;
    assert!(error.contains("404"), "error: {error}");
    assert_nothing_stored(&d, &missing);

    // A body shorter than announced: failed.
    let short = unique_name("short");
    import_failing(
        &d,
        &json!({"name": short, "url": server.url("/images/short.raw")}),
    )
    .await;
    assert_nothing_stored(&d, &short);

    // Nobody listening: failed.
    let refused = unique_name("refused");
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    import_failing(
        &d,
        &json!({"name": refused, "url": format!("http://{closed}/x.raw")}),
    )
    .await;
    assert_nothing_stored(&d, &refused);
}

// ---- 5. progress events -----------------------------------------------------------------

#[tokio::test]
async fn import_progress_shows_in_image_events() {
    let import = Scratch::new();
    let d = daemon_importing_from(&import).await;
    let size = 64 * MIB;
    let raw = write_pattern_raw(&import.path().join("big.raw"), size);
    let name = unique_name("big");
    let mut events = d.client.events(None).await.unwrap();
    start_import(&d, &json!({"name": name, "path": raw})).await;

    let mut importing: Vec<Image> = Vec::new();
    let last = loop {
        let event = expect_event(&mut events).await;
        let EventBody::Image { image } = event.body else {
            continue;
        };
        assert_eq!(image.name, name, "an image event of another image");
        match image.status {
            ImageStatus::Importing => importing.push(*image),
            ImageStatus::Ready => break *image,
            ImageStatus::Failed => panic!("import failed: {image:?}"),
        }
    };

    assert!(!importing.is_empty(), "no importing event");
    assert!(
        importing.iter().all(|i| i.progress.is_some()),
        "an importing event without progress: {importing:?}"
    );
    let fetch: Vec<_> = importing
        .iter()
        .filter_map(|i| i.progress.as_ref())
        .filter(|p| p.phase == ImportPhase::Fetch)
        .collect();
    assert!(!fetch.is_empty(), "no fetch progress: {importing:?}");
    assert!(
        fetch.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done),
        "fetch progress goes backwards: {fetch:?}"
    );
    assert!(
        fetch
            .iter()
            .any(|p| p.bytes_total == Some(size) && p.bytes_done == 0),
        "no fetch start with the source size: {fetch:?}"
    );
    assert!(
        fetch
            .iter()
            .any(|p| p.bytes_total == Some(size) && p.bytes_done == size),
        "fetch never reached the whole source: {fetch:?}"
    );
    assert!(
        importing
            .iter()
            .any(|i| i.progress.as_ref().unwrap().phase == ImportPhase::Convert),
        "no convert phase: {importing:?}"
    );
    // Fetch comes before convert.
    let first_convert = importing
        .iter()
        .position(|i| i.progress.as_ref().unwrap().phase == ImportPhase::Convert)
        .unwrap();
    assert!(importing[first_convert..]
        .iter()
        .all(|i| i.progress.as_ref().unwrap().phase == ImportPhase::Convert));

    assert_eq!(last.progress, None, "{last:?}");
    assert_eq!(last.virtual_size, Some(size), "{last:?}");
    assert_eq!(last.source_sha256, Some(sha256_of(&raw)), "{last:?}");
    let (_, shown) = get(&d, &format!("/v1/images/{name}")).await;
    assert_eq!(
        serde_json::from_value::<Image>(shown).unwrap(),
        last,
        "GET equals the last event"
    );

    // Deleting publishes image_deleted.
    let (status, body) = delete(&d, &format!("/v1/images/{name}")).await;
    assert_eq!(status, 204, "{body}");
    loop {
        let event = expect_event(&mut events).await;
        if let EventBody::ImageDeleted { name: deleted } = &event.body {
            assert_eq!(*deleted, name);
            break;
        }
    }
}

// ---- 6. volumes ---------------------------------------------------------------------------

#[tokio::test]
async fn volumes_blank_from_image_resize_and_delete() {
    let import = Scratch::new();
    let d = daemon_importing_from(&import).await;
    let raw = write_pattern_raw(&import.path().join("disk.raw"), 4 * MIB);
    let image = unique_name("img");
    import_ready(&d, &image, &raw).await;

    // Blank.
    let blank = unique_name("blank");
    let volume = create_volume(&d, &json!({"name": blank, "size_mib": 64})).await;
    assert_eq!(volume["name"], blank.as_str(), "{volume}");
    assert_eq!(volume["size_mib"], 64, "{volume}");
    assert_eq!(volume["virtual_size"], 64 * MIB, "{volume}");
    assert_eq!(volume["format"], "qcow2", "{volume}");
    assert_eq!(volume["attached_to"], Value::Null, "{volume}");
    let (status, shown) = get(&d, &format!("/v1/volumes/{blank}")).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["size_mib"], 64, "{shown}");
    assert_eq!(shown["attached_to"], Value::Null, "{shown}");
    let info = image_info(&volume_file(&d, &blank));
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 64 * MIB, "{info}");

    // From an image: a full copy (no backing file), the image's size by
    // default, or bigger.
    let copy = unique_name("copy");
    let volume = create_volume(&d, &json!({"name": copy, "image": image})).await;
    assert_eq!(volume["size_mib"], 4, "{volume}");
    let file = volume_file(&d, &copy);
    assert!(image_info(&file).get("backing-filename").is_none());
    assert!(images_identical(&raw, "raw", &file, "qcow2"));
    let grown = unique_name("grown");
    let volume = create_volume(&d, &json!({"name": grown, "image": image, "size_mib": 16})).await;
    assert_eq!(volume["size_mib"], 16, "{volume}");
    assert_eq!(virtual_size(&volume_file(&d, &grown)), 16 * MIB);

    // Refusals.
    let dup = post(&d, "/v1/volumes", &json!({"name": blank, "size_mib": 8})).await;
    assert_error(&dup, 409, "conflict");
    let answer = post(&d, "/v1/volumes", &json!({"name": "../x", "size_mib": 8})).await;
    assert_invalid_field(&answer, "name");
    let answer = post(&d, "/v1/volumes", &json!({"name": unique_name("v")})).await;
    assert_invalid_field(&answer, "size_mib");
    let answer = post(
        &d,
        "/v1/volumes",
        &json!({"name": unique_name("v"), "size_mib": 0}),
    )
    .await;
    assert_invalid_field(&answer, "size_mib");
    let answer = post(
        &d,
        "/v1/volumes",
        &json!({"name": unique_name("v"), "image": "no-such-image"}),
    )
    .await;
    assert_invalid_field(&answer, "image");
    let answer = post(
        &d,
        "/v1/volumes",
        &json!({"name": unique_name("v"), "image": image, "size_mib": 2}),
    )
    .await;
    assert_invalid_field(&answer, "size_mib");

    // Resize: grow only.
    let (status, resized) = post(
        &d,
        &format!("/v1/volumes/{blank}/resize"),
        &json!({"size_mib": 128}),
    )
    .await;
    assert_eq!(status, 200, "{resized}");
    assert_eq!(resized["size_mib"], 128, "{resized}");
    assert_eq!(virtual_size(&volume_file(&d, &blank)), 128 * MIB);
    let shrink = post(
        &d,
        &format!("/v1/volumes/{blank}/resize"),
        &json!({"size_mib": 64}),
    )
    .await;
    assert_invalid_field(&shrink, "size_mib");
    assert_eq!(virtual_size(&volume_file(&d, &blank)), 128 * MIB);
    let unknown = post(&d, "/v1/volumes/nope/resize", &json!({"size_mib": 64})).await;
    assert_error(&unknown, 404, "not_found");

    // List, delete.
    let mut expected = vec![blank.clone(), copy.clone(), grown.clone()];
    expected.sort();
    assert_eq!(volume_names(&d).await, expected);
    let (status, body) = delete(&d, &format!("/v1/volumes/{blank}")).await;
    assert_eq!(status, 204, "{body}");
    assert!(!volume_file(&d, &blank).exists());
    assert_not_found(&get(&d, &format!("/v1/volumes/{blank}")).await, &blank);
    assert_error(
        &delete(&d, &format!("/v1/volumes/{blank}")).await,
        404,
        "not_found",
    );
    assert_error(&delete(&d, "/v1/volumes/never-was").await, 404, "not_found");
    assert!(!volume_names(&d).await.contains(&blank));
    // No temp files were left by any create.
    let left: Vec<String> = dir_entries(&d.state_dir.join("volumes"))
        .into_iter()
        .filter(|e| e.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "volumes/ holds {left:?}");
    // The image was copied, not used: it can go.
    let (status, body) = delete(&d, &format!("/v1/images/{image}")).await;
    assert_eq!(status, 204, "{body}");
    assert!(images_identical(&raw, "raw", &file, "qcow2"));
}

// ---- 7. VM disks from images, volumes and blank -------------------------------------------

#[tokio::test]
async fn vm_disks_are_overlays_blank_disks_and_volumes() {
    let import = Scratch::new();
    let d = daemon_importing_from(&import).await;
    let raw = write_pattern_raw(&import.path().join("disk.raw"), 4 * MIB);
    let image = unique_name("img");
    import_ready(&d, &image, &raw).await;
    let volume = unique_name("vol");
    create_volume(&d, &json!({"name": volume, "size_mib": 32})).await;

    let vm_name = unique_name("disks");
    let vm = create_vm(
        &d,
        &spec_with_disks(
            &vm_name,
            json!([
                {"name": "root", "image": image, "size_mib": 64},
                {"name": "scratch", "size_mib": 48},
                {"name": "data", "volume": volume},
                {"name": "plain", "image": image},
            ]),
        ),
    )
    .await;
    let id = id_of(&vm);
    assert_eq!(vm["state"], "stopped", "{vm}");

    // The overlay: backed by the image file, at the requested size, with
    // the image's contents.
    let root = vm_disk_file(&d, &id, "root");
    let info = image_info(&root);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 64 * MIB, "{info}");
    let backing = info["full-backing-filename"]
        .as_str()
        .or(info["backing-filename"].as_str())
        .unwrap_or_else(|| panic!("the overlay has no backing file: {info}"));
    assert_eq!(Path::new(backing), image_file(&d, &image), "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    // The image's 4 MiB show through; the rest reads as zeros.
    let root_raw = import.path().join("root-contents.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        s(&root),
        s(&root_raw),
    ]);
    let contents = std::fs::read(&root_raw).unwrap();
    assert_eq!(contents.len() as u64, 64 * MIB);
    assert_eq!(
        &contents[..4 * MIB as usize],
        &std::fs::read(&raw).unwrap()[..]
    );
    assert!(contents[4 * MIB as usize..].iter().all(|b| *b == 0));
    std::fs::remove_file(&root_raw).unwrap();
    // Without size_mib: the image's size.
    assert_eq!(virtual_size(&vm_disk_file(&d, &id, "plain")), 4 * MIB);
    // Blank.
    let scratch_disk = image_info(&vm_disk_file(&d, &id, "scratch"));
    assert_eq!(scratch_disk["virtual-size"], 48 * MIB, "{scratch_disk}");
    assert!(scratch_disk.get("backing-filename").is_none());
    // The volume is used in place.
    assert!(!vm_disk_file(&d, &id, "data").exists());
    let (_, shown) = get(&d, &format!("/v1/volumes/{volume}")).await;
    assert_eq!(
        shown["attached_to"],
        json!({"vm": id, "vm_name": vm_name, "disk": "data"}),
        "{shown}"
    );

    // Refused VMs leave nothing.
    let vms_before = dir_entries(&d.state_dir.join("vms"));
    let answer = post(
        &d,
        "/v1/vms",
        &spec_with_disks(&unique_name("bad"), json!([{"image": "no-such-image"}])),
    )
    .await;
    assert_invalid_field(&answer, "disks[0].image");
    let answer = post(
        &d,
        "/v1/vms",
        &spec_with_disks(
            &unique_name("bad"),
            json!([{"size_mib": 8}, {"volume": "no-such-volume"}]),
        ),
    )
    .await;
    assert_invalid_field(&answer, "disks[1].volume");
    let answer = post(
        &d,
        "/v1/vms",
        &spec_with_disks(
            &unique_name("bad"),
            json!([{"image": image, "size_mib": 1}]),
        ),
    )
    .await;
    assert_invalid_field(&answer, "disks[0].size_mib");
    let answer = post(
        &d,
        "/v1/vms",
        &spec_with_disks(
            &unique_name("bad"),
            json!([{"image": image, "volume": volume}]),
        ),
    )
    .await;
    assert_eq!(answer.0, 422, "two sources: {}", answer.1);
    let answer = post(
        &d,
        "/v1/vms",
        &spec_with_disks(
            &unique_name("thief"),
            json!([{"size_mib": 8}, {"volume": volume}]),
        ),
    )
    .await;
    assert_error(&answer, 409, "conflict");
    assert_eq!(dir_entries(&d.state_dir.join("vms")), vms_before);

    // What the VM uses cannot go.
    let answer = delete(&d, &format!("/v1/images/{image}")).await;
    assert_error(&answer, 409, "conflict");
    assert!(image_file(&d, &image).exists());
    let answer = delete(&d, &format!("/v1/volumes/{volume}")).await;
    assert_error(&answer, 409, "conflict");
    assert!(volume_file(&d, &volume).exists());

    // Deleting the VM removes its own disks only.
    let (status, body) = delete(&d, &format!("/v1/vms/{id}")).await;
    assert_eq!(status, 204, "{body}");
    assert!(
        !d.state_dir.join("vms").join(&id).exists(),
        "the VM's directory is left: {:?}",
        dir_entries(&d.state_dir.join("vms").join(&id))
    );
    assert!(image_file(&d, &image).exists());
    assert!(volume_file(&d, &volume).exists());
    let (_, shown) = get(&d, &format!("/v1/volumes/{volume}")).await;
    assert_eq!(shown["attached_to"], Value::Null, "{shown}");
    let (status, body) = delete(&d, &format!("/v1/images/{image}")).await;
    assert_eq!(status, 204, "{body}");
    assert_nothing_stored(&d, &image);

    // The freed volume can be used again; delete_volumes takes it along.
    let vm = create_vm(
        &d,
        &spec_with_disks(&unique_name("again"), json!([{"volume": volume}])),
    )
    .await;
    let id = id_of(&vm);
    let (status, body) = delete(&d, &format!("/v1/vms/{id}?delete_volumes=true")).await;
    assert_eq!(status, 204, "{body}");
    assert!(!volume_file(&d, &volume).exists());
    assert_error(
        &get(&d, &format!("/v1/volumes/{volume}")).await,
        404,
        "not_found",
    );
    assert!(!d.state_dir.join("vms").join(&id).exists());
}

// ---- 8. offline snapshots ------------------------------------------------------------------

#[tokio::test]
async fn offline_snapshots_of_a_stopped_vm() {
    let d = Daemon::start().await;
    let vm = create_vm(
        &d,
        &spec_with_disks(&unique_name("snap"), json!([{"name": "d", "size_mib": 16}])),
    )
    .await;
    let id = id_of(&vm);
    let disk = vm_disk_file(&d, &id, "d");
    let snapshots = format!("/v1/vms/{id}/snapshots");
    let io = |cmd: &str| {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(&disk)
            .output()
            .expect("running qemu-io");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !text.contains("fail"),
            "qemu-io {cmd}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    let (status, list) = get(&d, &snapshots).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["snapshots"], json!([]), "{list}");

    let (status, snap) = post(&d, &snapshots, &json!({"name": "s1"})).await;
    assert_eq!(status, 201, "{snap}");
    assert_eq!(snap["name"], "s1", "{snap}");
    assert_eq!(snap["vm_state"], false, "{snap}");
    assert!(snap["created_at"].as_str().is_some(), "{snap}");
    let info = image_info(&disk);
    let tags: Vec<&str> = info["snapshots"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(tags, vec!["s1"], "qemu-img sees: {info}");

    let (_, list) = get(&d, &snapshots).await;
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["s1"], "{list}");

    assert_error(
        &post(&d, &snapshots, &json!({"name": "s1"})).await,
        409,
        "conflict",
    );
    assert_invalid_field(
        &post(&d, &snapshots, &json!({"name": "../x"})).await,
        "name",
    );

    // Write after the snapshot; reverting brings back the zeros.
    io("write -P 0xab 0 64k");
    io("read -P 0xab 0 64k");
    let (status, reverted) = post(&d, &format!("{snapshots}/s1/revert"), &json!({})).await;
    assert_eq!(status, 200, "{reverted}");
    assert_eq!(reverted["state"], "stopped", "{reverted}");
    io("read -P 0 0 64k");

    let unknown = post(&d, &format!("{snapshots}/nope/revert"), &json!({})).await;
    assert_not_found(&unknown, "nope");
    assert_error(
        &delete(&d, &format!("{snapshots}/nope")).await,
        404,
        "not_found",
    );

    let (status, body) = delete(&d, &format!("{snapshots}/s1")).await;
    assert_eq!(status, 204, "{body}");
    let (_, list) = get(&d, &snapshots).await;
    assert_eq!(list["snapshots"], json!([]), "{list}");
    assert!(image_info(&disk)
        .get("snapshots")
        .is_none_or(|s| s.as_array().is_some_and(|a| a.is_empty())));

    // Unknown VM.
    let answer = post(&d, "/v1/vms/no-such-vm/snapshots", &json!({"name": "s"})).await;
    assert_error(&answer, 404, "not_found");

    // A writable raw disk cannot be snapshotted; a read-only one may stay
    // out of the snapshot.
    let raw = d.scratch().join("plain.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let raw_vm = create_vm(
        &d,
        &spec_with_disks(
            &unique_name("raw"),
            json!([{"size_mib": 8}, {"path": raw, "format": "raw"}]),
        ),
    )
    .await;
    let answer = post(
        &d,
        &format!("/v1/vms/{}/snapshots", id_of(&raw_vm)),
        &json!({"name": "s1"}),
    )
    .await;
    let error = assert_error(&answer, 409, "conflict");
    assert!(
        error["message"].as_str().unwrap().contains("raw"),
        "{error}"
    );
    let ro_vm = create_vm(
        &d,
        &spec_with_disks(
            &unique_name("ro"),
            json!([{"name": "d", "size_mib": 8}, {"path": raw, "format": "raw", "read_only": true}]),
        ),
    )
    .await;
    let (status, snap) = post(
        &d,
        &format!("/v1/vms/{}/snapshots", id_of(&ro_vm)),
        &json!({"name": "s1"}),
    )
    .await;
    assert_eq!(status, 201, "{snap}");
}

// ---- 9. a full disk --------------------------------------------------------------------------

#[tokio::test]
async fn a_full_disk_gives_507_and_leaves_nothing() {
    let import = Scratch::new();
    // The capacity check would refuse first (a 16 MiB file system offers
    // 0 GiB): this test is about what happens when the disk really fills.
    let mut d = Daemon::start_with_env(&[
        ("VMLET_IMPORT_DIR", s(import.path())),
        ("VMLET_CAPACITY_DISK_GIB", "100"),
    ])
    .await;
    // The state directory moves onto a small tmpfs.
    d.kill();
    let mount = match TmpfsMount::mount(&d.state_dir, "16M") {
        Ok(mount) => mount,
        Err(e) => {
            common::skip(
                "a_full_disk_gives_507_and_leaves_nothing",
                format!("cannot mount a tmpfs ({e})"),
            );
            return;
        }
    };
    d.start_again().await;

    // An image of random data (stored about as big as its source).
    let image = unique_name("rand");
    let source = write_random(&import.path().join("rand.raw"), 4 * MIB);
    import_ready(&d, &image, &source).await;

    // Leave 3 MiB free: too little for a 4 MiB copy.
    let filler = mount.path().join("filler");
    let free = mount.free_bytes();
    assert!(free > 4 * MIB, "the tmpfs has only {free} bytes free");
    std::fs::write(&filler, vec![0u8; (free - 3 * MIB) as usize]).unwrap();

    let name = unique_name("full");
    let answer = post(&d, "/v1/volumes", &json!({"name": name, "image": image})).await;
    let error = assert_error(&answer, 507, "no_space");
    assert!(
        error["message"].as_str().unwrap().contains("space"),
        "{error}"
    );
    let volumes = dir_entries(&d.state_dir.join("volumes"));
    assert!(volumes.is_empty(), "volumes/ holds {volumes:?}");
    assert!(!volume_names(&d).await.contains(&name));

    // An import that runs out of space while converting (2 MiB fetched,
    // 2 MiB more needed) or while fetching (4 MiB, the error on its last
    // write): failed, nothing left.
    let small = write_random(&import.path().join("small.raw"), 2 * MIB);
    let big = write_random(&import.path().join("big.raw"), 4 * MIB);
    for (path, phase) in [(small, "qemu-img convert"), (big, "writing")] {
        let name = unique_name("nospace");
        let error = import_failing(&d, &json!({"name": name, "path": path})).await;
        assert!(
            error.contains("No space left on device") && error.starts_with(phase),
            "error of {} should start with {phase:?}: {error}",
            path.display()
        );
        assert_nothing_stored(&d, &name);
    }

    // A VM with a cloud-init seed, made while there is room for its record.
    let mut seeded = guest_spec_json(&unique_name("seeded"), "guest.action=hold");
    seeded["cloud_init"] = json!({"user_data": "#cloud-config\n"});
    let (status, seeded) = post(&d, "/v1/vms", &seeded).await;
    assert_eq!(status, 201, "{seeded}");

    // A VM whose blank disk does not fit: 507, no VM, no directory.
    let full = mount.path().join("filler-rest");
    std::fs::write(&full, vec![0u8; mount.free_bytes() as usize]).unwrap();

    // Starting the seeded VM cannot write its seed: 507 too, not 503, and
    // no QEMU runs.
    let seeded_id = seeded["id"].as_str().unwrap().to_string();
    let answer = post(&d, &format!("/v1/vms/{seeded_id}/start"), &json!({})).await;
    assert_error(&answer, 507, "no_space");
    assert!(d.qemu_pids().is_empty(), "a QEMU runs: {:?}", d.qemu_pids());
    let (status, body) = call(&d, Method::DELETE, &format!("/v1/vms/{seeded_id}"), None).await;
    assert_eq!(status, 204, "{body}");
    let vm_name = unique_name("nospace");
    let answer = post(
        &d,
        "/v1/vms",
        &spec_with_disks(&vm_name, json!([{"name": "d", "size_mib": 64}])),
    )
    .await;
    assert_error(&answer, 507, "no_space");
    let (_, vms) = get(&d, "/v1/vms").await;
    assert_eq!(vms["vms"], json!([]), "{vms}");
    // (Empty directories vms/UUID/disks are left: reported; only files
    // are checked here.)
    let left = files_under(&d.state_dir.join("vms"));
    assert!(
        left.is_empty(),
        "a VM that could not be created left {left:?}"
    );
    std::fs::remove_file(&full).unwrap();

    // With space again, the same copy works.
    std::fs::remove_file(&filler).unwrap();
    let volume = create_volume(&d, &json!({"name": name, "image": image})).await;
    assert_eq!(volume["size_mib"], 4, "{volume}");
    assert!(images_identical(
        &source,
        "raw",
        &volume_file(&d, &name),
        "qcow2"
    ));
    // Unmount (`mount` drops before `d`, whose scratch directory holds the
    // mount point) with the daemon gone, so the tmpfs is not busy.
    d.kill();
}
