//! Reboots that ask the guest, waits that say why, and boots in the console
//! log: a real daemon, the real test guest and the real `vmlet` binary.
//!
//! The test guest powers off on the ACPI power button (busy box acpid),
//! unless booted with `guest.acpi=ignore`, and prints `GUEST-READY` on
//! every boot.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::api::{assert_error, call, create_vm, id_of, uuid_of};
use common::daemon::{count_lines, guest_spec_json, unique_name, wait_for_count, Daemon};
use common::BOOT_TIMEOUT;
use serde_json::{json, Value};
use vmlet::client::Method;

/// How long one CLI call may take (a graceful stop or reboot of the idle
/// guest takes seconds; a boot under TCG on a busy host well under this).
const CLI_TIMEOUT: Duration = Duration::from_secs(240);

/// Runs `vmlet ARGS` against the daemon's socket.
async fn cli(d: &Daemon, args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"));
    command
        .args(args)
        .env("VMLET_SOCKET", &d.socket)
        .env_remove("VMLET_URL")
        .env_remove("VMLET_TOKEN_FILE")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(CLI_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("vmlet {args:?} did not finish"))
        .expect("running vmlet")
}

/// Runs `vmlet ARGS`, expecting success; returns stdout and stderr.
async fn cli_ok(d: &Daemon, args: &[&str]) -> (String, String) {
    let out = cli(d, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "vmlet {args:?} failed ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

async fn show(d: &Daemon, id: &str) -> Value {
    let (status, vm) = call(d, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(status, 200, "{vm}");
    vm
}

async fn console_log(d: &Daemon, id: &str, query: &str) -> (u16, String) {
    let response = d
        .client
        .request(
            Method::GET,
            &format!("/v1/vms/{id}/console-log{query}"),
            None,
        )
        .await
        .expect("console-log");
    (
        response.status,
        String::from_utf8_lossy(&response.body).into_owned(),
    )
}

#[tokio::test]
async fn a_reboot_asks_the_guest_and_each_start_is_a_boot_of_its_own() {
    let d = Daemon::start().await;
    let name = unique_name("reboot");
    let vm = create_vm(&d, &guest_spec_json(&name, "guest.action=hold")).await;
    let id = id_of(&vm);
    let log = d.serial_log(uuid_of(&vm));

    // Start, waiting for the guest through the console-log endpoint.
    let timeout = BOOT_TIMEOUT.as_secs().to_string();
    let (out, err) = cli_ok(
        &d,
        &[
            "vm",
            "start",
            &id,
            "--wait-ready",
            "--ready-marker",
            "GUEST-READY",
            "--timeout",
            &timeout,
        ],
    )
    .await;
    assert!(out.contains("ready"), "{out}");
    assert!(err.contains("waiting up to"), "{err}");
    assert_eq!(
        count_lines(&log, "GUEST-READY"),
        1,
        "--wait-ready returned before the guest was up"
    );
    assert_eq!(count_lines(&log, "--- vmlet: boot 1 started "), 1);
    let running = show(&d, &id).await;
    let pid = running["pid"].as_i64().unwrap();
    assert_eq!(running["boots"], 1);
    assert!(running.get("console_silent_since").is_none(), "{running}");

    // The reboot asks the guest: it shuts down on the ACPI button and boots
    // again in the same QEMU, and the watcher saw no stop nor crash.
    // --wait-ready returns once the guest is up again (the first boot's
    // marker, still in the log, does not count).
    let (out, err) = cli_ok(
        &d,
        &[
            "vm",
            "reboot",
            &id,
            "--wait-ready",
            "--ready-marker",
            "GUEST-READY",
            "--ready-timeout",
            "120",
        ],
    )
    .await;
    assert!(err.contains("asking the guest"), "{err}");
    assert!(
        out.contains("state=running") && out.contains("ready"),
        "{out}"
    );
    assert_eq!(
        count_lines(&log, "GUEST-ACPI-POWERDOWN"),
        1,
        "the guest was not asked"
    );
    // The marker was there when the CLI returned (its line may still be
    // being written).
    wait_for_count(&log, "GUEST-READY", 2, std::time::Duration::from_secs(5)).await;
    let rebooted = show(&d, &id).await;
    assert_eq!(rebooted["state"], "running", "{rebooted}");
    assert_eq!(rebooted["desired"], "running", "{rebooted}");
    assert_eq!(
        rebooted["pid"].as_i64().unwrap(),
        pid,
        "a reboot keeps the QEMU"
    );
    assert_eq!(rebooted["error"], Value::Null);

    // The shutdown action was restored: a stop now ends with the guest
    // powering off (not QEMU pausing and being quit after the grace).
    let (out, err) = cli_ok(&d, &["vm", "stop", &id]).await;
    assert!(
        err.contains("waiting up to 60s") && err.contains("QEMU is quit"),
        "the stop did not say what it waits for: {err}"
    );
    assert!(out.contains("the guest powered off"), "{out}");
    let stopped = show(&d, &id).await;
    assert_eq!(stopped["last_stop"], "guest_powered_off", "{stopped}");

    // A second start is boot 2: the current boot's log holds only it.
    cli_ok(
        &d,
        &[
            "vm",
            "start",
            &id,
            "--wait-ready",
            "--ready-marker",
            "GUEST-READY",
            "--timeout",
            &timeout,
        ],
    )
    .await;
    assert_eq!(
        count_lines(&log, "GUEST-READY"),
        3,
        "--wait-ready saw an earlier boot"
    );
    let (status, current) = console_log(&d, &id, "?boot=current").await;
    assert_eq!(status, 200);
    assert!(
        current.starts_with("--- vmlet: boot 2 started "),
        "{current}"
    );
    assert_eq!(current.matches("GUEST-READY").count(), 1, "{current}");
    let (_, all) = console_log(&d, &id, "").await;
    assert_eq!(all.matches("GUEST-READY").count(), 3);
    assert!(all.contains("--- vmlet: boot 1 started "));
    let (printed, _) = cli_ok(&d, &["console", &id, "--print-log", "--boot", "current"]).await;
    assert!(
        printed.starts_with("--- vmlet: boot 2 started "),
        "{printed}"
    );
    assert_eq!(printed.matches("GUEST-READY").count(), 1, "{printed}");
    let (status, body) = console_log(&d, &id, "?boot=all").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("boot"), "{body}");
    let (shown, _) = cli_ok(&d, &["vm", "show", &id]).await;
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("boots:") && l.split_whitespace().last() == Some("2")),
        "{shown}"
    );

    let (status, body) = call(
        &d,
        Method::POST,
        &format!("/v1/vms/{id}/stop"),
        Some(&json!({"force": true})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["last_stop"], "quit", "{body}");
}

#[tokio::test]
async fn a_guest_that_ignores_the_button_keeps_running_and_force_resets_it() {
    let d = Daemon::start_with_env(&[("VMLET_CONSOLE_SILENT_HINT_S", "2")]).await;
    let name = unique_name("stubborn");
    let vm = create_vm(
        &d,
        &guest_spec_json(&name, "guest.action=hold guest.acpi=ignore"),
    )
    .await;
    let id = id_of(&vm);
    let log = d.serial_log(uuid_of(&vm));

    // A marker that never comes: a clear failure, non-zero exit.
    let out = cli(
        &d,
        &[
            "vm",
            "start",
            &id,
            "--wait-ready",
            "--ready-marker",
            "NEVER-SAID",
            "--timeout",
            "3",
        ],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a wait that timed out succeeded: {err}"
    );
    assert!(
        err.contains("did not print \"NEVER-SAID\" within 3s"),
        "unclear timeout: {err}"
    );
    wait_for_count(&log, "GUEST-READY", 1, BOOT_TIMEOUT).await;
    let pid = show(&d, &id).await["pid"].as_i64().unwrap();

    // The guest ignores the button: the reboot fails, naming why, and the
    // VM keeps running in the same QEMU.
    let answer = call(
        &d,
        Method::POST,
        &format!("/v1/vms/{id}/reboot"),
        Some(&json!({"timeout_s": 3})),
    )
    .await;
    let error = assert_error(&answer, 503, "timeout");
    let message = error["message"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains("did not react to the ACPI power button within 3s")
            && message.contains("keeps running"),
        "{message}"
    );
    assert_eq!(count_lines(&log, "GUEST-ACPI-IGNORED"), 1);
    let after = show(&d, &id).await;
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["task"], Value::Null, "{after}");
    assert_eq!(after["pid"].as_i64().unwrap(), pid);

    // Bad options name their field.
    let answer = call(
        &d,
        Method::POST,
        &format!("/v1/vms/{id}/reboot"),
        Some(&json!({"timeout_s": 100_000})),
    )
    .await;
    assert_eq!(answer.0, 422, "{}", answer.1);
    assert!(answer.1.to_string().contains("timeout_s"), "{}", answer.1);

    // --force resets at once, without asking.
    let (out, err) = cli_ok(&d, &["vm", "reboot", &id, "--force"]).await;
    assert!(!err.contains("asking the guest"), "{err}");
    assert!(out.contains("state=running"), "{out}");
    wait_for_count(&log, "GUEST-READY", 2, BOOT_TIMEOUT).await;
    assert_eq!(
        count_lines(&log, "GUEST-ACPI-IGNORED"),
        1,
        "a forced reboot asked the guest"
    );
    assert_eq!(show(&d, &id).await["pid"].as_i64().unwrap(), pid);

    // The guest prints nothing once up: after 2 s, the view says since when.
    let quiet = common::daemon::wait_until(
        "the silent-console hint",
        Duration::from_secs(20),
        || async {
            let vm = show(&d, &id).await;
            vm.get("console_silent_since").cloned()
        },
    )
    .await;
    assert!(quiet.as_str().is_some_and(|s| s.ends_with('Z')), "{quiet}");
    let (shown, _) = cli_ok(&d, &["vm", "show", &id]).await;
    assert!(
        shown.contains("hint:") && shown.contains("has printed nothing since"),
        "{shown}"
    );

    // The stop says it waits, and that QEMU was quit.
    let (out, err) = cli_ok(&d, &["vm", "stop", &id, "--timeout", "2"]).await;
    assert!(err.contains("waiting up to 2s"), "{err}");
    assert!(out.contains("QEMU was quit"), "{out}");
    assert_eq!(show(&d, &id).await["last_stop"], "quit");
}

