//! The storage commands of the `vmlet` binary (`image`, `volume`, `vm disk`,
//! `vm snapshot`, `vm delete --delete-volumes`) against a real daemon: exit
//! codes, what they print (tables and `-o json`), the import progress and
//! its failures. No guest boots: disks are attached to stopped VMs.

mod common;

use std::time::Duration;

use common::api::expect;
use common::daemon::{guest_spec_json, unique_name, wait_until, Daemon};
use common::storage::create_image;
use common::Scratch;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmlet::client::Method;

/// How long one CLI command may take (an import of a few MiB takes well
/// under a second).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A daemon whose import directory is a scratch directory of its own, and
/// which may import from URLs on loopback (where the tests serve images).
async fn daemon_with_imports() -> (Daemon, Scratch) {
    let imports = Scratch::new();
    let dir = imports.path().to_str().unwrap().to_string();
    let d = Daemon::start_with_env(&[
        ("VMLET_IMPORT_DIR", &dir),
        ("VMLET_IMPORT_ALLOWED_NETWORKS", "127.0.0.0/8"),
    ])
    .await;
    (d, imports)
}

/// What one `vmlet` run gave.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
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

/// A `vmlet ARGS --socket SOCK` command, with nothing from the
/// environment naming another daemon.
fn command(d: &Daemon, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"));
    command
        .args(args)
        .arg("--socket")
        .arg(&d.socket)
        .env_remove("VMLET_SOCKET")
        .env_remove("VMLET_URL")
        .env_remove("VMLET_TOKEN_FILE")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

async fn finish(args: &[&str], command: &mut tokio::process::Command) -> Run {
    let output = tokio::time::timeout(COMMAND_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("vmlet {args:?} did not finish"))
        .expect("running vmlet");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn vmlet(d: &Daemon, args: &[&str]) -> Run {
    finish(args, &mut command(d, args)).await
}

/// Runs `vmlet ARGS`, expects exit 0, returns stdout.
async fn vmlet_ok(d: &Daemon, args: &[&str]) -> String {
    let run = vmlet(d, args).await;
    assert!(run.ok(), "vmlet {args:?}: {run}");
    run.stdout
}

/// Runs `vmlet ARGS`, expects it to fail with the exit code of the error's
/// class (`vmlet --help`: 3 for a 404, 4 for a 409, 5 for a 400 or 422, 6
/// for a 503, else 1), returns the error line from stderr (after any
/// progress lines).
async fn vmlet_fails(d: &Daemon, args: &[&str]) -> String {
    let run = vmlet(d, args).await;
    let error = run
        .stderr
        .lines()
        .find(|l| l.starts_with("vmlet: "))
        .unwrap_or_else(|| panic!("no error line: {run}"))
        .to_string();
    let status = error
        .strip_prefix("vmlet: ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|word| word.parse::<u16>().ok());
    let expected = match status {
        Some(404) => 3,
        Some(409) => 4,
        Some(400 | 422) => 5,
        Some(503) => 6,
        _ => 1,
    };
    assert_eq!(run.code, Some(expected), "vmlet {args:?}: {run}");
    error
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The row of `name` in a table, split on whitespace.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{table}"))
}

#[tokio::test]
async fn image_import_follows_the_import_to_ready() {
    let (d, imports) = daemon_with_imports().await;
    let name = unique_name("img");
    let file = create_image(imports.path(), "disk.raw", "raw", "16M");
    let sha256 = vmlet::storage::images::sha256_file(&file).unwrap();

    let args = [
        "image",
        "import",
        &name,
        "--file",
        file.to_str().unwrap(),
        "--sha256",
        &sha256,
    ];
    let run = vmlet(&d, &args).await;
    assert!(run.ok(), "{run}");
    assert_eq!(
        run.stdout,
        format!(
            "imported image {name}: 16MiB (qcow2 from raw, {} allocated)\n",
            {
                let image = d.client.get_image(&name).await.unwrap();
                vmlet::cli::bytes(image.actual_size.unwrap())
            }
        ),
        "{run}"
    );
    // Not a terminal: plain progress lines, no bar drawing.
    assert!(run.stderr.contains(&format!("importing {name}: ")), "{run}");
    assert!(!run.stderr.contains('\r'), "{run}");

    let list = vmlet_ok(&d, &["image", "list"]).await;
    assert!(list.starts_with("NAME "), "{list}");
    let cells = row(&list, &name);
    assert_eq!(
        (cells[1], cells[2], cells[4]),
        // The stored format, what VMs get.
        ("ready", "16MiB", "qcow2"),
        "{list}"
    );

    let shown = json(&vmlet_ok(&d, &["image", "show", &name, "-o", "json"]).await);
    assert_eq!(shown["status"], "ready");
    assert_eq!(shown["virtual_size"], 16 << 20);
    assert_eq!(shown["source_sha256"], sha256.as_str());
    let listed = json(&vmlet_ok(&d, &["image", "list", "-o", "json"]).await);
    assert_eq!(listed["images"][0]["name"], name.as_str());
    let text = vmlet_ok(&d, &["image", "show", &name]).await;
    assert!(text.contains("status:        ready\n"), "{text}");
    assert!(
        text.contains("size:          16MiB\n") && text.contains("(imported from raw)"),
        "{text}"
    );

    // Taken again: the daemon's conflict, exit 1.
    let err = vmlet_fails(&d, &args).await;
    assert!(
        err.contains("409") && err.contains("already exists"),
        "{err}"
    );

    // A relative path is taken from the working directory; -o json prints
    // the ready image.
    let other = unique_name("img");
    let mut cmd = command(
        &d,
        &[
            "image", "import", &other, "--file", "disk.raw", "-o", "json",
        ],
    );
    cmd.current_dir(imports.path());
    let run = finish(&["image", "import", &other], &mut cmd).await;
    assert!(run.ok(), "{run}");
    let image = json(&run.stdout);
    assert_eq!(image["status"], "ready", "{run}");
    assert_eq!(image["source"], file.to_str().unwrap());

    // A file outside the import directory: refused at once, naming the field.
    let outside = create_image(&d.scratch(), "outside.raw", "raw", "1M");
    let err = vmlet_fails(
        &d,
        &[
            "image",
            "import",
            "outside",
            "--file",
            outside.to_str().unwrap(),
        ],
    )
    .await;
    assert!(err.contains("422") && err.contains("path"), "{err}");
    // It says exactly how: copy it into the import directory it names.
    let import_dir = std::fs::canonicalize(imports.path()).unwrap();
    assert!(
        err.contains(&format!(
            "copy it there (`cp {} {}/`)",
            outside.display(),
            import_dir.display()
        )),
        "{err}"
    );

    let out = vmlet_ok(&d, &["image", "delete", &other]).await;
    assert_eq!(out, format!("deleted image {other}\n"));
    let err = vmlet_fails(&d, &["image", "show", &other]).await;
    assert!(err.contains("404"), "{err}");
}

#[tokio::test]
async fn image_import_with_a_wrong_checksum_fails_with_the_images_error() {
    let (d, imports) = daemon_with_imports().await;
    let name = unique_name("bad");
    let file = create_image(imports.path(), "disk.raw", "raw", "4M");
    let wrong = "0".repeat(64);
    let err = vmlet_fails(
        &d,
        &[
            "image",
            "import",
            &name,
            "--file",
            file.to_str().unwrap(),
            "--sha256",
            &wrong,
        ],
    )
    .await;
    assert!(
        err.contains(&format!("import of image {name} failed")) && err.contains("checksum"),
        "{err}"
    );
    // The failed import stays listed with its error until deleted.
    let list = vmlet_ok(&d, &["image", "list"]).await;
    assert_eq!(row(&list, &name)[1], "failed", "{list}");
    assert!(list.contains("checksum mismatch"), "{list}");
    vmlet_ok(&d, &["image", "delete", &name]).await;
    let list = vmlet_ok(&d, &["image", "list"]).await;
    assert_eq!(list, "NAME  STATUS  SIZE  ALLOCATED  FORMAT  DETAIL\n");

    // A malformed checksum is refused before anything starts.
    let err = vmlet_fails(
        &d,
        &[
            "image",
            "import",
            &name,
            "--file",
            file.to_str().unwrap(),
            "--sha256",
            "abc",
        ],
    )
    .await;
    assert!(err.contains("422") && err.contains("sha256"), "{err}");
}

/// Serves one file over HTTP on 127.0.0.1: the whole of it, or (`stall`)
/// a first piece, another after a pause, and then nothing.
async fn serve_once(body: Vec<u8>, stall: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/image.raw", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
            body.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        if !stall {
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
            return;
        }
        let piece = 64 * 1024;
        let _ = stream.write_all(&body[..piece]).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let _ = stream.write_all(&body[piece..2 * piece]).await;
        tokio::time::sleep(COMMAND_TIMEOUT).await;
    });
    url
}

#[tokio::test]
async fn image_import_from_a_url_and_deleted_while_followed() {
    let (d, _imports) = daemon_with_imports().await;

    let name = unique_name("web");
    let url = serve_once(vec![0u8; 2 << 20], false).await;
    let out = vmlet_ok(&d, &["image", "import", &name, "--from-url", &url]).await;
    assert!(
        out.starts_with(&format!("imported image {name}: 2MiB (qcow2 from raw, ")),
        "{out}"
    );

    // --no-wait returns while the download is under way.
    let slow = unique_name("slow");
    let url = serve_once(vec![0u8; 4 << 20], true).await;
    let out = vmlet_ok(
        &d,
        &["image", "import", &slow, "--from-url", &url, "--no-wait"],
    )
    .await;
    assert!(
        out.starts_with(&format!("importing image {slow} from {url}")),
        "{out}"
    );
    let image = d.client.get_image(&slow).await.unwrap();
    assert_eq!(image.status, vmlet::storage::images::ImageStatus::Importing);
    vmlet_ok(&d, &["image", "delete", &slow]).await;

    // Followed, then deleted (cancelled) meanwhile: exit 1, saying so.
    let slow = unique_name("slow");
    let url = serve_once(vec![0u8; 4 << 20], true).await;
    let args = ["image", "import", &slow, "--from-url", &url];
    let child = command(&d, &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the download to show progress", COMMAND_TIMEOUT, || async {
        let image = d.client.get_image(&slow).await.ok()?;
        let p = image.progress?;
        (p.bytes_done >= 128 * 1024).then_some(())
    })
    .await;
    // Let the CLI see it once or twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    expect(&d, Method::DELETE, &format!("/v1/images/{slow}"), None, 204).await;
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .expect("the import command ends once the image is gone")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Exit 3: the image is not found any more.
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "vmlet: image {slow} was deleted while it was being imported"
        )),
        "{stderr}"
    );
    // Plain progress lines with the percentage of the known size.
    assert!(
        stderr.contains(&format!("importing {slow}: fetch ")) && stderr.contains("/4MiB"),
        "{stderr}"
    );
}

