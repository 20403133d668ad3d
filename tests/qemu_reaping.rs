//! vmlet starts QEMU as its own child (no `-daemonize`) and reaps it
//! through its pidfd, after a good start and after a failed one. None may
//! stay a zombie. Alone in its own test binary: zombies of
//! other tests running in the same process would blur the count.

mod common;

use std::time::Duration;

use common::{disk, guest_spec, launch, Scratch};
use vmlet::qemu::instance::StopMode;

/// Zombie children of this process.
fn zombie_children() -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields[0] == "Z" && fields[1] == me
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launches_and_failed_launches_leave_no_zombies() {
    let scratch = Scratch::new();
    for _ in 0..2 {
        let vm = launch(&guest_spec("q35", ""), &scratch)
            .await
            .expect("launch");
        assert_eq!(zombie_children(), Vec::<String>::new(), "after a launch");
        vm.stop(StopMode::Force).await.unwrap();
        assert_eq!(zombie_children(), Vec::<String>::new(), "after a stop");
    }
    // QEMU refuses to start when another QEMU holds its disk's lock.
    let image = scratch.qcow2("shared.qcow2", "16M");
    let mut holder = guest_spec("q35", "");
    holder.disks.push(disk("data", &image));
    let holder = launch(&holder, &scratch).await.expect("launch");
    for _ in 0..2 {
        let mut spec = guest_spec("q35", "");
        spec.disks.push(disk("data", &image));
        launch(&spec, &scratch).await.expect_err("disk locked");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            zombie_children(),
            Vec::<String>::new(),
            "after a failed launch"
        );
    }
    holder.stop(StopMode::Force).await.unwrap();
}
