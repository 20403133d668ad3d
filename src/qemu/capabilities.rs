//! What the QEMU binary offers: its version, machine types and CPU models,
//! probed once by running it with no machine and asking over QMP on stdio.
//!
//! The daemon pins every VM to a versioned machine type and a CPU model
//! ([`MachinePin`]) resolved through this probe, and reports the machine
//! types and usable CPU models on `GET /v1/node`, so a scheduler can pick a
//! host whose QEMU can run (or receive) a VM. Leaf code: knows nothing of the
//! API or the VM registry.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::qemu::accel::Accel;
use crate::qemu::profile::Profile;
use crate::spec::{cpu_value, CpuSpec, FieldError, MachinePin};

/// How long the probe may take, start to quit, before QEMU is killed.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(10);

/// Most bytes read from the probed QEMU's stdout (its `query-cpu-definitions`
/// reply is about 50 KiB), so a broken binary cannot fill memory.
const MAX_STDOUT: u64 = 16 << 20;

/// Most bytes of its stderr kept for an error message.
const MAX_STDERR: u64 = 8 << 10;

/// CPU models that follow the host (or everything the accelerator can do),
/// whatever QEMU says of them: a guest on one cannot move to another host.
const HOST_DEPENDENT_CPUS: &[&str] = &["host", "max"];

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum CapabilitiesError {
    /// The binary could not be started.
    #[error("cannot run {binary}")]
    Spawn {
        /// The QEMU binary.
        binary: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not answer every query within the deadline; it was killed.
    #[error("{binary} did not answer the capability probe within {after:?}")]
    Timeout {
        /// The QEMU binary.
        binary: PathBuf,
        /// The deadline.
        after: Duration,
    },
    /// QEMU exited early, answered with an error, or sent something that
    /// is not a QMP reply.
    #[error("probing {binary}: {message}")]
    Probe {
        /// The QEMU binary.
        binary: PathBuf,
        /// What went wrong, with what QEMU printed on stderr.
        message: String,
    },
}

/// One machine type QEMU offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineType {
    /// The machine type's own (versioned) name: `pc-q35-10.0`.
    pub name: String,
    /// Its alias, if any: `q35`.
    pub alias: Option<String>,
    /// QEMU's default machine (the one `-machine` left out gives).
    pub is_default: bool,
    /// QEMU marks it deprecated.
    pub deprecated: bool,
}

/// One CPU model QEMU offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuModel {
    /// Its name: `qemu64`, `Skylake-Client-v4`.
    pub name: String,
    /// It can run with the probed accelerator on this host (QEMU reported no
    /// unavailable features).
    pub usable: bool,
    /// What this host and accelerator lack for it (empty when usable).
    pub unavailable_features: Vec<String>,
    /// QEMU calls it migration-safe: the same on every host.
    pub migration_safe: bool,
    /// The versioned model this name stands for (`qemu64` → `qemu64-v1`).
    pub alias_of: Option<String>,
}

/// What the QEMU binary offers, from one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCapabilities {
    /// `major.minor.micro`.
    pub version: String,
    /// Every machine type, as QEMU listed them.
    pub machines: Vec<MachineType>,
    /// Every CPU model, as QEMU listed them (usability is for the
    /// accelerator the probe ran with).
    pub cpu_models: Vec<CpuModel>,
    /// The names a `+flag`/`-flag` may take: the boolean properties of
    /// QEMU's `max` x86 CPU (`qom-list-properties`), its legacy `_`
    /// spellings included. Empty when this QEMU would not list them: flags
    /// are then checked for form only.
    pub cpu_features: std::collections::BTreeSet<String>,
}

#[derive(Deserialize)]
struct RawVersion {
    qemu: RawTriple,
}

#[derive(Deserialize)]
struct RawTriple {
    major: u64,
    minor: u64,
    micro: u64,
}

#[derive(Deserialize)]
struct RawMachine {
    name: String,
    #[serde(default)]
    alias: Option<String>,
    #[serde(default, rename = "is-default")]
    is_default: bool,
    #[serde(default)]
    deprecated: bool,
}

