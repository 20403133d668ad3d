//! `vmlet serve` losing and finding its VMs again: a SIGKILLed or SIGTERMed
//! daemon reattaches to the QEMUs it left running (same pids), a crashed or
//! hung QEMU affects only its own VM, a stale record never adopts an
//! unrelated process, a guest that powers off is recorded as stopped and one
//! that panics as crashed, a VM with `autostart` comes back after a "host
//! reboot", and a start cut short by a restart is cleaned up.
//!
//! Each test runs its own daemon on scratch directories; the [`Daemon`]
//! guard kills every QEMU whose command line names its run directory, and
//! [`ProcessGuard`] kills the other processes a test starts.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::api::expect;
use common::daemon::{guest_spec_json, unique_name, wait_for_count, wait_until, Daemon};
use common::{guest_cmdline, BOOT_TIMEOUT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use uuid::Uuid;
use vmlet::client::Method;
use vmlet::qemu::accel::Accel;
use vmlet::qemu::argv::RunPaths;
use vmlet::qemu::instance::{self, QemuInstance};
use vmlet::qemu::process::QemuProcess;
use vmlet::qemu::profile::Profiles;
use vmlet::vm::events::EventBody;
use vmlet::vm::state::{Desired, PowerState, Task};
use vmlet::vm::Vm;

/// What the API promises for noticing a dead QEMU, and for answering while
/// another VM's QEMU hangs.
const PROMPT: Duration = Duration::from_secs(1);

/// How long a command on a hung QEMU may take to fail: QMP's default
/// deadline (10 s) plus slack for a loaded machine.
const HUNG_COMMAND_LIMIT: Duration = Duration::from_secs(15);

/// How long a graceful stop gives the guest.
const STOP_TIMEOUT_S: u64 = 30;

/// How long waiting for a process to exit may take.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Creates a test-guest VM that stays up (`guest.action=hold`) or runs
/// `extra` kernel parameters.
async fn create(d: &Daemon, prefix: &str, extra: &str, autostart: bool) -> Vm {
    let mut spec = guest_spec_json(&unique_name(prefix), extra);
    if autostart {
        spec["autostart"] = Value::Bool(true);
    }
    let vm = d.client.create_vm(&spec).await.expect("creating VM");
    assert_eq!(vm.state, PowerState::Stopped);
    assert_eq!(vm.spec.autostart, autostart);
    vm
}

/// Starts `id` and returns it as the start left it (`running`, with a pid).
async fn start(d: &Daemon, id: Uuid) -> Vm {
    let vm = d.client.start(&id.to_string()).await.expect("starting VM");
    assert_eq!(vm.state, PowerState::Running, "after start: {vm:?}");
    assert!(vm.pid.is_some(), "a running VM has a pid: {vm:?}");
    vm
}

/// Waits for the guest of `id` to print `GUEST-READY` on its serial log.
async fn wait_ready(d: &Daemon, id: Uuid) {
    wait_for_count(&d.serial_log(id), "GUEST-READY", 1, BOOT_TIMEOUT).await;
}

async fn get(d: &Daemon, id: Uuid) -> Vm {
    d.client.get_vm(&id.to_string()).await.expect("GET VM")
}

/// Polls VM `id` every 20 ms until it satisfies `done`; returns it.
async fn wait_vm(
    d: &Daemon,
    id: Uuid,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Vm) -> bool,
) -> Vm {
    let started = Instant::now();
    loop {
        let vm = get(d, id).await;
        if done(&vm) {
            return vm;
        }
        if started.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {vm:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Field 22 of `/proc/PID/stat` (start time in clock ticks since boot):
/// together with the pid, it names one process for good.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True while `pid` is a live (not zombie) process whose command line
/// contains `needle`.
fn alive_with(pid: i32, needle: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .is_some_and(|s| s == "Z" || s == "X");
    if stat.is_empty() || zombie {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline)
        .replace('\0', " ")
        .contains(needle)
}

/// True while `pid` is VM `id`'s QEMU.
fn qemu_alive(pid: i32, id: Uuid) -> bool {
    alive_with(pid, &id.to_string())
}

/// Waits until `pid` is no longer VM `id`'s QEMU.
async fn wait_qemu_gone(pid: i32, id: Uuid) {
    wait_until(
        &format!("QEMU {pid} of {id} to exit"),
        EXIT_TIMEOUT,
        || async move { (!qemu_alive(pid, id)).then_some(()) },
    )
    .await;
}

fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("{sig} to {pid}: {e}"));
}

/// A process this test started; SIGKILLed and reaped on drop.
struct ProcessGuard(std::process::Child);

impl ProcessGuard {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn still_running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A QEMU this test launched itself; SIGKILLed on drop.
struct QemuGuard(Arc<QemuProcess>);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if self.0.is_running() {
            self.0.kill_blocking(EXIT_TIMEOUT);
        }
    }
}

