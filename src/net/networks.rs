//! Networks: a Linux bridge (created, or an existing one adopted), with an
//! optional VLAN sub-interface `UPLINK.ID` enslaved to it, or QEMU's
//! user-mode network for hosts where vmlet lacks CAP_NET_ADMIN. Each is
//! persisted as `STATE_DIR/networks/NAME.json` and put back at daemon start
//! when missing (after a host reboot). vmlet only ever deletes the links it
//! created.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::net::bridge;
use crate::net::{valid_ifname, NetError, MAX_IFNAME};
use crate::persist::timestamp;
use crate::persist::write_atomically;
use crate::spec::{validate_name, SpecError};

/// Why a network operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetworkError {
    /// No such network.
    #[error("no network {0}")]
    NotFound(String),
    /// The name is taken, or a host link is in the way.
    #[error("{0}")]
    Conflict(String),
    /// The request names a bad field.
    #[error(transparent)]
    Invalid(#[from] SpecError),
    /// Netlink or the tap device failed (the kernel's reason included).
    #[error(transparent)]
    Net(#[from] NetError),
    /// The record could not be written.
    #[error("{0}")]
    Failed(String),
}

/// `POST /v1/networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// The network's name.
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// `bridge` (default) or `user`.
    #[serde(default, rename = "type")]
    pub kind: NetworkKind,
    /// The bridge (default `vmbr-NAME`); an existing bridge of that name is
    /// adopted and never deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z0-9._-]+$", min_length = 1, max_length = 15)]
    pub bridge: Option<String>,
    /// MTU of the bridge, the VLAN device and the taps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 68, maximum = 65535)]
    pub mtu: Option<u32>,
    /// A VLAN sub-interface `UPLINK.ID` made and enslaved to the bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<VlanSpec>,
}

/// A network's kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetworkKind {
    /// A Linux bridge; NICs get taps on it.
    #[default]
    Bridge,
    /// QEMU user-mode networking (NAT, no host setup, no CAP_NET_ADMIN).
    User,
}

/// A VLAN on an uplink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VlanSpec {
    /// The host interface carrying the tagged traffic (e.g. `eth0`); with
    /// `.ID` it must fit an interface name (15 characters).
    #[schema(pattern = r"^[A-Za-z0-9._-]+$", min_length = 1, max_length = 10)]
    pub uplink: String,
    /// The VLAN id, 1..=4094.
    #[schema(minimum = 1, maximum = 4094)]
    pub id: u16,
}

/// A network as stored and shown. Its OpenAPI schema is [`NetworkDoc`]'s:
/// the derived one would be `allOf` the closed [`NetworkSpec`] (a request
/// type, no unknown field allowed) and the other fields, which no network
/// could satisfy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// What was asked for (with the bridge name filled in).
    #[serde(flatten)]
    pub spec: NetworkSpec,
    /// vmlet created the bridge (and will delete it with the network).
    pub created_bridge: bool,
    /// vmlet created the VLAN device.
    pub created_vlan: bool,
    /// The NICs on it (filled in by the manager).
    #[serde(default)]
    pub nics: Vec<NetworkNic>,
    /// When it was created (RFC 3339, UTC).
    pub created_at: String,
}

/// A VM NIC on a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkNic {
    /// The VM's UUID.
    pub vm: uuid::Uuid,
    /// The VM's name.
    pub vm_name: String,
    /// The NIC's MAC.
    pub mac: String,
    /// The host tap (while the VM runs).
    #[serde(default)]
    pub tap: Option<String>,
}

