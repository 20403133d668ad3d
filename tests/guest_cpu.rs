//! The guest's CPU and memory layout through a real daemon and real QEMU
//! (TCG): a CPU model with feature flags, sockets/cores/threads and two
//! NUMA nodes as the guest kernel sees them; huge pages taken from the
//! host's pool (reserved by the test) and refused (409) when the pool is
//! short; and the spec refusals, each naming its field. Between two hosts
//! ([`common::two_hosts`]): a VM with a topology and NUMA nodes migrates
//! and keeps them (the target's QEMU is made with them, and the guest sees
//! them again when it boots there), and a target short of free huge pages
//! refuses a huge-page VM (409) leaving nothing on either host.

mod common;

use std::time::Duration;

use common::api::{
    assert_error, assert_invalid_field, call, create_vm, expect, force_delete_vm, id_of,
    serial_token, uuid_of,
};
use common::daemon::{guest_spec_json, unique_name, wait_until, Daemon};
use common::serial_shell::SerialShell;
use common::two_hosts::TwoHosts;
use common::{wait_for_line, BOOT_TIMEOUT};
use serde_json::{json, Value};
use vmlet::client::Method;
use vmlet::spec::Phase;

const SHELL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a live migration of a small TCG guest may take on a loaded
/// machine.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(240);

/// The host's huge-page pool is one for every test: the tests that resize
/// it take turns.
static HUGE_PAGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The layout every topology test gives its VM: 4 vCPUs in 2 sockets of 2
/// cores with 1 thread, the model qemu64 with +aes, two NUMA nodes of
/// 256 MiB. (Not 2 threads per core: qemu64 is an AMD model without
/// `topoext`, for which QEMU warns that it cannot describe threads; with
/// that layout the guest now and then stalled in boot, or TCG aborted.)
fn layout_fields() -> Value {
    json!({
        "vcpus": 4,
        "memory_mib": 512,
        "cpu": {"model": "qemu64", "features": ["+aes"]},
        "topology": {"sockets": 2, "cores": 2, "threads": 1},
        "numa": [
            {"cpus": "0-1", "memory_mib": 256},
            {"cpus": "2-3", "memory_mib": 256}
        ]
    })
}

/// What the guest's kernel reports of its CPUs and memory layout, read
/// through its shell on the serial console of daemon `d`.
async fn guest_layout(d: &Daemon, id: &str, log: std::path::PathBuf) -> [String; 7] {
    let token = serial_token(d, id).await;
    let socket = d.socket.clone();
    tokio::task::spawn_blocking(move || {
        let mut shell = SerialShell::connect(&socket, &token, &log);
        let mut run = |command: &str| shell.run(command, SHELL_TIMEOUT).trim().to_string();
        [
            run("cat /sys/devices/system/cpu/online"),
            run("ls -d /sys/devices/system/node/node* | wc -l"),
            run("cat /sys/devices/system/node/node0/cpulist /sys/devices/system/node/node1/cpulist | tr '\\n' ' '"),
            run("cat /sys/devices/system/cpu/cpu*/topology/physical_package_id | sort -u | wc -l"),
            // Logical CPUs per package (qemu64 is an AMD model without
            // topoext: the kernel counts threads per socket, not siblings).
            run("grep -m1 '^siblings' /proc/cpuinfo | cut -d: -f2"),
            run("grep -c -w aes /proc/cpuinfo"),
            run("grep MemTotal /sys/devices/system/node/node1/meminfo | tr -s ' ' | cut -d' ' -f4"),
        ]
    })
    .await
    .unwrap()
}

/// Asserts that `layout` (from [`guest_layout`]) is [`layout_fields`]'s.
fn assert_layout(layout: &[String; 7], host: &str) {
    let [online, nodes, node_cpus, packages, siblings, aes, node1_kib] = layout;
    assert_eq!(online, "0-3", "vCPUs online ({host})");
    assert_eq!(nodes, "2", "NUMA nodes ({host})");
    assert_eq!(node_cpus.trim(), "0-1 2-3", "the nodes' vCPUs ({host})");
    assert_eq!(packages, "2", "sockets ({host})");
    assert_eq!(siblings, "2", "cores × threads per socket ({host})");
    assert_eq!(
        aes, "4",
        "every vCPU has the +aes flag qemu64 lacks ({host})"
    );
    // Node 1 has 256 MiB, less what the firmware and kernel keep.
    let node1_kib: u64 = node1_kib
        .parse()
        .unwrap_or_else(|_| panic!("{node1_kib:?} ({host})"));
    assert!(
        (200 * 1024..=256 * 1024).contains(&node1_kib),
        "node1 MemTotal {node1_kib} kB ({host})"
    );
}

