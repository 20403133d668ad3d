//! README.md's "Try it" walkthrough, so that it cannot rot: its first
//! `sh` block is read from the README, its spec (the `web.json` here
//! document) is written with the test guest copied where the README copies
//! it, and each `vmlet …` command of the block (`$vmlet …`, split at `;`
//! and `&&`) runs in order, as written, against a scratch daemon (its unix
//! socket instead of the default one; `--url` is dropped for the same
//! reason), and must exit 0. The lines that start the daemon and build
//! the guest are what tests/common already does.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::daemon::Daemon;

/// How long one command of the walkthrough may take (a boot or a reboot
/// of the test guest under TCG on a busy host).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// The walkthrough's code block: the first ```sh block after "## Try it".
fn walkthrough(readme: &str) -> Vec<String> {
    let section = readme
        .split_once("\n## Try it\n")
        .expect("README.md has a \"## Try it\" section")
        .1;
    let block = section
        .split_once("```sh\n")
        .expect("\"Try it\" has a sh block")
        .1;
    let block = block.split_once("\n```").expect("the sh block ends").0;
    block.lines().map(str::to_string).collect()
}

/// The here document `cat > NAME <<'SPEC'` … `SPEC` in `lines`.
fn here_document(lines: &[String], name: &str) -> String {
    let start = lines
        .iter()
        .position(|l| l.starts_with(&format!("cat > {name} <<'SPEC'")))
        .unwrap_or_else(|| panic!("no here document for {name}"));
    lines[start + 1..]
        .iter()
        .take_while(|l| l.as_str() != "SPEC")
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Each `$vmlet …` command of `lines`, as its words (comments cut, lines
/// split at `;` and `&&`).
fn vmlet_commands(lines: &[String]) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    for line in lines {
        if !line.starts_with("$vmlet ") {
            continue;
        }
        let code = match line.find("  #") {
            Some(at) => &line[..at],
            None => line.as_str(),
        };
        for part in code.split("&&").flat_map(|p| p.split(';')) {
            let words: Vec<String> = part.split_whitespace().map(str::to_string).collect();
            if words.is_empty() {
                continue;
            }
            assert_eq!(words[0], "$vmlet", "a command that is not vmlet: {part}");
            assert!(
                !words
                    .iter()
                    .any(|w| w.contains(['"', '\'', '$', '`']) && w != "$vmlet"),
                "quoting or expansion the test does not do: {part}"
            );
            commands.push(words[1..].to_vec());
        }
    }
    commands
}

#[test]
fn the_walkthrough_is_read_as_commands() {
    let lines: Vec<String> = [
        "$vmlet vm list",
        "$vmlet vm pause a; $vmlet vm resume a   # both",
        "$vmlet vm stop a && $vmlet vm delete a          # ACPI first",
        "echo not vmlet",
    ]
    .iter()
    .map(|l| l.to_string())
    .collect();
    let commands = vmlet_commands(&lines);
    let as_text: Vec<String> = commands.iter().map(|c| c.join(" ")).collect();
    assert_eq!(
        as_text,
        [
            "vm list",
            "vm pause a",
            "vm resume a",
            "vm stop a",
            "vm delete a"
        ]
    );
}

#[tokio::test]
async fn every_vmlet_command_of_try_it_succeeds() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("reading README.md");
    let lines = walkthrough(&readme);
    // The block must be safe to paste whole: nothing in it waits for input.
    for line in &lines {
        let console = line.contains(" vm console ") || line.contains("vmlet console ");
        assert!(
            !console || line.contains("--print-log") || line.contains("--vnc"),
            "an interactive console in the pasted block: {line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("kill -0") && l.contains("vmlet.sock")),
        "the wait for the daemon's socket stops when the daemon is gone"
    );

    let d = Daemon::start().await;
    // Where the README copies the guest: the daemon's allowed host dir.
    let guest = common::guest::test_guest();
    let host = d.scratch();
    for file in [&guest.kernel, &guest.initrd] {
        std::fs::copy(file, host.join(file.file_name().unwrap())).expect("copying the guest");
    }
    let spec = here_document(&lines, "web.json")
        .replace("/var/lib/vmlet/host/", &format!("{}/", host.display()));
    let spec_file = host.join("web.json");
    std::fs::write(&spec_file, spec).unwrap();

    let commands = vmlet_commands(&lines);
    assert!(commands.len() >= 10, "{commands:?}");
    for words in commands {
        let mut args: Vec<String> = Vec::new();
        let mut words = words.into_iter();
        while let Some(word) = words.next() {
            match word.as_str() {
                // The scratch daemon has its own socket and no TCP.
                "--url" | "--socket" => {
                    words.next();
                }
                "web.json" => args.push(spec_file.display().to_string()),
                _ => args.push(word),
            }
        }
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmlet"))
            .args(&args)
            .arg("--socket")
            .arg(&d.socket)
            .env_remove("VMLET_URL")
            .env_remove("VMLET_TOKEN_FILE")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(COMMAND_TIMEOUT, out)
            .await
            .unwrap_or_else(|_| panic!("vmlet {args:?} did not finish"))
            .expect("running vmlet");
        assert!(
            out.status.success(),
            "README's `vmlet {}` failed ({:?}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
