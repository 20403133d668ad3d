//! `vmlet network …`: create, list, show and delete networks, and how
//! networks are rendered.

use std::io::Write;

use super::{columns, key_values, shown, shown_list, unless_json, write_flush};
use super::{CliError, ClientOptions, Output};
use crate::net::networks::{Network, NetworkKind, NetworkSpec, VlanSpec};

/// `vmlet network …`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum NetworkCommand {
    /// List every network.
    List,
    /// Show one network and the NICs on it.
    Show {
        /// The network's name.
        name: String,
    },
    /// Create a network: a Linux bridge (an existing one is adopted),
    /// optionally with a VLAN `UPLINK.ID` on it; or, with --user, QEMU's
    /// user-mode network (NAT, no host setup).
    Create {
        /// The network's name.
        name: String,
        /// The bridge (default `vmbr-NAME`); an existing one is adopted and
        /// never deleted.
        #[arg(long, value_name = "BRIDGE", conflicts_with = "user")]
        bridge: Option<String>,
        /// MTU of the bridge, the VLAN device and the taps.
        #[arg(long, value_name = "N", conflicts_with = "user")]
        mtu: Option<u32>,
        /// The host interface carrying the VLAN (with --vlan-id).
        #[arg(long, value_name = "IF", requires = "vlan_id", conflicts_with = "user")]
        vlan_uplink: Option<String>,
        /// The VLAN id, 1..=4094 (with --vlan-uplink).
        #[arg(long, value_name = "N", requires = "vlan_uplink")]
        vlan_id: Option<u16>,
        /// QEMU user-mode networking instead of a bridge.
        #[arg(long)]
        user: bool,
    },
    /// Delete a network (refused while NICs are on it). Links vmlet did not
    /// create stay.
    Delete {
        /// The network's name.
        name: String,
    },
}

/// Runs `vmlet network CMD`, printing to `out`.
pub async fn run_network(
    cmd: NetworkCommand,
    opts: &ClientOptions,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let client = opts.client()?;
    let json = opts.output == Output::Json;
    let text = match cmd {
        NetworkCommand::List => {
            let networks = client.list_networks().await?;
            shown_list(json, "networks", &networks, render_network_list)
        }
        NetworkCommand::Show { name } => {
            shown(json, &client.get_network(&name).await?, render_network)
        }
        NetworkCommand::Create {
            name,
            bridge,
            mtu,
            vlan_uplink,
            vlan_id,
            user,
        } => {
            let spec = NetworkSpec {
                name,
                kind: if user {
                    NetworkKind::User
                } else {
                    NetworkKind::Bridge
                },
                bridge,
                mtu,
                vlan: vlan_uplink
                    .zip(vlan_id)
                    .map(|(uplink, id)| VlanSpec { uplink, id }),
            };
            let network = client.create_network(&spec).await?;
            shown(json, &network, |network| {
                format!("created network {}\n", network_line(network))
            })
        }
        NetworkCommand::Delete { name } => {
            client.delete_network(&name).await?;
            unless_json(json, || format!("deleted network {name}\n"))
        }
    };
    write_flush(out, &text)
}

fn kind_str(kind: NetworkKind) -> &'static str {
    match kind {
        NetworkKind::Bridge => "bridge",
        NetworkKind::User => "user",
    }
}

/// `NAME (bridge vmbr-lan, VLAN eth0.100, MTU 9000)`, `NAME (user)`.
fn network_line(network: &Network) -> String {
    let mut parts = vec![match network.bridge() {
        Some(bridge) if network.spec.kind == NetworkKind::Bridge => format!("bridge {bridge}"),
        _ => kind_str(network.spec.kind).to_string(),
    }];
    if let Some(vlan) = network.vlan_device() {
        parts.push(format!("VLAN {vlan}"));
    }
    if let Some(mtu) = network.spec.mtu {
        parts.push(format!("MTU {mtu}"));
    }
    format!("{} ({})", network.spec.name, parts.join(", "))
}

/// `network list` as aligned columns.
pub fn render_network_list(networks: &[Network]) -> String {
    let header = ["NAME", "TYPE", "BRIDGE", "MTU", "VLAN", "NICS"];
    let rows: Vec<Vec<String>> = networks
        .iter()
        .map(|n| {
            vec![
                n.spec.name.clone(),
                kind_str(n.spec.kind).to_string(),
                n.bridge().unwrap_or("-").to_string(),
                n.spec.mtu.map_or("-".to_string(), |m| m.to_string()),
                n.vlan_device().unwrap_or_else(|| "-".into()),
                n.nics.len().to_string(),
            ]
        })
        .collect();
    columns(&header, &rows)
}

