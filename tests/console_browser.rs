//! The VNC console in a real browser: a daemon with a TCP listener, a q35
//! test guest whose kernel writes its boot messages to the VGA text console
//! (`console=tty0 console=ttyS0`, no `quiet`), and Debian's chromium,
//! headless, driven by playwright-core (`tests/browser/console.mjs`). The
//! browser opens the console page with a one-time token and no bearer
//! token, noVNC (served by the daemon from the `novnc` package) connects
//! through the daemon's websocket to QEMU's VNC socket, and the script
//! checks that the canvas shows the guest's text: non-background pixels in
//! its top-left region. The screenshot is kept as a test artifact,
//! `target/test-artifacts/console-browser.png`.
//!
//! Needs chromium, node and `tests/browser/node_modules` (`scripts/setup.sh
//! --test` installs them); without them the test fails, it does not skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::api::{create_vm, expect, force_delete_vm, id_of, uuid_of};
use common::daemon::{free_port, unique_name, Daemon};
use common::{guest, processes_with, wait_for_line, Scratch, BOOT_TIMEOUT};
use serde_json::{json, Value};
use vmlet::client::Method;

/// Debian's chromium.
const CHROMIUM: &str = "/usr/bin/chromium";

/// How long the browser script may run in all: chromium's start, up to
/// 30 s for noVNC to connect and up to 60 s for the text to show (its own
/// bounds), the screenshot, and slack for a loaded machine.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(150);

/// Text pixels the script waits for in the canvas's top-left 360x200 (a
/// screenful of boot messages lights up about 11 000 there; one short line
/// of text a few hundred).
const MIN_TEXT_PIXELS: u64 = 1000;

/// The smallest screenshot taken as real (a 1024x800 page with a 720x400
/// console of text is about 25 KB; a blank one is under 5 KB).
const MIN_SCREENSHOT_BYTES: u64 = 10_000;

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn browser_dir() -> PathBuf {
    repo_dir().join("tests/browser")
}

/// `target/test-artifacts` (under `CARGO_TARGET_DIR` when that is set).
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let target = if target.is_absolute() {
        target
    } else {
        repo_dir().join(target)
    };
    target.join("test-artifacts")
}

/// Fails (no skip) when the browser test's tools are missing.
fn require_browser_tools() {
    let fix = "run scripts/setup.sh --test (as root) to install them";
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing (Debian package chromium): {fix}"
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node does not run ({node:?}): {fix}"
    );
    assert!(
        browser_dir()
            .join("node_modules/playwright-core/package.json")
            .exists(),
        "{}/node_modules has no playwright-core: {fix}",
        browser_dir().display()
    );
}

/// SIGKILLs every process whose command line contains `needle`.
fn kill_processes_with(needle: &str) {
    for pid in processes_with(needle) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills, on drop, the test VM's QEMU (failure paths; the happy path
/// deletes the VM through the API) and any chromium left from the browser
/// script: all of chromium's temp files, its profile included, are under
/// `browser_tmp`, which its command lines name.
struct Cleanup {
    vm: Option<String>,
    browser_tmp: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        kill_processes_with(&self.browser_tmp.display().to_string());
        if let Some(uuid) = &self.vm {
            kill_processes_with(uuid);
        }
    }
}

/// What `console.mjs` prints.
struct BrowserRun {
    report: Value,
    stderr: String,
    elapsed: Duration,
}

/// Runs `node tests/browser/console.mjs PAGE_URL SCREENSHOT` with its temp
/// files under `tmp`, within [`BROWSER_TIMEOUT`] (then SIGTERM, which makes
/// the script kill chromium, and SIGKILL 10 s later).
async fn run_browser(page_url: &str, screenshot: &Path, tmp: &Path) -> BrowserRun {
    let stdout_path = tmp.join("console.mjs.stdout");
    let stderr_path = tmp.join("console.mjs.stderr");
    let started = Instant::now();
    let mut child = tokio::process::Command::new("node")
        .arg(browser_dir().join("console.mjs"))
        .arg(page_url)
        .arg(screenshot)
        .current_dir(browser_dir())
        .env("TMPDIR", tmp)
        .env("MIN_TEXT_PIXELS", MIN_TEXT_PIXELS.to_string())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("starting node (scripts/setup.sh --test installs it)");
    let status = match tokio::time::timeout(BROWSER_TIMEOUT, child.wait()).await {
        Ok(status) => status.unwrap(),
        Err(_) => {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                Ok(status) => status.unwrap(),
                Err(_) => {
                    child.kill().await.unwrap();
                    child.wait().await.unwrap()
                }
            }
        }
    };
    let elapsed = started.elapsed();
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let last = stdout.lines().last().unwrap_or("");
    let report: Value = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "console.mjs ({status}, after {elapsed:?}) printed no JSON line ({e}):\n\
             stdout:\n{stdout}\nstderr:\n{stderr}"
        )
    });
    assert!(
        status.success(),
        "console.mjs failed ({status}, after {elapsed:?}): {report}\nstderr:\n{stderr}"
    );
    BrowserRun {
        report,
        stderr,
        elapsed,
    }
}

