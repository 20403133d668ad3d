//! The HTTP API of `vmlet serve`, driven over its unix socket: the full
//! lifecycle of the test guest, idempotent creates, spec validation, busy
//! conflicts, satisfied repeats, event replay, node facts, and the `vmlet`
//! client commands. Each test runs its own daemon on scratch directories;
//! dropping it kills the daemon and every QEMU it started.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::api::{
    assert_error, assert_invalid_field, call, create_vm, expect_event_within, force_delete_vm,
    id_of, next_event, uuid_of,
};
use common::daemon::{free_port, guest_spec_json, unique_name, wait_for_count, wait_until, Daemon};
use common::BOOT_TIMEOUT;
use serde_json::{json, Value};
use uuid::Uuid;
use vmlet::client::{EventStream, Method};
use vmlet::vm::events::{Event, EventBody};
use vmlet::vm::state::{PowerState, Task};

/// How long a graceful stop may take (the guest powers off on the ACPI
/// power button in well under a second when idle).
const STOP_TIMEOUT_S: u64 = 60;

/// How long to wait for an event that should come promptly.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to listen to make sure no further event comes.
const QUIET: Duration = Duration::from_millis(500);

// ---- helpers ------------------------------------------------------------------

/// `POST /v1/vms/{id}/{action}`, returning status and body whatever they are.
async fn try_act(d: &Daemon, id: &str, action: &str, body: Option<&Value>) -> (u16, Value) {
    call(d, Method::POST, &format!("/v1/vms/{id}/{action}"), body).await
}

/// `POST /v1/vms/{id}/{action}`, expecting 200; returns the VM.
async fn act(d: &Daemon, id: &str, action: &str, body: Option<&Value>) -> Value {
    let (status, vm) = try_act(d, id, action, body).await;
    assert_eq!(status, 200, "{action} of {id}: {vm}");
    vm
}

/// A graceful stop's body.
fn graceful() -> Value {
    json!({"force": false, "timeout_s": STOP_TIMEOUT_S})
}

fn generation(vm: &Value) -> u64 {
    vm["generation"].as_u64().expect("VM has a generation")
}

/// QEMU's pid in a view that must have one.
fn pid_of(vm: &Value) -> i32 {
    vm["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no pid in {vm}")) as i32
}

fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Asserts `state`, `desired`, no task, and a pid of a live process exactly
/// when the VM should have one.
fn assert_settled(vm: &Value, state: &str, desired: &str) {
    assert_eq!(vm["state"], state, "state of {vm}");
    assert_eq!(vm["desired"], desired, "desired of {vm}");
    assert_eq!(vm["task"], Value::Null, "task of {vm}");
    match state {
        "running" | "paused" => {
            let pid = pid_of(vm);
            assert!(process_exists(pid), "QEMU pid {pid} is not alive: {vm}");
        }
        _ => assert_eq!(vm["pid"], Value::Null, "pid of {vm}"),
    }
}

/// The next event, which must come within [`EVENT_TIMEOUT`].
async fn expect_event(stream: &mut EventStream) -> Event {
    expect_event_within(stream, EVENT_TIMEOUT).await
}

/// Reads events until (and with) the one `last` accepts.
async fn events_until(stream: &mut EventStream, last: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let event = expect_event(stream).await;
        let done = last(&event);
        events.push(event);
        if done {
            return events;
        }
    }
}

fn is_deleted(event: &Event, id: Uuid) -> bool {
    matches!(&event.body, EventBody::VmDeleted { id: deleted, .. } if *deleted == id)
}

/// Asserts no event arrives for a little while.
async fn assert_quiet(stream: &mut EventStream) {
    if let Some(event) = next_event(stream, QUIET).await {
        panic!("unexpected event: {event:?}");
    }
}

/// Microseconds since the epoch (event sequence numbers start there).
fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Entries of the state directory's `vms/` (none when it does not exist).
fn state_entries(d: &Daemon) -> Vec<String> {
    match std::fs::read_dir(d.state_dir.join("vms")) {
        Ok(dir) => dir
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    }
}

async fn list(d: &Daemon) -> Vec<Value> {
    let (status, body) = call(d, Method::GET, "/v1/vms", None).await;
    assert_eq!(status, 200, "{body}");
    body["vms"].as_array().expect("vms is a list").clone()
}

/// Waits until the VM's serial log shows `n` boots of the guest.
async fn wait_for_boots(d: &Daemon, vm: &Value, n: usize) {
    wait_for_count(&d.serial_log(uuid_of(vm)), "GUEST-READY", n, BOOT_TIMEOUT).await;
}