/// Rewrites VM `id`'s record on disk with `edit`, keeping everything else.
fn edit_record(d: &Daemon, id: Uuid, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = d.record(id);
    let text = std::fs::read_to_string(&path).expect("reading vm.json");
    let mut record: Value = serde_json::from_str(&text).expect("vm.json is JSON");
    assert_eq!(record["version"], 1, "record: {record}");
    edit(record.as_object_mut().expect("vm.json is an object"));
    std::fs::write(&path, serde_json::to_vec_pretty(&record).unwrap()).expect("writing vm.json");
}

fn remove_file(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing {}: {e}", path.display()),
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// SIGKILL the daemon while three VMs run; the restarted daemon finds all
/// three running with the same QEMU processes, and can stop them.
#[tokio::test]
async fn sigkilled_daemon_reattaches_running_vms() {
    let mut d = Daemon::start().await;
    let mut vms = Vec::new();
    for i in 0..3 {
        let vm = create(&d, &format!("reattach{i}"), "guest.action=hold", false).await;
        vms.push(start(&d, vm.id).await);
    }
    for vm in &vms {
        wait_ready(&d, vm.id).await;
    }
    let before: Vec<(Uuid, i32, u64)> = vms
        .iter()
        .map(|vm| {
            let pid = vm.pid.unwrap();
            (vm.id, pid, start_time(pid).expect("QEMU runs"))
        })
        .collect();

    d.restart().await;

    let listed = d.client.list_vms().await.unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    for (id, pid, started) in &before {
        let vm = get(&d, *id).await;
        assert_eq!(vm.state, PowerState::Running, "after restart: {vm:?}");
        assert_eq!(vm.pid, Some(*pid), "same pid after restart: {vm:?}");
        assert_eq!(vm.task, None, "{vm:?}");
        assert!(qemu_alive(*pid, *id), "QEMU {pid} still runs");
        assert_eq!(
            start_time(*pid),
            Some(*started),
            "pid {pid} is the same process"
        );
    }
    let mut pids = d.qemu_pids();
    pids.sort();
    let mut expected: Vec<i32> = before.iter().map(|(_, pid, _)| *pid).collect();
    expected.sort();
    assert_eq!(pids, expected, "no QEMU was started or lost");

    // One forced stop, two graceful ones (the guest's acpid powers it off).
    for (i, (id, pid, _)) in before.iter().enumerate() {
        let force = i == 0;
        let vm = d
            .client
            .stop(&id.to_string(), force, Some(STOP_TIMEOUT_S))
            .await
            .unwrap_or_else(|e| panic!("stop (force={force}) of reattached VM {id}: {e}"));
        assert_eq!(vm.state, PowerState::Stopped, "{vm:?}");
        assert_eq!(vm.desired, Desired::Stopped, "{vm:?}");
        assert_eq!(vm.pid, None, "{vm:?}");
        wait_qemu_gone(*pid, *id).await;
    }
    assert!(d.qemu_pids().is_empty(), "QEMUs left: {:?}", d.qemu_pids());
}

/// SIGKILL a VM's QEMU: within a second the VM is `crashed` with a reason,
/// and an event on `/v1/events` says so.
#[tokio::test]
async fn killed_qemu_becomes_crashed_within_a_second() {
    let d = Daemon::start().await;
    let vm = create(&d, "crash", "guest.action=hold", false).await;
    let vm = start(&d, vm.id).await;
    wait_ready(&d, vm.id).await;
    let pid = vm.pid.unwrap();
    let mut events = d.client.events(None).await.expect("subscribing to events");

    signal(pid, Signal::SIGKILL);
    let killed = Instant::now();
    let crashed = loop {
        let now = get(&d, vm.id).await;
        if now.state == PowerState::Crashed {
            break now;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "VM not crashed 10 s after its QEMU was killed: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let noticed = killed.elapsed();
    eprintln!("crash noticed after {noticed:?}");
    assert!(
        noticed <= PROMPT,
        "crash noticed after {noticed:?} (promised: {PROMPT:?})"
    );
    let error = crashed.error.clone().unwrap_or_default();
    assert!(!error.is_empty(), "a crashed VM says why: {crashed:?}");
    assert_eq!(crashed.pid, None, "{crashed:?}");
    assert_eq!(crashed.task, None, "{crashed:?}");
    assert!(crashed.generation > vm.generation, "{crashed:?}");

    let event = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = events.next().await {
            let event = event.expect("event decodes");
            if let EventBody::Vm { vm: seen } = &event.body {
                if seen.id == vm.id && seen.state == PowerState::Crashed {
                    return Some(*seen.clone());
                }
            }
        }
        None
    })
    .await
    .expect("no crashed event within 5 s")
    .expect("event stream ended before a crashed event");
    assert!(
        event.error.as_deref().is_some_and(|e| !e.is_empty()),
        "{event:?}"
    );
    assert_eq!(event.pid, None, "{event:?}");
    assert!(d.qemu_pids().is_empty(), "QEMUs left: {:?}", d.qemu_pids());
}

/// SIGSTOP a VM's QEMU in the middle of a hot-plug: creating another VM
/// still answers within a second (operations take claims on what they use,
/// not a host-wide lock), a create that wants the volume being attached is
/// refused at once, and the hung hot-plug fails on its own deadline.
#[tokio::test]
async fn a_hung_hot_plug_does_not_stall_creates() {
    let d = Daemon::start().await;
    let volume = unique_name("plug");
    expect(
        &d,
        Method::POST,
        "/v1/volumes",
        Some(&serde_json::json!({"name": volume, "size_mib": 8})),
        201,
    )
    .await;
    let a = create(&d, "plugging", "guest.action=hold", false).await;
    let a = start(&d, a.id).await;
    wait_ready(&d, a.id).await;
    let a_pid = a.pid.unwrap();

    signal(a_pid, Signal::SIGSTOP);
    let client = d.client.clone();
    let attach_path = format!("/v1/vms/{}/disks", a.id);
    let body = serde_json::json!({"volume": volume});
    let hung = tokio::spawn(async move {
        client
            .request_json(Method::POST, &attach_path, Some(&body))
            .await
    });
    wait_vm(&d, a.id, "A's hot-plug to be in flight", PROMPT * 5, |vm| {
        vm.task == Some(Task::Disks)
    })
    .await;

    let timed = Instant::now();
    let b = create(&d, "meanwhile", "guest.action=hold", false).await;
    let took = timed.elapsed();
    eprintln!("create with a hot-plug hung: {took:?}");
    assert!(
        took <= PROMPT,
        "a create took {took:?} while a hot-plug hung"
    );

    // The volume being attached is taken: a create wanting it is refused
    // at once, not after the hung hot-plug.
    let mut wants = guest_spec_json(&unique_name("wants"), "guest.action=hold");
    wants["disks"] = serde_json::json!([{"volume": volume}]);
    let timed = Instant::now();
    let (status, answer) = d
        .client
        .request_json(Method::POST, "/v1/vms", Some(&wants))
        .await
        .unwrap();
    assert!(
        timed.elapsed() <= PROMPT,
        "refusal took {:?}",
        timed.elapsed()
    );
    assert_eq!(status, 409, "{answer}");
    assert!(answer.to_string().contains(&volume), "{answer}");

    let (status, answer) = tokio::time::timeout(HUNG_COMMAND_LIMIT, hung)
        .await
        .expect("the hung hot-plug fails on its deadline")
        .unwrap()
        .expect("the hung hot-plug gets an answer");
    assert_ne!(status, 200, "{answer}");
    signal(a_pid, Signal::SIGCONT);
    for id in [a.id, b.id] {
        expect(
            &d,
            Method::DELETE,
            &format!("/v1/vms/{id}?force=true"),
            None,
            204,
        )
        .await;
    }
}

/// SIGSTOP one VM's QEMU: the listing and another VM's actions still answer
/// within a second, while the hung VM's own command fails with a `timeout`
/// error. Afterwards both VMs can be stopped and deleted.
#[tokio::test]
async fn hung_qemu_delays_only_its_own_vm() {
    let d = Daemon::start().await;
    let a = create(&d, "hung", "guest.action=hold", false).await;
    let b = create(&d, "healthy", "guest.action=hold", false).await;
    let a = start(&d, a.id).await;
    let b = start(&d, b.id).await;
    wait_ready(&d, a.id).await;
    wait_ready(&d, b.id).await;
    let a_pid = a.pid.unwrap();
    let b_pid = b.pid.unwrap();

    signal(a_pid, Signal::SIGSTOP);
    // A's command hangs in the background while the rest is measured.
    let client = d.client.clone();
    let a_path = format!("/v1/vms/{}/pause", a.id);
    let hung = tokio::spawn(async move {
        let sent = Instant::now();
        let answer = client.request_json(Method::POST, &a_path, None).await;
        (answer, sent.elapsed())
    });
    wait_vm(&d, a.id, "A's pause to be in flight", PROMPT * 5, |vm| {
        vm.task == Some(Task::Pause)
    })
    .await;

    let timed = Instant::now();
    let listed = d.client.list_vms().await.expect("listing");
    let took = timed.elapsed();
    eprintln!("GET /v1/vms with A hung: {took:?}");
    assert!(took <= PROMPT, "GET /v1/vms took {took:?} with a hung QEMU");
    assert_eq!(listed.len(), 2);
    let a_listed = listed.iter().find(|vm| vm.id == a.id).unwrap();
    assert_eq!(a_listed.task, Some(Task::Pause), "{a_listed:?}");

    let b_id = b.id.to_string();
    let timed = Instant::now();
    let paused = d.client.pause(&b_id).await.expect("pausing B");
    let took = timed.elapsed();
    assert!(took <= PROMPT, "pause of B took {took:?} with A hung");
    assert_eq!(paused.state, PowerState::Paused, "{paused:?}");
    let timed = Instant::now();
    let resumed = d.client.resume(&b_id).await.expect("resuming B");
    let took = timed.elapsed();
    assert!(took <= PROMPT, "resume of B took {took:?} with A hung");
    assert_eq!(resumed.state, PowerState::Running, "{resumed:?}");

    let timed = Instant::now();
    let single = d.client.get_vm(&a.id.to_string()).await.expect("GET A");
    let took = timed.elapsed();
    assert!(took <= PROMPT, "GET of the hung VM took {took:?}");
    assert_eq!(single.id, a.id);

    let (answer, took) = tokio::time::timeout(HUNG_COMMAND_LIMIT, hung)
        .await
        .unwrap_or_else(|_| {
            panic!("pause of the hung VM did not fail within {HUNG_COMMAND_LIMIT:?}")
        })
        .unwrap();
    let (status, body) = answer.expect("pause of the hung VM gets an answer");
    eprintln!("pause of hung A answered after {took:?}: {status} {body}");
    assert_eq!(status, 503, "pause of a hung QEMU: {body} after {took:?}");
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(took <= HUNG_COMMAND_LIMIT, "{took:?}");

    // B is untouched.
    let b_now = get(&d, b.id).await;
    assert_eq!(b_now.state, PowerState::Running, "{b_now:?}");
    assert_eq!(b_now.pid, Some(b_pid));

    // A lost its QMP link: `error` until QEMU answers again. Once it runs
    // again vmlet reconnects by itself and reads QEMU's state (running, or
    // paused if QEMU still executed the `stop` it had queued).
    let hung = get(&d, a.id).await;
    assert_eq!(hung.state, PowerState::Error, "{hung:?}");
    assert!(
        hung.error.as_deref().unwrap_or("").contains("stop"),
        "{hung:?}"
    );
    signal(a_pid, Signal::SIGCONT);
    let regained = wait_until(
        "A to be controllable again",
        Duration::from_secs(30),
        || async {
            let vm = get(&d, a.id).await;
            matches!(vm.state.get(), PowerState::Running | PowerState::Paused).then_some(vm)
        },
    )
    .await;
    assert_eq!(regained.error, None, "{regained:?}");
    assert_eq!(regained.pid, Some(a_pid), "{regained:?}");

    // Clean up: A can be force-stopped, B force-deleted while running.
    let stopped = d
        .client
        .stop(&a.id.to_string(), true, None)
        .await
        .expect("force stop of the formerly hung VM");
    assert_eq!(stopped.state, PowerState::Stopped, "{stopped:?}");
    assert_eq!(stopped.pid, None, "{stopped:?}");
    wait_qemu_gone(a_pid, a.id).await;

    d.client
        .delete_vm(&b_id, true)
        .await
        .expect("DELETE ?force=true of a running VM");
    wait_qemu_gone(b_pid, b.id).await;
    expect(&d, Method::GET, &format!("/v1/vms/{b_id}"), None, 404).await;
    d.client
        .delete_vm(&a.id.to_string(), true)
        .await
        .expect("DELETE ?force=true of a stopped VM");
    assert!(d.client.list_vms().await.unwrap().is_empty());
    assert!(d.qemu_pids().is_empty(), "QEMUs left: {:?}", d.qemu_pids());
}

/// A record whose pid now belongs to an unrelated process: the restarted
/// daemon neither adopts nor kills it, and records the VM as crashed.
#[tokio::test]
async fn stale_record_pid_is_not_adopted() {
    let mut d = Daemon::start().await;
    let vm = create(&d, "stale", "guest.action=hold", false).await;
    let vm = start(&d, vm.id).await;
    let qemu = vm.pid.unwrap();

    d.kill();
    signal(qemu, Signal::SIGKILL);
    wait_qemu_gone(qemu, vm.id).await;
    let mut stranger = ProcessGuard(
        std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .expect("starting sleep"),
    );
    let stranger_pid = stranger.pid();
    let stranger_started = start_time(stranger_pid).unwrap();
    edit_record(&d, vm.id, |record| {
        assert_eq!(record["pid"], qemu, "record: {record:?}");
        assert_eq!(record["state"], "running", "record: {record:?}");
        record.insert("pid".into(), stranger_pid.into());
    });

    d.start_again().await;

    let after = get(&d, vm.id).await;
    assert_ne!(
        after.state,
        PowerState::Running,
        "adopted a stranger: {after:?}"
    );
    assert_eq!(after.state, PowerState::Crashed, "{after:?}");
    assert!(
        after.error.as_deref().is_some_and(|e| !e.is_empty()),
        "a crashed VM says why: {after:?}"
    );
    assert_eq!(after.pid, None, "{after:?}");
    assert_eq!(after.task, None, "{after:?}");
    assert!(stranger.still_running(), "the unrelated process was killed");
    assert_eq!(start_time(stranger_pid), Some(stranger_started));

    // Still alone a moment later (nothing acted on it late), and the record
    // on disk says the same.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(stranger.still_running(), "the unrelated process was killed");
    let record: Value = serde_json::from_slice(&std::fs::read(d.record(vm.id)).unwrap()).unwrap();
    assert_eq!(record["state"], "crashed", "{record}");
    assert_eq!(record["pid"], Value::Null, "{record}");
    assert!(d.qemu_pids().is_empty(), "QEMUs left: {:?}", d.qemu_pids());
}

/// A record written in an earlier boot of the host (its `host_boot_id`
/// differs): the VM was stopped by the reboot, not crashed, and its recorded
/// pid is not even looked at.
#[tokio::test]
async fn a_host_reboot_is_not_a_crash() {
    let mut d = Daemon::start().await;
    let vm = create(&d, "reboot", "guest.action=hold", false).await;
    let vm = start(&d, vm.id).await;
    let qemu = vm.pid.unwrap();

    d.kill();
    signal(qemu, Signal::SIGKILL);
    wait_qemu_gone(qemu, vm.id).await;
    edit_record(&d, vm.id, |record| {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        assert_eq!(record["host_boot_id"], boot_id.trim(), "record: {record:?}");
        record.insert(
            "host_boot_id".into(),
            "00000000-0000-4000-8000-000000000000".into(),
        );
    });
    d.start_again().await;

    let after = get(&d, vm.id).await;
    assert_eq!(after.state, PowerState::Stopped, "{after:?}");
    assert_eq!(after.desired, Desired::Running, "{after:?}");
    assert!(
        after
            .error
            .as_deref()
            .is_some_and(|e| e.contains("rebooted")),
        "{after:?}"
    );
    assert_eq!(after.pid, None, "{after:?}");
    // The record now carries this boot's id.
    let record: Value = serde_json::from_slice(&std::fs::read(d.record(vm.id)).unwrap()).unwrap();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(record["host_boot_id"], boot_id.trim(), "{record}");
}

/// A guest that powers itself off: the VM becomes `stopped`, its desired
/// state follows, and there is no error.
#[tokio::test]
async fn guest_poweroff_becomes_stopped() {
    let d = Daemon::start().await;
    let vm = create(&d, "poweroff", "guest.action=poweroff", false).await;
    let vm = start(&d, vm.id).await;
    assert_eq!(vm.desired, Desired::Running);
    let pid = vm.pid.unwrap();
    let stopped = wait_vm(&d, vm.id, "the guest to power off", BOOT_TIMEOUT, |vm| {
        !vm.state.has_process()
    })
    .await;
    assert_eq!(stopped.state, PowerState::Stopped, "{stopped:?}");
    assert_eq!(stopped.desired, Desired::Stopped, "{stopped:?}");
    assert_eq!(stopped.error, None, "{stopped:?}");
    assert_eq!(stopped.pid, None, "{stopped:?}");
    assert_eq!(stopped.task, None, "{stopped:?}");
    wait_qemu_gone(pid, vm.id).await;
    assert!(d.qemu_pids().is_empty(), "QEMUs left: {:?}", d.qemu_pids());
}

/// A guest kernel panic (`guest.action=panic`), on q35 and on microvm: the
/// profile's pvpanic device tells QEMU, even though the guest reboots on
/// panic (`panic=-1`), and the VM becomes `crashed` with "guest panicked",
/// its QEMU gone.
#[tokio::test]
async fn guest_panic_becomes_crashed() {
    let d = Daemon::start().await;
    for profile in ["q35", "microvm"] {
        let mut spec = guest_spec_json(&unique_name("panic"), "");
        spec["profile"] = profile.into();
        spec["boot"]["cmdline"] = guest_cmdline(profile, "guest.action=panic").into();
        let vm = d.client.create_vm(&spec).await.expect("creating VM");
        let vm = start(&d, vm.id).await;
        let pid = vm.pid.unwrap();
        let crashed = wait_vm(&d, vm.id, "the guest to panic", BOOT_TIMEOUT, |vm| {
            !vm.state.has_process()
        })
        .await;
        assert_eq!(crashed.state, PowerState::Crashed, "{profile}: {crashed:?}");
        // Only QEMU's GUEST_PANICKED (or SHUTDOWN reason guest-panic) gives
        // this reason; a reset or a plain exit would not.
        let error = crashed.error.clone().unwrap_or_default();
        assert!(error.contains("panic"), "{profile}: {crashed:?}");
        assert_eq!(crashed.pid, None, "{profile}: {crashed:?}");
        assert_eq!(crashed.task, None, "{profile}: {crashed:?}");
        wait_qemu_gone(pid, vm.id).await;
    }
    assert!(d.qemu_pids().is_empty(), "QEMUs left: {:?}", d.qemu_pids());
}

/// As after a host reboot (the daemon and its QEMUs SIGKILLed together):
/// the VM with `autostart` is started again; the one without is `crashed`.
#[tokio::test]
async fn autostart_vm_comes_back_after_host_reboot() {
    let mut d = Daemon::start().await;
    let auto = create(&d, "auto", "guest.action=hold", true).await;
    let manual = create(&d, "manual", "guest.action=hold", false).await;
    let auto = start(&d, auto.id).await;
    let manual = start(&d, manual.id).await;
    wait_ready(&d, auto.id).await;
    wait_ready(&d, manual.id).await;
    let auto_pid = auto.pid.unwrap();
    let manual_pid = manual.pid.unwrap();

    d.kill();
    signal(auto_pid, Signal::SIGKILL);
    signal(manual_pid, Signal::SIGKILL);
    wait_qemu_gone(auto_pid, auto.id).await;
    wait_qemu_gone(manual_pid, manual.id).await;
    // Whatever is in the serial logs now came from the new boot.
    remove_file(&d.serial_log(auto.id));
    remove_file(&d.serial_log(manual.id));

    d.start_again().await;

    let back = wait_vm(
        &d,
        auto.id,
        "the autostart VM to run again",
        BOOT_TIMEOUT,
        |vm| vm.state == PowerState::Running && vm.pid.is_some(),
    )
    .await;
    let new_pid = back.pid.unwrap();
    assert_ne!(new_pid, auto_pid, "a new QEMU: {back:?}");
    assert!(qemu_alive(new_pid, auto.id));
    assert_eq!(back.desired, Desired::Running, "{back:?}");
    wait_ready(&d, auto.id).await;

    let left = get(&d, manual.id).await;
    assert_eq!(left.state, PowerState::Crashed, "{left:?}");
    assert!(
        left.error.as_deref().is_some_and(|e| !e.is_empty()),
        "{left:?}"
    );
    assert_eq!(left.pid, None, "{left:?}");
    assert_eq!(d.qemu_pids(), vec![new_pid], "only the autostart VM runs");
    assert_eq!(
        common::daemon::count_lines(&d.serial_log(manual.id), "GUEST-READY"),
        0,
        "the VM without autostart did not boot"
    );

    let now = get(&d, auto.id).await;
    assert_eq!(now.state, PowerState::Running, "{now:?}");
    assert_eq!(now.pid, Some(new_pid), "{now:?}");
    d.client
        .stop(&auto.id.to_string(), true, None)
        .await
        .expect("force stop");
    wait_qemu_gone(new_pid, auto.id).await;
}

/// SIGTERM: the daemon exits 0 and leaves the VM running; the next daemon
/// finds it with the same pid.
#[tokio::test]
async fn sigterm_leaves_vms_running() {
    let mut d = Daemon::start().await;
    let vm = create(&d, "sigterm", "guest.action=hold", false).await;
    let vm = start(&d, vm.id).await;
    wait_ready(&d, vm.id).await;
    let pid = vm.pid.unwrap();
    let started = start_time(pid).unwrap();

    let status = d.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "vmlet serve exit on SIGTERM: {status}"
    );
    assert!(qemu_alive(pid, vm.id), "SIGTERM stopped the VM's QEMU");
    assert_eq!(start_time(pid), Some(started));

    d.start_again().await;
    let after = get(&d, vm.id).await;
    assert_eq!(after.state, PowerState::Running, "{after:?}");
    assert_eq!(after.pid, Some(pid), "{after:?}");
    assert_eq!(start_time(pid), Some(started), "the same process");

    // Reattached for real: the guest answers a reboot and boots again.
    d.client
        .reboot(&vm.id.to_string())
        .await
        .expect("reboot after reattach");
    wait_for_count(&d.serial_log(vm.id), "GUEST-READY", 2, BOOT_TIMEOUT).await;
    d.client
        .stop(&vm.id.to_string(), false, Some(STOP_TIMEOUT_S))
        .await
        .expect("graceful stop after reattach");
    wait_qemu_gone(pid, vm.id).await;
}

