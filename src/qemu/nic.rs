//! How a NIC looks to QEMU: its netdev (a tap given by fd, or user-mode
//! networking) and its guest device, as JSON objects used both on the
//! command line (`-netdev`/`-device` take JSON) and in QMP hot-plug
//! (`netdev_add`, `device_add`). Ids derive from the MAC, which is unique
//! within a VM and never changes, so removing one NIC renames no other.

use serde_json::{json, Value};

use crate::qemu::profile::Profile;
use crate::spec::{parse_mac, NicModel, NicSpec};

/// One NIC, with its backend resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicPlan {
    /// The spec (its `mac` is set).
    pub spec: NicSpec,
    /// The host side.
    pub backend: NicBackend,
}

/// The host side of a NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicBackend {
    /// A tap device, handed over as file descriptors: numbers inherited at
    /// launch, or names given to `getfd` for hot-plug. One per queue.
    Tap {
        /// The tap's fds.
        fds: Vec<String>,
        /// vhost-net fds (empty without `/dev/vhost-net`).
        vhost_fds: Vec<String>,
    },
    /// QEMU's user-mode network stack.
    User,
}

/// The MAC without colons (12 hex digits).
fn mac_hex(spec: &NicSpec) -> String {
    let mac = spec.mac.as_deref().and_then(parse_mac).unwrap_or_default();
    mac.iter().map(|b| format!("{b:02x}")).collect()
}

/// QEMU id of a NIC's netdev.
pub fn netdev_id(spec: &NicSpec) -> String {
    format!("net-{}", mac_hex(spec))
}

/// QEMU id of a NIC's guest device.
pub fn device_id(spec: &NicSpec) -> String {
    format!("net-{}-dev", mac_hex(spec))
}

/// Prefix of the taps vmlet makes (`vmt` + the MAC's 12 hex digits: 15
/// characters, the most an interface name may have).
pub const TAP_PREFIX: &str = "vmt";

/// The host tap of a NIC.
pub fn tap_name(spec: &NicSpec) -> String {
    format!("{TAP_PREFIX}{}", mac_hex(spec))
}

/// Whether `name` is one of vmlet's tap names.
pub fn is_tap_name(name: &str) -> bool {
    name.strip_prefix(TAP_PREFIX).is_some_and(|rest| {
        rest.len() == 12
            && rest
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    })
}

/// The netdev (`-netdev` / `netdev_add`).
pub fn netdev(plan: &NicPlan) -> Value {
    let id = netdev_id(&plan.spec);
    match &plan.backend {
        NicBackend::User => json!({"type": "user", "id": id}),
        NicBackend::Tap { fds, vhost_fds } => {
            let mut netdev = json!({"type": "tap", "id": id});
            if fds.len() == 1 {
                netdev["fd"] = json!(fds[0]);
            } else {
                netdev["fds"] = json!(fds.join(":"));
            }
            if !vhost_fds.is_empty() {
                netdev["vhost"] = json!(true);
                if vhost_fds.len() == 1 {
                    netdev["vhostfd"] = json!(vhost_fds[0]);
                } else {
                    netdev["vhostfds"] = json!(vhost_fds.join(":"));
                }
            }
            netdev
        }
    }
}

/// The guest device (`-device` / `device_add`); `port`: the hot-plug root
/// port it goes on.
pub fn device(profile: &Profile, plan: &NicPlan, port: Option<&str>) -> Value {
    let driver = match plan.spec.model {
        NicModel::Virtio => profile.devices.net.as_str(),
        NicModel::E1000 => "e1000",
        NicModel::E1000e => "e1000e",
        NicModel::Rtl8139 => "rtl8139",
    };
    let mut device = json!({
        "driver": driver,
        "id": device_id(&plan.spec),
        "netdev": netdev_id(&plan.spec),
        "mac": plan.spec.mac,
    });
    let queues = plan.spec.queue_count();
    if queues > 1 {
        device["mq"] = json!(true);
        // One vector per queue each way, one for config, one for control.
        device["vectors"] = json!(2 * queues + 2);
    }
    if let Some(port) = port {
        device["bus"] = json!(port);
    }
    device
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::profile::Profiles;

    fn plan(queues: u32, backend: NicBackend) -> NicPlan {
        NicPlan {
            spec: NicSpec {
                network: "lan".into(),
                mac: Some("52:54:0A:bc:de:f0".into()),
                model: NicModel::Virtio,
                queues: Some(queues),
            },
            backend,
        }
    }

    #[test]
    fn ids_and_tap_names_come_from_the_mac() {
        let p = plan(1, NicBackend::User);
        assert_eq!(netdev_id(&p.spec), "net-52540abcdef0");
        assert_eq!(device_id(&p.spec), "net-52540abcdef0-dev");
        assert_eq!(tap_name(&p.spec), "vmt52540abcdef0");
        assert_eq!(tap_name(&p.spec).len(), 15);
        assert!(is_tap_name("vmt52540abcdef0"));
        assert!(!is_tap_name("vmt52540abcdef"));
        assert!(!is_tap_name("vmbr-lan"));
        assert!(!is_tap_name("vmt52540ABCDEF0"));
    }

    #[test]
    fn tap_netdevs_carry_fds_and_multiqueue_devices_vectors() {
        let one = plan(
            1,
            NicBackend::Tap {
                fds: vec!["7".into()],
                vhost_fds: vec![],
            },
        );
        assert_eq!(
            netdev(&one),
            json!({"type": "tap", "id": "net-52540abcdef0", "fd": "7"})
        );
        let two = plan(
            2,
            NicBackend::Tap {
                fds: vec!["7".into(), "8".into()],
                vhost_fds: vec!["9".into(), "10".into()],
            },
        );
        assert_eq!(netdev(&two)["fds"], "7:8");
        assert_eq!(netdev(&two)["vhostfds"], "9:10");
        assert_eq!(netdev(&two)["vhost"], true);
        let profiles = Profiles::built_in().unwrap();
        let device = device(profiles.get("q35").unwrap(), &two, Some("hp2"));
        assert_eq!(device["driver"], "virtio-net-pci");
        assert_eq!(device["mq"], true);
        assert_eq!(device["vectors"], 6);
        assert_eq!(device["bus"], "hp2");
        assert_eq!(device["mac"], "52:54:0A:bc:de:f0");
    }
}
