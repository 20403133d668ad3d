//! The hardware a VM is pinned to: its versioned machine type and CPU model.

use serde::{Deserialize, Serialize};

/// The versioned machine type and CPU model a VM was created with. Set by
/// vmlet (never by a caller) from the VM's profile, resolved through the
/// QEMU it runs with: `pc-q35-10.0`, never the alias `q35`, so that a QEMU
/// upgrade never changes the guest's hardware and the VM can move to a host
/// whose QEMU offers the same machine type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachinePin {
    /// The versioned machine type (`pc-q35-10.0`, `microvm`): `-machine`.
    #[serde(rename = "type")]
    pub machine_type: String,
    /// The CPU model with any feature flags (`qemu64`,
    /// `qemu64,+aes,+popcnt`): `-cpu`.
    pub cpu: String,
}
