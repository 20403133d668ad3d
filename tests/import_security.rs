//! Image imports treat their sources as hostile, shown against a real
//! `vmlet serve` with real `qemu-img` and real HTTP servers on loopback:
//! URL imports cannot reach internal addresses (the daemon's own API
//! included) directly, by name or by redirect; servers that hang or send too
//! much cannot hold an import forever or fill the disk; errors do not tell
//! port states apart; credentials in URLs are used but never shown;
//! crafted images (a huge virtual size, an external data file) are refused;
//! an import a SIGKILL interrupted is `failed` after the restart; stored
//! files are private.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api::{assert_invalid_field, call, expect};
use common::daemon::{free_port, unique_name, wait_until, Daemon};
use common::storage::{dir_entries, qemu_img, write_pattern_raw, MIB};
use common::{processes_with, Scratch};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmlet::client::Method;

/// How long an import of a few MiB may take on a loaded 2-core machine.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(120);

/// Loopback, where the tests serve images.
const LOOPBACK: (&str, &str) = ("VMLET_IMPORT_ALLOWED_NETWORKS", "127.0.0.0/8");

// ---- a scriptable HTTP server -----------------------------------------------------

/// How [`Server`] answers one request.
#[derive(Clone)]
enum Behavior {
    /// 200 with the body and its Content-Length.
    File(Arc<Vec<u8>>),
    /// 200 without a Content-Length: the body, then the connection closes.
    Unsized(Arc<Vec<u8>>),
    /// 200 announcing `announced` bytes and sending none.
    Announce(u64),
    /// A redirect to this Location.
    Redirect(String),
    /// Accepts the request and never answers.
    Hang,
    /// The head (Content-Length `announced`) and `first` bytes, the same
    /// again half a second later (progress shows at most every 250 ms),
    /// then nothing for a long time.
    Stall { announced: u64, first: usize },
    /// The head (Content-Length `announced`), then one byte every
    /// `every`.
    Trickle { announced: u64, every: Duration },
    /// 404.
    NotFound,
}

