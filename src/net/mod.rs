//! Host networking: Linux bridges, VLAN sub-interfaces and tap devices.
//!
//! [`bridge`] talks rtnetlink to create, enslave, bring up and delete links;
//! [`tap`] opens tap devices (and vhost-net) whose file descriptors are handed
//! to QEMU, so QEMU itself needs no network privileges; [`owner`] marks the
//! taps with the daemon's id so that daemons sharing a host never remove
//! each other's. This is a leaf
//! module: it knows nothing of VMs or the API, only interface names.

pub mod bridge;
pub mod networks;
pub mod owner;
pub mod tap;

use std::sync::Arc;

/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// Why a host networking operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    /// The kernel refused a netlink request. `message` names the errno, as in
    /// `File exists (EEXIST)`.
    #[error("{op}: {message}")]
    Netlink {
        /// What was being done, e.g. `create bridge br0`.
        op: String,
        /// The kernel's errno (positive), when it sent one.
        errno: Option<i32>,
        /// A description that includes the errno name.
        message: String,
    },
    /// The request itself is wrong: a bad interface name, a master that is
    /// not a bridge.
    #[error("{0}")]
    Invalid(String),
    /// A device file or ioctl failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done, e.g. `open /dev/net/tun`.
        op: String,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },
}

impl NetError {
    /// A failed netlink request `op`, with the kernel's errno named.
    pub(crate) fn netlink(op: impl Into<String>, err: rtnetlink::Error) -> NetError {
        let op = op.into();
        match err {
            rtnetlink::Error::NetlinkError(msg) => match msg.code {
                Some(code) => {
                    let errno = -code.get();
                    NetError::Netlink {
                        op,
                        errno: Some(errno),
                        message: errno_message(errno),
                    }
                }
                None => NetError::Netlink {
                    op,
                    errno: None,
                    message: "netlink error without an errno".into(),
                },
            },
            other => NetError::Netlink {
                op,
                errno: None,
                message: other.to_string(),
            },
        }
    }

    /// A failed I/O call `op`.
    pub(crate) fn io(op: impl Into<String>, source: std::io::Error) -> NetError {
        NetError::Io {
            op: op.into(),
            source: Arc::new(source),
        }
    }

    /// The kernel's errno, when the failure carries one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetError::Netlink { errno, .. } => *errno,
            NetError::Io { source, .. } => source.raw_os_error(),
            NetError::Invalid(_) => None,
        }
    }
}

/// The symbolic name of `errno` (`EEXIST`), or `E<number>` when unknown.
pub fn errno_name(errno: i32) -> String {
    match nix::errno::Errno::from_raw(errno) {
        nix::errno::Errno::UnknownErrno => format!("E{errno}"),
        known => format!("{known:?}"),
    }
}

/// A description of `errno` with its name: `File exists (EEXIST)`.
pub fn errno_message(errno: i32) -> String {
    let desc = nix::errno::Errno::from_raw(errno).desc();
    format!("{desc} ({})", errno_name(errno))
}

/// Whether `name` is usable as a Linux interface name: 1 to
/// [`MAX_IFNAME`] characters from `[A-Za-z0-9._-]`, and not `.` or `..`.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `Ok` when `name` is a valid interface name, [`NetError::Invalid`] otherwise.
pub(crate) fn check_ifname(name: &str) -> Result<(), NetError> {
    if valid_ifname(name) {
        Ok(())
    } else {
        Err(NetError::Invalid(format!(
            "invalid interface name {name:?}: 1 to {MAX_IFNAME} characters from [A-Za-z0-9._-]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifnames() {
        for ok in [
            "br0",
            "vmtap-0a1b2c3d",
            "a",
            "eth0.42",
            "x_y-z",
            "123456789012345",
        ] {
            assert!(valid_ifname(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "1234567890123456",
            "a/b",
            "a b",
            "tab\t",
            "nl\n",
            "br:0",
            "é",
            "br%d",
        ] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
        assert!(check_ifname("br0").is_ok());
        assert!(matches!(check_ifname("a/b"), Err(NetError::Invalid(_))));
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::EEXIST), "EEXIST");
        assert_eq!(errno_name(libc::ENODEV), "ENODEV");
        assert_eq!(errno_name(libc::EPERM), "EPERM");
        assert_eq!(errno_message(libc::EEXIST), "File exists (EEXIST)");
        assert_eq!(errno_name(99999), "E99999");
    }

    #[test]
    fn netlink_error_names_errno() {
        let mut msg = rtnetlink::packet_core::ErrorMessage::default();
        msg.code = std::num::NonZeroI32::new(-libc::EEXIST);
        let err = NetError::netlink("create bridge br0", rtnetlink::Error::NetlinkError(msg));
        assert_eq!(err.errno(), Some(libc::EEXIST));
        assert_eq!(err.to_string(), "create bridge br0: File exists (EEXIST)");
        let err = NetError::netlink("get links", rtnetlink::Error::RequestFailed);
        assert_eq!(err.errno(), None);
        assert!(err.to_string().starts_with("get links: "));
    }
}
