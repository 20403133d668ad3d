//! UEFI guests through the daemon: the test guest boots its kernel under
//! OVMF (found through QEMU's firmware descriptors) and sees EFI; each VM
//! has its own NVRAM in its state directory, which the firmware writes, which
//! survives a stop and start as the same file, and which goes with the VM.
//! Refusals name `boot.firmware`. Each test runs its own daemon.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::{assert_invalid_field, call, create_vm, force_delete_vm, id_of, uuid_of};
use common::daemon::{guest_spec_json, unique_name, wait_for_count, Daemon};
use common::{skip, Scratch, BOOT_TIMEOUT};
use serde_json::{json, Value};
use vmlet::client::Method;
use vmlet::config::Settings;
use vmlet::qemu::firmware::FirmwareCatalog;
use vmlet::spec::Firmware;

/// The firmware the daemon will find (its default descriptor directories).
fn installed(firmware: Firmware) -> Option<vmlet::qemu::firmware::UefiFirmware> {
    let (catalog, _) = FirmwareCatalog::load(&Settings::default().firmware_dirs);
    // Any versioned q35 type: Debian's descriptors target `pc-q35-*`.
    catalog.select(firmware, "pc-q35-10.0").ok()
}

async fn act(d: &Daemon, id: &str, action: &str, body: Option<&Value>) -> Value {
    let (status, vm) = call(d, Method::POST, &format!("/v1/vms/{id}/{action}"), body).await;
    assert_eq!(status, 200, "{action} of {id}: {vm}");
    vm
}

fn nvram_path(d: &Daemon, vm: &Value) -> PathBuf {
    d.state_dir
        .join("vms")
        .join(uuid_of(vm).to_string())
        .join("nvram.qcow2")
}

/// The NVRAM's guest-visible bytes (`qemu-img convert -U` to raw: `-U`
/// reads a running VM's copy, which its firmware does not write while the
/// guest runs).
fn nvram_bytes(nvram: &Path, scratch: &Scratch) -> Vec<u8> {
    let out = scratch.path().join("nvram.raw");
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(nvram)
        .arg(&out)
        .status()
        .expect("running qemu-img");
    assert!(status.success(), "qemu-img convert {}", nvram.display());
    std::fs::read(&out).unwrap()
}

async fn snapshot(d: &Daemon, id: &str, name: &str) {
    let path = format!("/v1/vms/{id}/snapshots");
    let (status, body) = call(d, Method::POST, &path, Some(&json!({"name": name}))).await;
    assert_eq!(status, 201, "snapshot {name}: {body}");
}

