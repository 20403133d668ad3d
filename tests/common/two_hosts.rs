//! Two vmlet hosts for live-migration tests: two network namespaces joined
//! by a veth, each running a daemon ([`Daemon::start_in_netns`]) whose TCP
//! API listens on its end of the veth with a token of its own, plus a
//! bridge network of the same name on both, whose bridges carry addresses
//! of one subnet (so a guest answers on either host after it moved).
//!
//! Tests drive each daemon through its unix socket client; the daemons
//! reach each other over the veth with the token. Dropping [`TwoHosts`]
//! stops each daemon (and its QEMUs) before deleting its namespace, which
//! takes the veth, the bridge and the taps with it. Needs root.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;
use vmlet::client::{Client, Method};
use vmlet::spec::{MigrateRequest, Migration, MigrationTarget, Phase};

use super::api::{call, expect};
use super::daemon::{wait_until, Daemon};
use super::netns::NetNs;
use super::{processes_with, Scratch};

/// The port each daemon's TCP API listens on, on its veth address (each
/// namespace has ports of its own, so tests never compete for it).
pub const API_PORT: u16 = 7780;

/// How long an image import of a few MiB may take on a loaded machine.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(120);

/// One host: a daemon in a namespace of its own.
pub struct Host {
    /// The daemon (dropped before the namespace: declared first).
    pub daemon: Daemon,
    /// Its network namespace.
    pub ns: NetNs,
    /// Its address on the veth between the hosts.
    pub addr: String,
    /// Its TCP API, as the other daemon reaches it (`http://ADDR:PORT`).
    pub url: String,
    /// Its bearer token.
    pub token: String,
    /// Its address on the bridge network (`ADDR/24`).
    pub bridge_addr: String,
    /// `VMLET_IMPORT_DIR`: images to import are copied here.
    pub import: Scratch,
    _token_dir: Scratch,
}

/// Two hosts joined by a veth, with a bridge network `network` each.
pub struct TwoHosts {
    /// Host A (declared first: dropped first, daemon before namespace).
    pub a: Host,
    /// Host B.
    pub b: Host,
    /// The bridge network both hosts have (same name on both).
    pub network: String,
    /// The bridge subnet's first three octets (`10.X.Y`): guests take
    /// `10.X.Y.10` and up, the bridges have `.1` (A) and `.2` (B).
    pub subnet: String,
}

impl TwoHosts {
    /// Two hosts with default daemon settings.
    pub async fn start() -> TwoHosts {
        TwoHosts::start_with(&[], &[]).await
    }

    /// Two hosts, with extra environment for A's and B's daemon (e.g. a
    /// tiny capacity on B).
    pub async fn start_with(env_a: &[(&str, &str)], env_b: &[(&str, &str)]) -> TwoHosts {
        // A random 10.X.Y.0/30 for the veth and 10.X.(Y+1).0/24 for the
        // bridges: unique per test (the namespaces keep them apart anyway,
        // but a leak from one test then never looks like another's).
        let r = Uuid::new_v4().as_u128();
        let x = 64 + (r % 128) as u8;
        let y = (((r >> 8) % 127) as u8) * 2;
        let veth_net = format!("10.{x}.{y}");
        let subnet = format!("10.{x}.{}", y + 1);
        let ns_a = NetNs::new();
        let ns_b = NetNs::new();
        let short = |ns: &NetNs| ns.name[ns.name.len() - 8..].to_string();
        let (link_a, link_b) = (format!("vm{}", short(&ns_a)), format!("vm{}", short(&ns_b)));
        ns_a.ip(&[
            "link", "add", &link_a, "type", "veth", "peer", "name", &link_b, "netns", &ns_b.name,
        ]);
        let addr_a = format!("{veth_net}.1");
        let addr_b = format!("{veth_net}.2");
        for (ns, link, addr) in [(&ns_a, &link_a, &addr_a), (&ns_b, &link_b, &addr_b)] {
            ns.ip(&["addr", "add", &format!("{addr}/30"), "dev", link]);
            ns.ip(&["link", "set", link, "up"]);
        }
        let network = format!("m{}", &Uuid::new_v4().simple().to_string()[..6]);
        let a = Host::start(ns_a, addr_a, format!("{subnet}.1/24"), &network, env_a).await;
        let b = Host::start(ns_b, addr_b, format!("{subnet}.2/24"), &network, env_b).await;
        TwoHosts {
            a,
            b,
            network,
            subnet,
        }
    }

    /// Guest address number `n` (10 and up) on the bridge subnet, with its
    /// prefix (`10.X.Y.N/24`).
    pub fn guest_ip(&self, n: u8) -> String {
        format!("{}.{n}/24", self.subnet)
    }