#[derive(Deserialize)]
struct RawCpu {
    name: String,
    /// Absent when QEMU cannot tell (not on x86 with TCG or KVM): taken as
    /// usable, since QEMU then reports no problem with the model.
    #[serde(default, rename = "unavailable-features")]
    unavailable_features: Option<Vec<String>>,
    #[serde(default, rename = "migration-safe")]
    migration_safe: Option<bool>,
    #[serde(default, rename = "alias-of")]
    alias_of: Option<String>,
}

impl QemuCapabilities {
    /// Builds the capabilities from the `return` values of `query-version`,
    /// `query-machines` and `query-cpu-definitions`.
    pub fn from_replies(
        version: &Value,
        machines: &Value,
        cpu_models: &Value,
    ) -> Result<QemuCapabilities, String> {
        let version: RawVersion = serde_json::from_value(version.clone())
            .map_err(|e| format!("query-version: unexpected reply: {e}"))?;
        let machines: Vec<RawMachine> = serde_json::from_value(machines.clone())
            .map_err(|e| format!("query-machines: unexpected reply: {e}"))?;
        let cpu_models: Vec<RawCpu> = serde_json::from_value(cpu_models.clone())
            .map_err(|e| format!("query-cpu-definitions: unexpected reply: {e}"))?;
        let v = version.qemu;
        Ok(QemuCapabilities {
            version: format!("{}.{}.{}", v.major, v.minor, v.micro),
            machines: machines
                .into_iter()
                .map(|m| MachineType {
                    name: m.name,
                    alias: m.alias,
                    is_default: m.is_default,
                    deprecated: m.deprecated,
                })
                .collect(),
            cpu_models: cpu_models
                .into_iter()
                .map(|c| {
                    let unavailable = c.unavailable_features.unwrap_or_default();
                    CpuModel {
                        name: c.name,
                        usable: unavailable.is_empty(),
                        unavailable_features: unavailable,
                        migration_safe: c.migration_safe.unwrap_or(false),
                        alias_of: c.alias_of,
                    }
                })
                .collect(),
            cpu_features: Default::default(),
        })
    }