// ---- 1. lifecycle -----------------------------------------------------------------

#[tokio::test]
async fn full_lifecycle_through_http_with_matching_events() {
    let d = Daemon::start().await;
    // Subscribed before anything happens: every event of the VM arrives.
    let mut events = d.client.events(None).await.unwrap();
    let name = unique_name("life");

    let mut views: Vec<(&str, Value)> = Vec::new();
    let vm = create_vm(&d, &guest_spec_json(&name, "guest.action=hold")).await;
    assert_eq!(vm["name"], name.as_str());
    assert_settled(&vm, "stopped", "stopped");
    assert_eq!(vm["error"], Value::Null);
    let id = id_of(&vm);
    let uuid = uuid_of(&vm);
    assert!(d.record(uuid).is_file(), "no record after create");
    views.push(("create", vm));

    let vm = act(&d, &id, "start", None).await;
    assert_settled(&vm, "running", "running");
    let first_pid = pid_of(&vm);
    views.push(("start", vm.clone()));
    wait_for_boots(&d, &vm, 1).await;

    let vm = act(&d, &id, "pause", None).await;
    assert_settled(&vm, "paused", "paused");
    assert_eq!(pid_of(&vm), first_pid, "pause keeps the QEMU");
    views.push(("pause", vm));

    let vm = act(&d, &id, "resume", None).await;
    assert_settled(&vm, "running", "running");
    views.push(("resume", vm));

    let vm = act(&d, &id, "reboot", None).await;
    assert_settled(&vm, "running", "running");
    assert_eq!(pid_of(&vm), first_pid, "a reboot keeps the QEMU");
    views.push(("reboot", vm.clone()));
    // The guest boots again in the same QEMU: a second READY line.
    wait_for_boots(&d, &vm, 2).await;
    let vm = call(&d, Method::GET, &format!("/v1/vms/{id}"), None)
        .await
        .1;
    assert_settled(&vm, "running", "running");

    let vm = act(&d, &id, "stop", Some(&graceful())).await;
    assert_settled(&vm, "stopped", "stopped");
    assert_eq!(vm["error"], Value::Null);
    assert!(
        !process_exists(first_pid),
        "QEMU {first_pid} outlived the stop"
    );
    // The guest powered itself off on the ACPI power button (QMP SHUTDOWN
    // with reason guest-shutdown), rather than being quit after the timeout.
    let log = d.log_text();
    assert!(
        log.contains("guest-shutdown") && !log.contains("did not power off in time"),
        "the guest did not power off on the ACPI power button"
    );
    views.push(("stop", vm));

    let vm = act(&d, &id, "start", None).await;
    assert_settled(&vm, "running", "running");
    let second_pid = pid_of(&vm);
    views.push(("start again", vm.clone()));
    // The serial log (in the state directory) keeps the earlier two boots.
    wait_for_boots(&d, &vm, 3).await;

    let generations: Vec<u64> = views.iter().map(|(_, vm)| generation(vm)).collect();
    assert!(
        generations.windows(2).all(|w| w[0] < w[1]),
        "generations do not grow: {:?}",
        views
            .iter()
            .map(|(what, vm)| format!("{what}={}", generation(vm)))
            .collect::<Vec<_>>()
    );

    force_delete_vm(&d, &id).await;
    let answer = call(&d, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_error(&answer, 404, "not_found");
    let answer = call(&d, Method::GET, &format!("/v1/vms/{name}"), None).await;
    assert_error(&answer, 404, "not_found");
    assert!(
        !d.record(uuid).parent().unwrap().exists(),
        "record directory left behind"
    );
    assert!(
        !process_exists(second_pid),
        "QEMU {second_pid} outlived the delete"
    );
    assert!(list(&d).await.is_empty());

    // The events of this VM, up to its deletion.
    let seen = events_until(&mut events, |e| is_deleted(e, uuid)).await;
    assert!(
        seen.windows(2).all(|w| w[0].seq < w[1].seq),
        "event seqs do not grow: {:?}",
        seen.iter().map(|e| e.seq).collect::<Vec<_>>()
    );
    let vm_events: Vec<&vmlet::vm::Vm> = seen
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Vm { vm } if vm.id == uuid => Some(vm.as_ref()),
            _ => None,
        })
        .collect();
    let event_generations: Vec<u64> = vm_events.iter().map(|vm| vm.generation).collect();
    assert_eq!(event_generations.first(), Some(&1), "the create's event");
    // Each change bumps the generation once and publishes one event.
    assert!(
        event_generations.windows(2).all(|w| w[1] == w[0] + 1),
        "event generations are not consecutive: {event_generations:?}"
    );
    // Every answer of the API was published as it was answered.
    for (what, view) in &views {
        let published = vm_events
            .iter()
            .find(|vm| vm.generation == generation(view))
            .unwrap_or_else(|| panic!("no event with the generation of the {what} answer"));
        assert_eq!(
            published.state.as_str(),
            view["state"],
            "state published for {what}"
        );
    }
    let mut states: Vec<PowerState> = Vec::new();
    for vm in &vm_events {
        if states.last() != Some(&vm.state) {
            states.push(vm.state.get());
        }
    }
    use PowerState as S;
    let expected = [
        S::Stopped,
        S::Starting,
        S::Running,
        S::Paused,
        S::Running,
        S::Stopping,
        S::Stopped,
        S::Starting,
        S::Running,
    ];
    // Exactly these: a reboot resets the guest without a state change, and
    // the forced delete publishes its task on a running VM, then the deletion.
    assert_eq!(states, expected, "distinct states in the events");
    assert!(
        is_deleted(seen.last().unwrap(), uuid),
        "the last event is the deletion"
    );
}

