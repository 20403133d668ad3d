//! Named volumes as the API shows them, and the requests that make and grow
//! them.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A volume as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Volume {
    /// Unique name.
    pub name: String,
    /// Size the guest sees, in MiB (rounded down).
    pub size_mib: u64,
    /// Size the guest sees, in bytes.
    pub virtual_size: u64,
    /// Bytes used on the host.
    #[serde(default)]
    pub actual_size: Option<u64>,
    /// Stored format (always `qcow2`).
    pub format: String,
    /// The VM disk using it, if any.
    #[serde(default)]
    pub attached_to: Option<VolumeAttachment>,
    /// When the file was created (RFC 3339, UTC).
    pub created_at: String,
}

/// Which VM disk uses a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeAttachment {
    /// The VM's UUID.
    pub vm: Uuid,
    /// The VM's name.
    pub vm_name: String,
    /// The disk's name in the VM.
    pub disk: String,
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    /// The volume's name.
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// Size in MiB (with `image`: at least the image's size; default: it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 67_108_864)]
    pub size_mib: Option<u64>,
    /// Copy this image's contents (a full copy: the volume does not depend
    /// on the image afterwards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// `POST /v1/volumes/{name}/resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeResize {
    /// New size in MiB; must not be smaller than the current size.
    #[schema(minimum = 1, maximum = 67_108_864)]
    pub size_mib: u64,
}
