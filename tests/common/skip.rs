//! Visible skips: a test that cannot run its subject on this host says so
//! in one `SKIPPED: BINARY::TEST: reason` line instead of passing silently.
//!
//! `cargo test` hides the output of passing tests, so the line also goes
//! to the file named by [`SKIP_LOG_ENV`] when it is set: `scripts/test.sh`
//! sets it, empties the file at the start of a run and lists its lines at
//! the end, so every skip shows in CI output.
#![allow(dead_code)] // some test binaries include only this module

use std::ffi::OsStr;
use std::fmt::Display;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

/// The environment variable naming the file skip lines are appended to
/// (unset: the lines go to stderr only).
pub const SKIP_LOG_ENV: &str = "VMLET_SKIP_LOG";

/// Records that `test` cannot run its subject here because of `reason`:
/// prints one `SKIPPED:` line to stderr and appends it to the file named by
/// [`SKIP_LOG_ENV`]. `test` is the test function's name, plus the part
/// left out when the rest of the test still runs (e.g. `"name (VLAN part)"`).
/// The caller then returns, or goes on without that part.
///
/// Panics when the log is set but cannot be written: a skip that cannot be
/// recorded would be silent again.
pub fn skip(test: &str, reason: impl Display) {
    record(std::env::var_os(SKIP_LOG_ENV).as_deref(), test, reason);
}

/// [`skip`] with the log given (`None`: stderr only); returns the line.
pub fn record(log: Option<&OsStr>, test: &str, reason: impl Display) -> String {
    let line = skip_line(&binary_name(), test, &reason.to_string());
    eprintln!("{line}");
    if let Some(log) = log {
        append_line(Path::new(log), &line);
    }
    line
}

/// The one line for a skip: `SKIPPED: BINARY::TEST: reason`, with any line
/// breaks in the test name or reason (a tool's stderr, say) folded into
/// `; ` so it stays one line.
pub fn skip_line(binary: &str, test: &str, reason: &str) -> String {
    format!(
        "SKIPPED: {binary}::{}: {}",
        one_line(test),
        one_line(reason)
    )
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Appends `line` and a newline to `log` (created when missing) in one
/// write on a file opened for appending, so lines from tests running at
/// once, in this and other test binaries, never mix.
pub fn append_line(log: &Path, line: &str) {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("opening the skip log {}: {e}", log.display()));
    file.write_all(format!("{line}\n").as_bytes())
        .unwrap_or_else(|e| panic!("writing the skip log {}: {e}", log.display()));
}

/// The test binary's name as cargo gives it (the test file's name), from
/// this executable's name `NAME-HASH`; the whole file name when there is
/// no such hash.
pub fn binary_name() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let file = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match file.rsplit_once('-') {
        Some((name, hash))
            if !name.is_empty()
                && !hash.is_empty()
                && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            name.to_string()
        }
        _ => file,
    }
}