// ---- 2. PUT idempotency ----------------------------------------------------------

#[tokio::test]
async fn put_is_idempotent_and_refuses_a_different_spec() {
    let d = Daemon::start().await;
    let uuid = Uuid::new_v4();
    let path = format!("/v1/vms/{uuid}");
    let spec = guest_spec_json(&unique_name("put"), "");

    let (status, first) = call(&d, Method::PUT, &path, Some(&spec)).await;
    assert_eq!(status, 201, "first PUT: {first}");
    assert_eq!(first["id"], uuid.to_string());
    assert_eq!(first["spec"]["uuid"], uuid.to_string());
    let (status, again) = call(&d, Method::PUT, &path, Some(&spec)).await;
    assert_eq!(status, 200, "second PUT: {again}");
    assert_eq!(again["id"], uuid.to_string());
    assert_eq!(
        generation(&again),
        generation(&first),
        "a retry changes nothing"
    );
    // The body may carry the UUID too, when it matches.
    let mut with_uuid = spec.clone();
    with_uuid["uuid"] = uuid.to_string().into();
    let (status, body) = call(&d, Method::PUT, &path, Some(&with_uuid)).await;
    assert_eq!(status, 200, "PUT with the matching uuid: {body}");
    let vms = list(&d).await;
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(vms[0]["id"], uuid.to_string());

    // A different spec under the same UUID.
    let mut different = spec.clone();
    different["vcpus"] = 2.into();
    let answer = call(&d, Method::PUT, &path, Some(&different)).await;
    assert_error(&answer, 409, "conflict");
    let (_, stored) = call(&d, Method::GET, &path, None).await;
    assert_eq!(stored["spec"]["vcpus"], 1, "stored spec changed: {stored}");
    assert_eq!(generation(&stored), generation(&first));

    // A body UUID that is not the path's.
    let mut mismatch = spec.clone();
    mismatch["uuid"] = Uuid::new_v4().to_string().into();
    let answer = call(&d, Method::PUT, &path, Some(&mismatch)).await;
    assert_invalid_field(&answer, "uuid");
    let other_path = format!("/v1/vms/{}", Uuid::new_v4());
    let answer = call(&d, Method::PUT, &other_path, Some(&mismatch)).await;
    assert_invalid_field(&answer, "uuid");

    // POST picks the UUID itself.
    let mut post = guest_spec_json(&unique_name("post"), "");
    post["uuid"] = Uuid::new_v4().to_string().into();
    let answer = call(&d, Method::POST, "/v1/vms", Some(&post)).await;
    assert_invalid_field(&answer, "uuid");

    // A new UUID with a name already taken.
    let answer = call(&d, Method::PUT, &other_path, Some(&spec)).await;
    assert_error(&answer, 409, "conflict");
    // PUT creates by UUID only.
    let answer = call(&d, Method::PUT, "/v1/vms/not-a-uuid", Some(&spec)).await;
    assert_error(&answer, 400, "bad_request");

    let vms = list(&d).await;
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(state_entries(&d), vec![uuid.to_string()]);
}

// ---- 3. invalid specs -------------------------------------------------------------

