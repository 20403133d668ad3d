//! Live migration between two vmlet hosts, each a daemon in a network
//! namespace of its own joined by a veth ([`common::two_hosts`]), under
//! real QEMU (TCG): a running guest with an image overlay, a blank disk, a
//! volume and a bridge NIC moves there and back with its memory (a counter
//! that goes on), its disks (markers read back from the new host's disks)
//! and its network (pinged on the new host); failures before the switch (the
//! target's QEMU killed, a cancel, either daemon killed and restarted) leave
//! exactly one running copy, on the source; refusals leave nothing anywhere.
//!
//! The guest runs `guest.action=count` (scripts/test-guest/init): it
//! writes `GUEST-MARK vda=MARKER ...` once, then `GUEST-COUNT N vda=READ
//! ...` every 0.5 s with N kept in guest memory.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;
use vmlet::client::Method;
use vmlet::spec::{MigrateRequest, Migration, MigrationTarget, Phase, Role};
use vmlet::vm::events::{Event, EventBody};

use common::api::{call, create_vm, expect, id_of, uuid_of};
use common::daemon::{guest_spec_json, unique_name, wait_until};
use common::two_hosts::{Host, TwoHosts};
use common::BOOT_TIMEOUT;

/// How long a migration of a 256 MiB TCG guest with small disks may take
/// on a loaded 2-core machine (a few seconds when idle).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);

/// How long a capped (1 MiB/s) migration may take to reach its RAM phase.
const RAM_PHASE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the guest's console gets to show new counts.
const COUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// A bandwidth cap that keeps a migration in its RAM phase for a long
/// while (the guest's kernel and initramfs alone are tens of MiB). It caps
/// the disk copies too, which copy the blank disks whole: they are kept
/// small (8 MiB) so the RAM phase comes within seconds.
const CRAWL_MIB_S: u64 = 2;

/// The skip line when this host cannot run two hosts in namespaces.
fn cannot_run(test: &str) -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        common::skip(test, "needs root (network namespaces, bridges, taps)");
        return true;
    }
    false
}

// ---- the guest ------------------------------------------------------------------

/// A counting guest on host A.
struct Guest {
    id: String,
    uuid: Uuid,
    mac: String,
    /// Its address on the bridge network (no prefix).
    ip: String,
    volume: String,
}

/// What the guest's console shows: its markers, and its counts with the
/// markers each read back. Whole lines only (a line cut by the switch
/// between hosts is left out).
#[derive(Debug, Default)]
struct Console {
    ready: usize,
    marks: BTreeMap<String, String>,
    counts: Vec<(u64, BTreeMap<String, String>)>,
    /// The console's whole lines, for a failure's message.
    lines: Vec<String>,
}

impl Console {
    fn read(host: &Host, uuid: Uuid) -> Console {
        let bytes = std::fs::read(host.daemon.serial_log(uuid)).unwrap_or_default();
        Console::parse(&String::from_utf8_lossy(&bytes))
    }