    /// Adds the CPU feature names from the `return` value of
    /// `qom-list-properties` on the `max` x86 CPU: its boolean properties,
    /// less the device plumbing every device has and QEMU's `x-` internals.
    pub fn with_cpu_properties(mut self, properties: &Value) -> QemuCapabilities {
        const NOT_FEATURES: [&str; 4] = [
            "realized",
            "hotplugged",
            "hotpluggable",
            "start-powered-off",
        ];
        self.cpu_features = properties
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["type"] == "bool")
            .filter_map(|p| p["name"].as_str())
            .filter(|name| !name.starts_with("x-") && !NOT_FEATURES.contains(name))
            .map(str::to_string)
            .collect();
        self
    }

    /// Whether `name` (a flag without its `+`/`-`) is a CPU feature of this
    /// QEMU; QEMU takes `_` and `-` alike. True when the features are
    /// unknown (see [`QemuCapabilities::cpu_features`]).
    pub fn cpu_feature_known(&self, name: &str) -> bool {
        self.cpu_features.is_empty()
            || self.cpu_features.contains(name)
            || self.cpu_features.contains(&name.replace('_', "-"))
            || self.cpu_features.contains(&name.replace('-', "_"))
    }

    /// The versioned machine type `name` stands for: an alias (`q35`)
    /// becomes the machine it names (`pc-q35-10.0`); a machine's own name
    /// (`pc-q35-9.2`, `microvm`) stays itself. `None` when this QEMU has no
    /// such machine.
    pub fn resolve_machine(&self, name: &str) -> Option<String> {
        if let Some(m) = self.machines.iter().find(|m| m.name == name) {
            return Some(m.name.clone());
        }
        self.machines
            .iter()
            .find(|m| m.alias.as_deref() == Some(name))
            .map(|m| m.name.clone())
    }

    /// Whether this QEMU offers machine type `name` (a name or an alias).
    pub fn has_machine(&self, name: &str) -> bool {
        self.resolve_machine(name).is_some()
    }

    /// QEMU's default machine type, if it names one.
    pub fn default_machine(&self) -> Option<&str> {
        self.machines
            .iter()
            .find(|m| m.is_default)
            .map(|m| m.name.as_str())
    }

    /// Every machine type by its own name (aliases resolved), sorted with
    /// version numbers compared as numbers (`pc-q35-9.2` before
    /// `pc-q35-10.0`).
    pub fn machine_types(&self) -> Vec<String> {
        let mut names: Vec<String> = self.machines.iter().map(|m| m.name.clone()).collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        names.dedup();
        names
    }

    /// The CPU models usable on this host with the probed accelerator,
    /// sorted like [`QemuCapabilities::machine_types`].
    pub fn usable_cpu_models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .cpu_models
            .iter()
            .filter(|c| c.usable)
            .map(|c| c.name.clone())
            .collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        names.dedup();
        names
    }

    fn cpu_model(&self, value: &str) -> Result<&CpuModel, String> {
        let base = cpu_base(value);
        self.cpu_models
            .iter()
            .find(|c| c.name == base)
            .ok_or_else(|| format!("CPU model {base:?} is unknown to this QEMU"))
    }

    /// Whether the `-cpu` value `value` (a model, maybe with features after
    /// a comma: `qemu64,+aes`) can run here: its model is known and usable
    /// with the probed accelerator. The features are not checked here
    /// ([`QemuCapabilities::pin_vm`] checks that each is a feature of this
    /// QEMU; one this host cannot give, QEMU warns about and leaves out).
    /// The reason names the model.
    pub fn cpu_usable(&self, value: &str) -> Result<(), String> {
        let model = self.cpu_model(value)?;
        if model.usable {
            Ok(())
        } else {
            Err(format!(
                "CPU model {:?} cannot run on this host with this accelerator (missing: {})",
                model.name,
                model.unavailable_features.join(", ")
            ))
        }
    }

    /// Why a VM with the `-cpu` value `value` cannot move to another host,
    /// or `None` when it can: `host` and `max` follow the host they run on,
    /// and models QEMU does not call migration-safe may differ between
    /// hosts.
    pub fn cpu_migration_blocker(&self, value: &str) -> Option<String> {
        let base = cpu_base(value);
        if HOST_DEPENDENT_CPUS.contains(&base) {
            return Some(format!(
                "CPU model {base:?} passes through what this host offers: the guest cannot move to another host; pin a named model such as qemu64"
            ));
        }
        match self.cpu_model(value) {
            Err(reason) => Some(reason),
            Ok(model) if !model.migration_safe => Some(format!(
                "CPU model {base:?} is not migration-safe in this QEMU: it may differ between hosts"
            )),
            Ok(_) => None,
        }
    }

    /// The pin a VM of `profile` gets under `accel`: the profile's machine
    /// type resolved to its versioned name, and the profile's CPU model for
    /// `accel`, checked usable. The error names the profile and its field.
    pub fn pin(&self, profile: &Profile, accel: Accel) -> Result<MachinePin, String> {
        let wanted = &profile.machine.machine_type;
        let machine_type = self.resolve_machine(wanted).ok_or_else(|| {
            format!(
                "profile {}: machine.type {wanted:?} is not a machine type of this QEMU ({})",
                profile.name, self.version
            )
        })?;
        let (field, cpu) = match accel {
            Accel::Kvm => ("cpu.kvm", &profile.cpu.kvm),
            Accel::Tcg => ("cpu.tcg", &profile.cpu.tcg),
        };
        self.cpu_usable(cpu)
            .map_err(|reason| format!("profile {}: {field}: {reason}", profile.name))?;
        Ok(MachinePin {
            machine_type,
            cpu: cpu.clone(),
        })
    }
}

