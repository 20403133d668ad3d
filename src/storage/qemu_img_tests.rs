//! Unit tests of `qemu_img.rs`, in a file of their own so that the code
//! stays short enough to read in one go.

use super::*;
use std::os::fd::AsFd;
use std::time::Instant;

fn sh(script: &str) -> Vec<String> {
    vec!["-c".into(), script.into()]
}

const SH: &str = "/bin/sh";

#[tokio::test]
async fn limits_reach_the_process() {
    let out = run_limited(Path::new(SH), &sh("ulimit -v; ulimit -t"), INFO_LIMITS, &[])
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // `ulimit -v` is in KiB, `ulimit -t` in seconds.
    assert_eq!(lines, ["1048576", "30"], "{text}");
}

#[tokio::test]
async fn the_wall_clock_limit_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    // A grandchild in the same group: killing only the shell would
    // leave it running.
    let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let limits = RunLimits {
        address_space: None,
        cpu_s: None,
        wall: Duration::from_millis(500),
    };
    let started = Instant::now();
    let err = run_limited(Path::new(SH), &sh(&script), limits, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, LimitedError::TimedOut(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The sleep was killed (it is our grandchild, reaped by init, so
    // give it a moment to disappear).
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.is_empty() || stat.contains(") Z ")
    });
    assert!(gone, "pid {pid} survived the timeout");
}

#[tokio::test]
async fn the_cpu_limit_stops_a_spinning_process() {
    let limits = RunLimits {
        address_space: None,
        cpu_s: Some(1),
        wall: Duration::from_secs(60),
    };
    let out = run_limited(Path::new(SH), &sh("while :; do :; done"), limits, &[])
        .await
        .unwrap();
    assert!(
        matches!(
            out.status.signal(),
            Some(libc::SIGXCPU) | Some(libc::SIGKILL)
        ),
        "{:?}",
        out.status
    );
}

#[tokio::test]
async fn the_memory_limit_fails_large_allocations() {
    // Reading 64 MiB into one shell variable needs more than 16 MiB of
    // address space; 1 KiB fits (so the shell itself runs under it).
    let limits = RunLimits {
        address_space: Some(16 << 20),
        cpu_s: None,
        wall: Duration::from_secs(60),
    };
    let small = run_limited(
        Path::new(SH),
        &sh("x=$(head -c 1024 /dev/zero | tr '\\0' a); echo ${#x}"),
        limits,
        &[],
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&small.stdout).trim(), "1024");
    let out = run_limited(
        Path::new(SH),
        &sh("x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo ${#x}"),
        limits,
        &[],
    )
    .await
    .unwrap();
    assert_ne!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "67108864",
        "the allocation succeeded under the limit"
    );
}

/// A stand-in `qemu-img` that reports the limits it runs under on
/// stderr and fails, so the error shows them.
fn limit_reporter(dir: &Path) -> QemuImg {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("qemu-img");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"as=$(ulimit -v) cpu=$(ulimit -t)\" >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    QemuImg::new(&script)
}

/// Retries a run that failed with ETXTBSY: another test's fork may
/// briefly hold the just-written script open.
async fn retry_busy<T, F, Fut>(mut run: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    for _ in 0..50 {
        match run().await {
            Err(e) if e.to_string().contains("Text file busy") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
    run().await
}

#[tokio::test]
async fn info_untrusted_runs_under_the_info_limits() {
    let dir = tempfile::tempdir().unwrap();
    let img = limit_reporter(dir.path());
    let file = dir.path().join("upload.raw");
    let err = retry_busy(|| img.info_untrusted(&file, None))
        .await
        .unwrap_err()
        .to_string();
    // `ulimit -v` is in KiB.
    let want = format!(
        "as={} cpu={}",
        INFO_LIMITS.address_space.unwrap() >> 10,
        INFO_LIMITS.cpu_s.unwrap()
    );
    assert!(err.contains(&want), "{err}");
    // The disk-listing run of a VM's own disk is limited the same way.
    let fd = std::fs::File::create(dir.path().join("disk.qcow2")).unwrap();
    let err = retry_busy(|| img.info_fd(fd.as_fd(), &file, true))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&want), "{err}");
}

