//! Tap devices and vhost-net, opened by vmlet and handed to QEMU as file
//! descriptors (`-netdev tap,fd=N,vhostfd=M`), so QEMU needs no privileges.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use super::{check_ifname, NetError};

const TUN_PATH: &str = "/dev/net/tun";
const VHOST_NET_PATH: &str = "/dev/vhost-net";

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags member of
/// the union, padded to the kernel's 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap device: the fds (one per queue) QEMU gets. Non-persistent:
/// the kernel removes the device when the last fd closes.
#[derive(Debug)]
pub struct Tap {
    /// The interface name.
    pub name: String,
    /// One fd per queue, close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// Opens /dev/net/tun `queues` times with TUNSETIFF
/// `IFF_TAP|IFF_NO_PI|IFF_VNET_HDR` (`|IFF_MULTI_QUEUE` when queues > 1),
/// name `name`; fds are O_CLOEXEC.
pub fn open_tap(name: &str, queues: u32) -> Result<Tap, NetError> {
    check_ifname(name)?;
    if queues == 0 {
        return Err(NetError::Invalid("a tap needs at least one queue".into()));
    }
    let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if queues > 1 {
        flags |= IFF_MULTI_QUEUE;
    }
    let mut fds = Vec::with_capacity(queues as usize);
    for queue in 0..queues {
        // On failure the fds opened so far close here, which removes the tap.
        fds.push(attach_queue(name, flags, queue)?);
    }
    Ok(Tap {
        name: name.to_string(),
        fds,
    })
}

fn attach_queue(name: &str, flags: libc::c_short, queue: u32) -> Result<OwnedFd, NetError> {
    // std opens with O_CLOEXEC.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_PATH)
        .map_err(|e| NetError::io(format!("open {TUN_PATH}"), e))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open tun fd and `req` is a valid, writable ifreq
    // of the size the kernel reads and writes for TUNSETIFF.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(NetError::io(format!("TUNSETIFF {name} (queue {queue})"), e));
    }
    Ok(file.into())
}

/// Opens /dev/vhost-net once per queue when it exists (`Ok(vec![])` when it
/// does not).
pub fn open_vhost(queues: u32) -> Result<Vec<OwnedFd>, NetError> {
    if !Path::new(VHOST_NET_PATH).exists() {
        return Ok(vec![]);
    }
    (0..queues)
        .map(|_| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(VHOST_NET_PATH)
                .map(OwnedFd::from)
                .map_err(|e| NetError::io(format!("open {VHOST_NET_PATH}"), e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn bad_arguments() {
        assert!(matches!(open_tap("a/b", 1), Err(NetError::Invalid(_))));
        assert!(matches!(open_tap("tap0", 0), Err(NetError::Invalid(_))));
    }
}