/// How long a 4-vCPU boot may go without `GUEST-READY` before it counts as
/// stalled (a good one takes 5–20 s here).
const STALL_AFTER: Duration = Duration::from_secs(45);

/// Waits for the guest of VM `id` on daemon `d` to print its `n`th
/// `GUEST-READY` into `log`. A 4-vCPU guest under TCG on this 2-core host
/// now and then stalls early in its boot (its console shows RCU stall
/// reports: "timer wakeup didn't happen"); it happens as often with the
/// code before 2026-11-26 and was not seen with the same layout started
/// by plain QEMU, so its cause is still open. Such a boot gets one reset
/// (a new boot in the same QEMU), said on stderr; a second stall fails.
async fn ready_or_reset_once(d: &Daemon, id: &str, log: &std::path::Path, n: usize) {
    let ready = |want: usize| async move {
        let started = std::time::Instant::now();
        while common::daemon::count_lines(log, "GUEST-READY") < want {
            if started.elapsed() > STALL_AFTER {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    };
    if ready(n).await {
        return;
    }
    eprintln!(
        "the 4-vCPU guest stalled in boot {n}; resetting it once:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    d.client
        .reboot_with(id, true, None)
        .await
        .expect("reset of a stalled guest");
    common::daemon::wait_for_count(log, "GUEST-READY", n, BOOT_TIMEOUT).await;
}

/// A guest spec with `extra` kernel parameters and `fields` merged in.
fn spec_with(name: &str, extra: &str, fields: Value) -> Value {
    let mut spec = guest_spec_json(name, extra);
    for (key, value) in fields.as_object().expect("an object") {
        spec[key] = value.clone();
    }
    spec
}

#[tokio::test]
async fn cpu_model_topology_and_numa_reach_the_guest() {
    let d = Daemon::start().await;
    let spec = spec_with(&unique_name("cpu"), "guest.action=shell", layout_fields());
    let vm = create_vm(&d, &spec).await;
    let id = id_of(&vm);
    // The pin carries the spec's model and flags; the spec reads back.
    assert_eq!(vm["machine"]["cpu"], "qemu64,+aes", "{vm}");
    assert_eq!(vm["spec"]["topology"]["cores"], 2, "{vm}");
    assert_eq!(vm["spec"]["numa"][1]["cpus"], "2-3", "{vm}");

    expect(&d, Method::POST, &format!("/v1/vms/{id}/start"), None, 200).await;
    let log = d.serial_log(uuid_of(&vm));
    ready_or_reset_once(&d, &id, &log, 1).await;
    assert_layout(&guest_layout(&d, &id, log).await, "one host");
    force_delete_vm(&d, &id).await;
}

#[tokio::test]
async fn impossible_cpu_and_memory_layouts_are_refused_naming_the_field() {
    let d = Daemon::start().await;
    let cases = [
        // Under TCG, `host` cannot run: checked against this QEMU.
        (json!({"cpu": {"model": "host"}}), "cpu.model"),
        (json!({"cpu": {"model": "NoSuchCpu-v9"}}), "cpu.model"),
        (json!({"cpu": {"model": "qemu64,+aes"}}), "cpu.model"),
        (json!({"cpu": {"features": ["aes"]}}), "cpu.features[0]"),
        // Well formed, but no feature of this QEMU.
        (
            json!({"cpu": {"features": ["+aes", "+aes2"]}}),
            "cpu.features[1]",
        ),
        (
            json!({"cpu": {"features": ["+aes", "-aes"]}}),
            "cpu.features[1]",
        ),
        (json!({"cpu": {"flags": ["+aes"]}}), ""),
        (
            json!({"vcpus": 4, "topology": {"sockets": 2, "cores": 2, "threads": 2}}),
            "topology",
        ),
        (
            json!({"vcpus": 2, "topology": {"sockets": 0, "cores": 2, "threads": 1}}),
            "topology.sockets",
        ),
        (
            json!({"vcpus": 2, "numa": [{"cpus": "0", "memory_mib": 128}, {"cpus": "0-1", "memory_mib": 128}]}),
            "numa[1].cpus",
        ),
        (
            json!({"vcpus": 2, "numa": [{"cpus": "0", "memory_mib": 128}]}),
            "numa",
        ),
        (
            json!({"vcpus": 1, "numa": [{"cpus": "0", "memory_mib": 100}]}),
            "numa",
        ),
        (
            json!({"memory_mib": 255, "memory": {"hugepages": "2M"}}),
            "memory.hugepages",
        ),
        (json!({"memory": {"hugepages": "4K"}}), ""),
    ];
    for (fields, field) in cases {
        let spec = spec_with(&unique_name("bad"), "", fields.clone());
        let answer = call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
        if field.is_empty() {
            // Not even the shape of a spec.
            assert!(
                (400..500).contains(&answer.0),
                "{fields}: {} {}",
                answer.0,
                answer.1
            );
        } else {
            assert_invalid_field(&answer, field);
        }
    }
    let (_, vms) = call(&d, Method::GET, "/v1/vms", None).await;
    assert_eq!(
        vms["vms"].as_array().map(Vec::len),
        Some(0),
        "nothing made: {vms}"
    );
}

/// The host's 2M huge-page pool, restored to what it was when dropped.
struct HugePagePool {
    before: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn read_number(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/meminfo"))
}

impl HugePagePool {
    /// Sets the pool to `pages` more than it had; `None` when this host
    /// cannot (not root, or not that much free contiguous memory).
    fn grow_by(pages: u64) -> Option<HugePagePool> {
        let before = std::fs::read_to_string(NR_HUGEPAGES)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let pool = HugePagePool { before };
        pool.set(before + pages).ok()?;
        (read_number(NR_HUGEPAGES) == before + pages).then_some(pool)
    }

    fn set(&self, pages: u64) -> std::io::Result<()> {
        std::fs::write(NR_HUGEPAGES, pages.to_string())
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        if let Err(e) = self.set(self.before) {
            eprintln!("restoring {NR_HUGEPAGES} to {}: {e}", self.before);
        }
    }
}

/// True when this test can reserve 2M huge pages here; else prints the
/// skip line.
fn huge_pages_here(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        common::skip(test, "reserving huge pages needs root");
        return false;
    }
    if !std::path::Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").is_dir() {
        common::skip(test, "this kernel has no 2M huge pages");
        return false;
    }
    true
}

#[tokio::test]
async fn huge_pages_back_the_guest_and_a_short_pool_is_a_conflict() {
    const TEST: &str = "huge_pages_back_the_guest_and_a_short_pool_is_a_conflict";
    if !huge_pages_here(TEST) {
        return;
    }
    let _turn = HUGE_PAGES.lock().await;
    let d = Daemon::start().await;
    // 64 pages (128 MiB) for the guest, 16 more.
    let Some(pool) = HugePagePool::grow_by(80) else {
        common::skip(TEST, "the kernel could not reserve 80 more 2M huge pages");
        return;
    };
    let base = pool.before;
    let node = expect(&d, Method::GET, "/v1/node", None, 200).await;
    let two = &node["inventory"]["hugepages"]["2M"];
    assert_eq!(two["total"], base + 80, "{node}");
    assert_eq!(two["allocated"], 0, "{node}");

    let huge = json!({"memory_mib": 128, "memory": {"hugepages": "2M"}});
    let vm = create_vm(&d, &spec_with(&unique_name("huge"), "", huge.clone())).await;
    let id = id_of(&vm);
    let node = expect(&d, Method::GET, "/v1/node", None, 200).await;
    assert_eq!(
        node["inventory"]["hugepages"]["2M"]["allocated"], 64,
        "{node}"
    );

    // More than the pool has left for new VMs: refused at create.
    let answer = call(
        &d,
        Method::POST,
        "/v1/vms",
        Some(&spec_with(
            &unique_name("huge"),
            "",
            json!({"memory_mib": 2 * (base + 16) + 2, "memory": {"hugepages": "2M"}}),
        )),
    )
    .await;
    let error = assert_error(&answer, 409, "conflict");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("not enough 2M huge pages"),
        "{error}"
    );

    let free_before = meminfo("HugePages_Free:");
    expect(&d, Method::POST, &format!("/v1/vms/{id}/start"), None, 200).await;
    wait_for_line(&d.serial_log(uuid_of(&vm)), "GUEST-READY", BOOT_TIMEOUT).await;
    // Preallocated: the whole 128 MiB is taken from the pool.
    let free_running = meminfo("HugePages_Free:");
    assert!(
        free_before - free_running >= 64,
        "HugePages_Free went from {free_before} to {free_running}"
    );
    let node = expect(&d, Method::GET, "/v1/node", None, 200).await;
    let free_reported = node["inventory"]["hugepages"]["2M"]["free"]
        .as_u64()
        .unwrap();
    assert!(free_reported <= free_running, "{node}");

    // A second VM fits what is unallocated (16 pages) ...
    let small = spec_with(
        &unique_name("huge"),
        "",
        json!({"memory_mib": 32, "memory": {"hugepages": "2M"}}),
    );
    let second = create_vm(&d, &small).await;
    let second_id = id_of(&second);
    // ... but when the pool shrinks under it, its start is a conflict,
    // and no QEMU is left behind.
    let free_now = meminfo("HugePages_Free:");
    pool.set(read_number(NR_HUGEPAGES) - free_now.saturating_sub(8))
        .unwrap();
    let free_shrunk = meminfo("HugePages_Free:");
    assert!(free_shrunk < 16, "the pool did not shrink");
    let answer = call(
        &d,
        Method::POST,
        &format!("/v1/vms/{second_id}/start"),
        None,
    )
    .await;
    let error = assert_error(&answer, 409, "conflict");
    assert!(
        error["message"].as_str().unwrap().contains("needs 16"),
        "{error}"
    );
    let second = expect(&d, Method::GET, &format!("/v1/vms/{second_id}"), None, 200).await;
    assert_eq!(second["state"], "stopped", "{second}");

    // Stopping the first gives its pages back.
    force_delete_vm(&d, &id).await;
    wait_until(
        "the huge pages to come back",
        Duration::from_secs(30),
        || async { (meminfo("HugePages_Free:") >= free_shrunk + 64).then_some(()) },
    )
    .await;
    force_delete_vm(&d, &second_id).await;
    drop(pool);
}

/// Two VMs on huge pages, each of which the free pages fit alone but not
/// both, started at once: one runs, the other is a 409 naming the huge
/// pages, its VM left with no QEMU and the reason (like any failed start).
/// (Each launch checks the free pages and its QEMU takes them as one turn;
/// without that both checks passed and one QEMU failed to preallocate.)
#[tokio::test]
async fn concurrent_starts_the_free_huge_pages_fit_only_one_at_a_time_run_one() {
    const TEST: &str = "concurrent_starts_the_free_huge_pages_fit_only_one_at_a_time_run_one";
    if !huge_pages_here(TEST) {
        return;
    }
    let _turn = HUGE_PAGES.lock().await;
    let d = Daemon::start().await;
    // Room to create both (64 pages each) ...
    let Some(pool) = HugePagePool::grow_by(140) else {
        common::skip(TEST, "the kernel could not reserve 140 more 2M huge pages");
        return;
    };
    let huge = json!({"memory_mib": 128, "memory": {"hugepages": "2M"}});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let vm = create_vm(&d, &spec_with(&unique_name("hugerace"), "", huge.clone())).await;
        ids.push(id_of(&vm));
    }
    // ... then the pool shrinks to about 100 free: either start fits, not both.
    let free_now = meminfo("HugePages_Free:");
    pool.set(read_number(NR_HUGEPAGES) - free_now.saturating_sub(100))
        .unwrap();
    let free = meminfo("HugePages_Free:");
    assert!((64..128).contains(&free), "{free} huge pages free");

    let start = |id: String| {
        let d = &d;
        async move { call(d, Method::POST, &format!("/v1/vms/{id}/start"), None).await }
    };
    let (a, b) = tokio::join!(start(ids[0].clone()), start(ids[1].clone()));
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "answers: {a:?} / {b:?}");
    let (refused, loser) = if a.0 == 409 {
        (&a, &ids[0])
    } else {
        (&b, &ids[1])
    };
    let error = assert_error(refused, 409, "conflict");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("not enough 2M huge pages"),
        "{error}"
    );
    let view = expect(&d, Method::GET, &format!("/v1/vms/{loser}"), None, 200).await;
    assert_eq!(view["state"], "error", "{view}");
    assert!(view["pid"].is_null(), "{view}");
    assert!(
        view["error"]
            .as_str()
            .unwrap_or_default()
            .contains("huge pages"),
        "{view}"
    );
    assert_eq!(d.qemu_pids().len(), 1, "QEMUs: {:?}", d.qemu_pids());

    // An edit that would take more huge pages than the pool has left
    // unallocated is refused like a create; the VM keeps its spec.
    let pages = read_number(NR_HUGEPAGES);
    let answer = call(
        &d,
        Method::PATCH,
        &format!("/v1/vms/{loser}"),
        Some(&json!({"memory_mib": 2 * pages + 2})),
    )
    .await;
    let error = assert_error(&answer, 409, "conflict");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("not enough 2M huge pages"),
        "{error}"
    );
    let view = expect(&d, Method::GET, &format!("/v1/vms/{loser}"), None, 200).await;
    assert_eq!(view["spec"]["memory_mib"], 128, "{view}");

    for id in &ids {
        force_delete_vm(&d, id).await;
    }
    drop(pool);
}