/// The internal snapshots in the NVRAM file (`qemu-img snapshot -l`).
fn nvram_snapshots(nvram: &Path) -> Vec<String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", "qcow2"])
        .arg(nvram)
        .output()
        .expect("running qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    info["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn qemu_cmdline(pid: i64) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

#[tokio::test]
async fn uefi_kernel_boot_sees_efi_and_keeps_its_own_nvram() {
    let test = "uefi_kernel_boot_sees_efi_and_keeps_its_own_nvram";
    let Some(firmware) = installed(Firmware::Uefi) else {
        skip(
            test,
            "no UEFI firmware descriptor (install the `ovmf` package)",
        );
        return;
    };
    let d = Daemon::start().await;
    let scratch = Scratch::new();
    let mut spec = guest_spec_json(&unique_name("uefi"), "guest.firmware=report");
    spec["boot"]["firmware"] = json!("uefi");
    // A qcow2 disk, so the VM can be snapshotted.
    spec["disks"] = json!([{"name": "data", "size_mib": 16}]);
    let vm = create_vm(&d, &spec).await;
    let id = id_of(&vm);
    assert_eq!(vm["spec"]["boot"]["firmware"], "uefi", "{vm}");

    // Made at create, from the firmware's template, as qcow2.
    let nvram = nvram_path(&d, &vm);
    let template = std::fs::read(&firmware.vars_template).unwrap();
    assert_eq!(nvram_bytes(&nvram, &scratch), template);
    let inode = std::fs::metadata(&nvram).unwrap().ino();

    let running = act(&d, &id, "start", None).await;
    let log = d.serial_log(uuid_of(&vm));
    wait_for_count(&log, "GUEST-FIRMWARE efi=yes", 1, BOOT_TIMEOUT).await;
    wait_for_count(&log, "GUEST-READY", 1, BOOT_TIMEOUT).await;
    // QEMU got the firmware as fd sets: no firmware path on its command
    // line, the flash nodes on -machine.
    let cmdline = qemu_cmdline(running["pid"].as_i64().expect("a running VM has a pid"));
    assert!(
        cmdline.contains("pflash0=efi-code,pflash1=efi-vars"),
        "{cmdline}"
    );
    assert!(
        !cmdline.contains(&firmware.code.display().to_string()) && !cmdline.contains("nvram.qcow2"),
        "{cmdline}"
    );

    let stop = json!({"force": false, "timeout_s": 60});
    act(&d, &id, "stop", Some(&stop)).await;
    // The firmware wrote its variables (boot entries) to this VM's store.
    let after_first = nvram_bytes(&nvram, &scratch);
    assert_ne!(after_first, template, "OVMF wrote nothing to the NVRAM");

    // Snapshots take the NVRAM along: offline (qemu-img) and live (QMP).
    snapshot(&d, &id, "offline1").await;
    assert!(nvram_snapshots(&nvram).contains(&"offline1".to_string()));

    act(&d, &id, "start", None).await;
    wait_for_count(&log, "GUEST-FIRMWARE efi=yes", 2, BOOT_TIMEOUT).await;
    snapshot(&d, &id, "live1").await;
    // A VM with snapshots is not migrated (they would be lost): refused
    // before any target is contacted, naming them.
    let migrate = json!({"target": {"url": "http://127.0.0.1:9", "token": "t0ken"}});
    let path = format!("/v1/vms/{id}/migrate");
    let (status, body) = call(&d, Method::POST, &path, Some(&migrate)).await;
    assert_eq!(status, 409, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("snapshots (offline1, live1)"), "{body}");
    act(&d, &id, "stop", Some(&stop)).await;
    assert_eq!(nvram_snapshots(&nvram), ["offline1", "live1"]);
    // The same file, kept across starts, never reset from the template.
    assert_eq!(std::fs::metadata(&nvram).unwrap().ino(), inode);
    assert_ne!(nvram_bytes(&nvram, &scratch), template);

    // `vm show` names the firmware.
    let show = std::process::Command::new(env!("CARGO_BIN_EXE_vmlet"))
        .args(["--socket"])
        .arg(&d.socket)
        .args(["vm", "show", &id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&show.stderr)
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("firmware") && l.trim_end().ends_with("uefi")),
        "{text}"
    );

    force_delete_vm(&d, &id).await;
    assert!(!nvram.exists(), "the NVRAM outlived its VM");
}

