//! `vmlet run SPEC.json` as a user runs it: the real binary, real QEMU, the
//! test guest under TCG.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{guest_spec, Scratch, BOOT_TIMEOUT};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::process::Command;
use vmlet::spec::VmSpec;

fn vmlet(scratch: &Scratch, spec_file: &Path) -> Command {
    vmlet_with_grace(scratch, spec_file, 30)
}

/// `vmlet run` with `--grace SECONDS`.
fn vmlet_with_grace(scratch: &Scratch, spec_file: &Path, grace: u64) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmlet"));
    cmd.args(["run", "--accel", "tcg", "--grace", &grace.to_string()])
        .arg("--run-dir")
        .arg(scratch.run_dir())
        .arg(spec_file)
        .env("VMLET_PROFILE_DIR", scratch.path().join("no-profiles"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn write_spec(scratch: &Scratch, spec: &VmSpec) -> std::path::PathBuf {
    let path = scratch.path().join("spec.json");
    std::fs::write(&path, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn a_guest_that_powers_off_exits_zero_with_its_console_on_stdout() {
    let scratch = Scratch::new();
    let spec = guest_spec("q35", "guest.action=poweroff");
    let file = write_spec(&scratch, &spec);
    let out = tokio::time::timeout(BOOT_TIMEOUT, vmlet(&scratch, &file).output())
        .await
        .expect("vmlet run finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("GUEST-READY"), "{stdout}");
    assert!(stdout.contains("GUEST-POWEROFF"), "{stdout}");
    // The run directory is gone with the VM.
    assert!(!scratch
        .run_dir()
        .join("vms")
        .join(spec.uuid.to_string())
        .exists());
}

#[tokio::test]
async fn ctrl_c_stops_the_guest_through_acpi() {
    stop_signal_stops_the_guest_through_acpi(nix::sys::signal::Signal::SIGINT).await;
}

#[tokio::test]
async fn sigterm_stops_the_guest_through_acpi() {
    stop_signal_stops_the_guest_through_acpi(nix::sys::signal::Signal::SIGTERM).await;
}

async fn stop_signal_stops_the_guest_through_acpi(signal: nix::sys::signal::Signal) {
    let scratch = Scratch::new();
    let spec = guest_spec("q35", "guest.action=hold");
    let file = write_spec(&scratch, &spec);
    let mut child = vmlet(&scratch, &file).spawn().unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut console = String::new();
    tokio::time::timeout(BOOT_TIMEOUT, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            console.push_str(&line);
            console.push('\n');
            if line.contains("GUEST-READY") {
                return;
            }
        }
        panic!("console ended before GUEST-READY:\n{console}");
    })
    .await
    .expect("GUEST-READY on stdout");

    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
    let mut rest = String::new();
    let mut stderr = String::new();
    let mut err_pipe = child.stderr.take().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            rest.push_str(&line);
            rest.push('\n');
        }
        err_pipe.read_to_string(&mut stderr).await.unwrap();
        child.wait().await.unwrap()
    })
    .await
    .expect("vmlet exits after Ctrl-C");
    assert_eq!(status.code(), Some(130), "stderr:\n{stderr}");
    assert!(
        rest.contains("GUEST-ACPI-POWERDOWN"),
        "guest saw the power button:\n{rest}"
    );
    assert!(stderr.contains("stopping"), "{stderr}");
    assert!(common::processes_with(&spec.uuid.to_string()).is_empty());
}

#[tokio::test]
async fn a_bad_spec_names_the_field_and_starts_nothing() {
    let scratch = Scratch::new();
    let mut spec = guest_spec("q35", "");
    spec.disks
        .push(common::disk("data", Path::new("relative/disk.qcow2")));
    spec.vcpus = 0;
    let file = write_spec(&scratch, &spec);
    let out = vmlet(&scratch, &file).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("disks[0].path"), "{stderr}");
    assert!(stderr.contains("vcpus"), "{stderr}");
    assert!(!scratch.run_dir().exists(), "nothing was prepared");
    assert!(common::processes_with(&spec.uuid.to_string()).is_empty());

    // Unknown fields are refused by name too.
    let mut value = serde_json::to_value(&spec).unwrap();
    value["vcpus"] = 1.into();
    value["disks"] = serde_json::json!([]);
    value["memroy_mib"] = 512.into();
    std::fs::write(&file, value.to_string()).unwrap();
    let out = vmlet(&scratch, &file).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("memroy_mib"), "{stderr}");
}

