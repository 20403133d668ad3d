//! `qemu-img`, run with argument lists (never a shell). Failures carry the
//! tool's stderr; a full disk becomes [`StorageError::NoSpace`].
//!
//! Files being imported are untrusted: a crafted header can make
//! `qemu-img` allocate or loop without bound. Those runs go through
//! [`run_limited`]: address space and CPU limits for `info` (1 GiB and
//! 30 s, as OpenStack's `oslo.concurrency` prlimit does for image
//! inspection), a wall-clock limit for `info` and `convert`, and the whole
//! process group killed when it is exceeded.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::storage::files::{self, Qcow2Header};
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

/// Resource limits for a run on an untrusted file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// `RLIMIT_AS`, in bytes.
    pub address_space: Option<u64>,
    /// `RLIMIT_CPU`, in seconds (the kernel sends SIGXCPU, then SIGKILL).
    pub cpu_s: Option<u64>,
    /// Wall-clock limit: the process group is killed when it is exceeded.
    pub wall: Duration,
}

/// Limits of `qemu-img info` on an untrusted file.
pub const INFO_LIMITS: RunLimits = RunLimits {
    address_space: Some(1 << 30),
    cpu_s: Some(30),
    wall: Duration::from_secs(60),
};

/// Limits of `qemu-img snapshot` on a VM's disk: a wall clock only (a
/// large image's refcounts take a while to update, legitimately), so a
/// file that blocks (a FIFO, a hung filesystem) cannot hang the request.
pub const SNAPSHOT_LIMITS: RunLimits = RunLimits {
    address_space: None,
    cpu_s: None,
    wall: Duration::from_secs(600),
};

/// The image argument that makes `qemu-img` read a qcow2 file vmlet opened
/// itself: through `/dev/fd/N` (the same open file, whatever its path names
/// now), with `"backing": null`, so a backing file a header names is never
/// opened. (QAPI has no way to pin a data file: callers refuse a header
/// that names one before.)
pub fn fd_image(fd: RawFd) -> String {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "backing": null,
        "file": {"driver": "file", "filename": format!("/dev/fd/{fd}")},
    });
    format!("json:{spec}")
}

/// Most output kept of a limited run (`info` of a sane image is a few KiB).
const MAX_OUTPUT: u64 = 4 << 20;

/// How a limited run ended.
#[derive(Debug)]
pub struct LimitedOutput {
    /// Exit status.
    pub status: std::process::ExitStatus,
    /// Standard output (at most 4 MiB).
    pub stdout: Vec<u8>,
    /// Standard error (at most 4 MiB).
    pub stderr: Vec<u8>,
}

/// Why a limited run produced no output.
#[derive(Debug, thiserror::Error)]
pub enum LimitedError {
    /// The program could not be started.
    #[error("running {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// It ran longer than the wall-clock limit and was killed.
    #[error("took longer than {} s and was killed", .0.as_secs())]
    TimedOut(Duration),
}

/// Kills a process group when dropped, unless disarmed: a run whose future
/// is dropped (an import cancelled) or timed out leaves nothing running.
struct GroupKiller(Option<i32>);

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // The group leader is not reaped yet (the caller disarms only
            // after wait), so the id cannot have been reused.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `program` with `args` in its own process group under `limits`;
