//! `qemu-img`, run with argument lists (never a shell). Failures carry the
//! tool's stderr; a full disk becomes [`StorageError::NoSpace`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::storage::StorageError;

/// The `qemu-img` binary to run.
#[derive(Debug, Clone)]
pub struct QemuImg {
    binary: PathBuf,
}

/// What `qemu-img info --output=json` says of an image (the fields vmlet
/// uses).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// Detected or given format (`raw`, `qcow2`, `vmdk`, …).
    pub format: String,
    /// Size the guest sees, in bytes.
    pub virtual_size: u64,
    /// Bytes used on the host.
    #[serde(default)]
    pub actual_size: Option<u64>,
    /// The backing file named in the image header, if any.
    #[serde(default)]
    pub backing_filename: Option<String>,
    /// Internal snapshots (qcow2).
    #[serde(default)]
    pub snapshots: Vec<SnapshotInfo>,
    /// Format-specific details (qcow2 `data-file`, vmdk `extents`).
    #[serde(default)]
    pub format_specific: Option<serde_json::Value>,
}

impl ImageInfo {
    /// Files other than the image itself that reading it would open: a
    /// qcow2 external data file, vmdk extents stored elsewhere. Such an
    /// uploaded image could read any host file, so imports refuse it.
    pub fn external_files(&self, own_path: &Path) -> Vec<String> {
        let Some(specific) = &self.format_specific else {
            return vec![];
        };
        let data = &specific["data"];
        let mut files = Vec::new();
        if let Some(data_file) = data["data-file"].as_str() {
            files.push(data_file.to_string());
        }
        if let Some(extents) = data["extents"].as_array() {
            for extent in extents {
                if let Some(name) = extent["filename"].as_str() {
                    if Path::new(name) != own_path {
                        files.push(name.to_string());
                    }
                }
            }
        }
        files
    }
}

/// One internal snapshot as `qemu-img info` lists it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// Snapshot id.
    pub id: String,
    /// Snapshot tag (its name).
    pub name: String,
    /// Bytes of saved guest memory and device state (0: disks only).
    #[serde(default)]
    pub vm_state_size: u64,
    /// When it was taken (seconds since the epoch).
    #[serde(default)]
    pub date_sec: u64,
}

/// What `qemu-img snapshot` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotCommand {
    /// `-c`: take.
    Create,
    /// `-a`: revert to.
    Apply,
    /// `-d`: delete.
    Delete,
}

impl QemuImg {
    /// Runs `binary`.
    pub fn new(binary: &Path) -> QemuImg {
        QemuImg {
            binary: binary.to_path_buf(),
        }
    }

    /// `qemu-img info`. `format`: the format to open it as (`None`: probe,
    /// only for files being inspected before import). `force_share` reads an
    /// image a running QEMU holds.
    pub async fn info(
        &self,
        path: &Path,
        format: Option<&str>,
        force_share: bool,
    ) -> Result<ImageInfo, StorageError> {
        let mut args = vec!["info".to_string(), "--output=json".into()];
        if let Some(format) = format {
            args.extend(["-f".into(), format.into()]);
        }
        if force_share {
            args.push("-U".into());
        }
        args.push(path_arg(path));
        let out = self.run(&args).await?;
        serde_json::from_str(&out)
            .map_err(|e| StorageError::Failed(format!("qemu-img info {}: {e}", path.display())))
    }

    /// Converts `src` (of format `src_format`) to a new qcow2 file `dst`.
    pub async fn convert_to_qcow2(
        &self,
        src: &Path,
        src_format: &str,
        dst: &Path,
    ) -> Result<(), StorageError> {
        self.run(&[
            "convert".into(),
            "-f".into(),
            src_format.into(),
            "-O".into(),
            "qcow2".into(),
            path_arg(src),
            path_arg(dst),
        ])
        .await
        .map(drop)
    }

    /// Creates a blank qcow2 image of `size` bytes.
    pub async fn create(&self, path: &Path, size: u64) -> Result<(), StorageError> {
        self.run(&[
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            path_arg(path),
            size.to_string(),
        ])
        .await
        .map(drop)
    }

    /// Creates a qcow2 overlay on the qcow2 image `backing`, `size` bytes big.
    pub async fn create_overlay(
        &self,
        path: &Path,
        backing: &Path,
        size: u64,
    ) -> Result<(), StorageError> {
        self.run(&[
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-b".into(),
            backing.to_string_lossy().into_owned(),
            "-F".into(),
            "qcow2".into(),
            path_arg(path),
            size.to_string(),
        ])
        .await
        .map(drop)
    }

    /// Grows a qcow2 image to `size` bytes (`--shrink` is never passed).
    pub async fn resize(&self, path: &Path, size: u64) -> Result<(), StorageError> {
        self.run(&[
            "resize".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            path_arg(path),
            size.to_string(),
        ])
        .await
        .map(drop)
    }

    /// Takes, applies or deletes internal snapshot `name` of a qcow2 image.
    pub async fn snapshot(
        &self,
        path: &Path,
        command: SnapshotCommand,
        name: &str,
    ) -> Result<(), StorageError> {
        let flag = match command {
            SnapshotCommand::Create => "-c",
            SnapshotCommand::Apply => "-a",
            SnapshotCommand::Delete => "-d",
        };
        self.run(&[
            "snapshot".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            flag.into(),
            name.into(),
            path_arg(path),
        ])
        .await
        .map(drop)
    }

    async fn run(&self, args: &[String]) -> Result<String, StorageError> {
        let output = tokio::process::Command::new(&self.binary)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| {
                StorageError::Failed(format!(
                    "running {}: {e} (scripts/setup.sh installs qemu-utils)",
                    self.binary.display()
                ))
            })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let message = format!("qemu-img {} failed: {stderr}", args[0]);
        if stderr.contains("No space left on device") {
            Err(StorageError::NoSpace(message))
        } else {
            Err(StorageError::Failed(message))
        }
    }
}

/// A path as one argument. A relative path could start with `-` and read as
/// an option; every path here is absolute, which this asserts.
fn path_arg(path: &Path) -> String {
    debug_assert!(path.is_absolute(), "{}", path.display());
    path.to_string_lossy().into_owned()
}