#[tokio::test]
async fn invalid_requests_are_refused_and_create_nothing() {
    let d = Daemon::start().await;
    let spec = || guest_spec_json(&unique_name("bad"), "");
    let uuid_path = || format!("/v1/vms/{}", Uuid::new_v4());

    let mut zero = spec();
    zero["vcpus"] = 0.into();
    assert_invalid_field(
        &call(&d, Method::POST, "/v1/vms", Some(&zero)).await,
        "vcpus",
    );
    assert_invalid_field(
        &call(&d, Method::PUT, &uuid_path(), Some(&zero)).await,
        "vcpus",
    );

    let mut word = spec();
    word["vcpus"] = "two".into();
    assert_invalid_field(
        &call(&d, Method::POST, "/v1/vms", Some(&word)).await,
        "vcpus",
    );

    let mut unknown = spec();
    unknown["colour"] = "blue".into();
    assert_invalid_field(
        &call(&d, Method::POST, "/v1/vms", Some(&unknown)).await,
        "colour",
    );

    let mut passwd = spec();
    passwd["boot"]["kernel"] = "/etc/passwd".into();
    assert_invalid_field(
        &call(&d, Method::POST, "/v1/vms", Some(&passwd)).await,
        "boot.kernel",
    );
    let mut initrd = spec();
    initrd["boot"]["initrd"] = "/etc/hostname".into();
    assert_invalid_field(
        &call(&d, Method::PUT, &uuid_path(), Some(&initrd)).await,
        "boot.initrd",
    );

    let mut no_name = spec();
    no_name.as_object_mut().unwrap().remove("name");
    let answer = call(&d, Method::POST, "/v1/vms", Some(&no_name)).await;
    assert_error(&answer, 422, "invalid_spec");

    let answer = call(&d, Method::POST, "/v1/vms", Some(&json!([1, 2]))).await;
    assert_invalid_field(&answer, "body");

    for malformed in [
        &b"{\"name\": "[..],
        b"{\"name\": \"x\"} trailing",
        b"not json",
    ] {
        let response = d
            .client
            .request_bytes(
                Method::POST,
                "/v1/vms",
                Some("application/json"),
                malformed.to_vec(),
            )
            .await
            .unwrap();
        let body = response.json().unwrap_or_else(|e| {
            panic!("400 body is not JSON ({e}): {}", response.text());
        });
        assert_error(&(response.status, body), 400, "bad_request");
    }

    // Over the 1 MiB body limit: valid JSON, just too big.
    let mut huge = spec();
    huge["boot"]["cmdline"] = "x".repeat(1024 * 1024 + 1).into();
    let bytes = serde_json::to_vec(&huge).unwrap();
    for (method, path) in [
        (Method::POST, "/v1/vms".to_string()),
        (Method::PUT, uuid_path()),
    ] {
        let response = d
            .client
            .request_bytes(
                method.clone(),
                &path,
                Some("application/json"),
                bytes.clone(),
            )
            .await
            .unwrap_or_else(|e| panic!("{method} {path} with a huge body: {e}"));
        assert_eq!(
            response.content_type(),
            Some("application/json"),
            "413 body: {}",
            response.text()
        );
        let body = response.json().unwrap();
        assert_error(&(response.status, body), 413, "payload_too_large");
    }

    assert!(list(&d).await.is_empty(), "a VM was created");
    assert_eq!(state_entries(&d), Vec::<String>::new());
    // The daemon still works after all that.
    let vm = create_vm(&d, &spec()).await;
    assert_eq!(state_entries(&d), vec![id_of(&vm)]);
}

// ---- 4. concurrent conflicting actions ------------------------------------------------

/// Of two answers, exactly one is a 200 and the other a 409 busy with `task`.
fn assert_one_won(a: &(u16, Value), b: &(u16, Value), task: &str) -> Value {
    let (won, lost) = match (a.0, b.0) {
        (200, _) => (a, b),
        (_, 200) => (b, a),
        _ => panic!("neither answer is 200: {a:?} {b:?}"),
    };
    let error = assert_error(lost, 409, "busy");
    assert_eq!(error["task"], task, "busy task in {error}");
    won.1.clone()
}