#[tokio::test]
async fn a_guest_that_ignores_the_button_is_rebooted_by_its_agent_and_ready_by_it() {
    let d = Daemon::start().await;
    let name = unique_name("agent-reboot");
    let vm = create_vm(
        &d,
        &guest_spec_json(&name, "guest.action=hold guest.acpi=ignore guest.agent=on"),
    )
    .await;
    let id = id_of(&vm);
    let log = d.serial_log(uuid_of(&vm));

    // The marker never comes; the agent answering makes the guest ready.
    let (out, err) = cli_ok(
        &d,
        &[
            "vm",
            "start",
            &id,
            "--wait-ready",
            "--ready-marker",
            "NEVER-SAID",
            "--timeout",
            &BOOT_TIMEOUT.as_secs().to_string(),
        ],
    )
    .await;
    assert!(
        err.contains("or for its guest agent to answer"),
        "the wait did not say it takes the agent: {err}"
    );
    assert!(out.contains("ready (the guest agent answered)"), "{out}");
    let running = show(&d, &id).await;
    assert!(running["guest"]["read_at"].is_string(), "{running}");
    let pid = running["pid"].as_i64().unwrap();
    assert_eq!(count_lines(&log, "GUEST-READY"), 1);

    // The guest ignores the button: halfway through, its agent is asked to
    // reboot it, and it boots again in the same QEMU.
    let (out, err) = cli_ok(
        &d,
        &[
            "vm",
            "reboot",
            &id,
            "--timeout",
            "40",
            "--wait-ready",
            "--ready-marker",
            "GUEST-READY",
            "--ready-timeout",
            "180",
        ],
    )
    .await;
    assert!(
        err.contains("then its guest agent's guest-shutdown mode=reboot after 20s"),
        "the reboot did not say it asks the agent: {err}"
    );
    assert!(
        out.contains("state=running") && out.contains("ready"),
        "{out}"
    );
    assert_eq!(
        count_lines(&log, "GUEST-ACPI-IGNORED"),
        1,
        "the button first"
    );
    assert_eq!(count_lines(&log, "GUEST-AGENT-REBOOT"), 1, "then the agent");
    assert_eq!(count_lines(&log, "GUEST-AGENT-SHUTDOWN"), 0);
    wait_for_count(&log, "GUEST-READY", 2, Duration::from_secs(5)).await;
    let rebooted = show(&d, &id).await;
    assert_eq!(rebooted["state"], "running", "{rebooted}");
    assert_eq!(rebooted["error"], Value::Null, "{rebooted}");
    assert_eq!(
        rebooted["pid"].as_i64().unwrap(),
        pid,
        "a reboot keeps the QEMU"
    );

    // The stop says the agent comes after the button, and it does.
    let (out, err) = cli_ok(&d, &["vm", "stop", &id, "--timeout", "40"]).await;
    assert!(
        err.contains("then its guest agent, if it answers, after 20s")
            && err.contains("waiting up to 40s"),
        "{err}"
    );
    assert!(out.contains("guest agent"), "{out}");
    assert_eq!(count_lines(&log, "GUEST-AGENT-SHUTDOWN"), 1);
}