#[tokio::test]
async fn only_the_named_fds_are_inherited() {
    let dir = tempfile::tempdir().unwrap();
    let passed = std::fs::File::create(dir.path().join("passed")).unwrap();
    let kept = std::fs::File::create(dir.path().join("kept")).unwrap();
    let script = format!(
        "[ -e /dev/fd/{} ] && echo passed; [ -e /dev/fd/{} ] && echo kept; true",
        passed.as_raw_fd(),
        kept.as_raw_fd()
    );
    let limits = RunLimits {
        address_space: None,
        cpu_s: None,
        wall: Duration::from_secs(60),
    };
    let out = run_limited(Path::new(SH), &sh(&script), limits, &[passed.as_raw_fd()])
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "passed\n");
}

fn qemu_img_binary() -> Option<QemuImg> {
    let found = std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join("qemu-img"))
        .find(|p| p.is_file())?;
    Some(QemuImg::new(&found))
}

/// qemu-img acts on the file vmlet opened, whatever its path names by
/// then, and never opens the backing file a header names.
#[tokio::test]
async fn snapshots_act_on_the_opened_file_with_no_backing() {
    let Some(img) = qemu_img_binary() else {
        eprintln!("SKIPPED: no qemu-img on PATH");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    img.create(&disk, 1 << 20).await.unwrap();
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    // The path now names another image.
    let moved = dir.path().join("moved.qcow2");
    std::fs::rename(&disk, &moved).unwrap();
    img.create(&disk, 1 << 20).await.unwrap();
    let before = std::fs::read(&disk).unwrap();

    img.snapshot_fd(opened.as_fd(), SnapshotCommand::Create, "s1")
        .await
        .unwrap();
    let info = img.info_fd(opened.as_fd(), &moved, false).await.unwrap();
    assert_eq!(
        info.snapshots.iter().map(|s| &s.name).collect::<Vec<_>>(),
        ["s1"]
    );
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "the path's file changed"
    );
    img.snapshot_fd(opened.as_fd(), SnapshotCommand::Apply, "s1")
        .await
        .unwrap();
    img.snapshot_fd(opened.as_fd(), SnapshotCommand::Delete, "s1")
        .await
        .unwrap();
    assert!(img
        .info_fd(opened.as_fd(), &moved, false)
        .await
        .unwrap()
        .snapshots
        .is_empty());

    // A header naming a backing file that does not exist: opening the
    // chain would fail; pinned empty, the image reads alone.
    let missing = dir.path().join("missing.raw");
    let status = std::process::Command::new(&img.binary)
        .args(["rebase", "-u", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&missing)
        .arg(&moved)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        img.info(&moved, Some("qcow2"), false).await.is_ok(),
        "info reads headers only"
    );
    img.snapshot_fd(opened.as_fd(), SnapshotCommand::Create, "s2")
        .await
        .unwrap();
    assert!(!missing.exists());
}

#[test]
fn fd_images_pin_the_backing_chain() {
    let spec: serde_json::Value =
        serde_json::from_str(fd_image(7).strip_prefix("json:").unwrap()).unwrap();
    assert_eq!(
        spec,
        serde_json::json!({
            "driver": "qcow2",
            "backing": null,
            "file": {"driver": "file", "filename": "/dev/fd/7"},
        })
    );
}

#[test]
fn qcow2_headers_with_a_data_file_or_backing_file_are_spotted() {
    let dir = tempfile::tempdir().unwrap();
    let mut header = vec![0u8; 104];
    header[..4].copy_from_slice(b"QFI\xfb");
    header[4..8].copy_from_slice(&3u32.to_be_bytes());
    let plain = dir.path().join("plain.qcow2");
    std::fs::write(&plain, &header).unwrap();
    assert_eq!(qcow2_header_refusal(&plain).unwrap(), None);

    let mut data_file = header.clone();
    data_file[72..80].copy_from_slice(&4u64.to_be_bytes());
    let path = dir.path().join("data-file.qcow2");
    std::fs::write(&path, &data_file).unwrap();
    let why = qcow2_header_refusal(&path).unwrap().unwrap();
    assert!(why.contains("external data file"), "{why}");

    let mut backing = header.clone();
    backing[8..16].copy_from_slice(&104u64.to_be_bytes());
    let path = dir.path().join("backing.qcow2");
    std::fs::write(&path, &backing).unwrap();
    let why = qcow2_header_refusal(&path).unwrap().unwrap();
    assert!(why.contains("backing file"), "{why}");

    let raw = dir.path().join("short.raw");
    std::fs::write(&raw, b"QFI").unwrap();
    assert_eq!(qcow2_header_refusal(&raw).unwrap(), None);
}
