//! The conventions every client subcommand of the `vmlet` binary shares,
//! against a real daemon: global options before or after the subcommand,
//! exit codes by error class, errors as JSON with `-o json`, shell
//! completions, and `vmlet vm console` with its `vmlet console` alias.

mod common;

use std::time::Duration;

use common::daemon::{guest_spec_json, unique_name, Daemon};
use serde_json::Value;

/// How long one CLI command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What one `vmlet` run gave.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `vmlet ARGS` exactly as given (the socket too), with nothing from
/// the environment naming another daemon.
async fn vmlet(args: &[&str]) -> Run {
    let output = tokio::time::timeout(
        COMMAND_TIMEOUT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"))
            .args(args)
            .env_remove("VMLET_SOCKET")
            .env_remove("VMLET_URL")
            .env_remove("VMLET_TOKEN_FILE")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("vmlet {args:?} did not finish"))
    .expect("running vmlet");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The one JSON error line on stderr of a failed `-o json` run.
fn json_error(run: &Run) -> Value {
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line expected: {run}");
    let body = json(lines[0]);
    assert!(body["error"]["code"].is_string(), "{run}");
    assert!(body["error"]["message"].is_string(), "{run}");
    body
}

#[tokio::test]
async fn client_options_work_before_and_after_the_subcommand() {
    let d = Daemon::start().await;
    let socket = d.socket.to_str().unwrap();
    let name = unique_name("glob");
    d.client
        .create_vm(&guest_spec_json(&name, ""))
        .await
        .unwrap();

    let before = vmlet(&["--socket", socket, "-o", "json", "vm", "list"]).await;
    let middle = vmlet(&["vm", "--socket", socket, "list", "-o", "json"]).await;
    let after = vmlet(&["vm", "list", "--output", "json", "--socket", socket]).await;
    for run in [&before, &middle, &after] {
        assert_eq!(run.code, Some(0), "{run}");
        let vms = json(&run.stdout);
        let names: Vec<&str> = vms["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["spec"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [name.as_str()], "{run}");
    }
    // The options have a help section of their own, and the exit codes
    // are listed.
    let help = vmlet(&["--help"]).await;
    assert_eq!(help.code, Some(0), "{help}");
    let section = help
        .stdout
        .find("Client options (before or after the subcommand):")
        .unwrap_or_else(|| panic!("no client options section: {help}"));
    assert!(help.stdout[section..].contains("--socket"), "{help}");
    assert!(help.stdout.contains("Logging options:"), "{help}");
    assert!(help.stdout.contains("3  not found"), "{help}");
}

#[tokio::test]
async fn exit_codes_and_json_errors_follow_the_error_class() {
    let d = Daemon::start().await;
    let socket = d.socket.to_str().unwrap();
    let name = unique_name("codes");
    d.client
        .create_vm(&guest_spec_json(&name, ""))
        .await
        .unwrap();

    // 3: not found.
    let missing = unique_name("missing");
    let run = vmlet(&["vm", "show", &missing, "--socket", socket]).await;
    assert_eq!(run.code, Some(3), "{run}");
    assert!(run.stderr.starts_with("vmlet: 404 not_found"), "{run}");
    let run = vmlet(&["-o", "json", "vm", "show", &missing, "--socket", socket]).await;
    assert_eq!(run.code, Some(3), "{run}");
    assert!(run.stdout.is_empty(), "{run}");
    let body = json_error(&run);
    assert_eq!(body["error"]["code"], "not_found", "{run}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&missing),
        "{run}"
    );

    // 4: conflict (the name is taken).
    let scratch = tempfile::tempdir().unwrap();
    let spec_file = scratch.path().join("spec.json");
    std::fs::write(&spec_file, guest_spec_json(&name, "").to_string()).unwrap();
    let spec_path = spec_file.to_str().unwrap();
    let run = vmlet(&[
        "vm", "create", "-f", spec_path, "--socket", socket, "-o", "json",
    ])
    .await;
    assert_eq!(run.code, Some(4), "{run}");
    assert_eq!(json_error(&run)["error"]["code"], "conflict", "{run}");

    // 5: invalid, with the field named.
    let mut bad = guest_spec_json(&unique_name("bad"), "");
    bad["vcpus"] = 0.into();
    std::fs::write(&spec_file, bad.to_string()).unwrap();
    let run = vmlet(&[
        "vm", "create", "-f", spec_path, "--socket", socket, "-o", "json",
    ])
    .await;
    assert_eq!(run.code, Some(5), "{run}");
    let body = json_error(&run);
    assert_eq!(body["error"]["code"], "invalid_spec", "{run}");
    assert_eq!(body["error"]["field"], "vcpus", "{run}");
    // A name that cannot go into a URL never reaches the daemon: 5 too.
    let run = vmlet(&["vm", "show", "a/b", "--socket", socket]).await;
    assert_eq!(run.code, Some(5), "{run}");

    // 6: the daemon cannot be reached.
    let gone = d.socket.with_file_name("no-daemon.sock");
    let run = vmlet(&["node", "-o", "json", "--socket", gone.to_str().unwrap()]).await;
    assert_eq!(run.code, Some(6), "{run}");
    let body = json_error(&run);
    assert_eq!(body["error"]["code"], "unavailable", "{run}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is `vmlet serve` running?"),
        "{run}"
    );

    // 2: usage.
    let run = vmlet(&["vm", "frobnicate", "--socket", socket]).await;
    assert_eq!(run.code, Some(2), "{run}");
}

#[tokio::test]
async fn completion_scripts_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let run = vmlet(&["completion", shell]).await;
        assert_eq!(run.code, Some(0), "{run}");
        // fish spells options without their dashes (`-l socket`).
        for word in [
            "image",
            "volume",
            "network",
            "events",
            "completion",
            "socket",
        ] {
            assert!(run.stdout.contains(word), "{shell} lacks {word}: {run}");
        }
    }
    let run = vmlet(&["completion", "tcsh"]).await;
    assert_eq!(run.code, Some(2), "{run}");
}

