//! Sample VMs, images and volumes for the rendering tests of every
//! subcommand.

use uuid::Uuid;

use crate::spec::VmSpec;
use crate::storage::images::{Image, ImageStatus, ImportPhase, ImportProgress};
use crate::storage::volumes::Volume;
use crate::vm::Vm;

/// A stopped VM `name` (2 vCPUs, 512 MiB, a kernel boot) with the UUID
/// `uuid`.
pub(super) fn vm(name: &str, uuid: u128) -> Vm {
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "uuid": Uuid::from_u128(uuid),
        "name": name,
        "vcpus": 2,
        "memory_mib": 512,
        "boot": {"type": "kernel", "kernel": "/k/vmlinuz"},
    }))
    .unwrap();
    let mut vm = Vm::new(spec);
    vm.created_at = "2024-05-01T10:00:00.000Z".into();
    vm.updated_at = "2024-05-01T10:00:05.000Z".into();
    vm
}

/// A VM's state as the client receives it in a view (the daemon changes
/// it only through its transition table).
pub(super) fn as_received(state: crate::vm::state::PowerState) -> crate::vm::state::Observed {
    serde_json::from_value(serde_json::json!(state)).unwrap()
}

/// An image `name` in `status`, with nothing known yet but its source.
pub(super) fn image(name: &str, status: ImageStatus) -> Image {
    Image {
        name: name.into(),
        status,
        source: format!("/srv/import/{name}.raw"),
        source_format: None,
        format: "qcow2".into(),
        virtual_size: None,
        actual_size: None,
        sha256: None,
        source_sha256: None,
        progress: None,
        error: None,
        created_at: "2024-05-01T10:00:00.000Z".into(),
    }
}

/// A ready 64 MiB image `name`, imported from raw.
pub(super) fn ready_image(name: &str) -> Image {
    Image {
        source_format: Some("raw".into()),
        virtual_size: Some(64 << 20),
        actual_size: Some(200_704),
        sha256: Some("ab".repeat(32)),
        source_sha256: Some("cd".repeat(32)),
        ..image(name, ImageStatus::Ready)
    }
}

/// Fetch progress: `done` of `total` bytes.
pub(super) fn fetch(done: u64, total: Option<u64>) -> ImportProgress {
    ImportProgress {
        phase: ImportPhase::Fetch,
        bytes_done: done,
        bytes_total: total,
    }
}

/// A detached qcow2 volume `name` of `size_mib` MiB.
pub(super) fn volume(name: &str, size_mib: u64) -> Volume {
    Volume {
        name: name.into(),
        size_mib,
        virtual_size: size_mib << 20,
        actual_size: Some(196_608),
        format: "qcow2".into(),
        attached_to: None,
        created_at: "2024-05-01T10:00:00.000Z".into(),
    }
}
