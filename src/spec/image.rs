//! Images of the image store as the API shows them, and the import request.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// An image as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Image {
    /// Unique name.
    pub name: String,
    /// Where it is in its life.
    pub status: ImageStatus,
    /// Where it was imported from: a path, or a URL without credentials,
    /// query or fragment.
    pub source: String,
    /// The format the source was in (detected, never taken from the name).
    #[serde(default)]
    pub source_format: Option<String>,
    /// Stored format (always `qcow2`).
    pub format: String,
    /// Size the guest sees, in bytes.
    #[serde(default)]
    pub virtual_size: Option<u64>,
    /// Bytes the stored file uses on the host.
    #[serde(default)]
    pub actual_size: Option<u64>,
    /// SHA-256 of the stored qcow2 file: it never changes.
    #[serde(default)]
    pub sha256: Option<String>,
    /// SHA-256 of the source as downloaded or read.
    #[serde(default)]
    pub source_sha256: Option<String>,
    /// Progress of an import under way.
    #[serde(default)]
    pub progress: Option<ImportProgress>,
    /// Why the import failed.
    #[serde(default)]
    pub error: Option<String>,
    /// When the import began (RFC 3339, UTC).
    pub created_at: String,
}

/// An image's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    /// Being imported; not usable yet.
    Importing,
    /// Usable by VMs.
    Ready,
    /// The import failed (`error` says why); nothing was stored.
    Failed,
}

impl ImageStatus {
    /// The status as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageStatus::Importing => "importing",
            ImageStatus::Ready => "ready",
            ImageStatus::Failed => "failed",
        }
    }
}

/// How far an import got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportProgress {
    /// What the import is doing.
    pub phase: ImportPhase,
    /// Source bytes read so far.
    pub bytes_done: u64,
    /// Source size, when known.
    #[serde(default)]
    pub bytes_total: Option<u64>,
}

/// Phases of an import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImportPhase {
    /// Reading the source (download or local copy) and hashing it.
    Fetch,
    /// Inspecting and converting to qcow2.
    Convert,
}

impl ImportPhase {
    /// The phase as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ImportPhase::Fetch => "fetch",
            ImportPhase::Convert => "convert",
        }
    }
}

/// `POST /v1/images`: give `path` (a file under the import directory) or
/// `url` (http or https).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageImport {
    /// The image's name.
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// A file under the import directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub path: Option<PathBuf>,
    /// An http(s) URL, streamed to disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Expected SHA-256 of the source (hex); checked before the image
    /// becomes visible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}