/// QEMU refusing to start (its disk is held by another QEMU) is reported
/// with QEMU's own message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_that_cannot_start_reports_its_own_message() {
    let scratch = Scratch::new();
    let image = scratch.qcow2("shared.qcow2", "16M");
    let mut holder = guest_spec("q35", "");
    holder.disks.push(common::disk("data", &image));
    let _holder = common::launch(&holder, &scratch).await.expect("launch");
    let mut spec = guest_spec("q35", "");
    spec.disks.push(common::disk("data", &image));
    let file = write_spec(&scratch, &spec);
    let out = vmlet(&scratch, &file).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("QEMU failed to start"), "{stderr}");
    assert!(stderr.contains("lock"), "{stderr}");
}

/// A kernel that is not there is named before any QEMU runs (vmlet opens
/// the files and hands QEMU descriptors).
#[tokio::test]
async fn a_missing_kernel_is_named_before_qemu_runs() {
    let scratch = Scratch::new();
    let mut spec = guest_spec("q35", "");
    if let vmlet::spec::Boot::Kernel { kernel, .. } = &mut spec.boot {
        *kernel = scratch.path().join("missing-vmlinuz");
    }
    let file = write_spec(&scratch, &spec);
    let out = vmlet(&scratch, &file).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("missing-vmlinuz"), "{stderr}");
    assert!(common::processes_with(&spec.uuid.to_string()).is_empty());
}

#[tokio::test]
async fn argv_prints_the_command_line_without_starting_anything() {
    let scratch = Scratch::new();
    let spec = guest_spec("microvm", "guest.action=poweroff");
    let file = write_spec(&scratch, &spec);
    let out = Command::new(env!("CARGO_BIN_EXE_vmlet"))
        .args(["argv", "--accel", "tcg"])
        .arg(&file)
        .env("VMLET_RUN_DIR", scratch.run_dir())
        .env("VMLET_PROFILE_DIR", scratch.path().join("no-profiles"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "qemu-system-x86_64");
    let uuid = spec.uuid.to_string();
    assert!(
        lines.windows(2).any(|w| w == ["-uuid", uuid.as_str()]),
        "{stdout}"
    );
    assert!(lines.iter().any(|l| l.starts_with("microvm,")), "{stdout}");
    assert!(lines.windows(2).any(|w| w == ["-accel", "tcg"]), "{stdout}");
    assert!(!scratch.run_dir().exists(), "argv prepares nothing");
    assert!(common::processes_with(&uuid).is_empty());

    // A bad spec is "invalid" (5), told apart from a usage error (2).
    let mut bad = spec.clone();
    bad.vcpus = 0;
    let bad_file = write_spec(&scratch, &bad);
    let argv = |file: &Path| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vmlet"));
        command
            .args(["argv", "--accel", "tcg"])
            .arg(file)
            .env("VMLET_RUN_DIR", scratch.run_dir())
            .env("VMLET_PROFILE_DIR", scratch.path().join("no-profiles"));
        command
    };
    let out = argv(&bad_file).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("vcpus"), "{stderr}");
    let out = argv(&bad_file)
        .arg("--no-such-flag")
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = Command::new(env!("CARGO_BIN_EXE_vmlet"))
        .args(["argv", "--help"])
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("exits 5"), "{help}");
}

#[tokio::test]
async fn a_bad_profile_file_is_named_and_an_unknown_profile_is_refused() {
    let scratch = Scratch::new();
    let profiles = scratch.path().join("profiles");
    std::fs::create_dir(&profiles).unwrap();
    std::fs::write(
        profiles.join("broken.toml"),
        "description = \"no machine\"\n",
    )
    .unwrap();
    let spec = guest_spec("q35", "");
    let file = write_spec(&scratch, &spec);
    let out = vmlet(&scratch, &file)
        .env("VMLET_PROFILE_DIR", &profiles)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("broken.toml"), "{stderr}");

    let mut spec = guest_spec("q35", "");
    spec.profile = "pc-i440fx".into();
    let file = write_spec(&scratch, &spec);
    let out = vmlet(&scratch, &file).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("profile: unknown profile \"pc-i440fx\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_run_directory_too_deep_for_unix_sockets_is_refused_up_front() {
    let scratch = Scratch::new();
    let spec = guest_spec("q35", "");
    let file = write_spec(&scratch, &spec);
    let deep = scratch.path().join("d".repeat(80));
    let out = Command::new(env!("CARGO_BIN_EXE_vmlet"))
        .args(["run", "--accel", "tcg", "--run-dir"])
        .arg(&deep)
        .arg(&file)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("choose a shorter run directory"),
        "{stderr}"
    );
    assert!(!deep.exists(), "nothing was created");
    assert!(common::processes_with(&spec.uuid.to_string()).is_empty());
}