    /// Creates a qcow2 image of `size` with real `qemu-img` (and `data`
    /// written at its start with `qemu-io`, when given) and imports the
    /// same file into both daemons as `name`.
    pub async fn import_image_on_both(&self, name: &str, size: &str) {
        let file = make_image(self.a.import.path(), &format!("{name}.qcow2"), size);
        std::fs::copy(&file, self.b.import.path().join(format!("{name}.qcow2"))).unwrap();
        for host in [&self.a, &self.b] {
            host.import_image(name, &format!("{name}.qcow2")).await;
        }
    }

    /// Live QEMU processes of VM `uuid` on both hosts, and how many
    /// daemons list it.
    pub async fn copies(&self, uuid: Uuid) -> (usize, usize) {
        let qemus = self.a.qemus(uuid).len() + self.b.qemus(uuid).len();
        let mut listed = 0;
        for host in [&self.a, &self.b] {
            if host.has_vm(uuid).await {
                listed += 1;
            }
        }
        (qemus, listed)
    }
}

/// Makes a qcow2 image of `size` in `dir` with `qemu-img create`, with a
/// recognisable pattern written over its first MiB (`qemu-io`), so the
/// image holds data an overlay reads through.
pub fn make_image(dir: &Path, file: &str, size: &str) -> PathBuf {
    let path = dir.join(file);
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(size)
        .output()
        .expect("running qemu-img");
    assert!(out.status.success(), "qemu-img create: {out:?}");
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 1M"])
        .arg(&path)
        .output()
        .expect("running qemu-io");
    assert!(out.status.success(), "qemu-io write: {out:?}");
    path
}

