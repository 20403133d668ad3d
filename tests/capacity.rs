//! The scheduler's capacity view through a real daemon: `GET /v1/node`'s
//! inventory is consistent with the VMs present, and a VM that does not fit
//! gets 409 naming the resource (nothing is created). No guest boots: VMs
//! take capacity from their creation, like placement allocations.

mod common;

use common::api::{assert_error, call, create_vm, expect, force_delete_vm, id_of};
use common::daemon::{guest_spec_json, unique_name, Daemon};
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