/// A `vmlet run` in the background with its console read line by line.
struct Running {
    child: tokio::process::Child,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    console: String,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd.spawn().unwrap();
        let stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Running {
            child,
            stdout,
            console: String::new(),
        }
    }

    /// Reads the console until a line holds `marker`.
    async fn wait_for(&mut self, marker: &str) {
        let found = tokio::time::timeout(BOOT_TIMEOUT, async {
            while let Some(line) = self.stdout.next_line().await.unwrap() {
                self.console.push_str(&line);
                self.console.push('\n');
                if line.contains(marker) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(
            found,
            Ok(true),
            "{marker} on the console:\n{}",
            self.console
        );
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Waits (at most `deadline`) for vmlet to exit: its exit code, the
    /// whole console and stderr.
    async fn finish(mut self, deadline: Duration) -> (Option<i32>, String, String) {
        let mut stderr = String::new();
        let mut err_pipe = self.child.stderr.take().unwrap();
        let status = tokio::time::timeout(deadline, async {
            while let Some(line) = self.stdout.next_line().await.unwrap() {
                self.console.push_str(&line);
                self.console.push('\n');
            }
            err_pipe.read_to_string(&mut stderr).await.unwrap();
            self.child.wait().await.unwrap()
        })
        .await
        .expect("vmlet exits in time");
        (status.code(), self.console, stderr)
    }
}

#[tokio::test]
async fn a_guest_ignoring_the_power_button_is_quit_after_the_grace() {
    let scratch = Scratch::new();
    let spec = guest_spec("q35", "guest.acpi=ignore");
    let file = write_spec(&scratch, &spec);
    let mut run = Running::spawn(vmlet_with_grace(&scratch, &file, 2));
    run.wait_for("GUEST-READY").await;
    run.signal(nix::sys::signal::Signal::SIGINT);
    let (code, console, stderr) = run.finish(Duration::from_secs(60)).await;
    assert_eq!(code, Some(130), "stderr:\n{stderr}");
    assert!(console.contains("GUEST-ACPI-IGNORED"), "{console}");
    assert!(
        stderr.contains("guest did not power off within 2s: QEMU was quit"),
        "{stderr}"
    );
    assert!(common::processes_with(&spec.uuid.to_string()).is_empty());
    assert!(!scratch
        .run_dir()
        .join("vms")
        .join(spec.uuid.to_string())
        .exists());
}

#[tokio::test]
async fn a_second_ctrl_c_forces_the_guest_off_without_waiting_for_the_grace() {
    let scratch = Scratch::new();
    let spec = guest_spec("q35", "guest.acpi=ignore");
    let file = write_spec(&scratch, &spec);
    let mut run = Running::spawn(vmlet_with_grace(&scratch, &file, 300));
    run.wait_for("GUEST-READY").await;
    run.signal(nix::sys::signal::Signal::SIGINT);
    run.wait_for("GUEST-ACPI-IGNORED").await;
    run.signal(nix::sys::signal::Signal::SIGINT);
    // Far less than the 300 s grace.
    let (code, _, stderr) = run.finish(Duration::from_secs(30)).await;
    assert_eq!(code, Some(130), "stderr:\n{stderr}");
    assert!(stderr.contains("forcing"), "{stderr}");
    assert!(!stderr.contains("QEMU was quit"), "{stderr}");
    assert!(common::processes_with(&spec.uuid.to_string()).is_empty());
}

#[tokio::test]
async fn a_guest_panic_fails_the_run() {
    let scratch = Scratch::new();
    let spec = guest_spec("q35", "guest.action=panic");
    let file = write_spec(&scratch, &spec);
    let run = Running::spawn(vmlet(&scratch, &file));
    let (code, console, stderr) = run.finish(BOOT_TIMEOUT).await;
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(console.contains("GUEST-PANICKING"), "{console}");
    assert!(stderr.contains("the guest panicked"), "{stderr}");
    assert!(common::processes_with(&spec.uuid.to_string()).is_empty());
}