/// `network show` as `key: value` lines, a `nic` line per NIC on it.
pub fn render_network(network: &Network) -> String {
    let made = |created: bool| if created { "created" } else { "existing" };
    let mut lines: Vec<(String, String)> = vec![
        ("name".into(), network.spec.name.clone()),
        ("type".into(), kind_str(network.spec.kind).into()),
    ];
    if let Some(bridge) = network.bridge() {
        lines.push((
            "bridge".into(),
            format!("{bridge} ({})", made(network.created_bridge)),
        ));
    }
    if let Some(vlan) = network.vlan_device() {
        lines.push((
            "vlan".into(),
            format!("{vlan} ({})", made(network.created_vlan)),
        ));
    }
    if let Some(mtu) = network.spec.mtu {
        lines.push(("mtu".into(), mtu.to_string()));
    }
    if network.nics.is_empty() {
        lines.push(("nics".into(), "-".into()));
    }
    for nic in &network.nics {
        let tap = nic
            .tap
            .as_ref()
            .map_or(String::new(), |t| format!(", tap {t}"));
        lines.push((
            "nic".into(),
            format!("{} VM {} ({}){tap}", nic.mac, nic.vm_name, nic.vm),
        ));
    }
    lines.push(("created".into(), network.created_at.clone()));
    key_values(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::networks::NetworkNic;
    use uuid::Uuid;

    fn network(name: &str) -> Network {
        Network {
            spec: NetworkSpec {
                name: name.into(),
                kind: NetworkKind::Bridge,
                bridge: Some(format!("vmbr-{name}")),
                mtu: None,
                vlan: None,
            },
            created_bridge: true,
            created_vlan: false,
            nics: vec![],
            created_at: "2024-05-01T10:00:00.000Z".into(),
        }
    }

    fn tagged() -> Network {
        let mut n = network("lan");
        n.spec.mtu = Some(9000);
        n.spec.vlan = Some(VlanSpec {
            uplink: "eth0".into(),
            id: 100,
        });
        n.created_vlan = true;
        n.nics = vec![
            NetworkNic {
                vm: Uuid::from_u128(1),
                vm_name: "web".into(),
                mac: "52:54:00:12:34:56".into(),
                tap: Some("vmtap0".into()),
            },
            NetworkNic {
                vm: Uuid::from_u128(2),
                vm_name: "db".into(),
                mac: "52:54:00:ab:cd:ef".into(),
                tap: None,
            },
        ];
        n
    }

    fn user() -> Network {
        let mut n = network("nat");
        n.spec.kind = NetworkKind::User;
        n.spec.bridge = None;
        n.created_bridge = false;
        n
    }

    #[test]
    fn network_list_is_aligned_columns() {
        let text = render_network_list(&[tagged(), user()]);
        let expected = "\
NAME  TYPE    BRIDGE    MTU   VLAN      NICS
lan   bridge  vmbr-lan  9000  eth0.100  2
nat   user    -         -     -         0
";
        assert_eq!(text, expected);
        assert_eq!(
            render_network_list(&[]),
            "NAME  TYPE  BRIDGE  MTU  VLAN  NICS\n"
        );
    }

    #[test]
    fn network_show_lists_links_and_nics() {
        let expected = "\
name:    lan
type:    bridge
bridge:  vmbr-lan (created)
vlan:    eth0.100 (created)
mtu:     9000
nic:     52:54:00:12:34:56 VM web (00000000-0000-0000-0000-000000000001), tap vmtap0
nic:     52:54:00:ab:cd:ef VM db (00000000-0000-0000-0000-000000000002)
created: 2024-05-01T10:00:00.000Z
";
        assert_eq!(render_network(&tagged()), expected);
        let mut adopted = network("br0");
        adopted.created_bridge = false;
        adopted.spec.bridge = Some("br0".into());
        let expected = "\
name:    br0
type:    bridge
bridge:  br0 (existing)
nics:    -
created: 2024-05-01T10:00:00.000Z
";
        assert_eq!(render_network(&adopted), expected);
        let expected = "\
name:    nat
type:    user
nics:    -
created: 2024-05-01T10:00:00.000Z
";
        assert_eq!(render_network(&user()), expected);
    }

    #[test]
    fn create_line_names_the_links() {
        assert_eq!(
            network_line(&tagged()),
            "lan (bridge vmbr-lan, VLAN eth0.100, MTU 9000)"
        );
        assert_eq!(network_line(&user()), "nat (user)");
    }
}