#[tokio::test]
async fn vm_console_and_its_alias_print_the_log_and_vnc_needs_a_running_vm() {
    let d = Daemon::start().await;
    let socket = d.socket.to_str().unwrap();
    let name = unique_name("cons");
    d.client
        .create_vm(&guest_spec_json(&name, ""))
        .await
        .unwrap();
    let new = vmlet(&["vm", "console", &name, "--print-log", "--socket", socket]).await;
    let alias = vmlet(&["console", &name, "--print-log", "--socket", socket]).await;
    assert_eq!(new.code, alias.code, "{new}\n{alias}");
    assert_eq!(new.stdout, alias.stdout, "{new}\n{alias}");
    // A VM that never ran has no graphical console to hand out: the
    // daemon's refusal, with its exit code.
    let run = vmlet(&[
        "vm", "console", &name, "--vnc", "--socket", socket, "-o", "json",
    ])
    .await;
    assert_ne!(run.code, Some(0), "{run}");
    let body = json_error(&run);
    let code = body["error"]["code"].as_str().unwrap();
    assert_eq!(
        run.code,
        Some(i32::from(vmlet::cli::exit_code_for(code))),
        "{run}"
    );
    // --vnc and --print-log exclude each other.
    let run = vmlet(&[
        "vm",
        "console",
        &name,
        "--vnc",
        "--print-log",
        "--socket",
        socket,
    ])
    .await;
    assert_eq!(run.code, Some(2), "{run}");
}

