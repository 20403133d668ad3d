//! A VM's network interfaces and their MAC addresses.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One network interface: a NIC on a network (`POST /v1/networks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// The network's name.
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        min_length = 1,
        max_length = 63
    )]
    pub network: String,
    /// MAC address (`52:54:00:12:34:56`): unicast, not all zero. Unset: one
    /// is derived from the VM's UUID and the NIC's index (locally
    /// administered, unique on the host) and written into the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")]
    pub mac: Option<String>,
    /// Device model.
    #[serde(default)]
    pub model: NicModel,
    /// Queue pairs (multi-queue virtio-net; one tap fd per queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 16)]
    pub queues: Option<u32>,
}

impl NicSpec {
    /// The number of queues (1 when unset).
    pub fn queue_count(&self) -> u32 {
        self.queues.unwrap_or(1).max(1)
    }
}

/// A NIC's device model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NicModel {
    /// virtio-net (the profile's `devices.net`).
    #[default]
    Virtio,
    /// Intel e1000 (PCI), for guests without virtio drivers.
    E1000,
    /// Intel 82574 (e1000e, PCIe).
    E1000e,
    /// Realtek RTL8139 (PCI).
    Rtl8139,
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff` (hex, either case).
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut out = [0u8; 6];
    for (byte, part) in out.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    Some(out)
}

/// Formats a MAC address in lower case.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MAC vmlet derives for NIC `index` of VM `uuid` (`attempt` > 0 after
/// a collision): `52:54` (locally administered, unicast, as QEMU's own
/// default) and four bytes of SHA-256 over the UUID, index and attempt.
pub fn derived_mac(uuid: Uuid, index: usize, attempt: u32) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(uuid.as_bytes());
    hasher.update((index as u32).to_le_bytes());
    hasher.update(attempt.to_le_bytes());
    let hash = hasher.finalize();
    format_mac([0x52, 0x54, hash[0], hash[1], hash[2], hash[3]])
}