/// The OpenAPI schema of [`Network`]: the same JSON, spelled out flat
/// (a test checks that a serialized `Network` has exactly these fields).
#[derive(utoipa::ToSchema)]
#[schema(as = Network, description = "A network as stored and shown.")]
#[allow(dead_code)]
pub struct NetworkDoc {
    /// The network's name.
    name: String,
    /// `bridge` or `user`.
    #[schema(rename = "type")]
    kind: NetworkKind,
    /// The bridge (bridge networks).
    #[schema(nullable = false)]
    bridge: Option<String>,
    /// MTU of the bridge, the VLAN device and the taps, when set.
    #[schema(nullable = false)]
    mtu: Option<u32>,
    /// The VLAN sub-interface `UPLINK.ID`, when there is one.
    #[schema(nullable = false)]
    vlan: Option<VlanSpec>,
    /// vmlet created the bridge (and will delete it with the network).
    created_bridge: bool,
    /// vmlet created the VLAN device.
    created_vlan: bool,
    /// The NICs on it.
    nics: Vec<NetworkNic>,
    /// When it was created (RFC 3339, UTC).
    created_at: String,
}

impl utoipa::PartialSchema for Network {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        NetworkDoc::schema()
    }
}

impl utoipa::ToSchema for Network {
    fn name() -> std::borrow::Cow<'static, str> {
        "Network".into()
    }

    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        NetworkDoc::schemas(schemas)
    }
}

impl Network {
    /// The VLAN device's name, `UPLINK.ID`.
    pub fn vlan_device(&self) -> Option<String> {
        self.spec
            .vlan
            .as_ref()
            .map(|v| format!("{}.{}", v.uplink, v.id))
    }

    /// The bridge (bridge networks).
    pub fn bridge(&self) -> Option<&str> {
        self.spec.bridge.as_deref()
    }
}

/// The networks of this host.
#[derive(Debug)]
pub struct NetworkStore {
    dir: PathBuf,
    /// The mark this daemon's taps carry (see [`crate::net::owner`]).
    tap_mark: String,
    networks: tokio::sync::Mutex<BTreeMap<String, Network>>,
}

fn invalid(field: &str, message: impl Into<String>) -> NetworkError {
    NetworkError::Invalid(SpecError::field(field, message))
}