#[tokio::test]
async fn of_two_concurrent_conflicting_actions_exactly_one_gets_409() {
    let d = Daemon::start().await;
    // The guest ignores the power button: a graceful stop waits for its
    // timeout, which holds the stop task open for as long as the test needs.
    let spec = guest_spec_json(&unique_name("race"), "guest.action=hold guest.acpi=ignore");
    let vm = create_vm(&d, &spec).await;
    let id = id_of(&vm);

    let (a, b) = tokio::join!(
        try_act(&d, &id, "start", None),
        try_act(&d, &id, "start", None)
    );
    let vm = assert_one_won(&a, &b, "start");
    assert_settled(&vm, "running", "running");
    wait_for_boots(&d, &vm, 1).await;
    let pid = pid_of(&vm);

    let stop = graceful();
    let others = async {
        wait_until("the stop task", EVENT_TIMEOUT, || async {
            let vm = d.client.get_vm(&id).await.ok()?;
            (vm.task == Some(Task::Stop)).then_some(())
        })
        .await;
        // Slack for the second concurrent stop to reach the daemon first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Every other action conflicts with the stop in progress.
        let delete = format!("/v1/vms/{id}?force=true");
        for action in ["start", "pause", "resume", "reboot", "stop"] {
            let answer = try_act(&d, &id, action, Some(&graceful())).await;
            let error = assert_error(&answer, 409, "busy");
            assert_eq!(error["task"], "stop", "{action}: {error}");
        }
        let answer = call(&d, Method::DELETE, &delete, None).await;
        let error = assert_error(&answer, 409, "busy");
        assert_eq!(error["task"], "stop", "delete: {error}");
        // But a forced stop may overtake a graceful one.
        act(&d, &id, "stop", Some(&json!({"force": true}))).await
    };
    let (a, b, forced) = tokio::join!(
        try_act(&d, &id, "stop", Some(&stop)),
        try_act(&d, &id, "stop", Some(&stop)),
        others
    );
    let vm = assert_one_won(&a, &b, "stop");
    assert_settled(&vm, "stopped", "stopped");
    assert_settled(&forced, "stopped", "stopped");
    assert!(!process_exists(pid), "QEMU {pid} outlived the stop");
    assert!(d.qemu_pids().is_empty(), "QEMUs left: {:?}", d.qemu_pids());
}

// ---- 5. satisfied repeats and senseless actions ----------------------------------------

