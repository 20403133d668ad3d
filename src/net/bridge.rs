//! Links through rtnetlink: bridges, VLAN sub-interfaces, enslaving ports.
//!
//! Each call opens its own netlink connection, driven by a task on the
//! current tokio runtime and stopped when the call returns. That makes every
//! function safe to call from many tasks at once, and makes it act in the
//! network namespace of the calling thread (which the tests rely on).

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVlan};
use tokio::task::JoinHandle;

use super::{check_ifname, NetError};

/// One network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// The link kind: `bridge`, `vlan`, `tun`, `veth`, …; `None` for plain
    /// physical devices and loopback.
    pub kind: Option<String>,
    /// The MTU, when reported.
    pub mtu: Option<u32>,
    /// Whether the interface is administratively up (`IFF_UP`).
    pub up: bool,
    /// Index of the controller (bridge) this link is enslaved to.
    pub master: Option<u32>,
    /// The VLAN id, for `vlan` links.
    pub vlan_id: Option<u16>,
    /// The link's alias (`IFLA_IFALIAS`); vmlet marks its taps with it
    /// (see [`super::owner`]).
    pub alias: Option<String>,
}

impl LinkInfo {
    fn from_message(msg: &LinkMessage) -> LinkInfo {
        let mut info = LinkInfo {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            mtu: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            master: None,
            vlan_id: None,
            alias: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => info.name = name.clone(),
                LinkAttribute::Mtu(mtu) => info.mtu = Some(*mtu),
                LinkAttribute::Controller(index) => info.master = Some(*index),
                // The kernel reports an empty alias for a cleared one.
                LinkAttribute::IfAlias(alias) if !alias.is_empty() => {
                    info.alias = Some(alias.clone())
                }
                LinkAttribute::LinkInfo(infos) => {
                    for nl in infos {
                        match nl {
                            NlLinkInfo::Kind(kind) => info.kind = Some(kind_name(kind)),
                            NlLinkInfo::Data(InfoData::Vlan(vlan)) => {
                                info.vlan_id = vlan.iter().find_map(|v| match v {
                                    InfoVlan::Id(id) => Some(*id),
                                    _ => None,
                                });
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        info
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Other(other) => other.clone(),
        known => known.to_string(),
    }
}

/// A netlink connection for one call; its driver task stops on drop.
struct Conn {
    handle: Handle,
    driver: JoinHandle<()>,
}

impl Conn {
    fn open() -> Result<Conn, NetError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| NetError::io("open netlink socket", e))?;
        let driver = tokio::spawn(connection);
        Ok(Conn { handle, driver })
    }

    /// The link called `name`, or `None` when there is none.
    async fn get(&self, name: &str) -> Result<Option<LinkInfo>, NetError> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(LinkInfo::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) => match NetError::netlink(format!("get link {name}"), e) {
                err if err.errno() == Some(libc::ENODEV) => Ok(None),
                err => Err(err),
            },
        }
    }

    /// The link called `name`; ENODEV (named) when there is none.
    async fn require(&self, name: &str, what: &str) -> Result<LinkInfo, NetError> {
        self.get(name).await?.ok_or_else(|| NetError::Netlink {
            op: format!("look up {what} {name}"),
            errno: Some(libc::ENODEV),
            message: super::errno_message(libc::ENODEV),
        })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The link called `name`, or `None` when absent.
pub async fn link(name: &str) -> Result<Option<LinkInfo>, NetError> {
    check_ifname(name)?;
    Conn::open()?.get(name).await
}

/// Every link in the namespace, for cleanup scans.
pub async fn links() -> Result<Vec<LinkInfo>, NetError> {
    let conn = Conn::open()?;
    let messages: Vec<LinkMessage> = conn
        .handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetError::netlink("list links", e))?;
    Ok(messages.iter().map(LinkInfo::from_message).collect())
}

/// Creates the bridge `name`, sets its MTU when given, and brings it up.
/// Fails with EEXIST when a link of that name exists.
pub async fn create_bridge(name: &str, mtu: Option<u32>) -> Result<(), NetError> {
    check_ifname(name)?;
    let conn = Conn::open()?;
    let op = format!("create bridge {name}");
    conn.handle
        .link()
        .add(LinkBridge::new(name).build())
        .execute()
        .await
        .map_err(|e| NetError::netlink(&op, e))?;
    if let Some(mtu) = mtu {
        // Set after creation rather than with IFLA_MTU at creation: only a
        // change through the bridge marks the MTU as chosen by the user, so
        // the kernel stops adjusting it to its ports'.
        let index = conn.require(name, "bridge").await?.index;
        let result = conn
            .handle
            .link()
            .change(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await;
        if let Err(e) = result {
            let err = NetError::netlink(format!("set mtu {mtu} on bridge {name}"), e);
            // Leave nothing half-made behind.
            let _ = conn.handle.link().del(index).execute().await;
            return Err(err);
        }
    }
    Ok(())
}

/// Creates the VLAN sub-interface `name` with tag `id` on `uplink`, with
/// the given MTU (the uplink's when `None`), and brings it up.
pub async fn create_vlan(
    name: &str,
    uplink: &str,
    id: u16,
    mtu: Option<u32>,
) -> Result<(), NetError> {
    check_ifname(name)?;
    check_ifname(uplink)?;
    if !(1..=4094).contains(&id) {
        return Err(NetError::Invalid(format!(
            "VLAN id {id} is out of range 1-4094"
        )));
    }
    let conn = Conn::open()?;
    let base = conn.require(uplink, "uplink").await?;
    let mut builder = LinkVlan::new(name, base.index, id).up();
    if let Some(mtu) = mtu {
        builder = builder.mtu(mtu);
    }
    conn.handle
        .link()
        .add(builder.build())
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("create vlan {name} (id {id} on {uplink})"), e))
}

/// Enslaves `name` to the bridge `master`, sets its MTU when given, and
/// brings it up, in one request.
pub async fn set_master_mtu_up(name: &str, master: &str, mtu: Option<u32>) -> Result<(), NetError> {
    check_ifname(name)?;
    check_ifname(master)?;
    let conn = Conn::open()?;
    let bridge = conn.require(master, "bridge").await?;
    if bridge.kind.as_deref() != Some("bridge") {
        return Err(NetError::Invalid(format!("{master} is not a bridge")));
    }
    let port = conn.require(name, "link").await?;
    let mut builder = LinkUnspec::new_with_index(port.index)
        .controller(bridge.index)
        .up();
    if let Some(mtu) = mtu {
        builder = builder.mtu(mtu);
    }
    conn.handle
        .link()
        .change(builder.build())
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("add {name} to bridge {master}"), e))
}

