//! The skip helper every test uses when it cannot run its subject here:
//! one `SKIPPED:` line, also appended whole to the log `scripts/test.sh`
//! lists at the end of a run.

#[path = "common/skip.rs"]
mod skip;

use std::collections::HashSet;
use std::ffi::OsStr;

/// Scratch files start with this so `scripts/test.sh` can prove none is left.
const SCRATCH_PREFIX: &str = "vmlet-test-";

#[test]
fn a_skip_is_one_line_naming_binary_and_test() {
    assert_eq!(
        skip::skip_line("net", "vlan_test (VLAN part)", "no 8021q"),
        "SKIPPED: net::vlan_test (VLAN part): no 8021q"
    );
    // A tool's multi-line stderr as the reason still makes one line.
    assert_eq!(
        skip::skip_line(
            "storage_api",
            "full\ndisk",
            "mount failed:\n  line one\r\n\nline two\n"
        ),
        "SKIPPED: storage_api::full; disk: mount failed:; line one; line two"
    );
}

#[test]
fn the_binary_is_named_after_its_test_file() {
    assert_eq!(skip::binary_name(), "skip_log");
}

#[test]
fn a_skip_reaches_the_log_and_stays_whole_when_tests_skip_at_once() {
    let dir = tempfile::Builder::new()
        .prefix(SCRATCH_PREFIX)
        .tempdir_in("/tmp")
        .unwrap();
    // The log is made by the first skip (test.sh empties it; a missing file
    // is no error either).
    let log = dir.path().join("skips.txt");
    let first = skip::record(Some(log.as_os_str()), "first", "reason one");
    assert_eq!(first, "SKIPPED: skip_log::first: reason one");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), format!("{first}\n"));

    // Long lines from many threads at once: appended, never interleaved.
    let filler = "x".repeat(2000);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (log, filler) = (log.clone(), filler.clone());
            std::thread::spawn(move || {
                (0..40)
                    .map(|i| skip::record(Some(log.as_os_str()), &format!("t{t}-{i}"), &filler))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut expected: HashSet<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    expected.insert(first);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8 * 40 + 1);
    assert!(text.ends_with('\n'));
    let seen: HashSet<String> = lines.iter().map(|l| l.to_string()).collect();
    assert_eq!(seen, expected);

    // Without a log the line goes to stderr only.
    let before = std::fs::read_to_string(&log).unwrap();
    skip::record(None, "nolog", "reason");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), before);
}

#[test]
fn an_unwritable_log_fails_the_test_instead_of_hiding_the_skip() {
    let dir = tempfile::Builder::new()
        .prefix(SCRATCH_PREFIX)
        .tempdir_in("/tmp")
        .unwrap();
    // A directory cannot be appended to.
    let log = dir.path().as_os_str().to_owned();
    let panic = std::panic::catch_unwind(|| skip::record(Some(OsStr::new(&log)), "t", "r"))
        .expect_err("writing the skip log to a directory must panic");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("skip log"), "{message}");
}