impl Host {
    async fn start(
        ns: NetNs,
        addr: String,
        bridge_addr: String,
        network: &str,
        env: &[(&str, &str)],
    ) -> Host {
        let token_dir = Scratch::new();
        let token_file = token_dir.path().join("token");
        let token = format!("tok-{}", Uuid::new_v4().simple());
        std::fs::write(&token_file, &token).unwrap();
        std::fs::set_permissions(
            &token_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let import = Scratch::new();
        let listen = format!("{addr}:{API_PORT}");
        let mut all: Vec<(&str, &str)> = vec![
            ("VMLET_TCP_LISTEN", &listen),
            ("VMLET_AUTH_TOKEN_FILE", token_file.to_str().unwrap()),
            ("VMLET_IMPORT_DIR", import.path().to_str().unwrap()),
        ];
        all.extend_from_slice(env);
        let daemon = Daemon::start_in_netns(&ns, &all).await;
        expect(
            &daemon,
            Method::POST,
            "/v1/networks",
            Some(&json!({ "name": network })),
            201,
        )
        .await;
        ns.ip(&[
            "addr",
            "add",
            &bridge_addr,
            "dev",
            &format!("vmbr-{network}"),
        ]);
        Host {
            daemon,
            ns,
            url: format!("http://{addr}:{API_PORT}"),
            addr,
            token,
            bridge_addr,
            import,
            _token_dir: token_dir,
        }
    }

    /// The daemon's unix socket client.
    pub fn client(&self) -> &Client {
        &self.daemon.client
    }

    /// This host as a migration target.
    pub fn target(&self) -> MigrationTarget {
        MigrationTarget {
            url: self.url.clone(),
            token: self.token.clone(),
        }
    }

    /// A migration request to this host (default downtime).
    pub fn migrate_here(&self, max_bandwidth_mib_s: Option<u64>) -> MigrateRequest {
        MigrateRequest {
            target: self.target(),
            max_downtime_ms: vmlet::spec::DEFAULT_MAX_DOWNTIME_MS,
            max_bandwidth_mib_s,
        }
    }

    /// Imports `file` (in this host's import directory) as image `name`
    /// and waits until it is ready.
    pub async fn import_image(&self, name: &str, file: &str) {
        let path = self.import.path().join(file);
        let body = json!({ "name": name, "path": path });
        expect(&self.daemon, Method::POST, "/v1/images", Some(&body), 202).await;
        let what = format!("the import of image {name}");
        let image = wait_until(&what, IMPORT_TIMEOUT, || async {
            let (status, image) = call(
                &self.daemon,
                Method::GET,
                &format!("/v1/images/{name}"),
                None,
            )
            .await;
            assert_eq!(status, 200, "{image}");
            (image["status"] != "importing").then_some(image)
        })
        .await;
        assert_eq!(image["status"], "ready", "{image}");
    }

    /// Live QEMU processes of VM `uuid` in this host's namespace (both
    /// hosts run QEMUs with the same `-uuid` during a migration: the
    /// namespace tells them apart).
    pub fn qemus(&self, uuid: Uuid) -> Vec<i32> {
        let here = self.ns.pids();
        processes_with(&format!("-uuid {uuid} "))
            .into_iter()
            .filter(|pid| here.contains(pid) && !is_zombie(*pid))
            .collect()
    }

    /// Whether the daemon lists VM `uuid`.
    pub async fn has_vm(&self, uuid: Uuid) -> bool {
        let (status, body) =
            call(&self.daemon, Method::GET, &format!("/v1/vms/{uuid}"), None).await;
        match status {
            200 => true,
            404 => false,
            _ => panic!("GET /v1/vms/{uuid}: {status} {body}"),
        }
    }

    /// VM `uuid` as the daemon shows it (must exist).
    pub async fn vm(&self, uuid: Uuid) -> Value {
        expect(
            &self.daemon,
            Method::GET,
            &format!("/v1/vms/{uuid}"),
            None,
            200,
        )
        .await
    }

    /// VM `uuid`'s directory under the state dir.
    pub fn vm_dir(&self, uuid: Uuid) -> PathBuf {
        self.daemon.state_dir.join("vms").join(uuid.to_string())
    }

    /// Whether the tap of the NIC with `mac` exists here.
    pub fn has_tap(&self, mac: &str) -> bool {
        let tap = format!("vmt{}", mac.replace(':', ""));
        self.ns.links().contains(&tap)
    }

    /// The names of the volumes the daemon lists.
    pub async fn volumes(&self) -> Vec<String> {
        let list = expect(&self.daemon, Method::GET, "/v1/volumes", None, 200).await;
        list["volumes"]
            .as_array()
            .unwrap_or_else(|| panic!("GET /v1/volumes: {list}"))
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// The volume files in the state dir.
    pub fn volume_files(&self) -> Vec<String> {
        std::fs::read_dir(self.daemon.state_dir.join("volumes"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Migration `id` as this daemon shows it.
    pub async fn migration(&self, id: Uuid) -> Migration {
        self.client()
            .get_migration(id)
            .await
            .unwrap_or_else(|e| panic!("GET /v1/migrations/{id}: {e}"))
    }

    /// Waits until migration `id` is final here; returns it.
    pub async fn wait_final(&self, id: Uuid, timeout: Duration) -> Migration {
        let what = format!("migration {id} to end on {}", self.url);
        wait_until(&what, timeout, || async {
            // A daemon being restarted does not answer for a moment.
            match self.client().get_migration(id).await {
                Ok(m) if m.phase.is_final() => Some(m),
                _ => None,
            }
        })
        .await
    }

    /// Waits until migration `id` is in `phase` here (panics if it ends
    /// in another final phase first, with both daemons' logs).
    pub async fn wait_phase(&self, id: Uuid, phase: Phase, timeout: Duration) -> Migration {
        let what = format!("migration {id} to reach {}", phase.as_str());
        wait_until(&what, timeout, || async {
            let m = self.migration(id).await;
            if m.phase == phase {
                return Some(m);
            }
            assert!(
                !m.phase.is_final(),
                "migration {id} ended {} before reaching {}: {m:?}\n{}",
                m.phase.as_str(),
                phase.as_str(),
                self.daemon.log_text()
            );
            None
        })
        .await
    }

    /// Pings `ip` (no prefix) from this host's namespace, up to `tries`
    /// times one second apart; whether it answered.
    pub async fn ping(&self, ip: &str, tries: u32) -> bool {
        for _ in 0..tries {
            let out = self.ns.exec(&["ping", "-c", "1", "-W", "1", ip]);
            if out.status.success() {
                return true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        false
    }

    /// Asserts that nothing of VM `uuid` (with NIC `mac` and volume
    /// `volume`, when given) is left here: no QEMU, no VM listed, no
    /// directory, no tap, no volume.
    pub async fn assert_clean_of(&self, uuid: Uuid, mac: Option<&str>, volume: Option<&str>) {
        let what = format!("{} ({})", self.url, self.ns.name);
        assert_eq!(
            self.qemus(uuid),
            Vec::<i32>::new(),
            "QEMU of {uuid} on {what}"
        );
        assert!(!self.has_vm(uuid).await, "VM {uuid} listed on {what}");
        assert!(
            !self.vm_dir(uuid).exists(),
            "{} is left on {what}",
            self.vm_dir(uuid).display()
        );
        if let Some(mac) = mac {
            assert!(
                !self.has_tap(mac),
                "tap of {mac} left on {what}: {:?}",
                self.ns.links()
            );
        }
        if let Some(volume) = volume {
            assert!(
                !self.volumes().await.contains(&volume.to_string()),
                "volume {volume} listed on {what}"
            );
            assert!(
                !self.volume_files().iter().any(|f| f.starts_with(volume)),
                "volume {volume}'s file left on {what}: {:?}",
                self.volume_files()
            );
        }
    }
}

/// A process that exited but was not reaped yet (state `Z`).
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}