/// Skips (with the line) a two-host test on a host where it cannot run.
fn cannot_run_two_hosts(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        common::skip(test, "needs root (network namespaces, bridges, taps)");
        return true;
    }
    false
}

/// QEMU's command line of process `pid`, arguments joined by spaces.
fn cmdline_of(pid: i32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .replace('\0', " ")
}

#[tokio::test]
async fn topology_and_numa_move_with_a_live_migration() {
    if cannot_run_two_hosts("topology_and_numa_move_with_a_live_migration") {
        return;
    }
    let hosts = TwoHosts::start().await;
    let (a, b) = (&hosts.a, &hosts.b);
    let spec = spec_with(
        &unique_name("cpu-mig"),
        "guest.action=shell",
        layout_fields(),
    );
    let vm = create_vm(&a.daemon, &spec).await;
    let (id, uuid) = (id_of(&vm), uuid_of(&vm));
    a.client().start(&id).await.expect("start on A");
    let log_a = a.daemon.serial_log(uuid);
    ready_or_reset_once(&a.daemon, &id, &log_a, 1).await;
    assert_layout(&guest_layout(&a.daemon, &id, log_a).await, "A");

    let started = a
        .client()
        .migrate_vm(&id, &b.migrate_here(None))
        .await
        .expect("migrate");
    let done = a.wait_final(started.id, MIGRATION_TIMEOUT).await;
    assert_eq!(done.phase, Phase::Completed, "{done:?}");
    assert!(!a.has_vm(uuid).await, "the VM left A");
    assert!(a.qemus(uuid).is_empty(), "no QEMU of the VM on A");
    let moved = b.vm(uuid).await;
    assert_eq!(moved["state"], "running", "{moved}");
    assert_eq!(moved["spec"]["topology"], layout_fields()["topology"]);
    assert_eq!(moved["spec"]["numa"], layout_fields()["numa"]);
    assert_eq!(moved["machine"]["cpu"], "qemu64,+aes", "{moved}");
    // The target's QEMU was made with the same layout (it must match the
    // guest state it received).
    let qemu = b.qemus(uuid);
    assert_eq!(qemu.len(), 1, "one QEMU on B");
    let cmdline = cmdline_of(qemu[0]);
    for part in [
        "-smp 4,sockets=2,cores=2,threads=1",
        "-numa node,nodeid=0,cpus=0-1,memdev=ram-node0",
        "-numa node,nodeid=1,cpus=2-3,memdev=ram-node1",
        "memory-backend-ram,id=ram-node1,size=256M",
        "-cpu qemu64,+aes",
    ] {
        assert!(
            cmdline.contains(part),
            "{part:?} not in B's QEMU: {cmdline}"
        );
    }
    // A reset on B: the guest's kernel reads the layout afresh from B's
    // firmware tables, and finds the same one.
    b.client()
        .reboot_with(&id, true, None)
        .await
        .expect("reset on B");
    let log_b = b.daemon.serial_log(uuid);
    ready_or_reset_once(&b.daemon, &id, &log_b, 1).await;
    assert_layout(&guest_layout(&b.daemon, &id, log_b).await, "B");
    force_delete_vm(&b.daemon, &id).await;
}

