//! Why a VM operation failed: one error type for everything the VM layer
//! does, mapped to HTTP statuses in one place (`api/error.rs`). Errors from
//! the leaves (storage, networks) convert into it keeping their kind, so a
//! full disk stays a full disk.

use crate::vm::state::{Refusal, Task};

/// Why a VM operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VmError {
    /// No such VM, disk, image, volume or snapshot (the message says which).
    #[error("{0}")]
    NotFound(String),
    /// Another operation runs on the VM.
    #[error("VM is busy with task {}", .0.as_str())]
    Busy(Task),
    /// The action does not apply in the VM's state (decided by the state
    /// table).
    #[error("{0}")]
    NotNow(Refusal),
    /// The operation is refused for a reason the message gives (a device
    /// the profile cannot hot-plug, a disk that cannot be snapshotted, …).
    #[error("{0}")]
    Refused(String),
    /// A create conflicts with an existing VM.
    #[error("{0}")]
    Conflict(String),
    /// The spec is invalid.
    #[error(transparent)]
    Invalid(#[from] crate::spec::SpecError),
    /// QEMU or the host failed the operation; the message says how.
    #[error("{0}")]
    Failed(String),
    /// A QMP command got no reply in time, or the guest did not react in
    /// time (a graceful reboot).
    #[error("{0}")]
    Timeout(String),
    /// The host's disk is full; nothing was left half-made.
    #[error("{0}")]
    NoSpace(String),
    /// The caller's generation of the VM is not its current one (someone
    /// changed it since the caller read it).
    #[error("{0}")]
    StaleGeneration(String),
    /// The VM was deleted while the request waited.
    #[error("VM was deleted")]
    Gone,
}

impl From<crate::net::networks::NetworkError> for VmError {
    fn from(e: crate::net::networks::NetworkError) -> VmError {
        use crate::net::networks::NetworkError as N;
        use crate::net::NetError;
        match e {
            N::NotFound(_) => VmError::NotFound(e.to_string()),
            N::Conflict(m) => VmError::Conflict(m),
            N::Invalid(spec) => VmError::Invalid(spec),
            N::Net(NetError::Invalid(m)) => VmError::Conflict(m),
            N::Net(
                net @ NetError::Netlink {
                    errno: Some(libc::EEXIST),
                    ..
                },
            ) => VmError::Conflict(net.to_string()),
            N::Net(net) => VmError::Failed(net.to_string()),
            N::Failed(m) => VmError::Failed(m),
        }
    }
}

impl From<crate::storage::StorageError> for VmError {
    fn from(e: crate::storage::StorageError) -> VmError {
        use crate::storage::StorageError as S;
        match e {
            S::NotFound(_) => VmError::NotFound(e.to_string()),
            S::Conflict(m) => VmError::Conflict(m),
            S::Invalid(spec) => VmError::Invalid(spec),
            S::Refused(m) => VmError::Refused(m),
            S::NoSpace(m) => VmError::NoSpace(m),
            S::Failed(m) => VmError::Failed(m),
        }
    }
}

impl VmError {
    /// The same failure, its message led by `what` (`start failed: …`); the
    /// kind, and so the HTTP status, stays.
    pub fn during(self, what: &str) -> VmError {
        let lead = |m: String| format!("{what}: {m}");
        match self {
            VmError::NotFound(m) => VmError::NotFound(lead(m)),
            VmError::Refused(m) => VmError::Refused(lead(m)),
            VmError::Conflict(m) => VmError::Conflict(lead(m)),
            VmError::Failed(m) => VmError::Failed(lead(m)),
            VmError::Timeout(m) => VmError::Timeout(lead(m)),
            VmError::NoSpace(m) => VmError::NoSpace(lead(m)),
            other @ (VmError::Busy(_)
            | VmError::NotNow(_)
            | VmError::Invalid(_)
            | VmError::StaleGeneration(_)
            | VmError::Gone) => other,
        }
    }
}

impl From<crate::qemu::hotplug::HotplugError> for VmError {
    /// A device sequence on a running QEMU: a timeout stays a timeout, no
    /// free slot is a refusal, the rest is QEMU failing (503).
    fn from(e: crate::qemu::hotplug::HotplugError) -> VmError {
        use crate::qemu::hotplug::HotplugError as H;
        let message = crate::error_chain(&e);
        match e {
            H::NoFreePort => VmError::Refused(message),
            e if e.is_timeout() => VmError::Timeout(message),
            _ => VmError::Failed(message),
        }
    }
}

impl From<crate::vm::launch::LaunchFileError> for VmError {
    /// A host file the spec names that cannot be opened now (gone,
    /// replaced by a symlink, a qcow2 naming other files): the field named.
    fn from(e: crate::vm::launch::LaunchFileError) -> VmError {
        VmError::Invalid(crate::spec::SpecError::field(e.field, e.source.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lead_keeps_the_kind() {
        let e = VmError::NoSpace("writing the seed".into()).during("start failed");
        assert!(matches!(&e, VmError::NoSpace(m) if m == "start failed: writing the seed"));
        let e = VmError::Busy(Task::Stop).during("start failed");
        assert!(matches!(e, VmError::Busy(Task::Stop)));
    }
}