#[tokio::test]
async fn volumes_are_created_resized_listed_and_deleted() {
    let (d, imports) = daemon_with_imports().await;
    let vol = unique_name("vol");

    let out = vmlet_ok(&d, &["volume", "create", &vol, "--size-mib", "64"]).await;
    assert_eq!(out, format!("created volume {vol}: 64MiB\n"));
    let out = vmlet_ok(&d, &["volume", "resize", &vol, "--size-mib", "1024"]).await;
    assert_eq!(out, format!("resized volume {vol} to 1GiB\n"));
    // Never smaller.
    let err = vmlet_fails(&d, &["volume", "resize", &vol, "--size-mib", "32"]).await;
    assert!(err.contains("422") && err.contains("size_mib"), "{err}");
    // Sizes in the daemon's message are in the unit of the field, never
    // raw bytes next to MiB.
    assert!(
        err.contains("volumes only grow: 32 MiB is smaller than the current 1024 MiB"),
        "{err}"
    );
    assert!(!err.contains("bytes"), "{err}");

    let list = vmlet_ok(&d, &["volume", "list"]).await;
    assert!(list.starts_with("NAME "), "{list}");
    let cells = row(&list, &vol);
    assert_eq!((cells[1], cells[3]), ("1GiB", "-"), "{list}");
    let shown = json(&vmlet_ok(&d, &["volume", "show", &vol, "-o", "json"]).await);
    assert_eq!(shown["size_mib"], 1024);
    assert_eq!(shown["virtual_size"], 1u64 << 30);
    assert_eq!(shown["attached_to"], Value::Null);
    let text = vmlet_ok(&d, &["volume", "show", &vol]).await;
    assert!(text.contains("size:        1GiB\n"), "{text}");

    // A copy of an image, grown.
    let image = unique_name("img");
    let file = create_image(imports.path(), "disk.raw", "raw", "8M");
    vmlet_ok(
        &d,
        &["image", "import", &image, "--file", file.to_str().unwrap()],
    )
    .await;
    let copy = unique_name("copy");
    let created = json(
        &vmlet_ok(
            &d,
            &[
                "volume",
                "create",
                &copy,
                "--image",
                &image,
                "--size-mib",
                "16",
                "-o",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(created["name"], copy.as_str());
    assert_eq!(created["size_mib"], 16);
    // Smaller than the image: both sizes in MiB.
    let err = vmlet_fails(
        &d,
        &[
            "volume",
            "create",
            &unique_name("small"),
            "--image",
            &image,
            "--size-mib",
            "4",
        ],
    )
    .await;
    assert!(
        err.contains("size_mib") && err.contains("4 MiB is smaller than the image (8 MiB)"),
        "{err}"
    );
    assert!(!err.contains("bytes"), "{err}");
    // The same for a VM's disk made from the image.
    let spec_file = imports.path().join("small-disk.json");
    let mut spec = guest_spec_json(&unique_name("small-disk"), "");
    spec["disks"] = serde_json::json!([{"name": "root", "image": image, "size_mib": 2}]);
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    let err = vmlet_fails(&d, &["vm", "create", "--file", spec_file.to_str().unwrap()]).await;
    assert!(
        err.contains("disks[0].size_mib")
            && err.contains(&format!("2 MiB is smaller than image {image:?} (8 MiB)")),
        "{err}"
    );
    assert!(!err.contains("bytes"), "{err}");
    let err = vmlet_fails(
        &d,
        &["volume", "create", "nope", "--image", "no-such-image"],
    )
    .await;
    assert!(err.contains("no-such-image"), "{err}");

    let listed = json(&vmlet_ok(&d, &["volume", "list", "-o", "json"]).await);
    let mut names: Vec<&str> = listed["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    names.sort();
    let mut expected = vec![vol.as_str(), copy.as_str()];
    expected.sort();
    assert_eq!(names, expected);

    assert_eq!(
        vmlet_ok(&d, &["volume", "delete", &vol]).await,
        format!("deleted volume {vol}\n")
    );
    assert_eq!(
        vmlet_ok(&d, &["volume", "delete", &copy, "-o", "json"]).await,
        ""
    );
    let err = vmlet_fails(&d, &["volume", "delete", &vol]).await;
    assert!(err.contains("404"), "{err}");
    assert_eq!(
        vmlet_ok(&d, &["volume", "list"]).await,
        "NAME  SIZE  ALLOCATED  ATTACHED TO\n"
    );
}

#[tokio::test]
async fn disks_and_snapshots_of_a_stopped_vm() {
    let (d, _imports) = daemon_with_imports().await;
    let vm = unique_name("vm");
    let spec = d.scratch().join("spec.json");
    std::fs::write(
        &spec,
        serde_json::to_vec(&guest_spec_json(&vm, "guest.action=hold")).unwrap(),
    )
    .unwrap();
    vmlet_ok(&d, &["vm", "create", "-f", spec.to_str().unwrap()]).await;
    let vol = unique_name("data");
    vmlet_ok(&d, &["volume", "create", &vol, "--size-mib", "32"]).await;

    let out = vmlet_ok(
        &d,
        &[
            "vm", "disk", "attach", &vm, "--volume", &vol, "--name", "data", "--cache", "none",
            "--serial", "S-1",
        ],
    )
    .await;
    assert_eq!(out, format!("attached volume {vol} to VM {vm} as data\n"));
    let list = vmlet_ok(&d, &["volume", "list"]).await;
    assert_eq!(row(&list, &vol)[3], format!("{vm}/data"), "{list}");
    let err = vmlet_fails(&d, &["volume", "delete", &vol]).await;
    assert!(err.contains("409"), "{err}");

    let out = vmlet_ok(
        &d,
        &[
            "vm",
            "disk",
            "limits",
            &vm,
            "data",
            "--iops-total",
            "200",
            "--bps-read",
            "10M",
        ],
    )
    .await;
    assert_eq!(
        out,
        format!("VM {vm} data: iops_total=200 bps_read=10MiB/s\n")
    );
    let shown = vmlet_ok(&d, &["vm", "show", &vm]).await;
    let disk = shown
        .lines()
        .find_map(|l| l.strip_prefix("disk data:"))
        .unwrap_or_else(|| panic!("no disk data in:\n{shown}"));
    assert_eq!(
        disk.trim(),
        format!("volume {vol} (cache none, serial S-1, iops_total=200 bps_read=10MiB/s)")
    );
    let err = vmlet_fails(
        &d,
        &[
            "vm",
            "disk",
            "limits",
            &vm,
            "data",
            "--iops-total",
            "5",
            "--iops-read",
            "5",
        ],
    )
    .await;
    assert!(err.contains("422"), "{err}");
    let out = vmlet_ok(&d, &["vm", "disk", "limits", &vm, "data"]).await;
    assert_eq!(out, format!("VM {vm} data: unlimited\n"));

    // Offline snapshots (the disks only).
    let out = vmlet_ok(&d, &["vm", "snapshot", "create", &vm, "s1"]).await;
    assert_eq!(out, format!("created snapshot s1 of VM {vm} (disks)\n"));
    let list = vmlet_ok(&d, &["vm", "snapshot", "list", &vm]).await;
    assert_eq!(&row(&list, "s1")[..3], ["s1", "disks", "-"], "{list}");
    let listed = json(&vmlet_ok(&d, &["vm", "snapshot", "list", &vm, "-o", "json"]).await);
    assert_eq!(listed["snapshots"][0]["vm_state"], false);
    let err = vmlet_fails(&d, &["vm", "snapshot", "create", &vm, "s1"]).await;
    assert!(err.contains("409"), "{err}");
    let out = vmlet_ok(&d, &["vm", "snapshot", "revert", &vm, "s1"]).await;
    assert_eq!(out, format!("reverted VM {vm} to snapshot s1\n"));
    let err = vmlet_fails(&d, &["vm", "snapshot", "revert", &vm, "nope"]).await;
    assert!(err.contains("404"), "{err}");
    let out = vmlet_ok(&d, &["vm", "snapshot", "delete", &vm, "s1"]).await;
    assert_eq!(out, format!("deleted snapshot s1 of VM {vm}\n"));
    assert_eq!(
        vmlet_ok(&d, &["vm", "snapshot", "list", &vm]).await,
        "NAME  CONTENTS  STATE SIZE  CREATED\n"
    );

    let out = vmlet_ok(&d, &["vm", "disk", "detach", &vm, "data"]).await;
    assert_eq!(out, format!("detached data from VM {vm}\n"));
    let list = vmlet_ok(&d, &["volume", "list"]).await;
    assert_eq!(row(&list, &vol)[3], "-", "{list}");

    // Attached again, then deleted with the VM.
    let vm_json = json(
        &vmlet_ok(
            &d,
            &["vm", "disk", "attach", &vm, "--volume", &vol, "-o", "json"],
        )
        .await,
    );
    let disks = vm_json["spec"]["disks"].as_array().unwrap();
    assert!(
        disks.iter().any(|disk| disk["volume"] == vol.as_str()),
        "{vm_json}"
    );
    let out = vmlet_ok(&d, &["vm", "delete", &vm, "--delete-volumes"]).await;
    assert_eq!(out, format!("deleted VM {vm} and its volumes\n"));
    let err = vmlet_fails(&d, &["volume", "show", &vol]).await;
    assert!(err.contains("404"), "{err}");
}