/// Sets the alias (`IFLA_IFALIAS`, at most 255 bytes) of the link `name`.
pub async fn set_alias(name: &str, alias: &str) -> Result<(), NetError> {
    check_ifname(name)?;
    if alias.is_empty() || alias.len() > 255 {
        return Err(NetError::Invalid(format!(
            "a link alias is 1 to 255 bytes, not {}",
            alias.len()
        )));
    }
    let conn = Conn::open()?;
    let link = conn.require(name, "link").await?;
    let mut message = LinkUnspec::new_with_index(link.index).build();
    message
        .attributes
        .push(LinkAttribute::IfAlias(alias.to_string()));
    conn.handle
        .link()
        .change(message)
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("set the alias of {name}"), e))
}

/// Brings the link `name` up.
pub async fn set_up(name: &str) -> Result<(), NetError> {
    check_ifname(name)?;
    let conn = Conn::open()?;
    let link = conn.require(name, "link").await?;
    conn.handle
        .link()
        .change(LinkUnspec::new_with_index(link.index).up().build())
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("set {name} up"), e))
}

/// Deletes the link `name`; succeeds when it is already absent.
pub async fn delete_link(name: &str) -> Result<(), NetError> {
    check_ifname(name)?;
    let conn = Conn::open()?;
    let Some(link) = conn.get(name).await? else {
        return Ok(());
    };
    match conn.handle.link().del(link.index).execute().await {
        Ok(()) => Ok(()),
        Err(e) => match NetError::netlink(format!("delete link {name}"), e) {
            // Deleted by someone else between the lookup and now.
            err if err.errno() == Some(libc::ENODEV) => Ok(()),
            err => Err(err),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::{Emitable, Parseable};

    /// Encodes and decodes `msg` as the kernel would see and send it.
    fn round_trip(msg: LinkMessage) -> LinkMessage {
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        LinkMessage::parse(buf.as_slice()).unwrap()
    }

    #[test]
    fn reads_vlan_link() {
        let mut msg = LinkVlan::new("eth0.42", 2, 42).mtu(1400).up().build();
        msg.header.index = 7;
        msg.attributes.push(LinkAttribute::Controller(5));
        let info = LinkInfo::from_message(&round_trip(msg));
        assert_eq!(
            info,
            LinkInfo {
                index: 7,
                name: "eth0.42".into(),
                kind: Some("vlan".into()),
                mtu: Some(1400),
                up: true,
                master: Some(5),
                vlan_id: Some(42),
                alias: None,
            }
        );
    }

    #[test]
    fn reads_bridge_and_plain_links() {
        let info = LinkInfo::from_message(&round_trip(LinkBridge::new("br0").build()));
        assert_eq!(info.kind.as_deref(), Some("bridge"));
        assert!(info.up);
        assert_eq!((info.mtu, info.master, info.vlan_id), (None, None, None));

        let info = LinkInfo::from_message(&round_trip(
            LinkUnspec::new_with_name("eth0").mtu(9000).build(),
        ));
        assert_eq!(info.name, "eth0");
        assert_eq!(info.kind, None);
        assert_eq!(info.mtu, Some(9000));
        assert!(!info.up);
        assert_eq!(info.alias, None);
    }

    #[test]
    fn reads_the_alias() {
        let mut msg = LinkUnspec::new_with_name("vmt525400000001").build();
        msg.attributes
            .push(LinkAttribute::IfAlias("vmlet:0123456789abcdef".into()));
        let info = LinkInfo::from_message(&round_trip(msg));
        assert_eq!(info.alias.as_deref(), Some("vmlet:0123456789abcdef"));
        let mut msg = LinkUnspec::new_with_name("eth0").build();
        msg.attributes.push(LinkAttribute::IfAlias(String::new()));
        assert_eq!(LinkInfo::from_message(&round_trip(msg)).alias, None);
    }
}