impl QemuCapabilities {
    /// The pin a VM of `profile` with CPU `cpu` (the spec's `cpu`) gets
    /// under `accel`: the profile's machine type, and the spec's model (else
    /// the profile's) with the spec's feature flags. The model must be
    /// usable here; `host` and `max` are allowed, and are refused by the
    /// source of a live migration ([`QemuCapabilities::cpu_migration_blocker`]).
    /// The error names the field: `profile` or `cpu.model`.
    pub fn pin_vm(
        &self,
        profile: &Profile,
        accel: Accel,
        cpu: Option<&CpuSpec>,
    ) -> Result<MachinePin, FieldError> {
        let field = |field: &str, message: String| FieldError {
            field: field.into(),
            message,
        };
        let model = cpu.and_then(|c| c.model.as_deref());
        let features = cpu.map(|c| c.features.as_slice()).unwrap_or_default();
        if let Some((i, flag)) = features
            .iter()
            .enumerate()
            .find(|(_, flag)| !self.cpu_feature_known(crate::spec::feature_name(flag)))
        {
            return Err(field(
                &format!("cpu.features[{i}]"),
                format!(
                    "{:?} is not a CPU feature of this QEMU ({})",
                    crate::spec::feature_name(flag),
                    self.version
                ),
            ));
        }
        let profile_pin = match model {
            // The profile's CPU must be usable only when it is used.
            Some(_) => {
                let machine_type = self
                    .resolve_machine(&profile.machine.machine_type)
                    .ok_or_else(|| {
                        field(
                            "profile",
                            format!(
                                "profile {}: machine.type {:?} is not a machine type of this QEMU ({})",
                                profile.name, profile.machine.machine_type, self.version
                            ),
                        )
                    })?;
                MachinePin {
                    machine_type,
                    cpu: String::new(),
                }
            }
            None => self
                .pin(profile, accel)
                .map_err(|reason| field("profile", reason))?,
        };
        let cpu = match model {
            Some(model) => {
                self.cpu_usable(model)
                    .map_err(|reason| field("cpu.model", reason))?;
                cpu_value(model, features)
            }
            // Flags go after the profile's own (`qemu64,+aes` + `-x2apic`).
            None => cpu_value(&profile_pin.cpu, features),
        };
        Ok(MachinePin { cpu, ..profile_pin })
    }
}

/// The model part of a `-cpu` value: before the first comma.
fn cpu_base(value: &str) -> &str {
    value.split(',').next().unwrap_or_default()
}

/// Compares names with runs of digits compared as numbers.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                // Longer (without leading zeros) is larger; then digit-wise.
                let order = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if order != Ordering::Equal {
                    return order;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&c| c == b'0').count();
    &digits[zeros..]
}

/// Runs `binary` with no machine under `accel`, asks for its version,
/// machine types and CPU models over QMP on stdio, and quits it. QEMU is
/// killed if it has not answered everything within `deadline`.
pub async fn probe(
    binary: &Path,
    accel: Accel,
    deadline: Duration,
) -> Result<QemuCapabilities, CapabilitiesError> {
    let mut child = tokio::process::Command::new(binary)
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
            "-accel",
            accel.as_str(),
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CapabilitiesError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        unreachable!("all three streams are piped")
    };
    // Read concurrently, so a chatty QEMU cannot block on a full pipe.
    let stderr_task = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = stderr.take(MAX_STDERR).read_to_end(&mut text).await;
        String::from_utf8_lossy(&text).trim().to_string()
    });
    let talk = tokio::time::timeout(deadline, converse(stdin, stdout)).await;
    let replies = match talk {
        Ok(Ok(replies)) => {
            // QEMU quits on the last command; reap it, or kill it.
            if tokio::time::timeout(Duration::from_secs(2), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            Ok(replies)
        }
        Ok(Err(message)) => {
            let _ = child.kill().await;
            Err(message)
        }
        Err(_) => {
            let _ = child.kill().await;
            stderr_task.abort();
            return Err(CapabilitiesError::Timeout {
                binary: binary.to_path_buf(),
                after: deadline,
            });
        }
    };
    let probe_error = |message: String, stderr: String| CapabilitiesError::Probe {
        binary: binary.to_path_buf(),
        message: if stderr.is_empty() {
            message
        } else {
            format!("{message}; QEMU said: {stderr}")
        },
    };
    match replies {
        Ok([version, machines, cpus, cpu_properties]) => {
            stderr_task.abort();
            QemuCapabilities::from_replies(&version, &machines, &cpus)
                .map(|caps| caps.with_cpu_properties(&cpu_properties))
                .map_err(|m| probe_error(m, String::new()))
        }
        Err(message) => {
            let stderr = stderr_task.await.unwrap_or_default();
            Err(probe_error(message, stderr))
        }
    }
}

