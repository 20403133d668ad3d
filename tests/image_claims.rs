//! Image claims through a real daemon: an image stays while an operation
//! that names it (an attach, an edit) is under way, and no VM ever ends up
//! naming an image that was deleted. Disks from images are made only with
//! their VM, so the attach and the edit are refused (422) and the image
//! delete either waits its turn (409 while the attach holds the image) or
//! goes through, never both in a way that leaves a VM on a missing image.

mod common;

use std::path::Path;
use std::time::Duration;

use common::api::{assert_error, call, create_vm, expect, id_of};
use common::daemon::{guest_spec_json, unique_name, wait_until, Daemon};
use common::storage::create_image;
use common::Scratch;
use serde_json::{json, Value};
use vmlet::client::Method;

/// Imports `file` as image `name` and waits until it is ready.
async fn import(d: &Daemon, name: &str, file: &Path) {
    let body = json!({"name": name, "path": file});
    let (status, answer) = call(d, Method::POST, "/v1/images", Some(&body)).await;
    assert_eq!(status, 202, "{answer}");
    let path = format!("/v1/images/{name}");
    let shown = wait_until("the image import", Duration::from_secs(60), || async {
        let shown = expect(d, Method::GET, &path, None, 200).await;
        (shown["status"] != "importing").then_some(shown)
    })
    .await;
    assert_eq!(shown["status"], "ready", "{shown}");
}

async fn disks_of(d: &Daemon, id: &str) -> Value {
    expect(d, Method::GET, &format!("/v1/vms/{id}"), None, 200).await["spec"]["disks"].clone()
}

#[tokio::test]
async fn an_image_is_never_deleted_from_under_a_disk_being_added() {
    let import_dir = Scratch::new();
    let d =
        Daemon::start_with_env(&[("VMLET_IMPORT_DIR", import_dir.path().to_str().unwrap())]).await;
    let file = create_image(import_dir.path(), "base.qcow2", "qcow2", "64M");
    let image = unique_name("base");
    import(&d, &image, &file).await;
    let vm = create_vm(&d, &guest_spec_json(&unique_name("claims"), "")).await;
    let id = id_of(&vm);
    let image_path = format!("/v1/images/{image}");

    for round in 0..4 {
        let attach_path = format!("/v1/vms/{id}/disks");
        let attach_body = json!({"image": image});
        let (attach, deleted) = tokio::join!(
            call(&d, Method::POST, &attach_path, Some(&attach_body)),
            call(&d, Method::DELETE, &image_path, None),
        );
        // The attach never succeeds: an overlay is made only with its VM.
        match attach.0 {
            422 => {
                assert_error(&attach, 422, "invalid_spec");
            }
            // The delete held the image alone while the attach came.
            409 => {
                let error = assert_error(&attach, 409, "conflict");
                assert!(
                    error["message"].as_str().unwrap().contains("image"),
                    "round {round}: {error}"
                );
            }
            other => panic!("round {round}: attach answered {other}: {}", attach.1),
        }
        match deleted.0 {
            204 => {
                let (status, _) = call(&d, Method::GET, &image_path, None).await;
                assert_eq!(
                    status, 404,
                    "round {round}: the deleted image is still listed"
                );
                import(&d, &image, &file).await;
            }
            409 => {
                // The attach held the image: it stays, whole.
                let error = assert_error(&deleted, 409, "conflict");
                assert!(
                    error["message"]
                        .as_str()
                        .unwrap()
                        .contains("in use by another operation"),
                    "round {round}: {error}"
                );
                expect(&d, Method::GET, &image_path, None, 200).await;
            }
            other => panic!("round {round}: delete answered {other}: {}", deleted.1),
        }
        assert_eq!(disks_of(&d, &id).await, json!([]), "round {round}");
    }

    // An edit cannot add a disk from an image either; the image stays.
    let patch = json!({"disks": [{"image": image}]});
    let answer = call(&d, Method::PATCH, &format!("/v1/vms/{id}"), Some(&patch)).await;
    assert_error(&answer, 422, "invalid_spec");
    assert_eq!(disks_of(&d, &id).await, json!([]));
    expect(&d, Method::GET, &image_path, None, 200).await;

    // Once nothing holds or uses it, the image goes.
    expect(&d, Method::DELETE, &format!("/v1/vms/{id}"), None, 204).await;
    expect(&d, Method::DELETE, &image_path, None, 204).await;
}
