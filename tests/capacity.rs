//! The scheduler's capacity view through a real daemon: `GET /v1/node`'s
//! inventory is consistent with the VMs present, and a VM that does not fit
//! gets 409 naming the resource (nothing is created). No guest boots: VMs
//! take capacity from their creation, like placement allocations.

mod common;

use std::time::Duration;

use common::api::{assert_error, call, create_vm, expect, force_delete_vm, id_of};
use common::daemon::{guest_spec_json, unique_name, wait_until, Daemon};
use common::storage::create_image;
use common::Scratch;
use serde_json::{json, Value};
use vmlet::client::Method;

fn spec(vcpus: u32, memory_mib: u64) -> Value {
    let mut spec = guest_spec_json(&unique_name("cap"), "");
    spec["vcpus"] = json!(vcpus);
    spec["memory_mib"] = json!(memory_mib);
    spec
}

async fn inventory(d: &Daemon) -> Value {
    expect(d, Method::GET, "/v1/node", None, 200).await["inventory"].clone()
}

#[tokio::test]
async fn a_vm_that_does_not_fit_is_refused_naming_the_resource() {
    let d = Daemon::start_with_env(&[
        ("VMLET_CAPACITY_VCPUS", "4"),
        ("VMLET_CAPACITY_MEMORY_MIB", "1024"),
        ("VMLET_CAPACITY_DISK_GIB", "2"),
        ("VMLET_RESERVED_MEMORY_MIB", "128"),
        ("VMLET_CPU_ALLOCATION_RATIO", "1.5"),
    ])
    .await;
    let inv = inventory(&d).await;
    assert_eq!(inv["vcpus"]["total"], 4);
    assert_eq!(inv["vcpus"]["allocation_ratio"], 1.5);
    assert_eq!(inv["vcpus"]["free"], 6);
    assert_eq!(inv["memory_mib"]["free"], 1024 - 128);
    assert_eq!(inv["disk_gib"]["free"], 2);

    let a = create_vm(&d, &spec(4, 256)).await;
    let mut with_disk = spec(1, 256);
    with_disk["disks"] = json!([{"size_mib": 1536}]);
    let b = create_vm(&d, &with_disk).await;
    let inv = inventory(&d).await;
    assert_eq!(inv["vcpus"]["allocated"], 5);
    assert_eq!(inv["vcpus"]["free"], 1);
    assert_eq!(inv["memory_mib"]["allocated"], 512);
    assert_eq!(inv["memory_mib"]["free"], 1024 - 128 - 512);
    assert_eq!(inv["disk_gib"]["allocated"], 2);
    assert_eq!(inv["disk_gib"]["free"], 0);

    // Each resource that does not fit is named; nothing is created.
    for (too_big, resource) in [
        (spec(2, 128), "vcpus"),
        (spec(1, 512), "memory_mib"),
        (
            {
                let mut s = spec(1, 128);
                s["disks"] = json!([{"size_mib": 100}]);
                s
            },
            "disk_gib",
        ),
    ] {
        let answer = call(&d, Method::POST, "/v1/vms", Some(&too_big)).await;
        let error = assert_error(&answer, 409, "conflict");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("not enough {resource}")),
            "{message}"
        );
    }
    let vms = expect(&d, Method::GET, "/v1/vms", None, 200).await;
    assert_eq!(vms["vms"].as_array().map(Vec::len), Some(2), "{vms}");

    // What fits does; deleting a VM frees its share.
    create_vm(&d, &spec(1, 128)).await;
    assert_eq!(inventory(&d).await["vcpus"]["free"], 0);
    force_delete_vm(&d, &id_of(&a)).await;
    force_delete_vm(&d, &id_of(&b)).await;
    let inv = inventory(&d).await;
    assert_eq!(inv["vcpus"]["allocated"], 1);
    assert_eq!(inv["vcpus"]["free"], 5);
    assert_eq!(inv["disk_gib"]["free"], 2);
}

#[tokio::test]
async fn enforcement_can_be_turned_off() {
    let d = Daemon::start_with_env(&[
        ("VMLET_CAPACITY_VCPUS", "1"),
        ("VMLET_CPU_ALLOCATION_RATIO", "1"),
        ("VMLET_CAPACITY_ENFORCE", "false"),
    ])
    .await;
    create_vm(&d, &spec(2, 128)).await;
    create_vm(&d, &spec(2, 128)).await;
    let inv = inventory(&d).await;
    assert_eq!(inv["vcpus"]["allocated"], 4);
    assert_eq!(inv["vcpus"]["free"], -3);
}

