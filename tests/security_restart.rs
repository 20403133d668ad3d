//! A create that dies half way leaves nothing behind: vmlet killed (-9)
//! while it makes the disks of a multi-disk `PUT`, after the first disk and
//! before the VM's record, leaves a `vms/UUID/` directory nothing lists;
//! the next start sweeps it, and the UUID can be created again.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::{call, expect, force_delete_vm};
use common::daemon::{guest_spec_json, unique_name, wait_until, Daemon};
use common::Scratch;
use serde_json::json;
use vmlet::client::Method;

/// Kills the stalled `qemu-img` stand-in, should the test end early.
struct KillOnDrop(Option<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn real_qemu_img() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join("qemu-img"))
        .find(|p| p.is_file())
}

#[tokio::test]
async fn a_create_killed_between_disks_is_swept_at_the_next_start() {
    let Some(real) = real_qemu_img() else {
        eprintln!("SKIPPED: no qemu-img on PATH");
        return;
    };
    // A qemu-img that stalls on the second disk's create while the trigger
    // file exists, writing its pid first; anything else runs the real one.
    let tools = Scratch::new();
    let trigger = tools.path().join("trigger");
    let stalled = tools.path().join("stalled");
    let wrapper = tools.path().join("qemu-img");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = create ] && [ -e {trigger} ]; then\n\
             case \"$*\" in *'/disks/slow.qcow2'*)\n\
             echo $$ > {stalled}.tmp && mv {stalled}.tmp {stalled}; exec sleep 600;;\n\
             esac\n\
             fi\n\
             exec {real} \"$@\"\n",
            trigger = trigger.display(),
            stalled = stalled.display(),
            real = real.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(&trigger, "").unwrap();

    let mut d = Daemon::start_with_env(&[("VMLET_QEMU_IMG", wrapper.to_str().unwrap())]).await;
    let uuid = uuid::Uuid::new_v4();
    let mut spec = guest_spec_json(&unique_name("halfmade"), "");
    spec["disks"] = json!([
        {"name": "first", "size_mib": 8},
        {"name": "slow", "size_mib": 8},
        {"name": "third", "size_mib": 8},
    ]);
    let path = format!("/v1/vms/{uuid}");
    let client = d.client.clone();
    let body = spec.clone();
    let put = tokio::spawn({
        let path = path.clone();
        async move {
            let _ = client.request_json(Method::PUT, &path, Some(&body)).await;
        }
    });
    let pid: i32 = wait_until("qemu-img stalls", Duration::from_secs(60), || {
        let stalled = stalled.clone();
        async move {
            std::fs::read_to_string(&stalled)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        }
    })
    .await;
    let mut sleeper = KillOnDrop(Some(pid));
    let vm_dir = d.state_dir.join("vms").join(uuid.to_string());
    assert!(
        vm_dir.join("disks/first.qcow2").is_file(),
        "the first disk is made"
    );
    assert!(!vm_dir.join("vm.json").exists(), "no record yet");

    d.kill();
    put.abort();
    drop(std::mem::replace(&mut sleeper, KillOnDrop(None)));
    std::fs::remove_file(&trigger).unwrap();
    assert!(
        vm_dir.is_dir(),
        "the half-made VM's directory stays until the start"
    );

    d.start_again().await;
    assert!(!vm_dir.exists(), "the orphan directory was not swept");
    assert!(
        d.log_text().contains("create never finished"),
        "{}",
        d.log_text()
    );
    let (status, answer) = call(&d, Method::GET, &path, None).await;
    assert_eq!(status, 404, "{answer}");
    // The UUID is free again: the same PUT makes the VM, all its disks.
    expect(&d, Method::PUT, &path, Some(&spec), 201).await;
    for disk in ["first", "slow", "third"] {
        assert!(
            vm_dir.join(format!("disks/{disk}.qcow2")).is_file(),
            "{disk}"
        );
    }
    force_delete_vm(&d, &uuid.to_string()).await;
}