/// it inherits `inherit` (fds vmlet opened with `O_CLOEXEC`, under the same
/// numbers), and no other fd.
pub async fn run_limited(
    program: &Path,
    args: &[String],
    limits: RunLimits,
    inherit: &[RawFd],
) -> Result<LimitedOutput, LimitedError> {
    use tokio::io::AsyncReadExt;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let (address_space, cpu_s) = (limits.address_space, limits.cpu_s);
    let inherit = inherit.to_vec();
    // SAFETY: the closure only calls setrlimit(2) and fcntl(2), which are
    // async-signal-safe, and allocates nothing (`inherit` was copied
    // before the fork).
    unsafe {
        command.pre_exec(move || {
            for &fd in &inherit {
                // Clears FD_CLOEXEC in the child only: the fd stays under
                // its number across exec.
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let set = |resource, value: u64| {
                let limit = libc::rlimit {
                    rlim_cur: value as libc::rlim_t,
                    rlim_max: value as libc::rlim_t,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            if let Some(bytes) = address_space {
                set(libc::RLIMIT_AS, bytes)?;
            }
            if let Some(seconds) = cpu_s {
                // The soft limit sends SIGXCPU; the hard one a second later
                // SIGKILL, should SIGXCPU be ignored.
                let limit = libc::rlimit {
                    rlim_cur: seconds as libc::rlim_t,
                    rlim_max: (seconds + 1) as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_CPU, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| LimitedError::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    let mut killer = GroupKiller(child.id().map(|id| id as i32));
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let run = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut out_reader = (&mut stdout).take(MAX_OUTPUT);
        let mut err_reader = (&mut stderr).take(MAX_OUTPUT);
        let (status, _, _) = tokio::join!(
            child.wait(),
            out_reader.read_to_end(&mut out),
            err_reader.read_to_end(&mut err),
        );
        (status, out, err)
    };
    match tokio::time::timeout(limits.wall, run).await {
        Ok((status, stdout, stderr)) => {
            let status = status.map_err(|source| LimitedError::Spawn {
                program: program.display().to_string(),
                source,
            })?;
            // Reaped: its pid (the group id) may be reused from now on, so
            // the group is no longer ours to kill.
            killer.0 = None;
            Ok(LimitedOutput {
                status,
                stdout,
                stderr,
            })
        }
        Err(_) => {
            killer.kill();
            let _ = child.wait().await;
            Err(LimitedError::TimedOut(limits.wall))
        }
    }
}

/// What in a qcow2 header makes an import unsafe, read before `qemu-img`
/// opens the file at all: opening a qcow2 with an external data file opens
/// that file (any host path, a FIFO, a device). `None`: not a qcow2, or
/// nothing found.
pub fn qcow2_header_refusal(path: &Path) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let mut header = Vec::with_capacity(104);
    std::fs::File::open(path)?
        .take(104)
        .read_to_end(&mut header)?;
    Ok(match files::read_qcow2_header(&header) {
        Qcow2Header::BackingFile => {
            Some("the image has a backing file; import a flattened image (qemu-img convert)".into())
        }
        Qcow2Header::DataFile => {
            Some("the image has an external data file; import a self-contained image".into())
        }
        // qemu-img refuses a truncated header itself.
        Qcow2Header::NotQcow2 | Qcow2Header::Truncated | Qcow2Header::SelfContained => None,
    })
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

    /// `qemu-img info` of an untrusted file, under [`INFO_LIMITS`].
    /// `format`: `None` probes (once, for a file about to be converted from
    /// the format found); every later run names the format.
    pub async fn info_untrusted(
        &self,
        path: &Path,
        format: Option<&str>,
    ) -> Result<ImageInfo, StorageError> {
        let mut args = vec!["info".to_string(), "--output=json".into()];
        if let Some(format) = format {
            args.extend(["-f".into(), format.into()]);
        }
        args.push(path_arg(path));
        let out = self.run_with(&args, INFO_LIMITS, &[]).await?;
        serde_json::from_str(&out)
            .map_err(|e| StorageError::Failed(format!("qemu-img info {}: {e}", path.display())))
    }

    /// Converts `src` (of format `src_format`, an image of the store) to a
    /// new qcow2 file `dst`.
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

    /// Converts the untrusted `src` (of format `src_format`) to a new qcow2
    /// file `dst`; killed after `timeout`.
    pub async fn convert_untrusted_to_qcow2(
        &self,
        src: &Path,
        src_format: &str,
        dst: &Path,
        timeout: Duration,
    ) -> Result<(), StorageError> {
        let args = [
            "convert".into(),
            "-f".into(),
            src_format.into(),
            "-O".into(),
            "qcow2".into(),
            path_arg(src),
            path_arg(dst),
        ];
        // No memory or CPU limit: a large image takes long legitimately,
        // and qemu-img's I/O threads need address space. The format is
        // never probed here.
        let limits = RunLimits {
            address_space: None,
            cpu_s: None,
            wall: timeout,
        };
        self.run_with(&args, limits, &[]).await.map(drop)
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

    /// `qemu-img info` of a qcow2 image vmlet opened itself (`fd`, which
    /// the run inherits; `shown` names it in errors), read through the fd
    /// with its backing chain pinned empty ([`fd_image`]), under
    /// [`INFO_LIMITS`]. `force_share` reads an image a running QEMU holds.
    pub async fn info_fd(
        &self,
        fd: BorrowedFd<'_>,
        shown: &Path,
        force_share: bool,
    ) -> Result<ImageInfo, StorageError> {
        let mut args = vec!["info".to_string(), "--output=json".into()];
        if force_share {
            args.push("-U".into());
        }
        args.push(fd_image(fd.as_raw_fd()));
        let out = self.run_with(&args, INFO_LIMITS, &[fd.as_raw_fd()]).await?;
        serde_json::from_str(&out)
            .map_err(|e| StorageError::Failed(format!("qemu-img info {}: {e}", shown.display())))
    }

    /// Takes, applies or deletes internal snapshot `name` of a qcow2 image
    /// vmlet opened itself (`fd`, which the run inherits), read through the
    /// fd with its backing chain pinned empty ([`fd_image`]), under
    /// [`SNAPSHOT_LIMITS`].
    pub async fn snapshot_fd(
        &self,
        fd: BorrowedFd<'_>,
        command: SnapshotCommand,
        name: &str,
    ) -> Result<(), StorageError> {
        let flag = match command {
            SnapshotCommand::Create => "-c",
            SnapshotCommand::Apply => "-a",
            SnapshotCommand::Delete => "-d",
        };
        let args = [
            "snapshot".into(),
            "-q".into(),
            flag.into(),
            name.into(),
            fd_image(fd.as_raw_fd()),
        ];
        self.run_with(&args, SNAPSHOT_LIMITS, &[fd.as_raw_fd()])
            .await
            .map(drop)
    }

    async fn run_with(
        &self,
        args: &[String],
        limits: RunLimits,
        inherit: &[RawFd],
    ) -> Result<String, StorageError> {
        let output = run_limited(&self.binary, args, limits, inherit)
            .await
            .map_err(|e| match e {
                LimitedError::Spawn { source, .. } => StorageError::Failed(format!(
                    "running {}: {source} (scripts/setup.sh installs qemu-utils)",
                    self.binary.display()
                )),
                LimitedError::TimedOut(_) => {
                    StorageError::Failed(format!("qemu-img {} {e}", args[0]))
                }
            })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let message = match output.status.signal() {
            Some(libc::SIGXCPU) | Some(libc::SIGKILL) if limits.cpu_s.is_some() => format!(
                "qemu-img {} was killed: it used more than {} s of CPU",
                args[0],
                limits.cpu_s.unwrap_or_default()
            ),
            Some(signal) => format!(
                "qemu-img {} was killed by signal {signal} (memory limit {}): {stderr}",
                args[0],
                limits
                    .address_space
                    .map_or("none".to_string(), |b| format!("{} MiB", b >> 20))
            ),
            None => format!("qemu-img {} failed: {stderr}", args[0]),
        };
        if stderr.contains("No space left on device") {
            Err(StorageError::NoSpace(message))
        } else {
            Err(StorageError::Failed(message))
        }
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

#[cfg(test)]
#[path = "qemu_img_tests.rs"]
mod tests;
