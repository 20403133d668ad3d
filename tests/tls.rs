//! HTTPS on the TCP listener, end to end: `vmlet serve` with `tls_cert`
//! and `tls_key` (a CA and server certificate made by the test), the CLI and
//! the client over `https://` with `--ca-file`, what happens without it or
//! with plain `http://`, the event stream and the serial console (`wss://`)
//! over TLS, and the settings that must stop the daemon from starting.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::api::create_vm;
use common::daemon::{free_port, guest_spec_json, unique_name, Daemon};
use common::tls::TestPki;
use common::Scratch;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use vmlet::client::{Client, ClientError, Endpoint};

/// How long a CLI run or a refused start may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A daemon serving HTTPS on a loopback port (and its plain unix socket).
async fn tls_daemon(pki: &TestPki) -> (Daemon, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let cert = pki.cert.to_string_lossy().into_owned();
    let key = pki.key.to_string_lossy().into_owned();
    let d = Daemon::start_with_env(&[
        ("VMLET_TCP_LISTEN", addr.as_str()),
        ("VMLET_TLS_CERT", cert.as_str()),
        ("VMLET_TLS_KEY", key.as_str()),
    ])
    .await;
    (d, addr)
}

fn token_of(d: &Daemon) -> String {
    std::fs::read_to_string(d.state_dir.join("api-token"))
        .unwrap()
        .trim()
        .to_string()
}

/// The vmlet CLI with none of the connection variables of the caller.
fn cli_command(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"));
    command
        .args(args)
        .env_remove("VMLET_SOCKET")
        .env_remove("VMLET_URL")
        .env_remove("VMLET_TOKEN_FILE")
        .env_remove("VMLET_CA_FILE")
        .env_remove("VMLET_AUTH_TOKEN_FILE")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn cli(args: &[&str]) -> std::process::Output {
    tokio::time::timeout(ANSWER_TIMEOUT, cli_command(args).output())
        .await
        .unwrap_or_else(|_| panic!("vmlet {args:?} did not finish"))
        .expect("running vmlet")
}

#[tokio::test]
async fn the_cli_and_client_speak_https_with_the_ca_file_and_refuse_without_it() {
    let pki = TestPki::new();
    let (d, addr) = tls_daemon(&pki).await;
    let name = unique_name("tls");
    create_vm(&d, &guest_spec_json(&name, "")).await;
    let url = format!("https://127.0.0.1:{}", addr.rsplit(':').next().unwrap());
    let token_file = d.state_dir.join("api-token");
    let token_file = token_file.to_str().unwrap();
    let ca = pki.ca.to_str().unwrap();

    // The CLI, trusting the test CA.
    let listed = cli(&[
        "vm",
        "list",
        "-o",
        "json",
        "--url",
        &url,
        "--ca-file",
        ca,
        "--token-file",
        token_file,
    ])
    .await;
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let value: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let vms = value.get("vms").unwrap_or(&value);
    assert!(vms.to_string().contains(&name), "{value}");

    // Without the CA: a certificate error that says what to do.
    let refused = cli(&["vm", "list", "--url", &url, "--token-file", token_file]).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("TLS handshake")
            && stderr.contains("certificate")
            && stderr.contains("--ca-file"),
        "{stderr}"
    );

    // A CA file that is not one: named.
    let bogus = pki.path("bogus.pem");
    std::fs::write(&bogus, "not a certificate\n").unwrap();
    let refused = cli(&[
        "vm",
        "list",
        "--url",
        &url,
        "--ca-file",
        bogus.to_str().unwrap(),
        "--token-file",
        token_file,
    ])
    .await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("bogus.pem") && stderr.contains("no PEM certificate"),
        "{stderr}"
    );

    // The client: the same through `localhost` (the certificate names it
    // too), and the bearer token is still needed.
    let endpoint = |host: &str, token: Option<String>| Endpoint::Tcp {
        url: format!("https://{host}:{}", addr.rsplit(':').next().unwrap()),
        token,
    };
    let client =
        Client::with_ca_file(endpoint("localhost", Some(token_of(&d))), Some(&pki.ca)).unwrap();
    assert!(client
        .list_vms()
        .await
        .unwrap()
        .iter()
        .any(|vm| vm.spec.name == name));
    let no_token = Client::with_ca_file(endpoint("127.0.0.1", None), Some(&pki.ca)).unwrap();
    let err = no_token.list_vms().await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    let untrusted = Client::new(endpoint("127.0.0.1", Some(token_of(&d))));
    let err = untrusted.list_vms().await.unwrap_err();
    assert!(matches!(err, ClientError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // Plain HTTP to the TLS port: a plain 400 saying to use https.
    let plain = Client::new(Endpoint::Tcp {
        url: format!("http://{addr}"),
        token: Some(token_of(&d)),
    });
    let err = plain.list_vms().await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("https://"), "{err}");
    // The listener is none the worse for it.
    client
        .health()
        .await
        .expect("the TLS listener still answers");
    // The unix socket stays plain.
    assert!(d.client.list_vms().await.is_ok());
}

