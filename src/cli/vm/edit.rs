//! `vmlet vm edit` (the spec in `$EDITOR`, like `virsh edit`) and `vmlet vm
//! set key=value…` (like `incus config set`): both send a JSON merge patch
//! with the generation they read, and say what the VM took at once and
//! what waits for its next start.

use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use serde_json::{Map, Value};

use super::super::CliError;
use crate::client::{Client, ClientError};
use crate::spec::{changed_fields, diff, name_disks, VmSpec};
use crate::vm::Vm;

/// The spec a change builds on: the pending one, when there is one.
fn base_spec(vm: &Vm) -> &VmSpec {
    vm.pending.as_ref().map_or(&vm.spec, |p| &p.spec)
}

/// `vm edit VM`: opens the spec in `$EDITOR` (else `vi`) and sends what
/// changed. A spec the daemon refuses (or that is not JSON) is opened
/// again when a person is at the terminal, as `virsh edit` does.
pub(super) async fn edit(client: &Client, key: &str, json: bool) -> Result<String, CliError> {
    let vm = client.get_vm(key).await?;
    let original = serde_json::to_value(base_spec(&vm)).expect("a spec serializes");
    let file = TempSpec::create(&vm.name)?;
    let mut text = serde_json::to_string_pretty(&original).expect("JSON serializes") + "\n";
    loop {
        file.write(&text)?;
        run_editor(&file.path)?;
        text = std::fs::read_to_string(&file.path)
            .map_err(|e| CliError::Edit(format!("reading {}: {e}", file.path.display())))?;
        let problem = match serde_json::from_str::<Value>(&text) {
            Ok(edited) if edited == original => return Ok(unless(json, "no changes\n")),
            Ok(edited) if edited.is_object() => {
                let patch = diff(&original, &edited);
                match client.patch_vm(key, &patch, Some(vm.generation)).await {
                    Ok(after) => return Ok(summary(&vm, &after, json)),
                    Err(e @ ClientError::Api { status: 422, .. }) => e.to_string(),
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(_) => "the spec must be a JSON object".to_string(),
            Err(e) => format!("not JSON: {e}"),
        };
        if !ask_again(&problem)? {
            return Err(CliError::Edit(format!("VM {key} not changed: {problem}")));
        }
    }
}

/// `vm set VM key=value…`: dotted keys reach into objects
/// (`resources.cpu_quota_percent=50`); a value that parses as JSON is
/// JSON (`512`, `true`, `null` removes the field), anything else a string.
pub(super) async fn set(
    client: &Client,
    key: &str,
    pairs: &[String],
    json: bool,
) -> Result<String, CliError> {
    let patch = set_patch(pairs)?;
    let vm = client.get_vm(key).await?;
    let after = client.patch_vm(key, &patch, Some(vm.generation)).await?;
    Ok(summary(&vm, &after, json))
}

/// The merge patch of `key=value` pairs.
fn set_patch(pairs: &[String]) -> Result<Value, CliError> {
    let mut patch = Map::new();
    for pair in pairs {
        let bad = |why: &str| CliError::Edit(format!("{pair:?}: {why}"));
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| bad("expected key=value"))?;
        let path: Vec<&str> = key.split('.').collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(bad(
                "a key is names joined by dots (resources.cpu_quota_percent)",
            ));
        }
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
        let mut object = &mut patch;
        for part in &path[..path.len() - 1] {
            let slot = object
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            object = slot
                .as_object_mut()
                .ok_or_else(|| bad(&format!("{part} is set to a value and used as an object")))?;
        }
        object.insert(path[path.len() - 1].to_string(), value);
    }
    Ok(Value::Object(patch))
}