/// A start cut short by a daemon restart leaves QEMU paused in prelaunch
/// (`-S`, no `cont`). Simulated by launching that QEMU ourselves for a
/// created VM while the daemon is down and recording the VM as starting:
/// the restarted daemon kills it and records the VM `stopped` with an error.
#[tokio::test]
async fn unfinished_start_is_cleaned_up() {
    let mut d = Daemon::start().await;
    let vm = create(&d, "prelaunch", "guest.action=hold", false).await;
    d.kill();

    let profiles = Profiles::built_in().unwrap();
    let paths = RunPaths::new(&d.run_dir, vm.id);
    let files = vmlet::vm::launch::LaunchFiles::open(
        &vm.spec,
        &vmlet::storage::Layout::new(&d.state_dir),
        &[std::path::PathBuf::from("/")],
    )
    .expect("opening the VM's files");
    let QemuInstance {
        process,
        qmp,
        events,
        ..
    } = instance::launch(instance::Launch {
        binary: Path::new("qemu-system-x86_64"),
        deadline: vmlet::qemu::process::SPAWN_DEADLINE,
        spec: &vm.spec,
        profile: profiles.get(&vm.spec.profile).unwrap(),
        // The pin the daemon gave the VM at create, as its own start would.
        machine: vm.machine.as_ref().expect("the daemon pinned the VM"),
        accel: Accel::Tcg,
        paths: &paths,
        serial_log: &paths.serial_log(),
        serial_banner: None,
        qemu_log: &paths.dir.with_extension("qemu.log"),
        disks: &files.disks,
        disk_sets: &files.sets,
        passed_fds: &files.passed,
        boot_files: files.boot.as_ref(),
        nics: &[],
        pflash: files.pflash,
        confine: Default::default(),
        tpm: None,
    })
    .await
    .expect("launching a paused QEMU");
    let qemu = QemuGuard(process);
    let pid = qemu.0.pid();
    // QMP takes one client at a time: make way for the daemon.
    drop(events);
    drop(qmp);
    assert!(qemu_alive(pid, vm.id));
    edit_record(&d, vm.id, |record| {
        record.insert("state".into(), "starting".into());
        record.insert("task".into(), "start".into());
        record.insert("desired".into(), "running".into());
        record.insert("pid".into(), pid.into());
    });

    d.start_again().await;

    let after = get(&d, vm.id).await;
    assert_eq!(after.state, PowerState::Stopped, "{after:?}");
    assert_eq!(after.pid, None, "{after:?}");
    assert_eq!(after.task, None, "{after:?}");
    let error = after.error.clone().unwrap_or_default();
    assert!(
        error.contains("did not finish"),
        "the error says the start did not finish: {after:?}"
    );
    assert!(
        qemu.0.wait_exit(EXIT_TIMEOUT).await.is_some(),
        "the prelaunch QEMU was not killed"
    );
    assert!(d.qemu_pids().is_empty(), "QEMUs left: {:?}", d.qemu_pids());
    assert!(
        !paths.dir.exists(),
        "run directory left: {}",
        paths.dir.display()
    );

    // The VM starts normally afterwards.
    let started = start(&d, vm.id).await;
    wait_ready(&d, vm.id).await;
    d.client
        .stop(&vm.id.to_string(), true, None)
        .await
        .expect("force stop");
    wait_qemu_gone(started.pid.unwrap(), vm.id).await;
}