/// A PNG's width and height, from its IHDR chunk.
fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 24 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&bytes[16..20]), be(&bytes[20..24])))
}

#[tokio::test]
async fn the_console_page_shows_the_guests_vga_text_in_chromium() {
    require_browser_tools();
    let started = Instant::now();

    // A bearer token guards the TCP listener; the page, noVNC's files and
    // the websocket must open without it (the one-time token is the key).
    let secrets = Scratch::new();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, "console-browser-bearer\n").unwrap();
    // Token files must be private to their owner.
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_with_env(&[
        ("VMLET_TCP_LISTEN", &addr),
        ("VMLET_AUTH_TOKEN_FILE", token_file.to_str().unwrap()),
    ])
    .await;
    let browser_tmp = Scratch::new();
    let mut cleanup = Cleanup {
        vm: None,
        browser_tmp: browser_tmp.path().to_path_buf(),
    };

    // No `quiet`: the kernel's boot messages go to tty0 (VGA) as well as
    // ttyS0, so there is text on the screen to see.
    let test_guest = guest::test_guest();
    let spec = json!({
        "name": unique_name("console-browser"),
        "profile": "q35",
        "vcpus": 1,
        "memory_mib": 256,
        "boot": {
            "type": "kernel",
            "kernel": test_guest.kernel,
            "initrd": test_guest.initrd,
            "cmdline": "console=tty0 console=ttyS0 panic=-1 guest.action=hold",
        },
    });
    let vm = create_vm(&d, &spec).await;
    let id = id_of(&vm);
    cleanup.vm = Some(id.clone());
    expect(&d, Method::POST, &format!("/v1/vms/{id}/start"), None, 200).await;
    wait_for_line(&d.serial_log(uuid_of(&vm)), "GUEST-READY", BOOT_TIMEOUT).await;
    let booted = started.elapsed();

    let token = expect(
        &d,
        Method::POST,
        &format!("/v1/vms/{id}/console"),
        Some(&json!({"type": "vnc"})),
        201,
    )
    .await;
    let page_url = token["page_url"]
        .as_str()
        .unwrap_or_else(|| panic!("no page_url in {token}"));
    assert!(page_url.starts_with("/console?token="), "{token}");

    let artifacts = artifacts_dir();
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("console-browser.png");
    let _ = std::fs::remove_file(&screenshot);
    let run = run_browser(
        &format!("http://{addr}{page_url}"),
        &screenshot,
        browser_tmp.path(),
    )
    .await;
    let report = &run.report;
    eprintln!(
        "console.mjs after {:?} (guest ready after {booted:?}): {report}",
        run.elapsed
    );
    if !run.stderr.is_empty() {
        eprintln!("console.mjs stderr:\n{}", run.stderr);
    }

    assert_eq!(report["state"], "connected", "{report}");
    // QEMU's VGA text mode: 80x25 cells of 9x16 pixels.
    assert_eq!(
        report["canvas"],
        json!({"width": 720, "height": 400}),
        "{report}"
    );
    let text_pixels = report["text_pixels"].as_u64().unwrap_or(0);
    assert!(
        text_pixels >= MIN_TEXT_PIXELS,
        "{text_pixels} text pixels, want {MIN_TEXT_PIXELS}: {report}"
    );
    let png = std::fs::read(&screenshot)
        .unwrap_or_else(|e| panic!("no screenshot at {}: {e}", screenshot.display()));
    assert_eq!(
        png_size(&png),
        Some((1024, 800)),
        "{}",
        screenshot.display()
    );
    assert!(
        png.len() as u64 >= MIN_SCREENSHOT_BYTES,
        "{} is only {} bytes",
        screenshot.display(),
        png.len()
    );
    // The script removed its temp files and closed chromium.
    let browser_path = browser_tmp.path().display().to_string();
    assert_eq!(processes_with(&browser_path), Vec::<i32>::new());
    assert_eq!(
        std::fs::read_dir(browser_tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("console.mjs."))
            .collect::<Vec<_>>(),
        Vec::<String>::new(),
        "console.mjs left files behind"
    );

    // The token was spent by the websocket: the page refuses it now.
    let (status, _) = common::api::call(&d, Method::GET, page_url, None).await;
    assert_eq!(status, 401, "GET {page_url} after the token was used");

    force_delete_vm(&d, &id).await;
    cleanup.vm = None;
    eprintln!("the whole test took {:?}", started.elapsed());
}