/// Reads stdout lines of `child` until one satisfies `want`, returning
/// every line read.
async fn lines_until(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(COMMAND_TIMEOUT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no {what} within the timeout; saw {seen:?}"))
            .expect("reading vmlet events")
            .unwrap_or_else(|| panic!("vmlet events ended before {what}; saw {seen:?}"));
        let event = json(&line);
        let done = want(&event);
        seen.push(event);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn events_reconnect_after_a_daemon_restart_and_resume_with_since() {
    use tokio::io::AsyncBufReadExt;
    let mut d = Daemon::start().await;
    let first = unique_name("ev1");
    let second = unique_name("ev2");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"))
        .args(["events", "-o", "json", "--socket"])
        .arg(&d.socket)
        .env_remove("VMLET_URL")
        .env_remove("VMLET_TOKEN_FILE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // The stream is open once an event made after the start arrives: make
    // VMs until one shows.
    let mut connected = false;
    for _ in 0..30 {
        d.client
            .create_vm(&guest_spec_json(&unique_name("probe"), ""))
            .await
            .unwrap();
        if let Ok(line) = tokio::time::timeout(Duration::from_secs(1), lines.next_line()).await {
            assert!(line.unwrap().is_some(), "vmlet events ended");
            connected = true;
            break;
        }
    }
    assert!(connected, "vmlet events printed nothing");
    d.client
        .create_vm(&guest_spec_json(&first, ""))
        .await
        .unwrap();
    let before = lines_until(&mut lines, "the first VM's event", |e| {
        e["type"] == "vm" && e["vm"]["spec"]["name"] == first.as_str()
    })
    .await;
    let last_seq = before.last().unwrap()["seq"].as_u64().unwrap();

    d.restart().await;
    // The reconnect asks for what followed the last event printed; the
    // restarted daemon no longer has it, and says so (re-list) first.
    let resynced = lines_until(&mut lines, "a resync after the restart", |e| {
        e["type"] == "resync"
    })
    .await;
    assert_eq!(
        resynced.last().unwrap()["requested"],
        last_seq,
        "{resynced:?}"
    );
    // Then it follows the new daemon's events.
    d.client
        .create_vm(&guest_spec_json(&second, ""))
        .await
        .unwrap();
    lines_until(&mut lines, "the second VM's event", |e| {
        e["type"] == "vm" && e["vm"]["spec"]["name"] == second.as_str()
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "vmlet events exited after reconnecting"
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn messages_name_fields_settings_and_flags() {
    let d = Daemon::start().await;
    let socket = d.socket.to_str().unwrap();

    // Every missing field at once, without a `body:` prefix.
    let scratch = tempfile::tempdir().unwrap();
    let spec_file = scratch.path().join("spec.json");
    std::fs::write(&spec_file, r#"{"boot":{"type":"firmware"}}"#).unwrap();
    let run = vmlet(&[
        "vm",
        "create",
        "-f",
        spec_file.to_str().unwrap(),
        "--socket",
        socket,
        "-o",
        "json",
    ])
    .await;
    assert_eq!(run.code, Some(5), "{run}");
    let body = json_error(&run);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("missing fields "), "{run}");
    for field in ["name", "vcpus", "memory_mib"] {
        assert!(message.contains(field), "{field}: {run}");
    }
    assert!(!message.contains("body"), "{run}");

    // A host path outside the allowed roots names the setting.
    let mut outside = guest_spec_json(&unique_name("out"), "");
    outside["disks"] = serde_json::json!([{"path": "/etc/hostname", "format": "raw"}]);
    std::fs::write(&spec_file, outside.to_string()).unwrap();
    let run = vmlet(&[
        "vm",
        "create",
        "-f",
        spec_file.to_str().unwrap(),
        "--socket",
        socket,
    ])
    .await;
    assert_eq!(run.code, Some(5), "{run}");
    assert!(run.stderr.contains("allowed_host_paths"), "{run}");

    // tail_bytes out of range is a bad request parameter, not a bad spec.
    let name = unique_name("msg");
    d.client
        .create_vm(&guest_spec_json(&name, ""))
        .await
        .unwrap();
    let run = vmlet(&[
        "vm",
        "console",
        &name,
        "--print-log",
        "--tail-bytes",
        "18446744073709551615",
        "--socket",
        socket,
        "-o",
        "json",
    ])
    .await;
    assert_eq!(run.code, Some(5), "{run}");
    let body = json_error(&run);
    assert_eq!(body["error"]["code"], "invalid_request", "{run}");
    assert_eq!(body["error"]["field"], "tail_bytes", "{run}");

    // A running VM: a second start says so and succeeds; a delete
    // without --force names the flag.
    let run = vmlet(&["vm", "start", &name, "--socket", socket]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert!(!run.stdout.contains("already running"), "{run}");
    let run = vmlet(&["vm", "start", &name, "--socket", socket]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stdout.contains("already running; nothing to do"),
        "{run}"
    );
    // --vnc: a one-time path to the noVNC page (over the socket, for the
    // TCP listener), whose token the daemon knows.
    let run = vmlet(&["vm", "console", &name, "--vnc", "--socket", socket]).await;
    assert_eq!(run.code, Some(0), "{run}");
    let page = run.stdout.lines().next().unwrap_or_default();
    let token = page
        .strip_prefix("/console?token=")
        .unwrap_or_else(|| panic!("no page path: {run}"));
    assert_eq!(token.len(), 64, "{run}");
    assert!(run.stdout.contains("one-time path"), "{run}");
    let live = |token: String| {
        let client = d.client.clone();
        async move {
            client
                .request(
                    vmlet::client::Method::GET,
                    &format!("/v1/console?token={token}"),
                    None,
                )
                .await
                .unwrap()
                .status
        }
    };
    // A live token gets "not a websocket request" (400), an unknown one 401.
    assert_eq!(live(token.to_string()).await, 400, "{run}");
    assert_eq!(live("0".repeat(64)).await, 401);

    let run = vmlet(&["vm", "delete", &name, "--socket", socket]).await;
    assert_eq!(run.code, Some(4), "{run}");
    assert!(
        run.stderr
            .contains(&format!("`vmlet vm delete {name} --force`")),
        "{run}"
    );
    assert!(!run.stderr.contains("force=true"), "{run}");
    let run = vmlet(&["vm", "delete", &name, "--force", "--socket", socket]).await;
    assert_eq!(run.code, Some(0), "{run}");
}

#[tokio::test]
async fn vm_migrate_moves_a_vm_shows_the_downtime_and_migration_lists_it_on_both_sides() {
    let a = Daemon::start().await;
    let target = common::daemon::TcpTarget::start("migrate-cli-token").await;
    let b = &target.daemon;
    let target_token = &target.token_file;
    let a_socket = a.socket.to_str().unwrap().to_string();
    let b_socket = b.socket.to_str().unwrap().to_string();
    let url = target.url.clone();
    let name = unique_name("cli-mig");
    let vm = common::api::create_vm(&a, &guest_spec_json(&name, "guest.action=hold")).await;
    let id = common::api::id_of(&vm);

    // A stopped VM: refused as a conflict (exit code 4), nothing started.
    let refused = vmlet(&[
        "--socket",
        &a_socket,
        "vm",
        "migrate",
        &name,
        "--to",
        &url,
        "--target-token-file",
        target_token.to_str().unwrap(),
    ])
    .await;
    assert_eq!(refused.code, Some(4), "{refused}");
    assert!(refused.stderr.contains("running VM"), "{refused}");

    a.client.start(&id).await.unwrap();
    // Without the target's token: refused before anything is asked,
    // naming the option.
    let no_token = vmlet(&["--socket", &a_socket, "vm", "migrate", &name, "--to", &url]).await;
    assert_ne!(no_token.code, Some(0), "{no_token}");
    assert!(no_token.stderr.contains("--token-file"), "{no_token}");
    assert!(a.client.list_migrations().await.unwrap().is_empty());
    // The form the issue names: over the unix socket, `--token-file` is
    // the target's token.
    let moved = vmlet(&[
        "--socket",
        &a_socket,
        "vm",
        "migrate",
        &name,
        "--to",
        &url,
        "--token-file",
        target_token.to_str().unwrap(),
    ])
    .await;
    assert_eq!(moved.code, Some(0), "{moved}");
    assert!(
        moved
            .stdout
            .contains(&format!("migrated VM {name} to {url}"))
            && moved.stdout.contains("downtime "),
        "{moved}"
    );
    assert_eq!(
        b.client.get_vm(&id).await.unwrap().state.as_str(),
        "running"
    );
    assert!(
        a.client.get_vm(&id).await.is_err(),
        "the source still lists the VM"
    );

    for (socket, direction) in [(&a_socket, "out"), (&b_socket, "in")] {
        let listed = vmlet(&["--socket", socket, "migration", "list"]).await;
        assert_eq!(listed.code, Some(0), "{listed}");
        let row = listed
            .stdout
            .lines()
            .find(|l| l.contains(&name))
            .unwrap_or_else(|| panic!("no row for {name}: {listed}"));
        assert!(
            row.contains(direction) && row.contains("completed"),
            "{row}"
        );
    }
    let as_json = vmlet(&["--socket", &b_socket, "-o", "json", "migration", "list"]).await;
    let list = json(&as_json.stdout);
    assert_eq!(list["migrations"][0]["role"], "target", "{as_json}");
    common::api::force_delete_vm(b, &id).await;
}