    fn parse(text: &str) -> Console {
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        let mut console = Console::default();
        for line in whole.lines().map(|l| l.trim_end_matches('\r')) {
            console.lines.push(line.to_string());
            if line.starts_with("GUEST-READY") {
                console.ready += 1;
            } else if let Some(rest) = line.strip_prefix("GUEST-MARK ") {
                console.marks = pairs(rest);
            } else if let Some(rest) = line.strip_prefix("GUEST-COUNT ") {
                let (n, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                if let Ok(n) = n.parse() {
                    console.counts.push((n, pairs(rest)));
                }
            }
        }
        console
    }

    fn last(&self) -> u64 {
        self.counts.last().map_or(0, |(n, _)| *n)
    }

    /// Asserts the counts go up one by one (the counter was never reset)
    /// and every one read back exactly `marks`.
    fn assert_steady(&self, marks: &BTreeMap<String, String>, what: &str) {
        for pair in self.counts.windows(2) {
            assert_eq!(
                pair[1].0,
                pair[0].0 + 1,
                "counts on {what}: {:?}",
                self.counts
            );
        }
        for (n, read) in &self.counts {
            let tail = &self.lines[self.lines.len().saturating_sub(40)..];
            assert_eq!(
                read,
                marks,
                "markers read back at count {n} on {what}; the console's last lines:\n{}",
                tail.join("\n")
            );
        }
    }
}

fn pairs(text: &str) -> BTreeMap<String, String> {
    text.split_whitespace()
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Waits until `host`'s console of `uuid` shows a count of at least `n`.
async fn wait_count(host: &Host, uuid: Uuid, n: u64) -> Console {
    let what = format!("count {n} on {}", host.url);
    let mut last = Console::default();
    let found = tokio::time::timeout(COUNT_TIMEOUT, async {
        loop {
            last = Console::read(host, uuid);
            if last.last() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if found.is_err() {
        panic!(
            "no {what} within {COUNT_TIMEOUT:?}; console:\n{}",
            std::fs::read_to_string(host.daemon.serial_log(uuid)).unwrap_or_default()
        );
    }
    last
}

/// Creates and starts, on host A, a 256 MiB counting guest with an
/// overlay on `image`, a blank disk, a volume and a NIC on the bridge
/// network at address `.n`; waits until it counted to 3.
async fn counting_guest(hosts: &TwoHosts, image: &str, n: u8) -> Guest {
    let a = &hosts.a;
    let volume = unique_name("vol");
    expect(
        &a.daemon,
        Method::POST,
        "/v1/volumes",
        Some(&json!({"name": volume, "size_mib": 8})),
        201,
    )
    .await;
    let ip = hosts.guest_ip(n);
    let r = Uuid::new_v4().as_bytes()[..3].to_vec();
    let mac = format!("52:54:00:{:02x}:{:02x}:{:02x}", r[0], r[1], r[2]);
    let mut spec = guest_spec_json(
        &unique_name("mig"),
        &format!("guest.action=count guest.ip={ip}"),
    );
    spec["disks"] = json!([
        {"name": "os", "image": image},
        {"name": "data", "size_mib": 8},
        {"name": "vol", "volume": volume},
    ]);
    spec["nics"] = json!([{"network": hosts.network, "mac": mac}]);
    let vm = create_vm(&a.daemon, &spec).await;
    let id = id_of(&vm);
    let uuid = uuid_of(&vm);
    a.client().start(&id).await.unwrap();
    common::wait_for_line(&a.daemon.serial_log(uuid), "GUEST-READY", BOOT_TIMEOUT).await;
    let console = wait_count(a, uuid, 3).await;
    assert_eq!(
        console.marks.keys().collect::<Vec<_>>(),
        ["vda", "vdb", "vdc"],
        "the guest marks its three disks: {console:?}"
    );
    console.assert_steady(&console.marks, "A before the migration");
    Guest {
        id,
        uuid,
        mac,
        ip: ip.split('/').next().unwrap().to_string(),
        volume,
    }
}

/// Follows `host`'s console of `uuid` in the background and keeps the
/// highest count seen, until dropped (the log goes with the VM's
/// directory when the VM moves away).
struct CountWatch {
    highest: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountWatch {
    fn start(host: &Host, uuid: Uuid) -> CountWatch {
        let highest = Arc::new(AtomicU64::new(0));
        let path = host.daemon.serial_log(uuid);
        let seen = highest.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(bytes) = std::fs::read(&path) {
                    let last = Console::parse(&String::from_utf8_lossy(&bytes)).last();
                    seen.fetch_max(last, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        CountWatch { highest, task }
    }

    fn highest(&self) -> u64 {
        self.highest.load(Ordering::SeqCst)
    }
}

impl Drop for CountWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Collects a daemon's events in the background until dropped.
struct Events {
    seen: Arc<Mutex<Vec<Event>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Events {
    async fn follow(host: &Host) -> Events {
        let mut stream = host.client().events(None).await.expect("GET /v1/events");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(event)) = stream.next().await {
                sink.lock().unwrap().push(event);
            }
        });
        Events { seen, task }
    }

    /// The events about VM `uuid` itself (not its migrations).
    fn about(&self, uuid: Uuid) -> Vec<Event> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|e| match &e.body {
                EventBody::Vm { vm } => vm.id == uuid,
                EventBody::VmDeleted { id, .. } | EventBody::VmMigrated { id, .. } => *id == uuid,
                _ => false,
            })
            .cloned()
            .collect()
    }

    /// The progress migration `id`'s events carried, in order.
    fn progress(&self, id: Uuid) -> Vec<vmlet::spec::Progress> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Migration { migration } if migration.id == id => {
                    Some(migration.progress.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Asserts `host`'s events showed migration `id` with progress: the
    /// memory's size, bytes of it moved, and every disk in `disks`.
    fn assert_progress(&self, host: &Host, id: Uuid, disks: &[&str]) {
        let all = self.progress(id);
        let shown = all.iter().any(|p| {
            let names: Vec<&str> = p.disks.iter().map(|d| d.name.as_str()).collect();
            p.ram_total > 0
                && p.ram_transferred > 0
                && disks.iter().all(|d| names.contains(d))
                && p.disks.iter().all(|d| d.total > 0 && d.done <= d.total)
        });
        assert!(
            shown,
            "no migration event with progress on {}: {all:?}",
            host.url
        );
    }

    /// The phases of migration `id` the events showed, in order.
    fn phases(&self, id: Uuid) -> Vec<Phase> {
        let mut phases: Vec<Phase> = Vec::new();
        for e in self.seen.lock().unwrap().iter() {
            if let EventBody::Migration { migration } = &e.body {
                if migration.id == id && phases.last() != Some(&migration.phase) {
                    phases.push(migration.phase);
                }
            }
        }
        phases
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- assertions -------------------------------------------------------------------

/// The guest memory `host` counts as allocated (`/v1/node` inventory), MiB.
async fn memory_allocated(host: &Host) -> u64 {
    let node = expect(&host.daemon, Method::GET, "/v1/node", None, 200).await;
    node["inventory"]["memory_mib"]["allocated"]
        .as_u64()
        .unwrap_or_else(|| panic!("no inventory.memory_mib.allocated: {node}"))
}

/// Asserts VM `uuid` runs on `host`, wanted running, with no task (not
/// lent to a migration any more).
async fn assert_runs_on(host: &Host, uuid: Uuid) -> Value {
    let vm = host.vm(uuid).await;
    assert_eq!(vm["state"], "running", "on {}: {vm}", host.url);
    assert_eq!(vm["desired"], "running", "on {}: {vm}", host.url);
    assert_eq!(
        vm["task"],
        Value::Null,
        "the VM is still busy on {}: {vm}",
        host.url
    );
    assert_eq!(
        host.qemus(uuid).len(),
        1,
        "one QEMU of {uuid} on {}",
        host.url
    );
    vm
}

/// Asserts the guest's counter goes on on `host` past `after` (it keeps
/// running there), with the markers unchanged.
async fn assert_counting_on(host: &Host, uuid: Uuid, after: u64, marks: &BTreeMap<String, String>) {
    let console = wait_count(host, uuid, after + 2).await;
    console.assert_steady(marks, &host.url);
}

/// Asserts exactly one copy of VM `uuid` across both hosts: one live QEMU
/// with its `-uuid`, and one daemon listing it.
async fn assert_one_copy(hosts: &TwoHosts, uuid: Uuid) {
    let (qemus, listed) = hosts.copies(uuid).await;
    assert_eq!(
        (qemus, listed),
        (1, 1),
        "QEMUs on A {:?}, on B {:?}",
        hosts.a.qemus(uuid),
        hosts.b.qemus(uuid)
    );
}

/// Asserts a migration record ended in `phase` with the fields a final
/// record has.
fn assert_ended(m: &Migration, phase: Phase, role: Role, uuid: Uuid) {
    assert_eq!(m.phase, phase, "{m:?}");
    assert_eq!(m.role, role, "{m:?}");
    assert_eq!(m.vm, uuid, "{m:?}");
    assert!(
        m.finished_at.is_some(),
        "a final record has finished_at: {m:?}"
    );
    if phase == Phase::Completed {
        assert_eq!(m.error, None, "{m:?}");
    } else {
        assert!(
            m.error.as_deref().is_some_and(|e| !e.is_empty()),
            "a failed or cancelled record says why: {m:?}"
        );
    }
}

/// Starts a migration of `guest` from `from` to `to`; returns its record.
async fn migrate(from: &Host, to: &Host, guest: &Guest, cap: Option<u64>) -> Migration {
    let request = serde_json::to_value(to.migrate_here(cap)).unwrap();
    let (status, body) = call(
        &from.daemon,
        Method::POST,
        &format!("/v1/vms/{}/migrate", guest.id),
        Some(&request),
    )
    .await;
    assert_eq!(status, 202, "migrate: {body}\n{}", from.daemon.log_text());
    let m: Migration = serde_json::from_value(body).unwrap();
    assert_eq!(m.vm, guest.uuid, "{m:?}");
    assert_eq!(m.role, Role::Source, "{m:?}");
    assert_eq!(m.target, to.url, "{m:?}");
    assert_eq!(m.max_bandwidth_mib_s, cap, "{m:?}");
    assert!(!m.phase.is_final(), "{m:?}");
    m
}

/// Moves `guest` from `from` to `to` and checks everything the move
/// promises: both records completed with a downtime, the VM running on
/// `to` (same UUID, generation going on, count going on, the same disk
/// markers, answering pings there), nothing left on `from`, and `from`'s
/// last event about the VM saying where it went. Returns the problems of
/// the checks left for the caller to assert last.
#[must_use]
async fn move_and_check(
    from: &Host,
    to: &Host,
    guest: &Guest,
    marks: &BTreeMap<String, String>,
) -> Vec<String> {
    let uuid = guest.uuid;
    let before = assert_runs_on(from, uuid).await;
    let generation = before["generation"].as_u64().unwrap();
    let events = Events::follow(from).await;
    let arrivals = Events::follow(to).await;
    let memory = before["spec"]["memory_mib"].as_u64().unwrap();
    let (from_allocated, to_allocated) = (memory_allocated(from).await, memory_allocated(to).await);
    let watch = CountWatch::start(from, uuid);
    wait_until("the count watch to see a count", COUNT_TIMEOUT, || async {
        (watch.highest() > 0).then_some(())
    })
    .await;

    let m = migrate(from, to, guest, None).await;
    let done = from.wait_final(m.id, MIGRATION_TIMEOUT).await;
    // Once the source says completed, the VM is no longer the source's (a
    // scheduler moving it on at once must not be told it still exists).
    let listed_when_completed = from.has_vm(uuid).await;
    assert_eq!(
        done.phase,
        Phase::Completed,
        "{done:?}\nsource log:\n{}\ntarget log:\n{}",
        from.daemon.log_text(),
        to.daemon.log_text()
    );
    assert_ended(&done, Phase::Completed, Role::Source, uuid);
    assert!(done.downtime_ms.is_some(), "source record: {done:?}");
    assert!(
        done.total_ms.is_some_and(|t| t > 0),
        "source record: {done:?}"
    );
    let arrived = to.wait_final(m.id, MIGRATION_TIMEOUT).await;
    assert_ended(&arrived, Phase::Completed, Role::Target, uuid);
    let last_on_source = watch.highest();
    drop(watch);

    // The VM runs on the target, the same VM, its generation going on.
    let vm = assert_runs_on(to, uuid).await;
    assert_eq!(vm["id"], before["id"]);
    assert_eq!(vm["name"], before["name"]);
    assert!(
        vm["generation"].as_u64().unwrap() > generation,
        "generation {generation} before, {} after: {vm}",
        vm["generation"]
    );
    // Its memory came along: the count goes on past the last one seen on
    // the source, without a new boot; its disks too: the markers written on
    // the source read back from the target's disks.
    let console = wait_count(to, uuid, last_on_source + 3).await;
    assert_eq!(
        console.ready, 0,
        "the guest booted again on the target: {console:?}"
    );
    let first = console.counts.first().map(|(n, _)| *n).unwrap();
    assert!(
        first > last_on_source,
        "the first count on the target ({first}) follows the last on the source ({last_on_source})"
    );
    console.assert_steady(marks, &to.url);
    // Its network: the bridge address on the target's side reaches it.
    assert!(
        to.ping(&guest.ip, 30).await,
        "ping {} from {}",
        guest.ip,
        to.ns.name
    );

    // Nothing of it is left on the source.
    from.assert_clean_of(uuid, Some(&guest.mac), Some(&guest.volume))
        .await;
    assert!(
        to.volumes().await.contains(&guest.volume),
        "the volume moved along"
    );
    // The source's last event about the VM says where it went.
    let about = wait_until("the vm_migrated event", Duration::from_secs(30), || async {
        let about = events.about(uuid);
        about
            .iter()
            .any(|e| matches!(e.body, EventBody::VmMigrated { .. }))
            .then_some(about)
    })
    .await;
    match &about.last().unwrap().body {
        EventBody::VmMigrated { id, target, .. } => {
            assert_eq!(*id, uuid);
            assert_eq!(*target, to.url);
        }
        other => panic!("the last event about the VM is not vm_migrated: {other:?}"),
    }
    let phases = events.phases(m.id);
    assert_eq!(phases.last(), Some(&Phase::Completed), "{phases:?}");
    assert!(phases.contains(&Phase::Ram), "{phases:?}");
    // Both daemons' event streams carried the migration with its progress.
    let arrived_phases = arrivals.phases(m.id);
    assert_eq!(
        arrived_phases.last(),
        Some(&Phase::Completed),
        "{arrived_phases:?}"
    );
    for (stream, host) in [(&events, from), (&arrivals, to)] {
        stream.assert_progress(host, m.id, &["os", "data", "vol"]);
    }
    // The guest's memory moved with it: released on the source, claimed on
    // the target.
    assert_eq!(
        (memory_allocated(from).await, memory_allocated(to).await),
        (from_allocated - memory, to_allocated + memory),
        "memory allocated on {} and {} after the move of a {memory} MiB guest",
        from.url,
        to.url
    );
    // Both daemons list the migration.
    for host in [from, to] {
        let listed = host.client().list_migrations().await.unwrap();
        assert!(listed.iter().any(|l| l.id == m.id), "{listed:?}");
    }
    // Returned to the caller, which asserts them after its other checks
    // (a move back, say) ran too: the source no longer listed the VM when
    // its record said completed, and the record both daemons keep of a
    // completed migration says how long the guest was paused.
    let mut problems = Vec::new();
    if listed_when_completed {
        problems.push(format!(
            "{} still listed the VM when its migration record said completed",
            from.url
        ));
    }
    let arrived = to.migration(m.id).await;
    if arrived.downtime_ms.is_none() {
        problems.push(format!(
            "the target's record has no downtime_ms: {arrived:?}"
        ));
    }
    problems
}

/// Asserts that the checks [`move_and_check`] left for the end held.
fn assert_no_problems(problems: &[String]) {
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---- a. there and back ------------------------------------------------------------

#[tokio::test]
async fn a_running_guest_moves_with_its_memory_disks_and_network_and_back() {
    if cannot_run("a_running_guest_moves_with_its_memory_disks_and_network_and_back") {
        return;
    }
    let hosts = TwoHosts::start().await;
    let image = unique_name("img");
    hosts.import_image_on_both(&image, "64M").await;
    let guest = counting_guest(&hosts, &image, 10).await;
    let marks = Console::read(&hosts.a, guest.uuid).marks;
    assert!(hosts.a.ping(&guest.ip, 30).await, "ping on A first");

    let mut problems = move_and_check(&hosts.a, &hosts.b, &guest, &marks).await;
    assert_one_copy(&hosts, guest.uuid).await;
    problems.extend(move_and_check(&hosts.b, &hosts.a, &guest, &marks).await);
    assert_one_copy(&hosts, guest.uuid).await;
    assert_no_problems(&problems);
}

// ---- b. the target's QEMU dies ------------------------------------------------------

#[tokio::test]
async fn the_target_qemu_killed_mid_migration_leaves_the_guest_on_the_source() {
    if cannot_run("the_target_qemu_killed_mid_migration_leaves_the_guest_on_the_source") {
        return;
    }
    let hosts = TwoHosts::start().await;
    let (a, b) = (&hosts.a, &hosts.b);
    let image = unique_name("img");
    hosts.import_image_on_both(&image, "64M").await;
    let guest = counting_guest(&hosts, &image, 11).await;
    let marks = Console::read(a, guest.uuid).marks;

    let m = migrate(a, b, &guest, Some(CRAWL_MIB_S)).await;
    a.wait_phase(m.id, Phase::Ram, RAM_PHASE_TIMEOUT).await;
    let target_qemus = b.qemus(guest.uuid);
    assert_eq!(
        target_qemus.len(),
        1,
        "the target's QEMU waits for the memory"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(target_qemus[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed_at = Console::read(a, guest.uuid).last();

    let failed = a.wait_final(m.id, MIGRATION_TIMEOUT).await;
    assert_ended(&failed, Phase::Failed, Role::Source, guest.uuid);
    let abandoned = b.wait_final(m.id, MIGRATION_TIMEOUT).await;
    assert_ended(&abandoned, Phase::Failed, Role::Target, guest.uuid);
    assert_runs_on(a, guest.uuid).await;
    assert_counting_on(a, guest.uuid, killed_at, &marks).await;
    b.assert_clean_of(guest.uuid, Some(&guest.mac), Some(&guest.volume))
        .await;
    assert!(a.volumes().await.contains(&guest.volume));

    // Nothing stands in the way of a second try.
    let problems = move_and_check(a, b, &guest, &marks).await;
    assert_one_copy(&hosts, guest.uuid).await;
    assert_no_problems(&problems);
}

// ---- c. cancel --------------------------------------------------------------------

#[tokio::test]
async fn a_migration_cancelled_in_its_ram_phase_leaves_the_guest_on_the_source() {
    if cannot_run("a_migration_cancelled_in_its_ram_phase_leaves_the_guest_on_the_source") {
        return;
    }
    let hosts = TwoHosts::start().await;
    let (a, b) = (&hosts.a, &hosts.b);
    let image = unique_name("img");
    hosts.import_image_on_both(&image, "64M").await;
    let guest = counting_guest(&hosts, &image, 12).await;
    let marks = Console::read(a, guest.uuid).marks;

    let m = migrate(a, b, &guest, Some(CRAWL_MIB_S)).await;
    a.wait_phase(m.id, Phase::Ram, RAM_PHASE_TIMEOUT).await;
    // Meanwhile the VM is busy on A: its task says so, and a second
    // migration is refused.
    let vm = a.vm(guest.uuid).await;
    assert_eq!(vm["task"], "migrating", "{vm}");
    let (status, code, message) = refused(a, &guest.id, &request_to(b.target())).await;
    assert_eq!((status, code.as_str()), (409, "busy"), "{message}");
    assert!(message.contains("migrating"), "{message}");
    // The target shows what arrived so far.
    let arriving = wait_until(
        "the target to show memory arriving",
        COUNT_TIMEOUT,
        || async {
            let there = b.migration(m.id).await;
            (there.progress.ram_transferred > 0).then_some(there)
        },
    )
    .await;
    assert_eq!(arriving.role, Role::Target, "{arriving:?}");
    assert_eq!(arriving.phase, Phase::Ram, "{arriving:?}");
    // Both hosts count the guest's memory meanwhile: A runs it, B holds
    // room for it.
    let memory = vm["spec"]["memory_mib"].as_u64().unwrap();
    assert_eq!(
        memory_allocated(a).await,
        memory,
        "on A during the migration"
    );
    assert_eq!(
        memory_allocated(b).await,
        memory,
        "on B during the migration"
    );
    assert!(
        arriving.progress.ram_transferred <= arriving.progress.ram_total,
        "{arriving:?}"
    );
    let at_cancel = Console::read(a, guest.uuid).last();
    let answer = a.client().cancel_migration(m.id).await.unwrap();
    assert_eq!(answer.id, m.id);
    let cancelled = a.wait_final(m.id, MIGRATION_TIMEOUT).await;
    assert_ended(&cancelled, Phase::Cancelled, Role::Source, guest.uuid);
    // The target learns it either from the cancel or from the memory
    // stream closing, whichever comes first; either way it gave up.
    let there = b.wait_final(m.id, MIGRATION_TIMEOUT).await;
    assert!(
        matches!(there.phase, Phase::Cancelled | Phase::Failed),
        "{there:?}"
    );
    assert_ended(&there, there.phase, Role::Target, guest.uuid);
    assert_runs_on(a, guest.uuid).await;
    assert_counting_on(a, guest.uuid, at_cancel, &marks).await;
    b.assert_clean_of(guest.uuid, Some(&guest.mac), Some(&guest.volume))
        .await;
    assert_one_copy(&hosts, guest.uuid).await;
    assert_eq!(memory_allocated(b).await, 0, "B released the room it held");
    assert_eq!(memory_allocated(a).await, memory, "A still runs the guest");
    // Cancelling again answers the final record as it is.
    let again = a.client().cancel_migration(m.id).await.unwrap();
    assert_eq!(again.phase, Phase::Cancelled);
}

// ---- d. refusals --------------------------------------------------------------------

/// Asserts that a refused migration request left nothing on either host:
/// no migration record, the VM running on A and not busy, nothing on B.
async fn assert_nothing_made(hosts: &TwoHosts, uuid: Uuid, mac: &str) {
    for host in [&hosts.a, &hosts.b] {
        let listed = host.client().list_migrations().await.unwrap();
        assert!(listed.is_empty(), "migrations on {}: {listed:?}", host.url);
    }
    assert_runs_on(&hosts.a, uuid).await;
    hosts.b.assert_clean_of(uuid, Some(mac), None).await;
    assert!(hosts.b.volumes().await.is_empty());
}

/// A refused `POST /v1/vms/{id}/migrate`: its status, code and message.
async fn refused(host: &Host, id: &str, request: &Value) -> (u16, String, String) {
    let (status, body) = call(
        &host.daemon,
        Method::POST,
        &format!("/v1/vms/{id}/migrate"),
        Some(request),
    )
    .await;
    assert!(status >= 400, "expected a refusal, got {status}: {body}");
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!message.is_empty(), "{body}");
    (status, code, message)
}

fn request_to(target: MigrationTarget) -> Value {
    serde_json::to_value(MigrateRequest {
        target,
        max_downtime_ms: 300,
        max_bandwidth_mib_s: None,
    })
    .unwrap()
}

#[tokio::test]
async fn refused_migrations_leave_nothing_on_either_host() {
    if cannot_run("refused_migrations_leave_nothing_on_either_host") {
        return;
    }
    // B offers 128 MiB of memory: a 256 MiB guest does not fit there.
    let profiles = common::Scratch::new();
    let q35 = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu-profiles/q35.toml"),
    )
    .unwrap();
    // A profile passing this host's CPU through ("max" under TCG).
    std::fs::write(
        profiles.path().join("passthrough.toml"),
        q35.replace("tcg = \"qemu64\"", "tcg = \"max\""),
    )
    .unwrap();
    // A profile whose disks are NVMe controllers, which QEMU cannot
    // migrate (a migration blocker QEMU reports itself).
    std::fs::write(
        profiles.path().join("nvmedisks.toml"),
        q35.replace("disk = \"virtio-blk-pci\"", "disk = \"nvme\""),
    )
    .unwrap();
    let profile_dir = profiles.path().to_str().unwrap();
    let hosts = TwoHosts::start_with(
        &[("VMLET_PROFILE_DIR", profile_dir)],
        &[
            ("VMLET_CAPACITY_MEMORY_MIB", "128"),
            ("VMLET_RESERVED_MEMORY_MIB", "0"),
        ],
    )
    .await;
    let (a, b) = (&hosts.a, &hosts.b);
    let image = unique_name("img");
    let file = common::two_hosts::make_image(a.import.path(), "only-a.qcow2", "64M");
    a.import_image(&image, "only-a.qcow2").await;

    // A running guest with an overlay on an image only A has, and a NIC.
    let mac = "52:54:00:d0:00:01";
    let mut spec = guest_spec_json(&unique_name("refuse"), "guest.action=hold");
    spec["disks"] = json!([{"name": "os", "image": image}, {"name": "data", "size_mib": 8}]);
    spec["nics"] = json!([{"network": hosts.network, "mac": mac}]);
    let vm = create_vm(&a.daemon, &spec).await;
    let (id, uuid) = (id_of(&vm), uuid_of(&vm));
    a.client().start(&id).await.unwrap();
    // And one whose CPU model follows this host's.
    let mut spec = guest_spec_json(&unique_name("maxcpu"), "guest.action=hold");
    spec["profile"] = json!("passthrough");
    let max_vm = create_vm(&a.daemon, &spec).await;
    let max_id = id_of(&max_vm);
    a.client().start(&max_id).await.unwrap();
    // And one with an NVMe disk.
    let mut spec = guest_spec_json(&unique_name("nvme"), "guest.action=hold");
    spec["profile"] = json!("nvmedisks");
    spec["disks"] = json!([{"name": "data", "size_mib": 8, "serial": "blocker1"}]);
    let nvme_vm = create_vm(&a.daemon, &spec).await;
    let nvme_id = id_of(&nvme_vm);
    a.client().start(&nvme_id).await.unwrap();
    for uuid in [uuid, uuid_of(&max_vm), uuid_of(&nvme_vm)] {
        common::wait_for_line(&a.daemon.serial_log(uuid), "GUEST-READY", BOOT_TIMEOUT).await;
    }

    let to_b = request_to(b.target());

    // QEMU's own migration blockers: 409 naming the device, refused on
    // the source before the target is asked.
    let (status, code, message) = refused(a, &nvme_id, &to_b).await;
    assert_eq!((status, code.as_str()), (409, "conflict"), "{message}");
    assert!(
        message.contains("QEMU cannot migrate") && message.contains("nvme"),
        "{message}"
    );
    assert_runs_on(a, uuid_of(&nvme_vm)).await;
    assert_eq!(a.vm(uuid_of(&nvme_vm)).await["task"], Value::Null);

    // A malformed request names its field.
    let answer = call(
        &a.daemon,
        Method::POST,
        &format!("/v1/vms/{id}/migrate"),
        Some(&json!({"target": {"url": "ftp://x:1", "token": "t"}})),
    )
    .await;
    common::api::assert_invalid_field(&answer, "target.url");
    assert_nothing_made(&hosts, uuid, mac).await;

    // No such image on B: 422 naming the image.
    let (status, code, message) = refused(a, &id, &to_b).await;
    assert_eq!((status, code.as_str()), (422, "invalid_spec"), "{message}");
    assert!(message.contains(&image), "{message}");
    assert_nothing_made(&hosts, uuid, mac).await;

    // An image of that name on B, but other data (its sha256 differs): an
    // overlay there would read other blocks. 422 naming the image.
    common::two_hosts::make_image(b.import.path(), "other.qcow2", "32M");
    b.import_image(&image, "other.qcow2").await;
    let (status, code, message) = refused(a, &id, &to_b).await;
    assert_eq!((status, code.as_str()), (422, "invalid_spec"), "{message}");
    assert!(
        message.contains(&image) && message.contains("sha256"),
        "{message}"
    );
    assert_nothing_made(&hosts, uuid, mac).await;
    expect(
        &b.daemon,
        Method::DELETE,
        &format!("/v1/images/{image}"),
        None,
        204,
    )
    .await;

    // The same image on B, but B has too little memory: 409 naming it.
    std::fs::copy(&file, b.import.path().join("same.qcow2")).unwrap();
    b.import_image(&image, "same.qcow2").await;
    let (status, code, message) = refused(a, &id, &to_b).await;
    assert_eq!((status, code.as_str()), (409, "conflict"), "{message}");
    assert!(message.contains("memory"), "{message}");
    assert_nothing_made(&hosts, uuid, mac).await;

    // A VM of the same name on B, then one with the same UUID (small, so
    // they fit B): 409 naming what is taken, checked before B's capacity.
    let name = vm["name"].as_str().unwrap().to_string();
    let mut same_name = guest_spec_json(&name, "guest.action=hold");
    same_name["memory_mib"] = json!(64);
    let mut same_uuid = guest_spec_json(&unique_name("twin"), "guest.action=hold");
    same_uuid["memory_mib"] = json!(64);
    for (spec, named, with_uuid) in [
        (same_name, name.clone(), false),
        (same_uuid, uuid.to_string(), true),
    ] {
        let twin = if with_uuid {
            let path = format!("/v1/vms/{uuid}");
            expect(&b.daemon, Method::PUT, &path, Some(&spec), 201).await
        } else {
            create_vm(&b.daemon, &spec).await
        };
        let (status, code, message) = refused(a, &id, &to_b).await;
        assert_eq!((status, code.as_str()), (409, "conflict"), "{message}");
        assert!(message.contains(&named), "{message}");
        for host in [a, b] {
            let listed = host.client().list_migrations().await.unwrap();
            assert!(listed.is_empty(), "migrations on {}: {listed:?}", host.url);
        }
        assert_runs_on(a, uuid).await;
        common::api::force_delete_vm(&b.daemon, &id_of(&twin)).await;
        assert_nothing_made(&hosts, uuid, mac).await;
    }

    // A wrong token: B's 401 comes back as the target's failure.
    let wrong = MigrationTarget {
        url: b.url.clone(),
        token: format!("{}x", b.token),
    };
    let (status, code, message) = refused(a, &id, &request_to(wrong)).await;
    assert_eq!((status, code.as_str()), (502, "target_failed"), "{message}");
    assert!(
        message.contains("401") || message.to_lowercase().contains("token"),
        "{message}"
    );
    assert_nothing_made(&hosts, uuid, mac).await;

    // A CPU model that passes this host's CPU through cannot move: refused
    // on the source (both hosts run the same QEMU with the same
    // accelerator, so no pinned model is usable on one and not the other;
    // B's own check is below).
    let (status, code, message) = refused(a, &max_id, &to_b).await;
    assert_eq!((status, code.as_str()), (409, "conflict"), "{message}");
    assert!(message.contains("max"), "{message}");
    assert_runs_on(a, uuid_of(&max_vm)).await;
    assert_nothing_made(&hosts, uuid, mac).await;

    // B refuses an arriving VM pinned to a CPU model or machine type it
    // cannot run, or coming from a newer QEMU (as from a host with another
    // QEMU), naming the field; asked directly, as a source daemon asks it.
    let node = expect(&b.daemon, Method::GET, "/v1/node", None, 200).await;
    let usable: Vec<&str> = node["cpu_models"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let view = a.client().get_vm(&id).await.unwrap();
    let unusable = [
        "Cascadelake-Server",
        "Icelake-Server",
        "SapphireRapids",
        "EPYC-Genoa",
    ]
    .into_iter()
    .find(|m| !usable.contains(m));
    let mut pins = vec![("vm.machine.type", "type", "pc-q35-99.0".to_string())];
    match unusable {
        Some(model) => pins.push(("vm.machine.cpu", "cpu", model.to_string())),
        None => common::skip(
            "refused_migrations_leave_nothing_on_either_host (CPU model part)",
            "every candidate CPU model is usable under this accelerator",
        ),
    }
    let qemu_version = node["qemu_version"].as_str().unwrap().to_string();
    // And a source whose QEMU is newer than B's (B's may not read its
    // stream).
    pins.push(("qemu_version", "", "99.0.0".to_string()));
    for (field, key, value) in pins {
        let mut vm = serde_json::to_value(&view).unwrap();
        let mut source_qemu = qemu_version.clone();
        if field == "qemu_version" {
            source_qemu = value.clone();
        } else {
            vm["machine"][key] = json!(value);
        }
        let request = json!({
            "id": Uuid::new_v4(),
            "source": "elsewhere",
            "qemu_version": source_qemu,
            "max_downtime_ms": 300,
            "vm": vm,
            "images": [],
            "disks": [],
        });
        let answer = call(
            &b.daemon,
            Method::POST,
            "/v1/migrations/incoming",
            Some(&request),
        )
        .await;
        common::api::assert_invalid_field(&answer, field);
        assert!(
            answer.1["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&value),
            "{answer:?}"
        );
        assert_nothing_made(&hosts, uuid, mac).await;
    }

    // A stopped VM does not migrate: 409.
    a.client().stop(&max_id, true, None).await.unwrap();
    wait_until("the VM to stop", BOOT_TIMEOUT, || async {
        (a.vm(uuid_of(&max_vm)).await["state"] == "stopped").then_some(())
    })
    .await;
    let (status, code, message) = refused(a, &max_id, &to_b).await;
    assert_eq!((status, code.as_str()), (409, "conflict"), "{message}");
    assert!(message.contains("stopped"), "{message}");
    assert_nothing_made(&hosts, uuid, mac).await;
}

// ---- e. a daemon dies mid-migration -----------------------------------------------------

#[tokio::test]
async fn the_source_daemon_killed_mid_migration_rolls_back_at_restart() {
    if cannot_run("the_source_daemon_killed_mid_migration_rolls_back_at_restart") {
        return;
    }
    let mut hosts = TwoHosts::start().await;
    let image = unique_name("img");
    hosts.import_image_on_both(&image, "64M").await;
    let guest = counting_guest(&hosts, &image, 13).await;
    let marks = Console::read(&hosts.a, guest.uuid).marks;

    let m = migrate(&hosts.a, &hosts.b, &guest, Some(CRAWL_MIB_S)).await;
    hosts
        .a
        .wait_phase(m.id, Phase::Ram, RAM_PHASE_TIMEOUT)
        .await;
    hosts.a.daemon.kill();
    let at_kill = Console::read(&hosts.a, guest.uuid).last();
    // The streams ran through the source daemon: the target gives up.
    let there = hosts.b.wait_final(m.id, MIGRATION_TIMEOUT).await;
    assert_ended(&there, Phase::Failed, Role::Target, guest.uuid);

    hosts.a.daemon.start_again().await;
    let here = hosts.a.wait_final(m.id, MIGRATION_TIMEOUT).await;
    assert_ended(&here, Phase::Failed, Role::Source, guest.uuid);
    assert_runs_on(&hosts.a, guest.uuid).await;
    assert_counting_on(&hosts.a, guest.uuid, at_kill, &marks).await;
    hosts
        .b
        .assert_clean_of(guest.uuid, Some(&guest.mac), Some(&guest.volume))
        .await;
    assert_one_copy(&hosts, guest.uuid).await;
}

#[tokio::test]
async fn the_target_daemon_killed_mid_migration_leaves_the_guest_on_the_source() {
    if cannot_run("the_target_daemon_killed_mid_migration_leaves_the_guest_on_the_source") {
        return;
    }
    let mut hosts = TwoHosts::start().await;
    let image = unique_name("img");
    hosts.import_image_on_both(&image, "64M").await;
    let guest = counting_guest(&hosts, &image, 14).await;
    let marks = Console::read(&hosts.a, guest.uuid).marks;

    let m = migrate(&hosts.a, &hosts.b, &guest, Some(CRAWL_MIB_S)).await;
    hosts
        .a
        .wait_phase(m.id, Phase::Ram, RAM_PHASE_TIMEOUT)
        .await;
    hosts.b.daemon.kill();
    let at_kill = Console::read(&hosts.a, guest.uuid).last();
    let here = hosts.a.wait_final(m.id, MIGRATION_TIMEOUT).await;
    assert_ended(&here, Phase::Failed, Role::Source, guest.uuid);
    assert_runs_on(&hosts.a, guest.uuid).await;

    hosts.b.daemon.start_again().await;
    let there = hosts.b.wait_final(m.id, MIGRATION_TIMEOUT).await;
    assert_ended(&there, Phase::Failed, Role::Target, guest.uuid);
    // The arriving QEMU the killed daemon left is stopped at its restart.
    wait_until(
        "the target's QEMU to go",
        Duration::from_secs(30),
        || async { hosts.b.qemus(guest.uuid).is_empty().then_some(()) },
    )
    .await;
    hosts
        .b
        .assert_clean_of(guest.uuid, Some(&guest.mac), Some(&guest.volume))
        .await;
    assert_counting_on(&hosts.a, guest.uuid, at_kill, &marks).await;
    assert_one_copy(&hosts, guest.uuid).await;
}

// ---- f. a frozen target, and a cancel on the target's side ---------------------------

/// Stops a process with SIGSTOP; lets it go on (SIGCONT) when dropped, so a
/// failing test never leaves a frozen daemon behind.
struct Frozen(i32);

impl Frozen {
    fn freeze(pid: i32) -> Frozen {
        signal(pid, nix::sys::signal::Signal::SIGSTOP);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .unwrap_or_else(|e| panic!("{signal} to {pid}: {e}"));
}

/// The stall timeout of A's daemon in the test below: short, so the test
/// does not wait the default minute.
const STALL_TIMEOUT_S: u64 = 5;

#[tokio::test]
async fn a_frozen_target_stalls_the_migration_and_a_cancel_on_the_target_rolls_back() {
    if cannot_run("a_frozen_target_stalls_the_migration_and_a_cancel_on_the_target_rolls_back") {
        return;
    }
    let stall = STALL_TIMEOUT_S.to_string();
    let hosts = TwoHosts::start_with(&[("VMLET_MIGRATION_STALL_TIMEOUT_S", &stall)], &[]).await;
    let (a, b) = (&hosts.a, &hosts.b);
    let image = unique_name("img");
    hosts.import_image_on_both(&image, "64M").await;
    let guest = counting_guest(&hosts, &image, 15).await;
    let marks = Console::read(a, guest.uuid).marks;

    // B's daemon freezes in the RAM phase (a host that hangs, or whose
    // network silently drops everything): its end of the streams stops
    // reading, so nothing moves any more.
    let m = migrate(a, b, &guest, Some(CRAWL_MIB_S)).await;
    a.wait_phase(m.id, Phase::Ram, RAM_PHASE_TIMEOUT).await;
    let frozen = Frozen::freeze(b.daemon.pid());
    let frozen_at = std::time::Instant::now();
    let failed = a.wait_final(m.id, MIGRATION_TIMEOUT).await;
    let waited = frozen_at.elapsed();
    assert_ended(&failed, Phase::Failed, Role::Source, guest.uuid);
    let error = failed.error.clone().unwrap_or_default();
    assert!(error.contains("stalled"), "{failed:?}");
    assert!(
        waited >= Duration::from_secs(STALL_TIMEOUT_S),
        "failed after {waited:?}, before the stall timeout: {failed:?}"
    );
    // The guest never stopped running on A, and is A's again.
    assert_runs_on(a, guest.uuid).await;
    let at_stall = Console::read(a, guest.uuid).last();
    assert_counting_on(a, guest.uuid, at_stall, &marks).await;

    // B wakes up: it finds its streams closed (or the source's cancel) and
    // removes everything it made.
    drop(frozen);
    let there = b.wait_final(m.id, MIGRATION_TIMEOUT).await;
    assert!(
        matches!(there.phase, Phase::Cancelled | Phase::Failed),
        "{there:?}"
    );
    assert_ended(&there, there.phase, Role::Target, guest.uuid);
    wait_until(
        "the target's QEMU to go",
        Duration::from_secs(30),
        || async { b.qemus(guest.uuid).is_empty().then_some(()) },
    )
    .await;
    b.assert_clean_of(guest.uuid, Some(&guest.mac), Some(&guest.volume))
        .await;
    assert_eq!(memory_allocated(b).await, 0, "B released the room it held");
    assert_one_copy(&hosts, guest.uuid).await;

    // A cancel on the target's side: B stops its QEMU, the streams break,
    // and the source resumes the guest.
    let m = migrate(a, b, &guest, Some(CRAWL_MIB_S)).await;
    a.wait_phase(m.id, Phase::Ram, RAM_PHASE_TIMEOUT).await;
    let at_cancel = Console::read(a, guest.uuid).last();
    let answer = b.client().cancel_migration(m.id).await.unwrap();
    assert_eq!((answer.id, answer.role), (m.id, Role::Target));
    let there = b.wait_final(m.id, MIGRATION_TIMEOUT).await;
    assert_ended(&there, Phase::Cancelled, Role::Target, guest.uuid);
    let here = a.wait_final(m.id, MIGRATION_TIMEOUT).await;
    assert_ended(&here, Phase::Failed, Role::Source, guest.uuid);
    assert_runs_on(a, guest.uuid).await;
    assert_counting_on(a, guest.uuid, at_cancel, &marks).await;
    b.assert_clean_of(guest.uuid, Some(&guest.mac), Some(&guest.volume))
        .await;
    assert_one_copy(&hosts, guest.uuid).await;

    // After both, a migration goes through.
    let problems = move_and_check(a, b, &guest, &marks).await;
    assert_one_copy(&hosts, guest.uuid).await;
    assert_no_problems(&problems);
}

// ---- g. restarts at the switch ---------------------------------------------------------

/// Kills process `pid` when dropped if it is still the process that
/// started at `start` (a QEMU a test left without a daemon to stop it).
struct KillOnDrop(i32, Option<u64>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if vmlet::qemu::process::start_time(self.0) == self.1 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The target's commit point is the arriving VM's saved record, not its
/// `switchover` phase (written just before it): a target daemon killed
/// between the two finds the phase without the VM at restart, and the
/// guest is still the source's. It must stop the QEMU it made and end the
/// migration failed (so the source resumes the guest), never report it
/// completed with the QEMU left running.
///
/// The state is the one the daemon writes: a real VM's record and its
/// running QEMU (started by this daemon), the record removed and a
/// migration record as `target.rs` saves it in `switchover` put in place
/// while the daemon is down.
#[tokio::test]
async fn a_target_restarted_at_the_switch_before_saving_the_vm_rolls_back() {
    if cannot_run("a_target_restarted_at_the_switch_before_saving_the_vm_rolls_back") {
        return;
    }
    let mut d = common::daemon::Daemon::start().await;
    let mut spec = guest_spec_json(&unique_name("arrive"), "guest.action=hold");
    spec["disks"] = json!([{"name": "data", "size_mib": 8}]);
    let vm = create_vm(&d, &spec).await;
    let (id, uuid) = (id_of(&vm), uuid_of(&vm));
    d.client.start(&id).await.unwrap();
    common::wait_for_line(&d.serial_log(uuid), "GUEST-READY", BOOT_TIMEOUT).await;
    let pids = d.qemu_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let start = vmlet::qemu::process::start_time(pids[0]);
    assert!(start.is_some());
    let _qemu = KillOnDrop(pids[0], start);
    let mut record: Value =
        serde_json::from_slice(&std::fs::read(d.record(uuid)).unwrap()).unwrap();
    let record_map = record.as_object_mut().unwrap();
    record_map.remove("version");
    record_map.remove("host_boot_id");

    d.kill();
    std::fs::remove_file(d.record(uuid)).unwrap();
    let migration = Migration {
        id: Uuid::new_v4(),
        vm: uuid,
        vm_name: vm["name"].as_str().unwrap().to_string(),
        role: Role::Target,
        source: "elsewhere".into(),
        target: "here".into(),
        phase: Phase::Switchover,
        started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        finished_at: None,
        max_downtime_ms: 300,
        max_bandwidth_mib_s: None,
        progress: Default::default(),
        downtime_ms: None,
        total_ms: None,
        error: None,
    };
    let file = json!({
        "migration": migration,
        "vm": record,
        "qemu": [pids[0], start.unwrap()],
    });
    let dir = d.state_dir.join("migrations");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{}.json", migration.id)),
        serde_json::to_vec_pretty(&file).unwrap(),
    )
    .unwrap();

    d.start_again().await;
    let ended = common::daemon::wait_for_migration(&d.client, migration.id).await;
    assert_ended(&ended, Phase::Failed, Role::Target, uuid);
    assert!(
        ended.error.as_deref().unwrap().contains("restarted"),
        "{ended:?}"
    );
    wait_until(
        "the arriving QEMU to go",
        Duration::from_secs(30),
        || async { (vmlet::qemu::process::start_time(pids[0]) != start).then_some(()) },
    )
    .await;
    let (status, body) = call(&d, Method::GET, &format!("/v1/vms/{uuid}"), None).await;
    assert_eq!(status, 404, "{body}");
    let vm_dir = d.state_dir.join("vms").join(uuid.to_string());
    assert!(!vm_dir.exists(), "{} is left", vm_dir.display());
}

/// The source daemon SIGKILLed once its QEMU completed and it is handing
/// the guest over (its record reads `switchover` with the total time
/// measured): at restart it asks the target, which runs the guest, and
/// removes its own copy (roll forward). Exactly one copy runs, on the
/// target (or, when the kill cut the last bytes of the memory stream, on
/// the source: the test says which path ran).
#[tokio::test]
async fn the_source_daemon_killed_at_the_switch_rolls_forward_at_restart() {
    if cannot_run("the_source_daemon_killed_at_the_switch_rolls_forward_at_restart") {
        return;
    }
    let mut hosts = TwoHosts::start().await;
    let image = unique_name("img");
    hosts.import_image_on_both(&image, "64M").await;
    let guest = counting_guest(&hosts, &image, 16).await;
    let marks = Console::read(&hosts.a, guest.uuid).marks;
    let at_start = Console::read(&hosts.a, guest.uuid).last();

    let m = migrate(&hosts.a, &hosts.b, &guest, None).await;
    let record = hosts
        .a
        .daemon
        .state_dir
        .join("migrations")
        .join(format!("{}.json", m.id));
    // Watch the record closely: the window between QEMU's completion and
    // the target's answer is short.
    let seen = tokio::time::timeout(MIGRATION_TIMEOUT, async {
        loop {
            let phase = std::fs::read(&record)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .map(|v| {
                    (
                        v["migration"]["phase"].as_str().unwrap_or("").to_string(),
                        v["migration"]["total_ms"].is_u64(),
                    )
                });
            match phase {
                Some((phase, true)) if phase == "switchover" => return phase,
                Some((phase, _))
                    if matches!(phase.as_str(), "completed" | "failed" | "cancelled") =>
                {
                    return phase
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    })
    .await
    .expect("the migration reached neither its switch nor its end");
    hosts.a.daemon.kill();
    let path = if seen == "switchover" {
        "killed while handing over: the restart settles it"
    } else {
        "missed the window: the migration ended before the kill"
    };
    eprintln!("PATH: source record read {seen:?} at the kill ({path})");
    assert_ne!(seen, "failed", "the migration failed by itself");

    hosts.a.daemon.start_again().await;
    let here = hosts.a.wait_final(m.id, MIGRATION_TIMEOUT).await;
    let there = hosts.b.wait_final(m.id, MIGRATION_TIMEOUT).await;
    // The source's daemon relays the memory stream: killed right after its
    // QEMU completed, it may have died before the last bytes went out. Then
    // the target never had the whole guest, refuses the switch, and the
    // restarted source resumes it (roll back); else the target runs it
    // (roll forward). Either way exactly one copy runs.
    let (owner, other) = if there.phase == Phase::Completed {
        eprintln!("PATH: the target had the whole guest: rolled forward to it");
        (&hosts.b, &hosts.a)
    } else {
        eprintln!("PATH: the last bytes never reached the target: rolled back to the source");
        assert_eq!(seen, "switchover", "{there:?}");
        (&hosts.a, &hosts.b)
    };
    let phase = there.phase;
    assert_ended(&here, phase, Role::Source, guest.uuid);
    assert_ended(&there, phase, Role::Target, guest.uuid);
    assert_runs_on(owner, guest.uuid).await;
    assert_counting_on(owner, guest.uuid, at_start, &marks).await;
    wait_until("the other QEMU to go", Duration::from_secs(30), || async {
        other.qemus(guest.uuid).is_empty().then_some(())
    })
    .await;
    other
        .assert_clean_of(guest.uuid, Some(&guest.mac), Some(&guest.volume))
        .await;
    assert_one_copy(&hosts, guest.uuid).await;
}