/// The VM directories in the daemon's state directory.
fn vm_dirs(d: &Daemon) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(d.state_dir.join("vms"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// Two creates that each fit alone but not together, sent at once: the
/// capacity check and the place it promises are one step, so exactly one
/// is admitted and the other gets 409, even while the first is still
/// making its disks (a blank disk, an overlay on an image). The refused
/// one leaves nothing: no VM, no directory, no allocation.
#[tokio::test]
async fn concurrent_creates_that_fit_only_one_at_a_time_admit_one() {
    let import = Scratch::new();
    let d = Daemon::start_with_env(&[
        ("VMLET_CAPACITY_VCPUS", "2"),
        ("VMLET_CPU_ALLOCATION_RATIO", "1"),
        ("VMLET_IMPORT_DIR", import.path().to_str().unwrap()),
    ])
    .await;
    let image = unique_name("base");
    let file = create_image(import.path(), "base.qcow2", "qcow2", "64M");
    let (status, body) = call(
        &d,
        Method::POST,
        "/v1/images",
        Some(&json!({"name": image, "path": file})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let path = format!("/v1/images/{image}");
    let shown = wait_until("the image import", Duration::from_secs(60), || async {
        let shown = expect(&d, Method::GET, &path, None, 200).await;
        (shown["status"] != "importing").then_some(shown)
    })
    .await;
    assert_eq!(shown["status"], "ready", "{shown}");

    // Each VM takes both vCPUs; its disks make the create slow enough
    // for the other to arrive while it is under way.
    let disks = [
        json!([{"size_mib": 64}]),
        json!([{"image": image}]),
        json!([{"image": image}, {"size_mib": 32}]),
    ];
    for (round, disks) in disks.iter().enumerate() {
        let specs: Vec<Value> = (0..2)
            .map(|_| {
                let mut s = spec(2, 128);
                s["disks"] = disks.clone();
                s
            })
            .collect();
        let (a, b) = tokio::join!(
            call(&d, Method::POST, "/v1/vms", Some(&specs[0])),
            call(&d, Method::POST, "/v1/vms", Some(&specs[1])),
        );
        let mut statuses = [a.0, b.0];
        statuses.sort();
        assert_eq!(statuses, [201, 409], "round {round}: {} / {}", a.1, b.1);
        let (admitted, refused) = if a.0 == 201 { (a, b) } else { (b, a) };
        let error = assert_error(&refused, 409, "conflict");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("not enough vcpus"),
            "round {round}: {message}"
        );

        let id = id_of(&admitted.1);
        let vms = expect(&d, Method::GET, "/v1/vms", None, 200).await;
        let ids: Vec<&str> = vms["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [id.as_str()], "round {round}: {vms}");
        assert_eq!(
            vm_dirs(&d),
            std::slice::from_ref(&id),
            "round {round}: the refused VM left files"
        );
        let inv = inventory(&d).await;
        assert_eq!(inv["vcpus"]["allocated"], 2, "round {round}: {inv}");
        force_delete_vm(&d, &id).await;
        assert_eq!(inventory(&d).await["vcpus"]["allocated"], 0);
        assert!(vm_dirs(&d).is_empty(), "round {round}: {:?}", vm_dirs(&d));
    }
    let (status, body) = call(&d, Method::DELETE, &path, None).await;
    assert_eq!(status, 204, "{body}");
}

/// Growth by edits holds its place like a create: two edits (or an edit
/// and a create) that each fit alone but not together, sent at once, admit
/// one and refuse the other with 409, every round; the refused VM keeps its
/// spec and the inventory counts only what was admitted.
#[tokio::test]
async fn concurrent_growth_that_fits_only_one_at_a_time_admits_one() {
    let d = Daemon::start_with_env(&[
        ("VMLET_CAPACITY_VCPUS", "3"),
        ("VMLET_CPU_ALLOCATION_RATIO", "1"),
    ])
    .await;
    let a = id_of(&create_vm(&d, &spec(1, 128)).await);
    let b = id_of(&create_vm(&d, &spec(1, 128)).await);
    let grow = |id: String, vcpus: u32| {
        let d = &d;
        async move {
            call(
                d,
                Method::PATCH,
                &format!("/v1/vms/{id}"),
                Some(&json!({"vcpus": vcpus})),
            )
            .await
        }
    };
    let vcpus_of = |answer: &(u16, Value)| answer.1["spec"]["vcpus"].as_u64();
    for round in 0..4 {
        // 2 of 3 vCPUs taken: one VM may grow by one, not both.
        let (x, y) = tokio::join!(grow(a.clone(), 2), grow(b.clone(), 2));
        let mut statuses = [x.0, y.0];
        statuses.sort();
        assert_eq!(statuses, [200, 409], "round {round}: {} / {}", x.1, y.1);
        let (grown, kept, refused) = if x.0 == 200 {
            (&a, &b, &y)
        } else {
            (&b, &a, &x)
        };
        let error = assert_error(refused, 409, "conflict");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("not enough vcpus"),
            "round {round}: {error}"
        );
        let view = expect(&d, Method::GET, &format!("/v1/vms/{kept}"), None, 200).await;
        assert_eq!(view["spec"]["vcpus"], 1, "round {round}: {view}");
        assert_eq!(
            inventory(&d).await["vcpus"]["allocated"],
            3,
            "round {round}"
        );
        // Back to 1 + 1.
        let back = grow(grown.clone(), 1).await;
        assert_eq!((back.0, vcpus_of(&back)), (200, Some(1)), "{}", back.1);
    }
    // An edit and a create at once: one place left for either.
    for round in 0..3 {
        let new = spec(1, 128);
        let (edit, create) = tokio::join!(
            grow(a.clone(), 2),
            call(&d, Method::POST, "/v1/vms", Some(&new)),
        );
        let admitted = [edit.0 == 200, create.0 == 201];
        assert!(
            admitted == [true, false] || admitted == [false, true],
            "round {round}: edit {} {} / create {} {}",
            edit.0,
            edit.1,
            create.0,
            create.1
        );
        assert_eq!(
            inventory(&d).await["vcpus"]["allocated"],
            3,
            "round {round}"
        );
        if admitted[0] {
            assert_error(&create, 409, "conflict");
            let back = grow(a.clone(), 1).await;
            assert_eq!(back.0, 200, "{}", back.1);
        } else {
            assert_error(&edit, 409, "conflict");
            force_delete_vm(&d, &id_of(&create.1)).await;
        }
    }
    force_delete_vm(&d, &a).await;
    force_delete_vm(&d, &b).await;
}