#[tokio::test]
async fn satisfied_repeats_succeed_and_senseless_actions_conflict() {
    let d = Daemon::start().await;
    let vm = create_vm(
        &d,
        &guest_spec_json(&unique_name("again"), "guest.action=hold"),
    )
    .await;
    let id = id_of(&vm);
    let created = generation(&vm);

    for body in [None, Some(graceful()), Some(json!({"force": true}))] {
        let vm = act(&d, &id, "stop", body.as_ref()).await;
        assert_settled(&vm, "stopped", "stopped");
        assert_eq!(
            generation(&vm),
            created,
            "a stop of a stopped VM changed it"
        );
    }
    for action in ["pause", "reboot", "resume"] {
        let answer = try_act(&d, &id, action, None).await;
        let error = assert_error(&answer, 409, "conflict");
        assert!(
            error["message"].as_str().unwrap().contains("stopped"),
            "{action}: {error}"
        );
    }
    let answer = try_act(&d, &id, "stop", Some(&json!({"force": "yes"}))).await;
    assert_invalid_field(&answer, "force");
    let answer = try_act(&d, &id, "hibernate", None).await;
    assert_error(&answer, 404, "not_found");
    let answer = try_act(&d, &Uuid::new_v4().to_string(), "start", None).await;
    assert_error(&answer, 404, "not_found");

    let vm = act(&d, &id, "start", None).await;
    assert_settled(&vm, "running", "running");
    let pid = pid_of(&vm);
    let vm = act(&d, &id, "start", None).await;
    assert_settled(&vm, "running", "running");
    assert_eq!(pid_of(&vm), pid, "a second start launched another QEMU");
    let vm = act(&d, &id, "resume", None).await;
    assert_settled(&vm, "running", "running");

    let vm = act(&d, &id, "pause", None).await;
    assert_settled(&vm, "paused", "paused");
    let paused = generation(&vm);
    let vm = act(&d, &id, "pause", None).await;
    assert_settled(&vm, "paused", "paused");
    assert_eq!(generation(&vm), paused, "a pause of a paused VM changed it");
    let answer = try_act(&d, &id, "start", None).await;
    assert_error(&answer, 409, "conflict");

    let answer = call(&d, Method::DELETE, &format!("/v1/vms/{id}"), None).await;
    assert_error(&answer, 409, "conflict");
    let vm = act(&d, &id, "resume", None).await;
    assert_settled(&vm, "running", "running");
    let answer = call(&d, Method::DELETE, &format!("/v1/vms/{id}"), None).await;
    assert_error(&answer, 409, "conflict");
    let vm = call(&d, Method::GET, &format!("/v1/vms/{id}"), None)
        .await
        .1;
    assert_settled(&vm, "running", "running");
    assert_eq!(pid_of(&vm), pid);

    force_delete_vm(&d, &id).await;
    assert!(
        !process_exists(pid),
        "QEMU {pid} outlived the forced delete"
    );
    assert!(d.qemu_pids().is_empty(), "QEMUs left: {:?}", d.qemu_pids());
    let answer = call(&d, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_error(&answer, 404, "not_found");
    let answer = call(&d, Method::DELETE, &format!("/v1/vms/{id}"), None).await;
    assert_error(&answer, 404, "not_found");
    assert_eq!(state_entries(&d), Vec::<String>::new());
}

// ---- 6. event replay --------------------------------------------------------------

#[tokio::test]
async fn events_resume_after_a_sequence_number_or_ask_for_a_resync() {
    let before_start = now_micros();
    let d = Daemon::start().await;
    let mut live = d.client.events(None).await.unwrap();

    let a = create_vm(&d, &guest_spec_json(&unique_name("ev-a"), "")).await;
    let first = expect_event(&mut live).await;
    assert!(
        first.seq > before_start,
        "seq {} does not start at the daemon's start time in µs ({before_start})",
        first.seq
    );
    assert!(matches!(&first.body, EventBody::Vm { vm } if vm.id == uuid_of(&a)));
    let b = create_vm(&d, &guest_spec_json(&unique_name("ev-b"), "")).await;
    let mark = expect_event(&mut live).await;
    assert!(mark.seq > first.seq);

    // Changes after the mark: a create, two deletes.
    let c = create_vm(&d, &guest_spec_json(&unique_name("ev-c"), "")).await;
    for vm in [&a, &b] {
        let answer = call(&d, Method::DELETE, &format!("/v1/vms/{}", id_of(vm)), None).await;
        assert_eq!(answer.0, 204, "delete: {}", answer.1);
    }
    let later = events_until(&mut live, |e| is_deleted(e, uuid_of(&b))).await;
    assert!(later.len() >= 3, "{later:?}");
    assert!(later.windows(2).all(|w| w[0].seq < w[1].seq), "{later:?}");
    assert!(matches!(&later[0].body, EventBody::Vm { vm } if vm.id == uuid_of(&c)));
    assert!(later.iter().any(|e| is_deleted(e, uuid_of(&a))));

    // Reconnecting after the mark replays exactly what came after it.
    let mut replay = d.client.events(Some(mark.seq)).await.unwrap();
    let mut replayed = Vec::new();
    for _ in 0..later.len() {
        replayed.push(expect_event(&mut replay).await);
    }
    assert_eq!(replayed, later);
    assert_quiet(&mut replay).await;
    // Then it goes on live.
    let d_vm = create_vm(&d, &guest_spec_json(&unique_name("ev-d"), "")).await;
    let next = expect_event(&mut replay).await;
    assert!(next.seq > later.last().unwrap().seq);
    assert!(matches!(&next.body, EventBody::Vm { vm } if vm.id == uuid_of(&d_vm)));
    assert_eq!(expect_event(&mut live).await, next);

    // From the very first event on: everything.
    let mut all = d.client.events(Some(first.seq - 1)).await.unwrap();
    let mut everything = vec![expect_event(&mut all).await];
    while everything.last().unwrap().seq < next.seq {
        everything.push(expect_event(&mut all).await);
    }
    assert_eq!(everything.first(), Some(&first));
    assert_eq!(everything.last(), Some(&next));

    // Up to date: nothing replayed.
    let mut current = d.client.events(Some(next.seq)).await.unwrap();
    assert_quiet(&mut current).await;

    // Older than the buffer (seqs start at the start time in µs): resync.
    let mut stale = d.client.events(Some(1)).await.unwrap();
    let resync = expect_event(&mut stale).await;
    assert_eq!(
        resync.body,
        EventBody::Resync {
            requested: 1,
            oldest: Some(first.seq)
        }
    );
    // Nothing old is replayed after a resync; new events follow.
    assert_quiet(&mut stale).await;
    // From the future (another daemon's numbers): resync too.
    let mut future = d.client.events(Some(next.seq + 1_000_000)).await.unwrap();
    let resync = expect_event(&mut future).await;
    assert!(
        matches!(resync.body, EventBody::Resync { requested, .. } if requested == next.seq + 1_000_000),
        "{resync:?}"
    );
    let answer = call(&d, Method::DELETE, &format!("/v1/vms/{}", id_of(&c)), None).await;
    assert_eq!(answer.0, 204);
    for stream in [&mut stale, &mut future, &mut current] {
        let event = expect_event(stream).await;
        assert!(event.seq > next.seq, "{event:?}");
        assert!(
            matches!(&event.body, EventBody::Vm { vm } if vm.id == uuid_of(&c))
                || is_deleted(&event, uuid_of(&c)),
            "{event:?}"
        );
    }

    // A malformed `since` is the caller's error.
    let response = d
        .client
        .request_bytes(Method::GET, "/v1/events?since=soon", None, vec![])
        .await
        .unwrap();
    assert_eq!(response.status, 400, "{}", response.text());
}

// ---- 7. node, health, unknown routes ----------------------------------------------------

#[tokio::test]
async fn node_health_and_unknown_routes() {
    let d = Daemon::start().await;

    let (status, health) = call(&d, Method::GET, "/healthz", None).await;
    assert_eq!((status, health), (200, json!({"status": "ok"})));

    let (status, node) = call(&d, Method::GET, "/v1/node", None).await;
    assert_eq!(status, 200, "{node}");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(node["hostname"], hostname.trim(), "{node}");
    assert!(node["cpus"].as_u64().is_some_and(|n| n >= 1), "{node}");
    assert!(node["memory_mib"].as_u64().is_some_and(|n| n > 0), "{node}");
    assert!(
        node["qemu_version"].as_str().is_some_and(|v| !v.is_empty()),
        "{node}"
    );
    assert_eq!(node["accel"], "tcg", "{node}");
    let profiles: Vec<&str> = node["profiles"]
        .as_array()
        .expect("profiles is a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for profile in ["q35", "microvm"] {
        assert!(profiles.contains(&profile), "{profile} missing: {node}");
    }
    assert_eq!(node["vms_by_state"], json!({}), "{node}");
    create_vm(&d, &guest_spec_json(&unique_name("node"), "")).await;
    let node = d.client.node().await.unwrap();
    assert_eq!(node.vms_by_state.get("stopped"), Some(&1), "{node:?}");

    let (status, doc) = call(&d, Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].is_string(), "not an OpenAPI document");
    assert!(doc["paths"]["/v1/vms"].is_object(), "no /v1/vms in it");

    for path in ["/v1/nope", "/v2/vms", "/", "/v1/vms/x/y/z"] {
        let answer = call(&d, Method::GET, path, None).await;
        assert_error(&answer, 404, "not_found");
    }
    let answer = call(&d, Method::GET, "/v1/vms/no-such-vm", None).await;
    assert_error(&answer, 404, "not_found");
    let answer = call(&d, Method::DELETE, "/v1/vms", None).await;
    assert_error(&answer, 405, "method_not_allowed");
}

