//! vCPU pinning by vmlet (QEMU's seccomp filter forbids QEMU doing it):
//! `resources.cpu_set` for every QEMU thread, `resources.vcpu_affinity`
//! per vCPU thread (from `query-cpus-fast`), checked against the host at
//! create and applied again when a restarted daemon reattaches.
//!
//! Everything real: `vmlet serve` over HTTP, QEMU under TCG booting the test
//! guest, the kernel's `Cpus_allowed_list` of each thread. vmlet pins QEMU
//! only when it confines it (root): without root each test prints one
//! `SKIPPED:` line.

mod common;

use common::api::{expect, id_of, uuid_of};
use common::daemon::{guest_spec_json, unique_name, Daemon};
use serde_json::{json, Value};
use uuid::Uuid;
use vmlet::client::Method;

/// True when this test runs as root; else prints the skip line.
fn confinement_runs_here(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        common::skip(
            test,
            "QEMU is confined (and pinned) only when vmlet runs as root",
        );
        false
    }
}

/// Creates a test-guest VM from `spec` and starts it; returns its id and
/// QEMU's pid.
async fn create_and_start(d: &Daemon, spec: &Value) -> (Uuid, i32) {
    let vm = expect(d, Method::POST, "/v1/vms", Some(spec), 201).await;
    let id = id_of(&vm);
    let vm = expect(d, Method::POST, &format!("/v1/vms/{id}/start"), None, 200).await;
    assert_eq!(vm["state"], "running", "after start: {vm}");
    let pid = vm["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("a running VM has a pid: {vm}"));
    (uuid_of(&vm), i32::try_from(pid).unwrap())
}

/// Force-stops VM `id`.
async fn vmlet_stop(d: &Daemon, id: Uuid) {
    let vm = expect(
        d,
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(&json!({"force": true})),
        200,
    )
    .await;
    assert_eq!(vm["state"], "stopped", "after stop: {vm}");
}

/// The threads of `pid` whose name starts with `prefix`, with the CPUs each
/// may run on (`Cpus_allowed_list`).
fn threads_named(pid: i32, prefix: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            let tid: i32 = task.file_name().to_string_lossy().parse().unwrap();
            let allowed = vmlet::confine::affinity::allowed(pid, tid).unwrap_or_default();
            found.push((comm.trim().to_string(), allowed));
        }
    }
    found
}

/// `resources.cpu_set` pins every vCPU thread (QEMU's seccomp filter keeps
/// QEMU from doing it; vmlet does, from `query-cpus-fast`) and QEMU's other
/// threads; a set naming no CPU of this host fails the start, naming the
/// field.
#[tokio::test]
async fn cpu_set_pins_the_vcpu_threads() {
    const TEST: &str = "cpu_set_pins_the_vcpu_threads";
    if !confinement_runs_here(TEST) {
        return;
    }
    let last = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let d = Daemon::start().await;
    let mut spec = guest_spec_json(&unique_name("pin"), "guest.action=hold");
    spec["vcpus"] = json!(2);
    spec["resources"] = json!({ "cpu_set": last.to_string() });
    let (_, pid) = create_and_start(&d, &spec).await;
    // With `debug-threads=on` the vCPU threads are named `CPU N/TCG`.
    let vcpus = threads_named(pid, "CPU ");
    assert_eq!(vcpus.len(), 2, "two vCPU threads: {vcpus:?}");
    for (name, allowed) in &vcpus {
        assert_eq!(allowed, &last.to_string(), "{name} is pinned");
    }
    let all = threads_named(pid, "");
    assert!(all.len() > 2, "{all:?}");
    assert!(
        all.iter().all(|(_, allowed)| allowed == &last.to_string()),
        "every thread is pinned to {last}: {all:?}"
    );

    let mut far = guest_spec_json(&unique_name("far"), "guest.action=hold");
    far["resources"] = json!({ "cpu_set": "4000" });
    let vm = expect(&d, Method::POST, "/v1/vms", Some(&far), 201).await;
    let body = expect(
        &d,
        Method::POST,
        &format!("/v1/vms/{}/start", id_of(&vm)),
        None,
        503,
    )
    .await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("4000"), "{body}");
    assert!(
        d.qemu_pids().len() == 1,
        "the failed start left no QEMU: {:?}",
        d.qemu_pids()
    );
}

/// `resources.vcpu_affinity` pins each vCPU thread to its own CPU list and
/// QEMU's other threads to `cpu_set`; vmlet sets them again when it
/// reattaches after a restart. A list per vCPU, naming CPUs of this host,
/// is checked at create (422 naming the field).
#[tokio::test]
async fn vcpu_affinity_pins_each_vcpu_and_is_applied_again_after_a_restart() {
    const TEST: &str = "vcpu_affinity_pins_each_vcpu_and_is_applied_again_after_a_restart";
    if !confinement_runs_here(TEST) {
        return;
    }
    let host = vmlet::spec::host_cpus().unwrap_or_default();
    if host.len() < 2 {
        return common::skip(
            TEST,
            format!("the host has {} online CPUs, 2 needed", host.len()),
        );
    }
    let (a, b) = (host[0], host[1]);
    let mut d = Daemon::start().await;
    let mut spec = guest_spec_json(&unique_name("vcpupin"), "guest.action=hold");
    spec["vcpus"] = json!(2);
    for (lists, field) in [
        (json!([a.to_string()]), "resources.vcpu_affinity"),
        (json!([a.to_string(), "4095"]), "resources.vcpu_affinity[1]"),
        (json!([a.to_string(), "2-1"]), "resources.vcpu_affinity[1]"),
    ] {
        spec["resources"] = json!({ "vcpu_affinity": lists });
        let answer = common::api::call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
        common::api::assert_invalid_field(&answer, field);
    }
    spec["resources"] = json!({
        "vcpu_affinity": [b.to_string(), a.to_string()],
        "cpu_set": b.to_string(),
    });
    let (id, pid) = create_and_start(&d, &spec).await;
    let check = |when: &str| {
        let all = threads_named(pid, "");
        for (name, allowed) in &all {
            let wanted = if name.starts_with("CPU 0/") {
                b
            } else if name.starts_with("CPU 1/") {
                a
            } else {
                b
            };
            assert_eq!(
                allowed,
                &wanted.to_string(),
                "{when}: thread {name:?} in {all:?}"
            );
        }
        let vcpus = all.iter().filter(|(n, _)| n.starts_with("CPU ")).count();
        assert_eq!(vcpus, 2, "{when}: {all:?}");
    };
    check("after start");

    // While vmlet is down every thread is let loose; the restarted daemon
    // pins them again.
    d.kill();
    let everywhere = {
        let mut set = nix::sched::CpuSet::new();
        for cpu in &host {
            set.set(*cpu as usize).unwrap();
        }
        set
    };
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let tid: i32 = task.file_name().to_string_lossy().parse().unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &everywhere).unwrap();
    }
    d.start_again().await;
    let vm = expect(&d, Method::GET, &format!("/v1/vms/{id}"), None, 200).await;
    assert_eq!(vm["pid"].as_i64(), Some(i64::from(pid)), "{vm}");
    check("after reattach");
    vmlet_stop(&d, id).await;
}
