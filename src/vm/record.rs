//! `Vm`: one VM as the API shows it and as `vm.json` keeps it.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::persist::timestamp;
use crate::spec::{MachinePin, VmSpec};
use crate::vm::state::{Desired, Observed, PowerState, Task};

/// Format version of `vm.json`.
pub const RECORD_VERSION: u32 = 1;

/// A VM: its spec and what vmlet knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Vm {
    /// The VM's UUID (also `spec.uuid`).
    pub id: Uuid,
    /// The VM's name (also `spec.name`).
    pub name: String,
    /// What the VM is.
    pub spec: VmSpec,
    /// The versioned machine type and CPU model this VM was created with;
    /// a QEMU upgrade never changes them. Set by vmlet from the profile
    /// (a record from an older vmlet gets it at its next start; a new
    /// profile, at the start after the change). `null` until then.
    #[serde(default)]
    pub machine: Option<MachinePin>,
    /// A change the running VM could not take: it waits for the next start,
    /// when its spec becomes `spec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    /// What vmlet last observed.
    #[schema(value_type = PowerState)]
    pub state: Observed,
    /// The operation in progress, if any.
    #[serde(default)]
    pub task: Option<Task>,
    /// The power state the API last asked for.
    pub desired: Desired,
    /// Grows by one on every change of this object.
    pub generation: u64,
    /// QEMU's pid while a process exists.
    #[serde(default)]
    pub pid: Option<i32>,
    /// When that process started (clock ticks after the host booted): with
    /// the pid, it names one process, so a reused pid is never mistaken for
    /// the VM's QEMU after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
    /// The pid of the VM's `swtpm` while it runs (VMs with a `tpm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_pid: Option<i32>,
    /// When that `swtpm` started (as `pid_start`), so a restarted vmlet
    /// finds exactly that process again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_pid_start: Option<u64>,
    /// Why the VM is `crashed` or `error`, or why the last operation failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Starts of this VM so far: the number of its current (or last) boot,
    /// as the serial log's `--- vmlet: boot N started …` lines count them.
    #[serde(default)]
    pub boots: u64,
    /// How the last stop ended; `null` before any stop (and cleared by a
    /// start).
    #[serde(default)]
    pub last_stop: Option<StopResult>,
    /// Set in `GET /v1/vms/{id}` only, for a running VM whose serial log
    /// has not grown for `[console] silent_hint_s` seconds: since when it is
    /// silent (RFC 3339, UTC). A hint that the guest may hang, or prints
    /// its console elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_silent_since: Option<String>,
    /// Set in `GET /v1/vms/{id}` only, for a running VM whose guest agent
    /// answered: what it last told of the guest (read in the background
    /// with a deadline; `read_at` says when). Never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::qemu::agent::GuestInfo>,
    /// When the VM was created (RFC 3339, UTC).
    pub created_at: String,
    /// When this object last changed (RFC 3339, UTC).
    pub updated_at: String,
}

impl Vm {
    /// A new, stopped VM, not yet pinned to a machine type.
    pub fn new(spec: VmSpec) -> Vm {
        let now = timestamp(SystemTime::now());
        Vm {
            id: spec.uuid,
            name: spec.name.clone(),
            spec,
            machine: None,
            pending: None,
            state: Observed::NEW,
            task: None,
            desired: Desired::Stopped,
            generation: 1,
            pid: None,
            pid_start: None,
            tpm_pid: None,
            tpm_pid_start: None,
            error: None,
            boots: 0,
            last_stop: None,
            console_silent_since: None,
            guest: None,
            created_at: now.clone(),
            updated_at: now,
        }
    }
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopResult {
    /// The guest powered off after the ACPI power button.
    GuestPoweredOff,
    /// The guest ignored the ACPI power button and powered off when its
    /// guest agent asked it to (`guest-shutdown`).
    GuestAgentShutdown,
    /// The guest did not power off within the grace time (or the stop was
    /// forced): QEMU was quit.
    Quit,
    /// QEMU did not quit and was killed.
    Killed,
    /// QEMU had already exited.
    AlreadyExited,
}

impl StopResult {
    /// The API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            StopResult::GuestPoweredOff => "guest_powered_off",
            StopResult::GuestAgentShutdown => "guest_agent_shutdown",
            StopResult::Quit => "quit",
            StopResult::Killed => "killed",
            StopResult::AlreadyExited => "already_exited",
        }
    }
}

impl From<crate::qemu::instance::StopOutcome> for StopResult {
    fn from(outcome: crate::qemu::instance::StopOutcome) -> StopResult {
        use crate::qemu::instance::StopOutcome as O;
        match outcome {
            O::GuestPoweredOff => StopResult::GuestPoweredOff,
            O::AgentShutdown => StopResult::GuestAgentShutdown,
            O::Quit => StopResult::Quit,
            O::Killed => StopResult::Killed,
            O::AlreadyExited => StopResult::AlreadyExited,
        }
    }
}

/// A spec waiting for the VM's next start (like Proxmox's pending changes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Pending {
    /// The spec the VM gets at its next start.
    pub spec: VmSpec,
    /// Where it differs from the spec the VM runs (`memory_mib`,
    /// `resources.cpu_quota_percent`, `disks`).
    pub fields: Vec<String>,
}

/// `vm.json`: the [`Vm`] with a format version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The host's boot id (`/proc/sys/kernel/random/boot_id`) when the
    /// record was written: a different one at load means the host rebooted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_boot_id: Option<String>,
    /// The VM.
    #[serde(flatten)]
    pub vm: Vm,
}
