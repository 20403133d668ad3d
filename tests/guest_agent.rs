//! The QEMU guest agent, end to end: the real daemon over HTTP, real QEMU
//! (TCG) and the real `qemu-ga` from Debian inside the test guest
//! (`guest.agent=on`). The VM view shows what the agent tells of the guest,
//! a guest that ignores the ACPI power button is shut down through the
//! agent, a snapshot freezes the guest's mounted filesystem (a host-made
//! ext4 the guest keeps writing to) and thaws it again, and a VM whose
//! guest runs no agent (or has no agent port) stops and answers as quickly
//! as ever.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::api::{create_vm, expect, force_delete_vm, id_of, uuid_of};
use common::daemon::{
    count_lines, guest_spec_json, unique_name, wait_for_count, wait_until, Daemon,
};
use common::netns::NetNs;
use common::{wait_for_line, BOOT_TIMEOUT};
use serde_json::{json, Value};
use vmlet::client::Method;

/// How long the agent may take to be read after GUEST-READY (the daemon
/// asks every 2 s until the first answer).
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

async fn create_and_start(d: &Daemon, spec: &Value) -> Value {
    let vm = create_vm(d, spec).await;
    let id = id_of(&vm);
    let vm = expect(d, Method::POST, &format!("/v1/vms/{id}/start"), None, 200).await;
    assert_eq!(vm["state"], "running", "{vm}");
    vm
}

async fn show(d: &Daemon, id: &str) -> Value {
    expect(d, Method::GET, &format!("/v1/vms/{id}"), None, 200).await
}

/// A graceful stop with `timeout_s`, timed.
async fn graceful_stop(d: &Daemon, id: &str, timeout_s: u64) -> (Value, Duration) {
    let started = Instant::now();
    let vm = expect(
        d,
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(&json!({"force": false, "timeout_s": timeout_s})),
        200,
    )
    .await;
    (vm, started.elapsed())
}