#[tokio::test]
async fn uefi_secure_boot_runs_the_firmware_with_smm() {
    let test = "uefi_secure_boot_runs_the_firmware_with_smm";
    if installed(Firmware::UefiSecure).is_none() {
        skip(
            test,
            "no Secure Boot firmware descriptor (install the `ovmf` package)",
        );
        return;
    }
    let d = Daemon::start().await;
    let mut spec = guest_spec_json(&unique_name("sb"), "guest.firmware=report");
    spec["boot"]["firmware"] = json!("uefi-secure");
    let vm = create_vm(&d, &spec).await;
    let id = id_of(&vm);
    let running = act(&d, &id, "start", None).await;
    let cmdline = qemu_cmdline(running["pid"].as_i64().expect("a running VM has a pid"));
    assert!(
        cmdline.contains("pflash0=efi-code,pflash1=efi-vars,smm=on")
            && cmdline.contains("driver=cfi.pflash01,property=secure,value=on"),
        "{cmdline}"
    );
    let log = d.serial_log(uuid_of(&vm));
    // The firmware enforces Secure Boot with Microsoft's keys: it runs only
    // a kernel signed for them, which the test guest's is not (Debian signs
    // its kernels for shim). Either the kernel runs and reports Secure Boot
    // on, or the firmware refuses it; it must never boot with it off.
    let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("GUEST-FIRMWARE") {
            assert!(
                text.contains("GUEST-FIRMWARE efi=yes secureboot=enabled"),
                "{text}"
            );
            break;
        }
        if text.contains("Access Denied") || text.contains("Security Violation") {
            skip(
                test,
                "the firmware enforces Secure Boot and refuses the unsigned-for-MS test kernel (the VM ran with SMM and the secure flash)",
            );
            break;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("no GUEST-FIRMWARE line and no refusal within {BOOT_TIMEOUT:?}:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    force_delete_vm(&d, &id).await;
}

#[tokio::test]
async fn uefi_refusals_name_boot_firmware() {
    let empty = Scratch::new();
    let d =
        Daemon::start_with_env(&[("VMLET_FIRMWARE_DIRS", empty.path().to_str().unwrap())]).await;
    // No descriptors: the firmware is refused at create, naming the package.
    let mut spec = guest_spec_json(&unique_name("nofw"), "");
    spec["boot"]["firmware"] = json!("uefi");
    let answer = call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
    assert_invalid_field(&answer, "boot.firmware");
    let message = answer.1["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("ovmf"), "{message}");
    assert!(
        !d.state_dir.join("vms").exists() || {
            std::fs::read_dir(d.state_dir.join("vms"))
                .unwrap()
                .next()
                .is_none()
        }
    );
    // microvm has no pflash, whatever is installed.
    for firmware in ["uefi", "uefi-secure"] {
        let mut spec = guest_spec_json(&unique_name("micro"), "");
        spec["profile"] = json!("microvm");
        spec["boot"]["firmware"] = json!(firmware);
        let answer = call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
        assert_invalid_field(&answer, "boot.firmware");
    }
    // A disk may not take a firmware node's name.
    let mut spec = guest_spec_json(&unique_name("node"), "");
    spec["disks"] = json!([{"name": "efi-vars", "size_mib": 1}]);
    let answer = call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
    assert_invalid_field(&answer, "disks[0].name");
    // A BIOS VM needs no descriptor.
    let vm = create_vm(&d, &guest_spec_json(&unique_name("bios"), "")).await;
    // As a migration target, a daemon without UEFI firmware refuses a UEFI
    // VM, asked directly as a source daemon asks it.
    let node = call(&d, Method::GET, "/v1/node", None).await.1;
    let (_, mut view) = call(&d, Method::GET, &format!("/v1/vms/{}", id_of(&vm)), None).await;
    view["spec"]["boot"]["firmware"] = json!("uefi");
    let request = json!({
        "id": uuid::Uuid::new_v4(),
        "source": "elsewhere",
        "qemu_version": node["qemu_version"],
        "max_downtime_ms": 300,
        "vm": view,
        "images": [],
        "disks": [],
    });
    let answer = call(&d, Method::POST, "/v1/migrations/incoming", Some(&request)).await;
    assert_invalid_field(&answer, "vm.spec.boot.firmware");
    force_delete_vm(&d, &id_of(&vm)).await;
}

#[tokio::test]
async fn a_uefi_vm_migrates_with_its_nvram() {
    let test = "a_uefi_vm_migrates_with_its_nvram";
    if installed(Firmware::Uefi).is_none() {
        skip(
            test,
            "no UEFI firmware descriptor (install the `ovmf` package)",
        );
        return;
    }
    let a = Daemon::start().await;
    let target = common::daemon::TcpTarget::start("uefi-migration-token").await;
    let b = &target.daemon;
    let scratch = Scratch::new();
    let mut spec = guest_spec_json(&unique_name("uefi-mig"), "guest.firmware=report");
    spec["boot"]["firmware"] = json!("uefi");
    let vm = create_vm(&a, &spec).await;
    let id = id_of(&vm);
    act(&a, &id, "start", None).await;
    wait_for_count(&a.serial_log(uuid_of(&vm)), "GUEST-READY", 1, BOOT_TIMEOUT).await;
    // What the firmware wrote at this boot (its boot entries).
    let before = nvram_bytes(&nvram_path(&a, &vm), &scratch);

    let started = a
        .client
        .migrate_vm(&id, &target.request())
        .await
        .expect("migrate");
    let done =
        serde_json::to_value(common::daemon::wait_for_migration(&a.client, started.id).await)
            .unwrap();
    assert_eq!(done["phase"], "completed", "{done}");
    assert!(
        done["progress"]["disks"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["name"] == "efi-vars")),
        "the NVRAM was copied: {done}"
    );
    let (_, moved) = call(b, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(moved["state"], "running", "{moved}");
    // The target's NVRAM holds what the source's did, not a fresh template.
    let after = nvram_bytes(&nvram_path(b, &moved), &scratch);
    assert_eq!(after, before, "the NVRAM moved with the VM");
    assert!(!nvram_path(&a, &vm).exists(), "the source's NVRAM is gone");
    force_delete_vm(b, &id).await;
}