/// An HTTP/1.1 server on 127.0.0.1 that answers by a function of the
/// request target (path and query) and records every request head. Its
/// task ends with the test's runtime.
struct Server {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl Server {
    async fn start(answer: impl Fn(&str) -> Behavior + Send + Sync + 'static) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        let (h, c) = (heads.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (h, answer) = (h.clone(), answer.clone());
                tokio::spawn(async move { serve(stream, &h, answer.as_ref()).await });
            }
        });
        Server {
            port,
            heads,
            connections,
        }
    }

    fn url(&self, target: &str) -> String {
        format!("http://127.0.0.1:{}{target}", self.port)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut stream: tokio::net::TcpStream,
    heads: &Mutex<Vec<String>>,
    answer: &(dyn Fn(&str) -> Behavior + Send + Sync),
) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&request).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    heads.lock().unwrap().push(head);
    let ok = |length: Option<u64>| match length {
        Some(n) => format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"),
        None => "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_string(),
    };
    let _ = match answer(&target) {
        Behavior::File(body) => {
            let _ = stream
                .write_all(ok(Some(body.len() as u64)).as_bytes())
                .await;
            stream.write_all(&body).await
        }
        Behavior::Unsized(body) => {
            let _ = stream.write_all(ok(None).as_bytes()).await;
            stream.write_all(&body).await
        }
        Behavior::Announce(n) => {
            let _ = stream.write_all(ok(Some(n)).as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }
        Behavior::Redirect(location) => {
            let head = format!(
                "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await
        }
        Behavior::Hang => {
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok(())
        }
        Behavior::Stall { announced, first } => {
            let _ = stream.write_all(ok(Some(announced)).as_bytes()).await;
            let _ = stream.write_all(&vec![0u8; first]).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = stream.write_all(&vec![0u8; first]).await;
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok(())
        }
        Behavior::Trickle { announced, every } => {
            let _ = stream.write_all(ok(Some(announced)).as_bytes()).await;
            for _ in 0..announced {
                tokio::time::sleep(every).await;
                if stream.write_all(b"\0").await.is_err() {
                    break;
                }
            }
            Ok(())
        }
        Behavior::NotFound => {
            stream
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await
        }
    };
    let _ = stream.shutdown().await;
}

// ---- helpers -----------------------------------------------------------------------

async fn post_import(d: &Daemon, body: &Value) -> (u16, Value) {
    call(d, Method::POST, "/v1/images", Some(body)).await
}

/// Imports `body` (expecting 202) and waits until the import ended;
/// returns the image.
async fn import_until_done(d: &Daemon, body: &Value) -> Value {
    expect(d, Method::POST, "/v1/images", Some(body), 202).await;
    let name = body["name"].as_str().unwrap().to_string();
    wait_until("the import to end", IMPORT_TIMEOUT, || async {
        let image = expect(d, Method::GET, &format!("/v1/images/{name}"), None, 200).await;
        (image["status"] != "importing").then_some(image)
    })
    .await
}

/// Imports `body`, expects it to fail, and returns the error.
async fn import_error(d: &Daemon, body: &Value) -> String {
    let image = import_until_done(d, body).await;
    assert_eq!(image["status"], "failed", "{image}");
    image["error"].as_str().unwrap().to_string()
}

/// No image file and no import leftovers for `name`.
fn assert_no_image_file(d: &Daemon, name: &str) {
    let images = d.state_dir.join("images");
    assert!(
        !images.join(format!("{name}.qcow2")).exists(),
        "{name}.qcow2"
    );
    let tmp = dir_entries(&images.join(".tmp"));
    assert!(tmp.is_empty(), "images/.tmp holds {tmp:?}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// ---- 1. internal destinations --------------------------------------------------------

#[tokio::test]
async fn url_imports_cannot_reach_internal_addresses() {
    // The daemon also listens on loopback TCP: the old behaviour stored its
    // own API's answer as an image.
    let api_port = free_port();
    let listen = format!("127.0.0.1:{api_port}");
    let d = Daemon::start_with_env(&[("VMLET_TCP_LISTEN", &listen)]).await;
    let server = Server::start(|_| Behavior::File(Arc::new(vec![0u8; 4096]))).await;

    // Addresses in the URL: refused at once (422 naming `url`), in every
    // spelling, without a connection.
    let port = server.port;
    let mut urls = vec![
        format!("http://127.0.0.1:{api_port}/v1/vms"),
        server.url("/disk.raw"),
        format!("http://0x7f.1:{port}/disk.raw"),
        format!("http://2130706433:{port}/disk.raw"),
        format!("http://[::ffff:127.0.0.1]:{port}/disk.raw"),
        format!("http://[::1]:{port}/disk.raw"),
        format!("http://0.0.0.0:{port}/disk.raw"),
    ];
    for host in [
        "169.254.169.254",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "[fe80::1]",
        "[fd00::1]",
        "[ff02::1]",
        "[64:ff9b::7f00:1]",
    ] {
        urls.push(format!("http://{host}/latest/meta-data"));
    }
    for url in &urls {
        let name = unique_name("ssrf");
        let answer = post_import(&d, &json!({"name": name, "url": url})).await;
        assert_invalid_field(&answer, "url");
        let message = answer.1["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("not allowed"), "{url}: {message}");
        let (status, _) = call(&d, Method::GET, &format!("/v1/images/{name}"), None).await;
        assert_eq!(status, 404, "a refused import of {url} is listed");
    }
    assert_eq!(server.connections(), 0, "the server was contacted");

    // A name that resolves to loopback: checked after the lookup, failed
    // without a connection.
    let name = unique_name("ssrf-name");
    let url = format!("http://localhost:{port}/disk.raw");
    let error = import_error(&d, &json!({"name": name, "url": url})).await;
    assert!(
        error.contains("not allowed") && error.contains("loopback"),
        "{error}"
    );
    assert_no_image_file(&d, &name);
    assert_eq!(server.connections(), 0, "the server was contacted by name");

    // Nothing was stored from any of them.
    let images = dir_entries(&d.state_dir.join("images"));
    assert!(
        images
            .iter()
            .all(|e| e == ".tmp" || e == &format!("{name}.json")),
        "images/ holds {images:?}"
    );
}

// ---- 2. redirects ----------------------------------------------------------------------

#[tokio::test]
async fn redirects_are_followed_by_hand_and_every_hop_is_checked() {
    let d = Daemon::start_with_env(&[LOOPBACK]).await;
    let scratch = Scratch::new();
    let raw = write_pattern_raw(&scratch.path().join("disk.raw"), MIB);
    let body = Arc::new(std::fs::read(&raw).unwrap());
    let server = Server::start(move |target| match target {
        "/disk.raw" => Behavior::File(body.clone()),
        "/moved" => Behavior::Redirect("/disk.raw".into()),
        "/to-metadata" => Behavior::Redirect("http://169.254.169.254/latest/meta-data".into()),
        "/to-localhost-v6" => Behavior::Redirect("http://[::1]/x".into()),
        "/to-file" => Behavior::Redirect("file:///etc/passwd".into()),
        "/loop" => Behavior::Redirect("/loop".into()),
        _ => Behavior::NotFound,
    })
    .await;

    // A relative redirect on an allowed network is followed.
    let name = unique_name("moved");
    let image = import_until_done(&d, &json!({"name": name, "url": server.url("/moved")})).await;
    assert_eq!(image["status"], "ready", "{image}");
    assert_eq!(image["virtual_size"], MIB, "{image}");

    // Redirects to denied addresses are refused before connecting.
    for (target, kind) in [
        ("/to-metadata", "link-local"),
        ("/to-localhost-v6", "loopback"),
    ] {
        let name = unique_name("redirect");
        let error = import_error(&d, &json!({"name": name, "url": server.url(target)})).await;
        assert!(
            error.contains("not allowed") && error.contains(kind),
            "{target}: {error}"
        );
        assert_no_image_file(&d, &name);
    }

    // Another scheme, and an endless loop (cut after 5 redirects).
    let name = unique_name("redirect");
    let error = import_error(&d, &json!({"name": name, "url": server.url("/to-file")})).await;
    assert!(error.contains("scheme file"), "{error}");
    let before = server.heads().len();
    let name = unique_name("redirect");
    let error = import_error(&d, &json!({"name": name, "url": server.url("/loop")})).await;
    assert!(error.contains("more than 5 redirects"), "{error}");
    assert_eq!(server.heads().len() - before, 6, "requests for /loop");
}

// ---- 3. hanging servers, size caps, port state ----------------------------------------

#[tokio::test]
async fn hanging_and_oversized_sources_fail_and_port_states_look_alike() {
    let d = Daemon::start_with_env(&[
        ("VMLET_IMPORT_ALLOWED_NETWORKS", "127.0.0.0/8,192.0.2.0/24"),
        ("VMLET_IMPORT_CONNECT_TIMEOUT_S", "2"),
        ("VMLET_IMPORT_IDLE_TIMEOUT_S", "2"),
        ("VMLET_IMPORT_TIMEOUT_S", "6"),
        ("VMLET_IMPORT_MAX_BYTES", &MIB.to_string()),
    ])
    .await;
    let big = Arc::new(vec![0u8; 4 * MIB as usize]);
    let server = Server::start(move |target| match target {
        "/hang" => Behavior::Hang,
        "/stall" => Behavior::Stall {
            announced: MIB / 2,
            first: 1000,
        },
        "/trickle" => Behavior::Trickle {
            announced: MIB / 2,
            every: Duration::from_millis(500),
        },
        "/announced-big" => Behavior::Announce(64 << 30),
        "/unsized-big" => Behavior::Unsized(big.clone()),
        _ => Behavior::NotFound,
    })
    .await;

    for (target, expected) in [
        // No answer at all: bounded by the idle timeout.
        ("/hang", "could not connect"),
        // Stopped sending.
        ("/stall", "no data for 2 s"),
        // Sends, slowly: bounded by the total timeout.
        ("/trickle", "took longer than 6 s"),
        // Announced too big: refused before reading.
        ("/announced-big", "larger than the limit of 1048576 bytes"),
        // Sent too much: stopped at the limit.
        ("/unsized-big", "larger than the limit of 1048576 bytes"),
    ] {
        let name = unique_name("hostile");
        let started = Instant::now();
        let error = import_error(&d, &json!({"name": name, "url": server.url(target)})).await;
        assert!(error.contains(expected), "{target}: {error}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{target} took {:?}",
            started.elapsed()
        );
        assert_no_image_file(&d, &name);
    }

    // A closed port and an unroutable (or filtered) address give the same
    // error: it does not tell port states apart.
    let closed = free_port();
    let name = unique_name("closed");
    let refused = import_error(
        &d,
        &json!({"name": name, "url": format!("http://127.0.0.1:{closed}/x.raw")}),
    )
    .await;
    let name = unique_name("filtered");
    let filtered = import_error(
        &d,
        &json!({"name": name, "url": "http://192.0.2.1:8080/x.raw"}),
    )
    .await;
    assert_eq!(
        refused.replace(&format!("127.0.0.1:{closed}"), "HOST"),
        filtered.replace("192.0.2.1:8080", "HOST"),
    );
    assert!(refused.ends_with("could not connect"), "{refused}");

    // A local file over the limit is refused too.
    let import = d.state_dir.join("import");
    let file = write_pattern_raw(&import.join("big.raw"), 2 * MIB);
    let name = unique_name("local-big");
    let error = import_error(&d, &json!({"name": name, "path": file})).await;
    assert!(error.contains("larger than the limit"), "{error}");
    assert_no_image_file(&d, &name);
}

// ---- 4. credentials --------------------------------------------------------------------

#[tokio::test]
async fn url_credentials_and_queries_are_used_but_never_shown() {
    let d = Daemon::start_with_env(&[LOOPBACK]).await;
    let scratch = Scratch::new();
    let raw = write_pattern_raw(&scratch.path().join("disk.raw"), MIB);
    let body = Arc::new(std::fs::read(&raw).unwrap());
    let server = Server::start(move |target| {
        if target == "/disk.raw?token=qu3ry-s3cret" {
            Behavior::File(body.clone())
        } else {
            Behavior::NotFound
        }
    })
    .await;
    let mut events = d.client.events(None).await.unwrap();

    let port = server.port;
    let secret_url =
        format!("http://alice:pa55-s3cret@127.0.0.1:{port}/disk.raw?token=qu3ry-s3cret#frag");
    let shown = format!("http://127.0.0.1:{port}/disk.raw");
    let name = unique_name("creds");
    let image = import_until_done(&d, &json!({"name": name, "url": secret_url})).await;
    assert_eq!(image["status"], "ready", "{image}");
    assert_eq!(image["source"], shown, "{image}");
    // The real URL was used: the query and the credentials reached the
    // server (as basic auth: alice:pa55-s3cret).
    let heads = server.heads();
    assert!(
        heads[0].starts_with("GET /disk.raw?token=qu3ry-s3cret "),
        "{heads:?}"
    );
    assert!(
        heads[0].contains("authorization: Basic YWxpY2U6cGE1NS1zM2NyZXQ=")
            || heads[0].contains("Authorization: Basic YWxpY2U6cGE1NS1zM2NyZXQ="),
        "{heads:?}"
    );

    // A failing one: its error does not show them either.
    let failing = unique_name("creds-fail");
    let url = format!("http://bob:fa1l-s3cret@127.0.0.1:{port}/nothing?sig=fa1l-s3cret");
    let error = import_error(&d, &json!({"name": failing, "url": url})).await;
    assert!(error.contains("404"), "{error}");

    // Nowhere: image records, events, the daemon's log, the API.
    let mut seen = String::new();
    while let Ok(Some(Ok(event))) =
        tokio::time::timeout(Duration::from_millis(500), events.next()).await
    {
        seen.push_str(&serde_json::to_string(&event).unwrap());
    }
    assert!(seen.contains(&name), "the events were not seen: {seen}");
    for entry in std::fs::read_dir(d.state_dir.join("images")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            seen.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    seen.push_str(&d.log_text());
    let listed = expect(&d, Method::GET, "/v1/images", None, 200).await;
    seen.push_str(&listed.to_string());
    for secret in ["s3cret", "alice", "bob:", "token=", "sig=", "#frag"] {
        assert!(!seen.contains(secret), "{secret:?} shows in: {seen}");
    }
}

// ---- 5. crafted images ----------------------------------------------------------------

#[tokio::test]
async fn crafted_images_are_refused_before_conversion() {
    let import = Scratch::new();
    let outside = Scratch::new();
    let d = Daemon::start_with_env(&[("VMLET_IMPORT_DIR", import.path().to_str().unwrap())]).await;
    let dir = import.path();

    // A qcow2 of a few MiB whose header claims 100 TiB (over the default
    // limit of 1 TiB).
    let huge = dir.join("huge.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        huge.to_str().unwrap(),
        "100T",
    ]);
    let name = unique_name("huge");
    let error = import_error(&d, &json!({"name": name, "path": huge})).await;
    assert!(
        error.contains("virtual size of 109951162777600 bytes is larger than the limit"),
        "{error}"
    );
    assert_no_image_file(&d, &name);

    // A qcow2 with an external data file, which is a FIFO outside the
    // import directory: opening it would block, so a quick refusal shows
    // qemu-img never opened it.
    let data = outside.path().join("data.raw");
    let with_data = dir.join("with-data.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", data.display()),
        with_data.to_str().unwrap(),
        "16M",
    ]);
    std::fs::remove_file(&data).unwrap();
    nix::unistd::mkfifo(&data, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let name = unique_name("data-file");
    let started = Instant::now();
    let error = import_error(&d, &json!({"name": name, "path": with_data})).await;
    assert!(error.contains("external data file"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_no_image_file(&d, &name);

    // Under a lower limit a modest image is refused too, and a fitting
    // one is stored privately.
    drop(d);
    let d = Daemon::start_with_env(&[
        ("VMLET_IMPORT_DIR", import.path().to_str().unwrap()),
        ("VMLET_IMAGE_MAX_VIRTUAL_BYTES", &(4 * MIB).to_string()),
    ])
    .await;
    let big = dir.join("8m.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", big.to_str().unwrap(), "8M"]);
    let name = unique_name("over");
    let error = import_error(&d, &json!({"name": name, "path": big})).await;
    assert!(error.contains("max_virtual_bytes"), "{error}");
    let raw = write_pattern_raw(&dir.join("fits.raw"), 4 * MIB);
    let name = unique_name("fits");
    let image = import_until_done(&d, &json!({"name": name, "path": raw})).await;
    assert_eq!(image["status"], "ready", "{image}");
    let images = d.state_dir.join("images");
    assert_eq!(mode(&images), 0o700, "images/");
    assert_eq!(mode(&images.join(format!("{name}.qcow2"))), 0o600);
    assert_eq!(mode(&images.join(format!("{name}.json"))), 0o600);

    // A conversion over its time limit is killed and fails the import (a
    // limit of 0 s makes any conversion too slow).
    drop(d);
    let d = Daemon::start_with_env(&[
        ("VMLET_IMPORT_DIR", import.path().to_str().unwrap()),
        ("VMLET_IMAGE_CONVERT_TIMEOUT_S", "0"),
    ])
    .await;
    let name = unique_name("slow-convert");
    let error = import_error(&d, &json!({"name": name, "path": raw})).await;
    assert!(
        error.contains("qemu-img convert took longer than 0 s and was killed"),
        "{error}"
    );
    assert_no_image_file(&d, &name);
    let scratch = d.state_dir.join("images").join(".tmp");
    let left = processes_with(scratch.to_str().unwrap());
    assert!(left.is_empty(), "qemu-img processes left: {left:?}");
}

// ---- 6. an import interrupted by SIGKILL ---------------------------------------------

#[tokio::test]
async fn an_import_interrupted_by_sigkill_is_failed_after_the_restart() {
    let mut d = Daemon::start_with_env(&[LOOPBACK]).await;
    let server = Server::start(|_| Behavior::Stall {
        announced: 8 * MIB,
        first: 256 * 1024,
    })
    .await;
    let name = unique_name("killed");
    let body = json!({"name": name, "url": server.url("/disk.raw")});
    expect(&d, Method::POST, "/v1/images", Some(&body), 202).await;
    wait_until("the download to start", IMPORT_TIMEOUT, || async {
        let image = expect(&d, Method::GET, &format!("/v1/images/{name}"), None, 200).await;
        (image["progress"]["bytes_done"].as_u64() > Some(0)).then_some(())
    })
    .await;
    let images = d.state_dir.join("images");
    let record = images.join(format!("{name}.json"));
    assert_eq!(mode(&record), 0o600);
    assert_eq!(mode(&images.join(".tmp")), 0o700);
    assert!(!dir_entries(&images.join(".tmp")).is_empty(), "no scratch");

    d.restart().await;
    let image = expect(&d, Method::GET, &format!("/v1/images/{name}"), None, 200).await;
    assert_eq!(image["status"], "failed", "{image}");
    assert_eq!(image["error"], "interrupted: vmlet restarted", "{image}");
    assert_eq!(image["progress"], Value::Null, "{image}");
    assert_no_image_file(&d, &name);

    // It stays failed across another restart, until deleted.
    d.restart().await;
    let image = expect(&d, Method::GET, &format!("/v1/images/{name}"), None, 200).await;
    assert_eq!(image["status"], "failed", "{image}");
    expect(&d, Method::DELETE, &format!("/v1/images/{name}"), None, 204).await;
    assert!(!record.exists(), "the record was left");
    d.restart().await;
    let (status, _) = call(&d, Method::GET, &format!("/v1/images/{name}"), None).await;
    assert_eq!(status, 404);
}
