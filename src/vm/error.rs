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

impl From<crate::vm::store::StoreError> for VmError {
    /// A VM record or directory that could not be written or removed: a
    /// full disk is [`VmError::NoSpace`] (507), anything else a failure of
    /// the host (503). The message is the whole chain (which file, why).
    fn from(e: crate::vm::store::StoreError) -> VmError {
        use crate::vm::store::StoreError as S;
        let io = match &e {
            S::Io { source, .. } => Some(source),
            S::Persist(p) => Some(&p.source),
            S::Corrupt { .. } => None,
        };
        let message = crate::error_chain(&e);
        if io.is_some_and(crate::storage::is_no_space) {
            VmError::NoSpace(message)
        } else {
            VmError::Failed(message)
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
    use crate::net::networks::NetworkError;
    use crate::net::NetError;
    use crate::qemu::hotplug::HotplugError;
    use crate::qemu::qmp::QmpError;
    use crate::spec::SpecError;
    use crate::storage::StorageError;
    use crate::vm::store::StoreError;
    use std::io;
    use std::time::Duration;

    /// The kind a converted error has: `api/error.rs` maps each kind to
    /// one status (`NotFound` 404, `Refused`/`Conflict` 409, `Invalid`
    /// 422, `Failed` 503 unavailable, `Timeout` 503 timeout, `NoSpace`
    /// 507), and tests that mapping kind by kind.
    fn kind(e: &VmError) -> &'static str {
        match e {
            VmError::NotFound(_) => "NotFound",
            VmError::Busy(_) => "Busy",
            VmError::NotNow(_) => "NotNow",
            VmError::Refused(_) => "Refused",
            VmError::Conflict(_) => "Conflict",
            VmError::Invalid(_) => "Invalid",
            VmError::Failed(_) => "Failed",
            VmError::Timeout(_) => "Timeout",
            VmError::NoSpace(_) => "NoSpace",
            VmError::StaleGeneration(_) => "StaleGeneration",
            VmError::Gone => "Gone",
        }
    }

    fn os(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn leaf_errors_convert_keeping_their_kind() {
        let netlink = |errno| NetError::Netlink {
            op: "create bridge br0".into(),
            errno,
            message: "kernel said no".into(),
        };
        let store_io = |errno| StoreError::Io {
            op: "removing",
            path: "/state/vms/x".into(),
            source: os(errno),
        };
        let table: Vec<(&str, VmError, &str)> = vec![
            // Hot-plug sequences on a running QEMU.
            ("no free port", HotplugError::NoFreePort.into(), "Refused"),
            (
                "QMP timeout",
                HotplugError::Qmp {
                    command: "device_add".into(),
                    source: QmpError::Timeout {
                        command: "device_add".into(),
                        after: Duration::from_secs(5),
                    },
                }
                .into(),
                "Timeout",
            ),
            (
                "device not released",
                HotplugError::NotReleased {
                    what: "disk data".into(),
                    deadline: Duration::from_secs(5),
                }
                .into(),
                "Timeout",
            ),
            ("QMP closed", HotplugError::Closed.into(), "Failed"),
            // Images, volumes and disks.
            (
                "no image",
                StorageError::NotFound("image a".into()).into(),
                "NotFound",
            ),
            (
                "image in use",
                StorageError::Conflict("in use".into()).into(),
                "Conflict",
            ),
            (
                "bad field",
                StorageError::field("size_mib", "too small").into(),
                "Invalid",
            ),
            (
                "backing file",
                StorageError::Refused("backing".into()).into(),
                "Refused",
            ),
            (
                "full disk",
                StorageError::NoSpace("full".into()).into(),
                "NoSpace",
            ),
            (
                "qemu-img failed",
                StorageError::Failed("exit 1".into()).into(),
                "Failed",
            ),
            // Networks and taps.
            (
                "no network",
                NetworkError::NotFound("n".into()).into(),
                "NotFound",
            ),
            (
                "network taken",
                NetworkError::Conflict("taken".into()).into(),
                "Conflict",
            ),
            (
                "bad network field",
                NetworkError::Invalid(SpecError::field("name", "bad")).into(),
                "Invalid",
            ),
            (
                "not a bridge",
                NetworkError::Net(NetError::Invalid("not a bridge".into())).into(),
                "Conflict",
            ),
            (
                "link exists",
                NetworkError::Net(netlink(Some(libc::EEXIST))).into(),
                "Conflict",
            ),
            (
                "netlink refused",
                NetworkError::Net(netlink(Some(libc::EPERM))).into(),
                "Failed",
            ),
            (
                "no errno",
                NetworkError::Net(netlink(None)).into(),
                "Failed",
            ),
            (
                "record",
                NetworkError::Failed("write".into()).into(),
                "Failed",
            ),
            // VM records.
            (
                "record on a full disk",
                store_io(libc::ENOSPC).into(),
                "NoSpace",
            ),
            (
                "record not removable",
                store_io(libc::EACCES).into(),
                "Failed",
            ),
            (
                "record write on a full disk",
                StoreError::Persist(crate::persist::PersistError {
                    op: "writing",
                    path: "/state/vms/x/vm.json.tmp".into(),
                    source: io::Error::from(io::ErrorKind::StorageFull),
                })
                .into(),
                "NoSpace",
            ),
            (
                "corrupt record",
                StoreError::Corrupt {
                    path: "/state/vms/x/vm.json".into(),
                    message: "eof".into(),
                }
                .into(),
                "Failed",
            ),
        ];
        for (case, error, expected) in &table {
            assert_eq!(kind(error), *expected, "{case}: {error:?}");
            if !matches!(error, VmError::Invalid(_)) {
                assert!(!error.to_string().is_empty(), "{case}: no message");
            }
        }
        // A full disk keeps naming the file, and stays 507 when led.
        let led = VmError::from(store_io(libc::ENOSPC)).during("delete failed");
        assert!(
            matches!(&led, VmError::NoSpace(m) if m.starts_with("delete failed: removing /state/vms/x")),
            "{led:?}"
        );
    }

    #[test]
    fn a_lead_keeps_the_kind() {
        let e = VmError::NoSpace("writing the seed".into()).during("start failed");
        assert!(matches!(&e, VmError::NoSpace(m) if m == "start failed: writing the seed"));
        let e = VmError::Busy(Task::Stop).during("start failed");
        assert!(matches!(e, VmError::Busy(Task::Stop)));
    }
}