#[tokio::test]
async fn the_agent_reports_the_guest_and_shuts_down_a_guest_that_ignores_acpi() {
    let ns = NetNs::new();
    let d = Daemon::start_in_netns(&ns, &[]).await;
    expect(
        &d,
        Method::POST,
        "/v1/networks",
        Some(&json!({"name": "lan"})),
        201,
    )
    .await;
    let mac = "52:54:00:79:00:02";
    let mut spec = guest_spec_json(
        &unique_name("agent"),
        "guest.agent=on guest.acpi=ignore guest.ip=10.79.0.2/24",
    );
    spec["nics"] = json!([{"network": "lan", "mac": mac}]);
    spec["disks"] = json!([{"name": "data", "size_mib": 16}]);
    let vm = create_and_start(&d, &spec).await;
    assert_eq!(vm["spec"]["guest_agent"], true, "the default: {vm}");
    let id = id_of(&vm);
    let log = d.serial_log(uuid_of(&vm));
    let ready = wait_for_line(&log, "GUEST-READY", BOOT_TIMEOUT).await;
    assert!(
        ready.contains("org.qemu.guest_agent.0"),
        "the guest sees the agent's port: {ready}"
    );

    let guest = wait_until(
        "the guest agent's view of the guest",
        AGENT_TIMEOUT,
        || async {
            let vm = show(&d, &id).await;
            let guest = vm.get("guest")?.clone();
            let has_address = guest["interfaces"]
                .as_array()?
                .iter()
                .any(|i| i["addresses"].to_string().contains("10.79.0.2/24"));
            has_address.then_some(guest)
        },
    )
    .await;
    assert_eq!(guest["hostname"], "vmlet-agent-guest", "{guest}");
    assert_eq!(guest["os"]["id"], "vmlet-test-guest", "{guest}");
    assert_eq!(guest["os"]["pretty_name"], "vmlet test guest 1", "{guest}");
    assert_eq!(guest["os"]["machine"], "x86_64", "{guest}");
    assert!(
        guest["os"]["kernel_release"]
            .as_str()
            .is_some_and(|k| k.contains("cloud-amd64")),
        "{guest}"
    );
    let eth0 = guest["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["mac"] == mac)
        .unwrap_or_else(|| panic!("no interface with the NIC's MAC: {guest}"));
    assert_eq!(eth0["addresses"][0], "10.79.0.2/24", "{guest}");
    assert!(guest["read_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    // A listing shows no guest info (it never asks an agent), and the
    // record on disk keeps none.
    let list = expect(&d, Method::GET, "/v1/vms", None, 200).await;
    assert!(list.to_string().contains(&id) && !list.to_string().contains("vmlet-agent-guest"));
    let record = std::fs::read_to_string(d.record(uuid_of(&vm))).unwrap();
    assert!(!record.contains("vmlet-agent-guest"), "{record}");
    // `vmlet vm show` prints it.
    let show_cli = vmlet_show(&d, &id).await;
    assert!(
        show_cli.contains("hostname:   vmlet-agent-guest"),
        "{show_cli}"
    );
    assert!(
        show_cli.contains(&format!("eth0 {mac} 10.79.0.2/24")),
        "{show_cli}"
    );

    // A snapshot with the agent answering is taken with the guest's
    // filesystems frozen (the freeze is refused unless the agent answers),
    // and thawed after it: the agent's shutdown below still works.
    let snapshot = snapshot(&d, &id, "quiet").await;
    assert_eq!(snapshot["quiesced"], true, "{snapshot}");
    let listed = expect(
        &d,
        Method::GET,
        &format!("/v1/vms/{id}/snapshots"),
        None,
        200,
    )
    .await;
    assert_eq!(listed["snapshots"][0]["quiesced"], true, "{listed}");

    // The guest ignores the power button: after half the grace time the
    // agent is asked, and the guest powers off well before the grace ends.
    let (vm, took) = graceful_stop(&d, &id, 16).await;
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert_eq!(vm["last_stop"], "guest_agent_shutdown", "{vm}");
    assert!(took < Duration::from_secs(16), "stop took {took:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    let ignored = text
        .find("GUEST-ACPI-IGNORED")
        .expect("the button was pressed");
    let agent = text
        .find("GUEST-AGENT-SHUTDOWN")
        .expect("the agent shut the guest down");
    assert!(ignored < agent, "{text}");
    assert!(
        show(&d, &id).await.get("guest").is_none(),
        "stopped: no guest info"
    );
    force_delete_vm(&d, &id).await;
}

#[tokio::test]
async fn without_an_answering_agent_nothing_waits() {
    let d = Daemon::start().await;
    // The port is there (the default), but no agent runs in the guest.
    let mut spec = guest_spec_json(&unique_name("noagent"), "guest.acpi=ignore");
    spec["disks"] = json!([{"name": "data", "size_mib": 16}]);
    let vm = create_and_start(&d, &spec).await;
    let id = id_of(&vm);
    let log = d.serial_log(uuid_of(&vm));
    wait_for_line(&log, "GUEST-READY", BOOT_TIMEOUT).await;
    // Long enough for several reads of the silent agent to time out.
    tokio::time::sleep(Duration::from_secs(8)).await;
    for _ in 0..5 {
        let started = Instant::now();
        let vm = show(&d, &id).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(vm.get("guest").is_none(), "{vm}");
    }
    // A snapshot does not wait for the silent agent beyond its handshake
    // deadline, and is not quiesced.
    let started = Instant::now();
    let taken = snapshot(&d, &id, "plain").await;
    assert_eq!(taken["quiesced"], false, "{taken}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // The stop asks the silent agent (bounded), then quits QEMU at the end
    // of the grace time as before.
    let (vm, took) = graceful_stop(&d, &id, 6).await;
    assert_eq!(vm["last_stop"], "quit", "{vm}");
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(12),
        "stop took {took:?}"
    );
    force_delete_vm(&d, &id).await;

    // guest_agent: false: no port at all, and the channel name is free.
    let mut spec = guest_spec_json(&unique_name("noport"), "guest.action=hold");
    spec["guest_agent"] = json!(false);
    spec["channels"] = json!([{"name": "org.qemu.guest_agent.0"}]);
    let vm = create_and_start(&d, &spec).await;
    let id = id_of(&vm);
    let ready = wait_for_line(&d.serial_log(uuid_of(&vm)), "GUEST-READY", BOOT_TIMEOUT).await;
    // The caller's own channel, not vmlet's agent port.
    assert!(ready.contains("ports=org.qemu.guest_agent.0"), "{ready}");
    assert!(
        !walk_has(&d.run_dir, "agent.sock"),
        "no agent socket without guest_agent"
    );
    force_delete_vm(&d, &id).await;

    // With the agent on, that channel name is the agent's.
    let mut spec = guest_spec_json(&unique_name("clash"), "");
    spec["channels"] = json!([{"name": "org.qemu.guest_agent.0"}]);
    let answer = common::api::call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
    common::api::assert_invalid_field(&answer, "channels[0].name");
    spec["guest_agent"] = json!("yes");
    let answer = common::api::call(&d, Method::POST, "/v1/vms", Some(&spec)).await;
    assert_eq!(answer.0, 422, "{answer:?}");
}

/// e2fsprogs' tools the quiesce test needs on the host, or why not.
fn e2fsprogs() -> Result<(), String> {
    for tool in ["mkfs.ext4", "dumpe2fs", "debugfs", "e2fsck"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain(["/sbin".into(), "/usr/sbin".into()])
            .any(|dir| dir.join(tool).is_file());
        if !found {
            return Err(format!(
                "{tool} is not installed (Debian package e2fsprogs)"
            ));
        }
    }
    Ok(())
}

/// Runs `program` with `args`; its stdout (panics, with stderr, on failure).
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The `Filesystem features:` of the ext4 in raw image `raw` (`dumpe2fs -h`).
fn ext4_features(raw: &Path) -> Vec<String> {
    let header = run("dumpe2fs", &["-h", raw.to_str().unwrap()]);
    header
        .lines()
        .find_map(|l| l.strip_prefix("Filesystem features:"))
        .unwrap_or_else(|| panic!("no features in dumpe2fs -h:\n{header}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The numbers of the `tick N` lines of `/ticks` in the ext4 of `raw`,
/// checking they count up from 1 without a gap.
fn ticks(raw: &Path) -> u64 {
    let text = run("debugfs", &["-R", "cat /ticks", raw.to_str().unwrap()]);
    let mut n = 0;
    for line in text.lines() {
        n += 1;
        assert_eq!(line, format!("tick {n}"), "/ticks:\n{text}");
    }
    n
}

/// The disk image `qcow2` (or its internal snapshot `snapshot`) as a raw
/// file beside it, converted by `qemu-img`.
fn to_raw(qcow2: &Path, snapshot: Option<&str>, raw: &Path) -> PathBuf {
    let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
    let spec;
    if let Some(name) = snapshot {
        spec = format!("snapshot.name={name}");
        args.extend(["-l", spec.as_str()]);
    }
    args.extend([qcow2.to_str().unwrap(), raw.to_str().unwrap()]);
    common::storage::qemu_img(&args);
    raw.to_path_buf()
}

/// Asks the guest agent behind vmlet's socket `socket` to run `command`
/// (no arguments) in a session of its own, as vmlet does: the
/// `guest-sync-delimited` handshake first (the port may hold answers of an
/// earlier session), then the command. Its `return`.
async fn agent_call(socket: &Path, command: &str) -> Value {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let session = async {
        let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        let mut stream = BufReader::new(stream);
        let id: u64 = rand_id();
        let mut request = vec![0xFF];
        request.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        request.push(b'\n');
        stream.get_mut().write_all(&request).await.unwrap();
        loop {
            // Up to the agent's 0xFF, then its answer line.
            let mut byte = [0];
            loop {
                stream.read_exact(&mut byte).await.unwrap();
                if byte[0] == 0xFF {
                    break;
                }
            }
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            let answer: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if answer["return"] == id {
                break;
            }
        }
        let request = format!("{}\n", json!({ "execute": command }));
        stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        let answer: Value = serde_json::from_str(&line).unwrap();
        answer
            .get("return")
            .unwrap_or_else(|| panic!("{command}: {answer}"))
            .clone()
    };
    tokio::time::timeout(AGENT_TIMEOUT, session)
        .await
        .unwrap_or_else(|_| panic!("the guest agent did not answer {command}"))
}

/// A session id unlikely to be vmlet's (which counts from 0).
fn rand_id() -> u64 {
    (uuid::Uuid::new_v4().as_u128() as u64) >> 12
}

#[tokio::test]
async fn a_snapshot_freezes_the_guests_filesystem_and_thaws_it() {
    const TEST: &str = "a_snapshot_freezes_the_guests_filesystem_and_thaws_it";
    if let Err(reason) = e2fsprogs() {
        common::skip(TEST, reason);
        return;
    }
    let d = Daemon::start().await;
    // A 32 MiB ext4 (with a journal) made on the host, as a qcow2 disk.
    let raw = d.scratch().join("data.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    run(
        "mkfs.ext4",
        &["-q", "-F", "-L", "vmlet-data", raw.to_str().unwrap()],
    );
    let disk = d.scratch().join("data.qcow2");
    to_qcow2(&raw, &disk);
    std::fs::remove_file(&raw).unwrap();
    assert!(
        !ext4_features(&to_raw(&disk, None, &d.scratch().join("fresh.raw")))
            .contains(&"needs_recovery".to_string()),
        "a fresh filesystem is clean"
    );

    let mut spec = guest_spec_json(&unique_name("quiesce"), "guest.agent=on guest.mount=vda");
    spec["disks"] = json!([{"name": "data", "path": disk, "format": "qcow2"}]);
    let vm = create_and_start(&d, &spec).await;
    let (id, uuid) = (id_of(&vm), uuid_of(&vm));
    let log = d.serial_log(uuid);
    let mounted = wait_for_line(&log, "GUEST-MOUNT", BOOT_TIMEOUT).await;
    assert!(mounted.contains("dev=vda fs=ext4"), "{mounted}");
    wait_for_line(&log, "GUEST-READY", BOOT_TIMEOUT).await;
    // The agent answers (vmlet read the guest through it) and the guest
    // writes to its filesystem.
    wait_until("the guest agent to answer", AGENT_TIMEOUT, || async {
        show(&d, &id).await.get("guest").map(drop)
    })
    .await;
    wait_for_count(&log, "GUEST-WRITE", 3, BOOT_TIMEOUT).await;
    let socket = vmlet::qemu::argv::RunPaths::new(&d.run_dir, uuid).agent_socket();
    assert_eq!(agent_call(&socket, "guest-fsfreeze-status").await, "thawed");

    let written_before = count_lines(&log, "GUEST-WRITE") as u64;
    let taken = snapshot(&d, &id, "frozen").await;
    assert_eq!(taken["quiesced"], true, "{taken}");
    let written_at = count_lines(&log, "GUEST-WRITE");
    // vmlet logs how many filesystems the agent froze: the ext4 (the
    // guest's other filesystems, proc, sysfs and the like, cannot freeze).
    let frozen = d
        .log_text()
        .lines()
        .filter(|l| l.contains("guest filesystems frozen for a snapshot"))
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert_eq!(frozen.len(), 1, "{frozen:?}");
    assert!(frozen[0].contains("filesystems=1"), "{frozen:?}");
    // Thawed afterwards: the agent says so, and the guest's writes go on.
    assert_eq!(agent_call(&socket, "guest-fsfreeze-status").await, "thawed");
    wait_for_count(&log, "GUEST-WRITE", written_at + 3, BOOT_TIMEOUT).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("GUEST-ERROR"), "{text}");

    expect(
        &d,
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(&json!({"force": true})),
        200,
    )
    .await;
    let written = count_lines(&log, "GUEST-WRITE") as u64;

    // The snapshot holds a clean filesystem: the freeze flushed ext4's
    // journal and cleared its needs_recovery flag, which a mounted ext4
    // otherwise keeps set; every write the guest had reported before the
    // snapshot is in it, none made after the thaw.
    let in_snapshot = to_raw(&disk, Some("frozen"), &d.scratch().join("frozen.raw"));
    let features = ext4_features(&in_snapshot);
    assert!(
        !features.contains(&"needs_recovery".to_string()),
        "the snapshot's filesystem was frozen: {features:?}"
    );
    run("e2fsck", &["-f", "-n", in_snapshot.to_str().unwrap()]);
    let snapshot_ticks = ticks(&in_snapshot);
    assert!(
        snapshot_ticks >= written_before && snapshot_ticks < written,
        "the snapshot has {snapshot_ticks} writes: {written_before} before it, {written} in all"
    );
    // The disk as the guest left it (killed while mounted): the thawed
    // filesystem was mounted again in full (needs_recovery set, as the
    // freeze had cleared it), and after ext4's recovery it holds the
    // writes made after the snapshot too.
    let now = to_raw(&disk, None, &d.scratch().join("now.raw"));
    let features = ext4_features(&now);
    assert!(
        features.contains(&"needs_recovery".to_string()),
        "the thawed filesystem is in use again: {features:?}"
    );
    let recovered = Command::new("e2fsck")
        .args(["-f", "-y", now.to_str().unwrap()])
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .unwrap();
    // 0: clean, 1: errors corrected (the journal replay counts).
    assert!(
        matches!(recovered.status.code(), Some(0 | 1)),
        "{recovered:?}"
    );
    let now_ticks = ticks(&now);
    assert!(
        now_ticks > snapshot_ticks && now_ticks >= written,
        "{now_ticks} writes on the disk, {snapshot_ticks} in the snapshot, {written} reported"
    );
    force_delete_vm(&d, &id).await;
}

/// Converts raw image `raw` to qcow2 `qcow2` with `qemu-img`.
fn to_qcow2(raw: &Path, qcow2: &Path) {
    common::storage::qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qcow2.to_str().unwrap(),
    ]);
}

/// Takes snapshot `name` of VM `id`: the snapshot.
async fn snapshot(d: &Daemon, id: &str, name: &str) -> Value {
    expect(
        d,
        Method::POST,
        &format!("/v1/vms/{id}/snapshots"),
        Some(&json!({ "name": name })),
        201,
    )
    .await
}

/// `vmlet vm show ID` against the daemon: its stdout.
async fn vmlet_show(d: &Daemon, id: &str) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"))
        .args(["vm", "show", id, "--socket"])
        .arg(&d.socket)
        .env_remove("VMLET_SOCKET")
        .env_remove("VMLET_URL")
        .env_remove("VMLET_TOKEN_FILE")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("vmlet runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Whether a file named `name` is anywhere under `dir`.
fn walk_has(dir: &std::path::Path, name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        e.file_name() == name || (path.is_dir() && !path.is_symlink() && walk_has(&path, name))
    })
}