/// A QEMU that never finishes setting up (as on hung storage) fails the
/// start after `start_timeout_s` instead of holding the VM's task forever:
/// 503 naming the timeout, state `error`, the stuck process gone, and the
/// VM free for the next action.
#[tokio::test]
async fn a_stuck_qemu_launch_times_out() {
    let tools = common::Scratch::new();
    let fake = tools.path().join("stuck-qemu");
    // Answers --version like QEMU and lets the real QEMU answer the
    // daemon's capability probe (`-qmp stdio`); a VM launch then hangs.
    std::fs::write(
        &fake,
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'QEMU emulator version 10.0.2 (stuck)'; exit 0; }\ncase \"$*\" in *'-qmp stdio'*) exec qemu-system-x86_64 \"$@\" ;; esac\nexec tail -f \"$0\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let d = Daemon::start_with_env(&[
        ("VMLET_QEMU", fake.to_str().unwrap()),
        ("VMLET_START_TIMEOUT_S", "2"),
    ])
    .await;
    let vm = create(&d, "stuck", "guest.action=hold", false).await;
    let body = expect(
        &d,
        Method::POST,
        &format!("/v1/vms/{}/start", vm.id),
        None,
        503,
    )
    .await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("did not finish starting within 2s"),
        "{body}"
    );
    let after = get(&d, vm.id).await;
    assert_eq!(after.state, PowerState::Error, "{after:?}");
    assert_eq!(after.task, None, "{after:?}");
    let fake_path = fake.display().to_string();
    wait_until(
        "the stuck QEMU to be killed",
        Duration::from_secs(10),
        || {
            let left = common::processes_with(&fake_path);
            async move { left.is_empty().then_some(()) }
        },
    )
    .await;
    // Nothing holds the VM: it can be stopped (settles on `stopped`) and deleted.
    let stopped = d.client.stop(&vm.id.to_string(), true, None).await.unwrap();
    assert_eq!(stopped.state, PowerState::Stopped, "{stopped:?}");
    d.client.delete_vm(&vm.id.to_string(), false).await.unwrap();
}