impl NetworkStore {
    /// Loads `STATE_DIR/networks/*.json` and the daemon's tap mark
    /// (`STATE_DIR/daemon-id`, made on first use).
    pub fn open(state_dir: &std::path::Path) -> std::io::Result<NetworkStore> {
        let tap_mark = crate::net::owner::daemon_mark(state_dir)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let dir = state_dir.join("networks");
        std::fs::create_dir_all(&dir)?;
        let mut networks = BTreeMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Network>(&b).map_err(|e| e.to_string()))
            {
                Ok(network) => {
                    networks.insert(network.spec.name.clone(), network);
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "skipping unreadable network record")
                }
            }
        }
        Ok(NetworkStore {
            dir,
            tap_mark,
            networks: tokio::sync::Mutex::new(networks),
        })
    }

    /// The alias this daemon's taps carry: stale-tap cleanup removes only
    /// taps with it, never another daemon's.
    pub fn tap_mark(&self) -> &str {
        &self.tap_mark
    }

    /// Every network, by name.
    pub async fn list(&self) -> Vec<Network> {
        self.networks.lock().await.values().cloned().collect()
    }

    /// Network `name`.
    pub async fn get(&self, name: &str) -> Result<Network, NetworkError> {
        self.networks
            .lock()
            .await
            .get(name)
            .cloned()
            .ok_or_else(|| NetworkError::NotFound(name.to_string()))
    }

    /// Creates a network: the bridge (or adopts it), the VLAN device, up.
    /// A failure removes what this call created.
    pub async fn create(&self, mut spec: NetworkSpec) -> Result<Network, NetworkError> {
        validate_name("name", &spec.name)?;
        if spec.kind == NetworkKind::User {
            if spec.bridge.is_some() || spec.vlan.is_some() || spec.mtu.is_some() {
                return Err(invalid(
                    "type",
                    "a user network takes no bridge, vlan or mtu",
                ));
            }
        } else {
            let bridge = spec
                .bridge
                .clone()
                .unwrap_or_else(|| format!("vmbr-{}", spec.name));
            if !valid_ifname(&bridge) {
                let field = if spec.bridge.is_some() {
                    "bridge"
                } else {
                    "name"
                };
                return Err(invalid(
                    field,
                    format!("bridge name {bridge:?} is not a valid interface name (1..={MAX_IFNAME} characters of A-Z a-z 0-9 . _ -); give `bridge`"),
                ));
            }
            spec.bridge = Some(bridge);
            if let Some(mtu) = spec.mtu {
                if !(68..=65535).contains(&mtu) {
                    return Err(invalid("mtu", "must be 68..=65535"));
                }
            }
            if let Some(vlan) = &spec.vlan {
                if !(1..=4094).contains(&vlan.id) {
                    return Err(invalid("vlan.id", "must be 1..=4094"));
                }
                let device = format!("{}.{}", vlan.uplink, vlan.id);
                if !valid_ifname(&vlan.uplink) || !valid_ifname(&device) {
                    return Err(invalid(
                        "vlan.uplink",
                        format!("{device:?} is not a valid interface name (at most {MAX_IFNAME} characters)"),
                    ));
                }
            }
        }
        let mut networks = self.networks.lock().await;
        if networks.contains_key(&spec.name) {
            return Err(NetworkError::Conflict(format!(
                "network {} already exists",
                spec.name
            )));
        }
        if let Some(bridge) = spec.bridge.as_deref() {
            if let Some(other) = networks.values().find(|n| n.bridge() == Some(bridge)) {
                return Err(NetworkError::Conflict(format!(
                    "bridge {bridge} belongs to network {}",
                    other.spec.name
                )));
            }
        }
        if let Some(vlan) = &spec.vlan {
            // A missing uplink is a mistake in the request, not a host
            // failure: say which field, before anything is created.
            let device = format!("{}.{}", vlan.uplink, vlan.id);
            if bridge::link(&device).await?.is_none() && bridge::link(&vlan.uplink).await?.is_none()
            {
                return Err(invalid(
                    "vlan.uplink",
                    format!("no interface {:?} on this host", vlan.uplink),
                ));
            }
        }
        let mut network = Network {
            spec,
            created_bridge: false,
            created_vlan: false,
            nics: vec![],
            created_at: timestamp(SystemTime::now()),
        };
        if let Err(e) = ensure_links(&mut network).await {
            remove_links(&network).await;
            return Err(e);
        }
        if let Err(e) = self.save(&network) {
            remove_links(&network).await;
            return Err(e);
        }
        tracing::info!(network = %network.spec.name, bridge = ?network.bridge(), adopted = !network.created_bridge, "network created");
        networks.insert(network.spec.name.clone(), network.clone());
        Ok(network)
    }

    /// Deletes a network no NIC uses (the caller checks): the links vmlet
    /// created go, adopted ones stay.
    pub async fn delete(&self, name: &str) -> Result<(), NetworkError> {
        let mut networks = self.networks.lock().await;
        let network = networks
            .get(name)
            .cloned()
            .ok_or_else(|| NetworkError::NotFound(name.to_string()))?;
        if let Some(vlan) = network.vlan_device().filter(|_| network.created_vlan) {
            bridge::delete_link(&vlan).await?;
        }
        if let Some(bridge) = network.bridge().filter(|_| network.created_bridge) {
            bridge::delete_link(bridge).await?;
        }
        let file = self.dir.join(format!("{name}.json"));
        std::fs::remove_file(&file)
            .map_err(|e| NetworkError::Failed(format!("removing {}: {e}", file.display())))?;
        networks.remove(name);
        tracing::info!(network = %name, "network deleted");
        Ok(())
    }

    /// Puts back the links of every network that lost them (a host
    /// reboot, or someone deleted the bridge). Errors are logged per network.
    pub async fn restore_all(&self) {
        let mut networks = self.networks.lock().await;
        for network in networks.values_mut() {
            if let Err(e) = restore(network).await {
                tracing::error!(network = %network.spec.name, error = %e, "could not restore the network");
            }
        }
    }

    /// Makes sure network `name`'s links exist (before a VM's taps join it);
    /// returns the network.
    pub async fn ensure(&self, name: &str) -> Result<Network, NetworkError> {
        let mut networks = self.networks.lock().await;
        let network = networks
            .get_mut(name)
            .ok_or_else(|| NetworkError::NotFound(name.to_string()))?;
        restore(network).await?;
        Ok(network.clone())
    }

    fn save(&self, network: &Network) -> Result<(), NetworkError> {
        let mut stored = network.clone();
        stored.nics.clear();
        let mut bytes = serde_json::to_vec_pretty(&stored).expect("a Network serializes");
        bytes.push(b'\n');
        write_atomically(&self.dir, &format!("{}.json", network.spec.name), &bytes)
            .map_err(|e| NetworkError::Failed(crate::error_chain(&e)))
    }
}