/// The QMP commands of the probe, by id; the replies come back in this
/// order (QEMU answers in order, but ids are checked anyway).
const QUERIES: [&str; 4] = [
    "query-version",
    "query-machines",
    "query-cpu-definitions",
    "qom-list-properties",
];

/// The arguments of `QUERIES[i]`.
fn query_arguments(command: &str) -> Option<Value> {
    (command == "qom-list-properties").then(|| json!({"typename": "max-x86_64-cpu"}))
}

/// Whether a query's error fails the probe; the CPU properties only
/// refine the flags' check, so without them it goes on.
fn query_required(command: &str) -> bool {
    command != "qom-list-properties"
}

/// Sends every query at once (QEMU reads them after its greeting),
/// collects the replies (`null` for an optional one that failed), then
/// asks QEMU to quit.
async fn converse(
    mut stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
) -> Result<[Value; QUERIES.len()], String> {
    let mut script = String::new();
    script.push_str(&json!({"execute": "qmp_capabilities", "id": 0}).to_string());
    script.push('\n');
    for (i, command) in QUERIES.iter().enumerate() {
        let mut message = json!({"execute": command, "id": i + 1});
        if let Some(arguments) = query_arguments(command) {
            message["arguments"] = arguments;
        }
        script.push_str(&message.to_string());
        script.push('\n');
    }
    stdin
        .write_all(script.as_bytes())
        .await
        .map_err(|e| format!("writing QMP commands: {e} (QEMU exited?)"))?;
    let mut lines = BufReader::new(stdout.take(MAX_STDOUT)).lines();
    let mut replies: [Option<Value>; QUERIES.len()] = Default::default();
    while replies.iter().any(Option::is_none) {
        let line = lines
            .next_line()
            .await
            .map_err(|e| format!("reading QMP replies: {e}"))?
            .ok_or_else(|| "QEMU exited before answering every query".to_string())?;
        let message: Value = serde_json::from_str(&line)
            .map_err(|e| format!("not a QMP message ({e}): {:.200}", line))?;
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            // The greeting and events carry no id.
            continue;
        };
        let name = match id {
            0 => "qmp_capabilities",
            n if (n as usize) <= QUERIES.len() => QUERIES[n as usize - 1],
            _ => continue,
        };
        if let Some(error) = message.get("error") {
            let desc = error.get("desc").and_then(Value::as_str).unwrap_or("?");
            if id > 0 && !query_required(name) {
                tracing::info!(query = name, error = desc, "an optional probe query failed");
                replies[id as usize - 1] = Some(Value::Null);
                continue;
            }
            return Err(format!("{name}: {desc}"));
        }
        let Some(value) = message.get("return") else {
            return Err(format!("{name}: a reply without `return`"));
        };
        if id > 0 {
            replies[id as usize - 1] = Some(value.clone());
        }
    }
    // `quit` only once every reply is read: QEMU exits at once on it and
    // drops whatever of its replies it had not yet written into a full pipe.
    let quit = json!({"execute": "quit", "id": QUERIES.len() + 1}).to_string() + "\n";
    let _ = stdin.write_all(quit.as_bytes()).await;
    Ok(replies.map(|r| r.expect("every reply arrived")))
}

#[cfg(test)]
#[path = "capabilities_tests.rs"]
mod tests;