#[tokio::test]
async fn events_stream_over_https_to_the_client_and_the_cli() {
    let pki = TestPki::new();
    let (d, addr) = tls_daemon(&pki).await;
    let url = format!("https://{addr}");
    let client = Client::with_ca_file(
        Endpoint::Tcp {
            url: url.clone(),
            token: Some(token_of(&d)),
        },
        Some(&pki.ca),
    )
    .unwrap();
    let mut stream = client.events(None).await.expect("the event stream");

    let name = unique_name("tls-ev");
    create_vm(&d, &guest_spec_json(&name, "")).await;

    let event = common::api::expect_event_within(&mut stream, Duration::from_secs(15)).await;
    let text = serde_json::to_string(&event).unwrap();
    assert!(text.contains(&name), "{text}");

    // The CLI replays the buffered events after the one before it (no race
    // with the creation above).
    let seq = serde_json::to_value(&event).unwrap()["seq"]
        .as_u64()
        .unwrap();
    let since = (seq - 1).to_string();
    let token_file = d.state_dir.join("api-token");
    let mut events = cli_command(&[
        "events",
        "--since",
        &since,
        "-o",
        "json",
        "--url",
        &url,
        "--ca-file",
        pki.ca.to_str().unwrap(),
        "--token-file",
        token_file.to_str().unwrap(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("vmlet events");
    let mut lines = BufReader::new(events.stdout.take().unwrap()).lines();

    let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .expect("vmlet events printed an event in time")
        .unwrap()
        .unwrap_or_else(|| panic!("vmlet events ended"));
    assert!(line.contains(&name), "{line}");
    let _ = events.kill().await;
}

/// Runs `vmlet serve` with TLS `env`, expecting it to refuse to start;
/// returns what it printed.
async fn refused_start(env: &[(&str, &Path)]) -> String {
    let scratch = Scratch::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"));
    command
        .arg("serve")
        .arg("--state-dir")
        .arg(scratch.path().join("state"))
        .arg("--run-dir")
        .arg(scratch.path().join("run"))
        .arg("--config")
        .arg("/dev/null")
        .env("VMLET_ACCEL", "tcg")
        .env("VMLET_TCP_LISTEN", &addr)
        .env_remove("VMLET_AUTH_TOKEN_FILE")
        .env_remove("VMLET_TLS_CERT")
        .env_remove("VMLET_TLS_KEY")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = tokio::time::timeout(ANSWER_TIMEOUT, command.output())
        .await
        .expect("vmlet serve should have refused to start")
        .expect("running vmlet serve");
    assert!(!output.status.success(), "vmlet serve started");
    assert!(!scratch.path().join("run/vmlet.sock").exists());
    String::from_utf8_lossy(&output.stderr).into_owned() + &String::from_utf8_lossy(&output.stdout)
}

#[tokio::test]
async fn bad_tls_settings_refuse_to_start_naming_the_file() {
    let pki = TestPki::new();
    let missing = pki.path("missing.key");
    let text = refused_start(&[("VMLET_TLS_CERT", &pki.cert), ("VMLET_TLS_KEY", &missing)]).await;
    assert!(
        text.contains("TLS key file") && text.contains(&*missing.to_string_lossy()),
        "{text}"
    );

    let open_key = pki.path("open.key");
    std::fs::copy(&pki.key, &open_key).unwrap();
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = refused_start(&[("VMLET_TLS_CERT", &pki.cert), ("VMLET_TLS_KEY", &open_key)]).await;
    assert!(
        text.contains(&*open_key.to_string_lossy()) && text.contains("0644"),
        "{text}"
    );

    let text = refused_start(&[("VMLET_TLS_CERT", &pki.cert)]).await;
    assert!(text.contains("tls_key"), "{text}");

    // The CA's certificate with the server's key: they do not match.
    let text = refused_start(&[("VMLET_TLS_CERT", &pki.ca), ("VMLET_TLS_KEY", &pki.key)]).await;
    assert!(
        text.contains("does not match") && text.contains(&*pki.ca.to_string_lossy()),
        "{text}"
    );
}

#[tokio::test]
async fn a_live_migration_to_an_https_target_trusts_the_peer_ca_and_refuses_without_it() {
    let pki = TestPki::new();
    let (target, addr) = tls_daemon(&pki).await;
    let url = format!("https://127.0.0.1:{}", addr.rsplit(':').next().unwrap());
    let token = token_of(&target);
    let trusting =
        Daemon::start_with_env(&[("VMLET_PEER_CA_FILE", pki.ca.to_str().unwrap())]).await;
    let untrusting = Daemon::start().await;
    let request = vmlet::spec::MigrateRequest {
        target: vmlet::spec::MigrationTarget {
            url: url.clone(),
            token,
        },
        max_downtime_ms: 300,
        max_bandwidth_mib_s: None,
    };

    // Without the CA the target's certificate is not trusted: refused at
    // once, the VM still running and not busy here, nothing over there.
    let name = unique_name("tls-mig");
    let kept = create_vm(&untrusting, &guest_spec_json(&name, "guest.action=hold")).await;
    let kept = common::api::id_of(&kept);
    untrusting.client.start(&kept).await.unwrap();
    let refused = untrusting
        .client
        .migrate_vm(&kept, &request)
        .await
        .unwrap_err();
    match &refused {
        ClientError::Api {
            status, message, ..
        } => {
            assert_eq!(*status, 502, "{refused}");
            assert!(message.contains("certificate"), "{refused}");
        }
        other => panic!("expected the API's 502, got {other}"),
    }
    let still = untrusting.client.get_vm(&kept).await.unwrap();
    assert_eq!(still.state.as_str(), "running");
    assert!(still.task.is_none(), "{still:?}");
    assert!(target.client.list_vms().await.unwrap().is_empty());

    // With it, the VM moves, every stream over TLS.
    let name = unique_name("tls-mig");
    let mut spec = guest_spec_json(&name, "guest.action=hold");
    spec["disks"] = serde_json::json!([{"name": "data", "size_mib": 16}]);
    let vm = create_vm(&trusting, &spec).await;
    let id = common::api::id_of(&vm);
    trusting.client.start(&id).await.unwrap();
    let started = trusting.client.migrate_vm(&id, &request).await.unwrap();
    let done = common::daemon::wait_for_migration(&trusting.client, started.id).await;
    assert_eq!(done.phase, vmlet::spec::Phase::Completed, "{done:?}");
    assert_eq!(
        target.client.get_vm(&id).await.unwrap().state.as_str(),
        "running"
    );
    common::api::force_delete_vm(&target, &id).await;
    common::api::force_delete_vm(&untrusting, &kept).await;
}

/// The serial console over `wss://`: a console token asked over HTTPS opens
/// its websocket through TLS (trusting the test CA), and bytes go both ways
/// between the caller and the guest's shell. The token opens one console
/// only, and a client that does not trust the CA gets no console at all.
#[tokio::test]
async fn the_serial_console_works_over_wss() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use vmlet::console::ConsoleKind;

    let pki = TestPki::new();
    let (d, addr) = tls_daemon(&pki).await;
    let vm = create_vm(
        &d,
        &guest_spec_json(&unique_name("wss"), "guest.action=shell"),
    )
    .await;
    let id = common::api::id_of(&vm);
    d.client.start(&id).await.expect("start");
    common::wait_for_line(
        &d.serial_log(common::api::uuid_of(&vm)),
        "GUEST-READY",
        common::BOOT_TIMEOUT,
    )
    .await;
    let port = addr.rsplit(':').next().unwrap();
    let endpoint = || Endpoint::Tcp {
        url: format!("https://localhost:{port}"),
        token: Some(token_of(&d)),
    };
    let client = Client::with_ca_file(endpoint(), Some(&pki.ca)).unwrap();
    let token = client
        .console_token(&id, ConsoleKind::Serial)
        .await
        .expect("a console token over https");
    let mut ws = client
        .open_console(&token.url)
        .await
        .expect("the console websocket over wss");

    // The shell may come up a moment after GUEST-READY: ask until it answers.
    let deadline = tokio::time::Instant::now() + common::BOOT_TIMEOUT;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("wss-42") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer through the wss console; it sent:\n{}",
            String::from_utf8_lossy(&seen)
        );
        ws.send(Message::Binary(b"echo wss-$((6*7))\n".to_vec().into()))
            .await
            .expect("writing to the console");
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some(message)) = tokio::time::timeout_at(until, ws.next()).await {
            if let Message::Binary(bytes) = message.expect("reading the console") {
                seen.extend_from_slice(&bytes);
            }
        }
    }
    let _ = ws.close(None).await;

    // The token was used: it opens nothing more.
    let again = client.open_console(&token.url).await;
    assert!(
        again.is_err(),
        "a used console token opened another console"
    );
    // Without the CA, a fresh token is asked for in vain: the TLS
    // handshake fails before any request.
    let untrusted = Client::new(endpoint());
    let err = untrusted
        .console_token(&id, ConsoleKind::Serial)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Tls { .. }), "{err}");
    let fresh = client
        .console_token(&id, ConsoleKind::Serial)
        .await
        .unwrap();
    match untrusted.open_console(&fresh.url).await {
        Ok(_) => panic!("a client that does not trust the CA opened a console"),
        Err(err) => assert!(err.to_string().contains("UnknownIssuer"), "{err}"),
    }
    d.client.stop(&id, true, None).await.expect("stop");
}
