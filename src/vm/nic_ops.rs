//! NICs at start and while running: a tap per NIC on a bridge network,
//! opened by vmlet (`/dev/net/tun`), enslaved to the network's bridge with
//! its MTU and brought up, then handed to QEMU by fd; hot-plug and unplug
//! over QMP (`getfd` → `netdev_add` → `device_add`, and `device_del` →
//! `DEVICE_DELETED` → `netdev_del`).
//!
//! Taps are not persistent: the kernel removes one when its last fd closes,
//! so a VM's taps go when its QEMU exits, however it exits, and a failed
//! start leaves none.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::net::bridge;
use crate::net::networks::{NetworkKind, NetworkStore};
use crate::net::tap::{self, Tap};
use crate::qemu::hotplug;
use crate::qemu::nic::{self, NicBackend, NicPlan};
use crate::qemu::profile::Profile;
use crate::qemu::qmp::QmpClient;
use crate::spec::NicSpec;
use crate::vm::error::VmError;

/// The host side of a NIC that vmlet holds until QEMU has its own copies.
#[derive(Debug)]
pub struct HostNic {
    /// The tap (none for user-mode networking).
    pub tap: Option<Tap>,
    /// vhost-net fds.
    pub vhost: Vec<OwnedFd>,
}

/// Opens the host side of `nic`: for a bridge network, a tap named after
/// the MAC, marked as this daemon's (its alias), enslaved to the bridge (which is recreated if it vanished),
/// with the network's MTU, up. Dropping the result closes the fds (and so
/// removes the tap, unless QEMU holds it).
pub async fn open_host_nic(networks: &NetworkStore, nic: &NicSpec) -> Result<HostNic, VmError> {
    let network = networks.ensure(&nic.network).await?;
    if network.spec.kind == NetworkKind::User {
        return Ok(HostNic {
            tap: None,
            vhost: vec![],
        });
    }
    let bridge = network.bridge().unwrap_or_default().to_string();
    let name = nic::tap_name(nic);
    let tap = tap::open_tap(&name, nic.queue_count()).map_err(net_error)?;
    // Marked before anything else, so that a tap of ours is never taken
    // for another daemon's (or left unclaimed by our own cleanup).
    bridge::set_alias(&name, networks.tap_mark())
        .await
        .map_err(net_error)?;
    bridge::set_master_mtu_up(&name, &bridge, network.spec.mtu)
        .await
        .map_err(net_error)?;
    let vhost = tap::open_vhost(nic.queue_count()).map_err(net_error)?;
    Ok(HostNic {
        tap: Some(tap),
        vhost,
    })
}

fn net_error(e: crate::net::NetError) -> VmError {
    VmError::from(crate::net::networks::NetworkError::Net(e))
}

/// The plan for a NIC whose host side QEMU inherits at launch (fd numbers).
pub fn launch_plan(nic: &NicSpec, host: &HostNic) -> NicPlan {
    let backend = match &host.tap {
        None => NicBackend::User,
        Some(tap) => NicBackend::Tap {
            fds: tap
                .fds
                .iter()
                .map(|fd| fd.as_raw_fd().to_string())
                .collect(),
            vhost_fds: host
                .vhost
                .iter()
                .map(|fd| fd.as_raw_fd().to_string())
                .collect(),
        },
    };
    NicPlan {
        spec: nic.clone(),
        backend,
    }
}

/// Opens the host side of every NIC of a VM about to start.
pub async fn open_all(
    networks: &NetworkStore,
    nics: &[NicSpec],
) -> Result<(Vec<NicPlan>, Vec<HostNic>), VmError> {
    let mut plans = Vec::new();
    let mut hosts = Vec::new();
    for nic in nics {
        let host = open_host_nic(networks, nic).await?;
        plans.push(launch_plan(nic, &host));
        hosts.push(host);
    }
    Ok((plans, hosts))
}

/// Hot-plugs a NIC: opens its host side (the tap on its bridge) and hands
/// the fds to [`hotplug::attach_nic`]. On failure the tap goes with the
/// fds.
pub async fn attach(
    qmp: &QmpClient,
    profile: &Profile,
    networks: &NetworkStore,
    nic: &NicSpec,
) -> Result<(), VmError> {
    let host = open_host_nic(networks, nic).await?;
    let tap_fds: Vec<_> = host
        .tap
        .iter()
        .flat_map(|t| t.fds.iter().map(|fd| fd.as_fd()))
        .collect();
    let vhost_fds: Vec<_> = host.vhost.iter().map(|fd| fd.as_fd()).collect();
    let user = host.tap.is_none();
    Ok(hotplug::attach_nic(qmp, profile, nic, &tap_fds, &vhost_fds, user).await?)
}

/// Unplugs a NIC: `device_del`, waits for the guest to let go
/// (`DEVICE_DELETED`), `netdev_del` (QEMU closes the tap), and removes the
/// tap should it linger.
pub async fn detach(qmp: &QmpClient, nic: &NicSpec) -> Result<(), VmError> {
    hotplug::detach_nic(qmp, nic).await?;
    bridge::delete_link(&nic::tap_name(nic))
        .await
        .map_err(net_error)?;
    Ok(())
}