#[tokio::test]
async fn a_banner_the_guest_prints_does_not_start_a_boot() {
    let d = Daemon::start().await;
    let name = unique_name("fake-banner");
    let vm = create_vm(&d, &guest_spec_json(&name, "guest.action=shell")).await;
    let id = id_of(&vm);
    let log = d.serial_log(uuid_of(&vm));
    cli_ok(&d, &["vm", "start", &id]).await;
    wait_for_count(&log, "GUEST-READY", 1, BOOT_TIMEOUT).await;

    // The guest prints a line just like vmlet's banner, at a line start.
    let token = common::api::serial_token(&d, &id).await;
    let socket = d.socket.clone();
    let shell_log = log.clone();
    tokio::task::spawn_blocking(move || {
        let mut shell = common::serial_shell::SerialShell::connect(&socket, &token, &shell_log);
        shell.run(
            "printf '%s\\n' '--- vmlet: boot 7 started 2020-01-01T00:00:00Z' 'AFTER-FAKE'",
            Duration::from_secs(60),
        )
    })
    .await
    .expect("the shell");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l
            .trim_end_matches('\r')
            .starts_with("--- vmlet: boot 7 started")),
        "the guest printed its banner at a line start: {text}"
    );

    // The current boot is still the whole of boot 1, from vmlet's banner.
    let (status, current) = console_log(&d, &id, "?boot=current").await;
    assert_eq!(status, 200);
    assert!(
        current.starts_with("--- vmlet: boot 1 started "),
        "a guest-printed banner moved the boot's start: {current}"
    );
    assert!(current.contains("GUEST-READY"), "{current}");
    assert!(current.contains("AFTER-FAKE"), "{current}");
    let (printed, _) = cli_ok(
        &d,
        &["vm", "console", &id, "--print-log", "--boot", "current"],
    )
    .await;
    assert!(
        printed.starts_with("--- vmlet: boot 1 started "),
        "{printed}"
    );
}
