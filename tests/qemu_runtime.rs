//! The QEMU runtime against real QEMU and the real test guest (TCG):
//! launch, QMP status, boot on both profiles, graceful and fallback stop,
//! and a QEMU that refuses to start.

mod common;

use std::time::Duration;

use common::{disk, guest_channel, guest_spec, launch, wait_for_line, Scratch, BOOT_TIMEOUT};
use qapi::qmp::RunState;
use tokio::io::AsyncBufReadExt;
use vmlet::qemu::instance::{LaunchError, StopMode, StopOutcome};
use vmlet::qemu::process::{ExitStatus, ProcessError};
use vmlet::spec::Boot;
use vmlet::vm::launch::LaunchFiles;

/// Boots the test guest on `profile` with a 64 MiB qcow2 disk made by
/// qemu-img and checks what the guest reports, on the serial console and on
/// its virtio-serial channel.
async fn boots_and_reports_disk(profile: &str) {
    let scratch = Scratch::new();
    let image = scratch.qcow2("data.qcow2", "64M");
    let mut spec = guest_spec(profile, "guest.action=poweroff");
    spec.disks.push(disk("data", &image));
    spec.channels.push(guest_channel());
    let vm = launch(&spec, &scratch).await.expect("launch");

    let status = vm.qmp.execute(qapi::qmp::query_status {}).await.unwrap();
    assert_eq!(status.status, RunState::prelaunch);

    // Open the guest's channel before it runs so its report has a reader.
    let channel = tokio::net::UnixStream::connect(vm.paths.channel_socket(0))
        .await
        .expect("channel socket");
    vm.start_guest().await.unwrap();
    let status = vm.qmp.execute(qapi::qmp::query_status {}).await.unwrap();
    assert_eq!(status.status, RunState::running);

    let ready = wait_for_line(&vm.paths.serial_log(), "GUEST-READY", BOOT_TIMEOUT).await;
    assert!(
        ready.contains(&format!("vda:{}", 64 * 1024 * 1024)),
        "guest should report its 64 MiB virtio disk: {ready}"
    );
    assert!(ready.contains("org.vmlet.guest.0"), "{ready}");

    let mut lines = tokio::io::BufReader::new(channel).lines();
    let from_channel = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("report on the channel")
        .unwrap()
        .unwrap_or_default();
    assert!(from_channel.contains("GUEST-READY"), "{from_channel:?}");
    assert!(from_channel.contains("vda:"), "{from_channel:?}");

    // guest.action=poweroff: the guest powers itself off; QEMU exits cleanly.
    let exit = vm.process.wait_exit(BOOT_TIMEOUT).await;
    assert_eq!(exit, Some(ExitStatus::Code(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_guest_boots_on_q35() {
    boots_and_reports_disk("q35").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_guest_boots_on_microvm() {
    boots_and_reports_disk("microvm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_powers_off_through_acpi_on_q35() {
    graceful_stop_powers_off_through_acpi("q35").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_powers_off_through_acpi_on_microvm() {
    graceful_stop_powers_off_through_acpi("microvm").await;
}

async fn graceful_stop_powers_off_through_acpi(profile: &str) {
    let scratch = Scratch::new();
    let spec = guest_spec(profile, "guest.action=hold");
    let vm = launch(&spec, &scratch).await.expect("launch");
    vm.start_guest().await.unwrap();
    wait_for_line(&vm.paths.serial_log(), "GUEST-READY", BOOT_TIMEOUT).await;

    let outcome = vm
        .stop(StopMode::Graceful {
            grace: Duration::from_secs(60),
        })
        .await
        .unwrap();
    assert_eq!(outcome, StopOutcome::GuestPoweredOff);
    let log = std::fs::read_to_string(vm.paths.serial_log()).unwrap();
    assert!(log.contains("GUEST-ACPI-POWERDOWN"), "{log}");
    assert!(!vm.process.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_falls_back_when_the_guest_ignores_acpi() {
    let scratch = Scratch::new();
    let spec = guest_spec("q35", "guest.action=hold guest.acpi=ignore");
    let vm = launch(&spec, &scratch).await.expect("launch");
    vm.start_guest().await.unwrap();
    wait_for_line(&vm.paths.serial_log(), "GUEST-READY", BOOT_TIMEOUT).await;

    let started = std::time::Instant::now();
    let grace = Duration::from_secs(3);
    let outcome = vm.stop(StopMode::Graceful { grace }).await.unwrap();
    assert_eq!(
        outcome,
        StopOutcome::Quit,
        "QEMU quit after the grace period"
    );
    assert!(started.elapsed() >= grace, "waited the grace period first");
    // The guest saw the button and ignored it.
    wait_for_line(
        &vm.paths.serial_log(),
        "GUEST-ACPI-IGNORED",
        Duration::from_secs(1),
    )
    .await;
    assert!(!vm.process.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_stop_ends_a_running_guest() {
    let scratch = Scratch::new();
    let spec = guest_spec("q35", "guest.action=hold");
    let vm = launch(&spec, &scratch).await.expect("launch");
    vm.start_guest().await.unwrap();
    let outcome = vm.stop(StopMode::Force).await.unwrap();
    assert_eq!(outcome, StopOutcome::Quit);
    assert!(!vm.process.is_running());
    // Stopping again is a no-op, not an error.
    assert_eq!(
        vm.stop(StopMode::Force).await.unwrap(),
        StopOutcome::AlreadyExited
    );
}

/// A QEMU that refuses to start (here: its disk is in use by another QEMU,
/// which holds the image lock) reports QEMU's own message and leaves
/// nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_start_failure_reports_qemus_message_and_leaves_nothing() {
    let scratch = Scratch::new();
    let image = scratch.qcow2("shared.qcow2", "16M");
    let mut holder = guest_spec("q35", "");
    holder.disks.push(disk("data", &image));
    let _holder = launch(&holder, &scratch).await.expect("launch");
    let mut spec = guest_spec("q35", "");
    spec.disks.push(disk("data", &image));
    let err = launch(&spec, &scratch).await.expect_err("must fail");
    let LaunchError::Process(ProcessError::StartFailed { message }) = &err else {
        panic!("expected QEMU's own failure, got {err:?}");
    };
    assert!(
        message.contains("lock"),
        "QEMU's message should say the image is locked: {message}"
    );
    let run_dir = scratch.run_dir().join("vms").join(spec.uuid.to_string());
    assert!(
        !run_dir.exists(),
        "run directory removed after a failed start"
    );
    assert!(common::processes_with(&spec.uuid.to_string()).is_empty());
}

/// A kernel that is not there is refused by vmlet, which opens it for QEMU,
/// naming the field; no QEMU runs.
#[test]
fn missing_kernel_is_refused_before_qemu_runs() {
    let scratch = Scratch::new();
    let mut spec = guest_spec("q35", "");
    spec.boot = Boot::Kernel {
        kernel: scratch.path().join("no-such-kernel"),
        initrd: None,
        cmdline: String::new(),
        firmware: Default::default(),
    };
    let err = LaunchFiles::open(
        &spec,
        &vmlet::storage::Layout::new(scratch.path()),
        &[std::path::PathBuf::from("/")],
    )
    .expect_err("missing kernel");
    assert_eq!(err.field, "boot.kernel");
    assert!(err.to_string().contains("no-such-kernel"), "{err}");
    assert!(common::processes_with(&spec.uuid.to_string()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commas_and_spaces_in_paths_reach_qemu_intact() {
    let scratch = Scratch::new();
    let odd = scratch.path().join("odd, dir with spaces");
    std::fs::create_dir(&odd).unwrap();
    let guest = common::guest::test_guest();
    let kernel = odd.join("vmlinuz,1");
    let initrd = odd.join("initrd,1 x.img");
    std::fs::copy(&guest.kernel, &kernel).unwrap();
    std::fs::copy(&guest.initrd, &initrd).unwrap();
    let image = scratch.qcow2("data,1 x.qcow2", "32M");

    let mut spec = guest_spec("q35", "guest.action=poweroff");
    spec.boot = Boot::Kernel {
        kernel,
        initrd: Some(initrd),
        cmdline: common::guest_cmdline("q35", "guest.action=poweroff"),
        firmware: Default::default(),
    };
    spec.disks.push(disk("data", &image));
    // The run directory (sockets, pidfile, serial log) has a comma too.
    let vm = common::launch_in(&spec, &odd.join("run,root"))
        .await
        .expect("launch");
    vm.start_guest().await.unwrap();
    let ready = wait_for_line(&vm.paths.serial_log(), "GUEST-READY", BOOT_TIMEOUT).await;
    assert!(
        ready.contains(&format!("vda:{}", 32 * 1024 * 1024)),
        "{ready}"
    );
    assert_eq!(
        vm.process.wait_exit(BOOT_TIMEOUT).await,
        Some(ExitStatus::Code(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_qemu_times_out_and_is_killed_by_the_stop() {
    let scratch = Scratch::new();
    let spec = guest_spec("q35", "guest.action=hold");
    let vm = launch(&spec, &scratch).await.expect("launch");
    let pid = nix::unistd::Pid::from_raw(vm.process.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();

    // Its commands fail with a timeout, promptly, and the link is then dead.
    let started = std::time::Instant::now();
    let err = vm
        .qmp
        .execute_with_deadline(qapi::qmp::query_status {}, Duration::from_millis(500))
        .await
        .expect_err("a stopped QEMU cannot answer");
    assert!(
        matches!(err, vmlet::qemu::qmp::QmpError::Timeout { .. }),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(vm.qmp.is_closed());

    // A graceful stop cannot reach it over QMP and ends with SIGKILL.
    let outcome = vm
        .stop(StopMode::Graceful {
            grace: Duration::from_secs(1),
        })
        .await
        .unwrap();
    assert_eq!(outcome, StopOutcome::Killed);
    assert!(!vm.process.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_boot_starts_the_disk_with_boot_order() {
    let scratch = Scratch::new();
    let data = scratch.qcow2("data.qcow2", "32M");
    let boot = scratch.bios_boot_disk(
        "boot.raw",
        "console=ttyS0 panic=-1 quiet guest.action=poweroff",
    );
    let mut spec = guest_spec("q35", "");
    spec.boot = Boot::Firmware {
        firmware: vmlet::spec::Firmware::Bios,
    };
    // The first disk is not bootable; SeaBIOS must skip to the one with
    // boot_order, attached read-only.
    spec.disks.push(disk("data", &data));
    let mut boot_disk = disk("boot", &boot);
    boot_disk.format = Some(vmlet::spec::DiskFormat::Raw);
    boot_disk.read_only = true;
    boot_disk.boot_order = Some(1);
    spec.disks.push(boot_disk);

    let vm = launch(&spec, &scratch).await.expect("launch");
    vm.start_guest().await.unwrap();
    let ready = wait_for_line(&vm.paths.serial_log(), "GUEST-READY", BOOT_TIMEOUT).await;
    assert!(
        ready.contains(&format!("vda:{}", 32 * 1024 * 1024)),
        "{ready}"
    );
    assert!(
        ready.contains(&format!("vdb:{}:ro", 64 * 1024 * 1024)),
        "{ready}"
    );
    assert_eq!(
        vm.process.wait_exit(BOOT_TIMEOUT).await,
        Some(ExitStatus::Code(0))
    );
}