// ---- 8. the CLI -------------------------------------------------------------------

/// Runs `vmlet ARGS` against nothing but what the arguments (and `env`) say.
async fn vmlet(args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"));
    command
        .args(args)
        .env_remove("VMLET_SOCKET")
        .env_remove("VMLET_URL")
        .env_remove("VMLET_TOKEN_FILE")
        .stdin(std::process::Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(BOOT_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("vmlet {args:?} did not finish"))
        .expect("running vmlet");
    output
}

/// Runs `vmlet ARGS --socket SOCK`, expects success, returns stdout.
async fn vmlet_ok(d: &Daemon, args: &[&str]) -> String {
    let socket = d.socket.to_str().unwrap();
    let mut all = args.to_vec();
    all.extend(["--socket", socket]);
    let output = vmlet(&all, &[]).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "vmlet {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn cli_commands_drive_the_daemon() {
    let d = Daemon::start().await;
    let name = unique_name("cli");

    let out = vmlet_ok(&d, &["vm", "list"]).await;
    assert!(out.contains("NAME") && out.contains("STATE"), "{out}");
    assert!(!out.contains(&name), "{out}");

    let spec_file = d.scratch().join("spec.json");
    std::fs::write(
        &spec_file,
        serde_json::to_vec_pretty(&guest_spec_json(&name, "guest.action=hold")).unwrap(),
    )
    .unwrap();
    let out = vmlet_ok(&d, &["vm", "create", "-f", spec_file.to_str().unwrap()]).await;
    assert!(out.contains(&format!("created VM {name}")), "{out}");

    let out = vmlet_ok(&d, &["vm", "show", &name, "-o", "json"]).await;
    let shown: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(shown["name"], name.as_str());
    assert_eq!(shown["state"], "stopped");
    let id = id_of(&shown);

    let out = vmlet_ok(&d, &["vm", "show", &id]).await;
    assert!(out.contains(&name) && out.contains("stopped"), "{out}");

    // The socket from the environment.
    let output = vmlet(&["vm", "start", &name], &[("VMLET_SOCKET", &d.socket)]).await;
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "vm start: {output:?}");
    assert!(out.contains(&format!("{name} state=running")), "{out}");

    let out = vmlet_ok(&d, &["vm", "list"]).await;
    let row = out
        .lines()
        .find(|l| l.contains(&name))
        .unwrap_or_else(|| panic!("{name} not listed: {out}"));
    assert!(row.contains("running") && row.contains(&id), "{row}");
    // Options before the subcommand.
    let out = vmlet_ok(&d, &["vm", "-o", "json", "list"]).await;
    let listed: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(listed["vms"][0]["state"], "running", "{listed}");

    // Deleting a running VM without --force fails and says why.
    let socket = d.socket.to_str().unwrap();
    let output = vmlet(&["vm", "delete", &name, "--socket", socket], &[]).await;
    assert!(!output.status.success(), "deleted a running VM: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("409"), "{stderr}");

    let out = vmlet_ok(&d, &["vm", "stop", &name, "--force"]).await;
    assert!(out.contains(&format!("{name} state=stopped")), "{out}");
    let out = vmlet_ok(&d, &["vm", "delete", &name]).await;
    assert!(out.contains(&format!("deleted VM {name}")), "{out}");

    let output = vmlet(&["vm", "show", &name, "--socket", socket], &[]).await;
    assert!(!output.status.success(), "showed a deleted VM: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("404"), "{stderr}");

    let out = vmlet_ok(&d, &["node"]).await;
    assert!(out.contains("hostname:"), "{out}");
    assert!(out.contains("tcg"), "{out}");
    assert!(out.contains("q35"), "{out}");
    let out = vmlet_ok(&d, &["node", "-o", "json"]).await;
    let node: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(node["accel"], "tcg");

    // No daemon at the socket: a clear error, not a hang.
    let missing = d.scratch().join("nobody.sock");
    let output = vmlet(&["vm", "list", "--socket", missing.to_str().unwrap()], &[]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");

    assert!(list(&d).await.is_empty());
}

#[tokio::test]
async fn tcp_listener_requires_the_bearer_token_socket_group_and_json_logs() {
    use vmlet::client::{Client, Endpoint};
    let token_dir = common::Scratch::new();
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    // Token files must be private to their owner.
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with_env(&[
        ("VMLET_TCP_LISTEN", &addr),
        ("VMLET_AUTH_TOKEN_FILE", token_file.to_str().unwrap()),
        ("VMLET_LOG_FORMAT", "json"),
        ("VMLET_SOCKET_GROUP", "daemon"),
    ])
    .await;
    let url = format!("http://{addr}");
    let anonymous = Client::new(Endpoint::Tcp {
        url: url.clone(),
        token: None,
    });
    let wrong = Client::new(Endpoint::Tcp {
        url: url.clone(),
        token: Some("s3cret-tokem".into()),
    });
    let right = Client::new(Endpoint::Tcp {
        url,
        token: Some("s3cret-token".into()),
    });

    // Health stays open for probes; everything else needs the token.
    anonymous.health().await.expect("/healthz without a token");
    for client in [&anonymous, &wrong] {
        let answer = client
            .request_json(Method::GET, "/v1/vms", None)
            .await
            .unwrap();
        assert_error(&answer, 401, "unauthorized");
    }
    assert!(right.list_vms().await.unwrap().is_empty());
    // The unix socket needs no token (its file mode guards it).
    assert!(d.client.list_vms().await.unwrap().is_empty());
    let mode = std::fs::metadata(&d.socket).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o660
    );

    // JSON logs: one object per line, a request line with its id.
    let log = d.log_text();
    let requests: Vec<Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("log line is JSON"))
        .filter(|v: &Value| v["message"] == "request")
        .collect();
    assert!(
        requests
            .iter()
            .any(|r| r["path"] == "/v1/vms" && r["status"] == 401 && r["request_id"].is_string()),
        "no JSON request line for the refused request:\n{log}"
    );
}