/// What the change did: fields applied (live on a running VM) and
/// fields waiting for the next start; the VM itself with `-o json`.
fn summary(before: &Vm, after: &Vm, json: bool) -> String {
    if json {
        return super::super::pretty(after);
    }
    let named = |spec: &VmSpec| {
        let mut spec = spec.clone();
        name_disks(&mut spec);
        spec
    };
    let applied = changed_fields(&named(&before.spec), &named(&after.spec));
    let pending = after
        .pending
        .as_ref()
        .map(|p| p.fields.clone())
        .unwrap_or_default();
    let before_pending = before.pending.as_ref().map(|p| &p.spec);
    if applied.is_empty() && after.pending.as_ref().map(|p| &p.spec) == before_pending {
        return "no changes\n".into();
    }
    let mut text = String::new();
    if !applied.is_empty() {
        let how = if after.state.has_process() {
            "applied live"
        } else {
            "applied"
        };
        text.push_str(&format!("{how}: {}\n", applied.join(", ")));
    }
    if !pending.is_empty() {
        text.push_str(&format!(
            "pending until the next start: {}\n",
            pending.join(", ")
        ));
    }
    text.push_str(&format!("generation: {}\n", after.generation));
    text
}

fn unless(json: bool, text: &str) -> String {
    if json {
        String::new()
    } else {
        text.to_string()
    }
}

/// Runs `$EDITOR FILE` (through the shell, so `EDITOR="code -w"` works),
/// `vi` when `EDITOR` is unset or empty.
fn run_editor(path: &std::path::Path) -> Result<(), CliError> {
    let editor = std::env::var("EDITOR")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| "vi".into());
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(path)
        .status()
        .map_err(|e| CliError::Edit(format!("running the editor {editor:?}: {e}")))?;
    if !status.success() {
        return Err(CliError::Edit(format!(
            "the editor {editor:?} failed ({status}); VM not changed"
        )));
    }
    Ok(())
}

/// Shows `problem` and asks whether to edit again; never asks (no) when no
/// person is at the terminal.
fn ask_again(problem: &str) -> Result<bool, CliError> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Ok(false);
    }
    let mut err = std::io::stderr();
    let _ = write!(err, "error: {problem}\nEdit again? [Y/n] ");
    let _ = err.flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(|e| CliError::Edit(format!("reading the answer: {e}")))?;
    Ok(!answer.trim().eq_ignore_ascii_case("n"))
}

/// The spec being edited: a file only its owner can read (specs hold
/// cloud-init user data), removed when the edit ends.
struct TempSpec {
    path: PathBuf,
}

impl TempSpec {
    fn create(vm: &str) -> Result<TempSpec, CliError> {
        let dir = std::env::temp_dir();
        for attempt in 0..16u32 {
            let nonce: u64 = rand_nonce(attempt);
            let path = dir.join(format!("vmlet-edit-{vm}-{nonce:016x}.json"));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(_) => return Ok(TempSpec { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(CliError::Edit(format!("creating {}: {e}", path.display()))),
            }
        }
        Err(CliError::Edit(format!(
            "no free temporary file name in {}",
            dir.display()
        )))
    }

    fn write(&self, text: &str) -> Result<(), CliError> {
        std::fs::write(&self.path, text)
            .map_err(|e| CliError::Edit(format!("writing {}: {e}", self.path.display())))
    }
}

impl Drop for TempSpec {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A name nobody guesses in advance (the file is made with `create_new`,
/// so a guess only makes the create retry).
fn rand_nonce(attempt: u32) -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom_fill(&mut bytes) {
        u64::from_ne_bytes(bytes)
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        now ^ (u64::from(std::process::id()) << 32) ^ u64::from(attempt)
    }
}

fn getrandom_fill(bytes: &mut [u8]) -> bool {
    // SAFETY: the buffer is valid for `bytes.len()` bytes of writes.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    n == bytes.len() as isize
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn set_pairs_make_a_nested_merge_patch() {
        let pairs = [
            "memory_mib=512",
            "resources.cpu_quota_percent=50",
            "resources.pids_max=null",
            "autostart=true",
            "boot.cmdline=console=ttyS0 quiet",
        ]
        .map(String::from);
        assert_eq!(
            set_patch(&pairs).unwrap(),
            json!({
                "memory_mib": 512,
                "resources": {"cpu_quota_percent": 50, "pids_max": null},
                "autostart": true,
                "boot": {"cmdline": "console=ttyS0 quiet"},
            })
        );
        for bad in ["memory_mib", "a..b=1", "=1", "x=1 x.y=2"] {
            let pairs: Vec<String> = bad.split(' ').map(String::from).collect();
            let err = set_patch(&pairs).unwrap_err().to_string();
            assert!(err.contains(pairs.last().unwrap()), "{bad}: {err}");
        }
    }
}
