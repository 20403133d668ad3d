//! `vmlet serve` without root, as README's "Without root" shows it: the
//! daemon runs as `nobody` (setpriv) with its own `--state-dir` and
//! `--run-dir` in a scratch directory that user owns, answers `/healthz`,
//! and the CLI (as the same user, on the daemon's socket) creates, starts,
//! stops and deletes a VM of the test guest, whose QEMU runs unconfined
//! (one log line says so).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::daemon::{guest_spec_json, unique_name};
use common::{Scratch, BOOT_TIMEOUT};
use serde_json::json;
use tokio::process::{Child, Command};

const TEST: &str = "serve_works_without_root";
const NOBODY: u32 = 65534;
/// How long one CLI call may take (a boot under TCG on a busy host).
const CLI_TIMEOUT: Duration = Duration::from_secs(240);

/// `setpriv` as nobody, without groups or capabilities, running `vmlet`.
fn as_nobody() -> Command {
    let mut command = Command::new("setpriv");
    command.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        env!("CARGO_BIN_EXE_vmlet"),
    ]);
    command
}

/// The daemon and the VM's QEMU, ended whatever happens.
struct Serve {
    child: Child,
    /// The VM's UUID once it exists: its QEMU is killed on drop.
    vm: Option<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if let Some(uuid) = &self.vm {
            for pid in common::processes_with(uuid) {
                // SAFETY: a QEMU this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Runs `vmlet ARGS --socket SOCKET` as nobody; returns (ok, stdout+stderr).
async fn cli(socket: &Path, args: &[&str]) -> (bool, String) {
    let out = as_nobody()
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("VMLET_URL")
        .env_remove("VMLET_TOKEN_FILE")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(CLI_TIMEOUT, out)
        .await
        .unwrap_or_else(|_| panic!("vmlet {args:?} did not finish"))
        .expect("running vmlet");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn chown_all(paths: &[PathBuf]) {
    for path in paths {
        std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
    }
}

#[tokio::test]
async fn serve_works_without_root() {
    if !nix::unistd::geteuid().is_root() {
        return common::skip(TEST, "running as another user needs root");
    }
    let setpriv = std::process::Command::new("setpriv")
        .arg("--version")
        .output();
    if !setpriv.is_ok_and(|o| o.status.success()) {
        return common::skip(TEST, "setpriv (util-linux) is not installed");
    }
    let scratch = Scratch::new();
    let dir = scratch.path().to_path_buf();
    let (state, run, host) = (dir.join("state"), dir.join("run"), dir.join("state/host"));
    std::fs::create_dir_all(&host).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    // The README's recipe: host files under the state dir's `host`.
    let guest = common::guest::test_guest();
    let (kernel, initrd) = (host.join("vmlinuz"), host.join("initrd.img"));
    std::fs::copy(&guest.kernel, &kernel).unwrap();
    std::fs::copy(&guest.initrd, &initrd).unwrap();
    let name = unique_name("nobody-serve");
    let mut spec = guest_spec_json(&name, "guest.action=hold");
    spec["boot"]["kernel"] = json!(kernel);
    spec["boot"]["initrd"] = json!(initrd);
    let spec_file = dir.join("spec.json");
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    let log_path = dir.join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    chown_all(&[
        dir.clone(),
        state.clone(),
        run.clone(),
        host.clone(),
        kernel,
        initrd,
        spec_file.clone(),
        log_path.clone(),
    ]);

    let child = as_nobody()
        .args(["--config", "/dev/null", "serve", "--state-dir"])
        .arg(&state)
        .arg("--run-dir")
        .arg(&run)
        .env("VMLET_ACCEL", "tcg")
        .env("VMLET_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("starting vmlet serve as nobody");
    let mut serve = Serve { child, vm: None };
    let socket = run.join("vmlet.sock");
    let started = std::time::Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = serve.child.try_wait() {
            panic!(
                "vmlet serve as nobody exited ({status}):\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no socket after 60 s:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // /healthz, over the daemon's socket.
    let health = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(&socket)
        .arg("http://localhost/healthz")
        .output()
        .await
        .expect("running curl");
    assert_eq!(String::from_utf8_lossy(&health.stdout), "200");

    let (ok, out) = cli(
        &socket,
        &["vm", "create", "-f", spec_file.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{out}");
    let (ok, shown) = cli(&socket, &["vm", "show", &name, "-o", "json"]).await;
    assert!(ok, "{shown}");
    let view: serde_json::Value = serde_json::from_str(&shown).expect("vm show -o json");
    serve.vm = view["id"].as_str().map(str::to_string);
    let timeout = BOOT_TIMEOUT.as_secs().to_string();
    let (ok, out) = cli(
        &socket,
        &[
            "vm",
            "start",
            &name,
            "--wait-ready",
            "--ready-marker",
            "GUEST-READY",
            "--timeout",
            &timeout,
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("ready"), "{out}");
    let (ok, shown) = cli(&socket, &["vm", "show", &name, "-o", "json"]).await;
    assert!(ok, "{shown}");
    let view: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let pid = view["pid"].as_u64().expect("a running VM has a pid");
    // QEMU runs as the daemon's user: nobody.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    assert_eq!(uid, NOBODY.to_string(), "{status}");

    let (ok, out) = cli(&socket, &["vm", "stop", &name]).await;
    assert!(ok, "{out}");
    assert!(out.contains("the guest powered off"), "{out}");
    let (ok, out) = cli(&socket, &["vm", "delete", &name]).await;
    assert!(ok, "{out}");

    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let notes = text
        .lines()
        .filter(|l| l.contains("without jail or cgroup"))
        .count();
    assert_eq!(notes, 1, "the unconfined note, once:\n{text}");
    drop(serve);
}