/// Creates what is missing: the bridge, the VLAN device (enslaved), both up.
/// Records what it created in `network`.
async fn ensure_links(network: &mut Network) -> Result<(), NetworkError> {
    let Some(bridge) = network.spec.bridge.clone() else {
        return Ok(());
    };
    let mtu = network.spec.mtu;
    match bridge::link(&bridge).await? {
        Some(link) if link.kind.as_deref() != Some("bridge") => {
            return Err(NetworkError::Conflict(format!(
                "{bridge} exists and is not a bridge ({})",
                link.kind.as_deref().unwrap_or("unknown kind")
            )));
        }
        Some(link) => {
            if !link.up {
                bridge::set_up(&bridge).await?;
            }
        }
        None => {
            bridge::create_bridge(&bridge, mtu).await?;
            network.created_bridge = true;
        }
    }
    if let (Some(device), Some(vlan)) = (network.vlan_device(), network.spec.vlan.clone()) {
        if bridge::link(&device).await?.is_none() {
            bridge::create_vlan(&device, &vlan.uplink, vlan.id, mtu).await?;
            network.created_vlan = true;
        }
        bridge::set_master_mtu_up(&device, &bridge, mtu).await?;
    }
    Ok(())
}

/// [`ensure_links`] for a network that exists already: what it was given
/// (an adopted bridge) stays its owner's even when vmlet has to recreate it.
async fn restore(network: &mut Network) -> Result<(), NetworkError> {
    let owned = (network.created_bridge, network.created_vlan);
    let result = ensure_links(network).await;
    (network.created_bridge, network.created_vlan) = owned;
    result
}

/// Best-effort removal of the links `network` created (a failed create).
async fn remove_links(network: &Network) {
    if let Some(vlan) = network.vlan_device().filter(|_| network.created_vlan) {
        let _ = bridge::delete_link(&vlan).await;
    }
    if let Some(bridge) = network.bridge().filter(|_| network.created_bridge) {
        let _ = bridge::delete_link(bridge).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::openapi::schema::Schema;
    use utoipa::openapi::RefOr;
    use utoipa::PartialSchema;

    /// Property names and required names of `Network`'s OpenAPI schema.
    fn documented() -> (Vec<String>, Vec<String>) {
        let RefOr::T(Schema::Object(object)) = Network::schema() else {
            panic!("Network's schema is an inline object");
        };
        (object.properties.keys().cloned().collect(), object.required)
    }

    fn keys(network: &Network) -> Vec<String> {
        let value = serde_json::to_value(network).unwrap();
        let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    #[test]
    fn the_documented_schema_matches_what_is_served() {
        let (mut properties, required) = documented();
        properties.sort();
        let full = Network {
            spec: NetworkSpec {
                name: "lan".into(),
                kind: NetworkKind::Bridge,
                bridge: Some("vmbr-lan".into()),
                mtu: Some(1400),
                vlan: Some(VlanSpec {
                    uplink: "eth0".into(),
                    id: 42,
                }),
            },
            created_bridge: true,
            created_vlan: true,
            nics: vec![],
            created_at: "2026-01-01T00:00:00Z".into(),
        };
        assert_eq!(keys(&full), properties);
        let user = Network {
            spec: NetworkSpec {
                name: "nat".into(),
                kind: NetworkKind::User,
                bridge: None,
                mtu: None,
                vlan: None,
            },
            ..full
        };
        let served = keys(&user);
        for name in &required {
            assert!(served.contains(name), "{name} is required but not served");
        }
    }
}