#[tokio::test]
async fn a_target_short_of_huge_pages_refuses_the_migration() {
    const TEST: &str = "a_target_short_of_huge_pages_refuses_the_migration";
    if cannot_run_two_hosts(TEST) || !huge_pages_here(TEST) {
        return;
    }
    let _turn = HUGE_PAGES.lock().await;
    let hosts = TwoHosts::start().await;
    let (a, b) = (&hosts.a, &hosts.b);
    // 64 pages (128 MiB) for the guest on A, 8 more.
    let Some(pool) = HugePagePool::grow_by(72) else {
        common::skip(TEST, "the kernel could not reserve 72 more 2M huge pages");
        return;
    };
    let spec = spec_with(
        &unique_name("huge-mig"),
        "",
        json!({"memory_mib": 128, "memory": {"hugepages": "2M"}}),
    );
    let vm = create_vm(&a.daemon, &spec).await;
    let (id, uuid) = (id_of(&vm), uuid_of(&vm));
    a.client().start(&id).await.expect("start on A");
    wait_for_line(&a.daemon.serial_log(uuid), "GUEST-READY", BOOT_TIMEOUT).await;
    // Both hosts share this machine's pool: leave fewer free pages than
    // the guest needs (whatever else the pool held before the test).
    let free_now = meminfo("HugePages_Free:");
    pool.set(read_number(NR_HUGEPAGES) - free_now.saturating_sub(8))
        .unwrap();
    assert!(meminfo("HugePages_Free:") < 64, "the pool did not shrink");

    let request = serde_json::to_value(b.migrate_here(None)).unwrap();
    let answer = call(
        &a.daemon,
        Method::POST,
        &format!("/v1/vms/{id}/migrate"),
        Some(&request),
    )
    .await;
    let error = assert_error(&answer, 409, "conflict");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("not enough 2M huge pages") && message.contains("needs 64"),
        "{error}"
    );
    // Nothing on either host: no migration, the VM runs on A as before,
    // nothing of it on B.
    for host in [a, b] {
        let listed = host.client().list_migrations().await.unwrap();
        assert!(listed.is_empty(), "migrations on {}: {listed:?}", host.url);
    }
    let there = a.vm(uuid).await;
    assert_eq!(there["state"], "running", "{there}");
    assert!(there.get("task").is_none_or(Value::is_null), "{there}");
    assert_eq!(a.qemus(uuid).len(), 1, "the VM's QEMU on A");
    b.assert_clean_of(uuid, None, None).await;

    // With the pages back, the same migration goes through: the refusal
    // left B nothing that stands in its way.
    pool.set(read_number(NR_HUGEPAGES) + 64).unwrap();
    let started = a
        .client()
        .migrate_vm(&id, &b.migrate_here(None))
        .await
        .expect("migrate");
    let done = a.wait_final(started.id, MIGRATION_TIMEOUT).await;
    assert_eq!(done.phase, Phase::Completed, "{done:?}");
    assert_eq!(b.vm(uuid).await["state"], "running");
    assert!(a.qemus(uuid).is_empty(), "no QEMU of the VM on A");
    force_delete_vm(&b.daemon, &id).await;
    drop(pool);
}
