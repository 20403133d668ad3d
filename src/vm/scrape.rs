//! The `/metrics` scrape: VMs by state, and for each VM with a QEMU process its vCPU
//! time, resident memory, block I/O, NIC traffic, balloon size and its
//! cgroup's figures (CPU usage and throttling, memory and its limit, tasks),
//! followed by the daemon's own families.
//!
//! A hung QEMU must not hang the scrape. Host-side numbers (vCPU threads'
//! CPU time, RSS, tap counters) come from `/proc` and never ask QEMU: vCPU
//! threads are found by the names QEMU gives them (`CPU 0/KVM`,
//! `CPU 0/TCG`; vmlet launches with `debug-threads=on`). Block and balloon
//! numbers need QMP: every VM is asked at once with monitoring reads
//! ([`QmpClient::query_raw`]) whose deadline is [`QMP_BUDGET`]. Their
//! expiry is not a lost link: a scrape is a read and never changes a VM's
//! state, however stopped or slow its QEMU is. A VM that did not answer in
//! time lacks those series and has `vmlet_vm_metrics_up` 0; a concurrent
//! scrape does not queue more queries behind its unanswered ones.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use crate::confine::cgroup::CgroupStats;
use crate::metrics::{encode_daemon, Encoder, Kind};
use crate::qemu::nic::tap_name;
use crate::qemu::qmp::QmpClient;
use crate::vm::actor::VmHandle;
use crate::vm::state::PowerState;

/// How long a scrape waits for QEMU's QMP answers (all VMs at once): the
/// deadline of its monitoring reads.
pub const QMP_BUDGET: Duration = Duration::from_secs(2);

/// The whole exposition: host, per-VM and daemon families. `cgroup_stats`
/// reads a running VM's cgroup figures (`None`: it has no cgroup); it
/// reads files, so it is called off the async threads.
pub async fn render<F>(handles: &[VmHandle], cgroup_stats: F) -> String
where
    F: Fn(Uuid) -> Option<CgroupStats> + Send + 'static,
{
    let mut by_state = [0u64; PowerState::ALL.len()];
    let mut states = Vec::with_capacity(handles.len());
    let mut targets = Vec::new();
    for handle in handles {
        let vm = handle.view();
        if let Some(i) = PowerState::ALL.iter().position(|s| vm.state == *s) {
            by_state[i] += 1;
        }
        states.push((vm.id.to_string(), vm.name.clone(), vm.state.get()));
        if let Some(live) = handle.live() {
            targets.push(Target {
                id: vm.id,
                name: vm.name,
                pid: live.pid,
                qmp: live.qmp,
                nics: vm
                    .spec
                    .nics
                    .iter()
                    .map(|nic| (nic.mac.clone().unwrap_or_default(), tap_name(nic)))
                    .collect(),
            });
        }
    }
    let targets = std::sync::Arc::new(targets);
    let host = {
        let targets = targets.clone();
        tokio::task::spawn_blocking(move || {
            let net = read_net_dev();
            let ticks = clock_ticks();
            targets
                .iter()
                .map(|t| read_host(t, &net, ticks, cgroup_stats(t.id).unwrap_or_default()))
                .collect::<Vec<_>>()
        })
    };
    let qmp = futures_util::future::join_all(
        targets
            .iter()
            .map(|t| query_qmp(t.id, t.qmp.clone(), QMP_BUDGET)),
    );
    let (host, qmp) = tokio::join!(host, qmp);
    let host = host.unwrap_or_else(|_| targets.iter().map(|_| HostStats::default()).collect());

    let mut e = Encoder::new();
    e.family(
        "vmlet_vms",
        Kind::Gauge,
        "VMs on this host by their last observed power state.",
    );
    for (state, count) in PowerState::ALL.iter().zip(by_state) {
        e.sample("vmlet_vms", &[("state", state.as_str())], count);
    }
    encode_states(&mut e, &states);
    let vms: Vec<VmStats> = targets
        .iter()
        .zip(host)
        .zip(qmp)
        .map(|((t, host), qmp)| VmStats {
            id: t.id.to_string(),
            name: t.name.clone(),
            host,
            qmp,
        })
        .collect();
    encode_vms(&mut e, &vms);
    encode_daemon(&mut e);
    e.finish()
}

/// `vmlet_vm_state`: one series per VM, whatever its state (stopped and
/// crashed ones too, which have no other per-VM series), valued 1 and
/// labelled with the state, so `vmlet_vm_state{state="crashed"} == 1`
/// names the VMs to look at.
fn encode_states(e: &mut Encoder, states: &[(String, String, PowerState)]) {
    e.family(
        "vmlet_vm_state",
        Kind::Gauge,
        "1 for each VM, labelled with its last observed power state.",
    );
    for (id, name, state) in states {
        e.sample(
            "vmlet_vm_state",
            &[("id", id), ("name", name), ("state", state.as_str())],
            1u64,
        );
    }
}

/// A VM with a QEMU process, as the scrape found it.
struct Target {
    id: Uuid,
    name: String,
    pid: i32,
    qmp: Option<QmpClient>,
    /// (MAC, tap) of each NIC.
    nics: Vec<(String, String)>,
}

/// What `/proc` says of a VM's QEMU.
#[derive(Debug, Default)]
struct HostStats {
    /// (vCPU index or `all`, seconds of CPU time).
    vcpus: Vec<(String, f64)>,
    rss_bytes: Option<u64>,
    nics: Vec<NicStats>,
    /// The VM's cgroup (all `None` without one, or where the host's
    /// controllers do not offer a figure).
    cgroup: CgroupStats,
}

/// A NIC's traffic as the guest sees it.
#[derive(Debug)]
struct NicStats {
    nic: String,
    rx_bytes: u64,
    tx_bytes: u64,
}

/// What QMP says of a VM.
#[derive(Debug, Default)]
struct QmpStats {
    disks: Vec<BlockStats>,
    balloon_bytes: Option<u64>,
}

/// One disk's I/O since QEMU started.
#[derive(Debug, PartialEq, Eq)]
struct BlockStats {
    disk: String,
    read_bytes: u64,
    write_bytes: u64,
    read_ops: u64,
    write_ops: u64,
}

struct VmStats {
    id: String,
    name: String,
    host: HostStats,
    /// `None`: QMP did not answer in time (or is gone).
    qmp: Option<QmpStats>,
}

/// One per-VM family: HELP, TYPE and a sample per VM (and per `extra`).
fn vm_family<'a, V, F>(
    e: &mut Encoder,
    vms: &'a [VmStats],
    name: &str,
    kind: Kind,
    help: &str,
    f: F,
) where
    V: crate::metrics::SampleValue,
    F: Fn(&'a VmStats) -> Vec<(Option<(&'static str, &'a str)>, V)>,
{
    e.family(name, kind, help);
    for vm in vms {
        for (extra, value) in f(vm) {
            let mut labels = vec![("id", vm.id.as_str()), ("name", vm.name.as_str())];
            labels.extend(extra);
            e.sample(name, &labels, value);
        }
    }
}

fn encode_vms(e: &mut Encoder, vms: &[VmStats]) {
    vm_family(
        e,
        vms,
        "vmlet_vm_metrics_up",
        Kind::Gauge,
        "1 when the VM's QEMU answered this scrape's QMP queries in time, else 0 \
         (its block and balloon series are then missing).",
        |vm| vec![(None, u64::from(vm.qmp.is_some()))],
    );
    vm_family(
        e,
        vms,
        "vmlet_vm_vcpu_seconds_total",
        Kind::Counter,
        "CPU time (user and system) of each vCPU thread of the VM's QEMU \
         (vcpu=\"all\" when one thread runs every vCPU).",
        |vm| {
            vm.host
                .vcpus
                .iter()
                .map(|(vcpu, seconds)| (Some(("vcpu", vcpu.as_str())), *seconds))
                .collect()
        },
    );
    vm_family(
        e,
        vms,
        "vmlet_vm_memory_rss_bytes",
        Kind::Gauge,
        "Resident memory of the VM's QEMU process.",
        |vm| vm.host.rss_bytes.map(|b| (None, b)).into_iter().collect(),
    );
    type BlockField = fn(&BlockStats) -> u64;
    let block: [(&str, &str, BlockField); 4] = [
        (
            "vmlet_vm_block_read_bytes_total",
            "Bytes the guest read from each disk (query-blockstats rd_bytes).",
            |b| b.read_bytes,
        ),
        (
            "vmlet_vm_block_write_bytes_total",
            "Bytes the guest wrote to each disk (query-blockstats wr_bytes).",
            |b| b.write_bytes,
        ),
        (
            "vmlet_vm_block_read_ops_total",
            "Read requests of the guest to each disk (query-blockstats rd_operations).",
            |b| b.read_ops,
        ),
        (
            "vmlet_vm_block_write_ops_total",
            "Write requests of the guest to each disk (query-blockstats wr_operations).",
            |b| b.write_ops,
        ),
    ];
    for (name, help, field) in block {
        vm_family(e, vms, name, Kind::Counter, help, |vm| {
            vm.qmp
                .iter()
                .flat_map(|q| &q.disks)
                .map(|b| (Some(("disk", b.disk.as_str())), field(b)))
                .collect()
        });
    }
    vm_family(
        e,
        vms,
        "vmlet_vm_nic_rx_bytes_total",
        Kind::Counter,
        "Bytes each NIC received, from the guest's point of view (its host tap's \
         tx_bytes); nic is the MAC. NICs without a tap (user networking) are left out.",
        |vm| {
            vm.host
                .nics
                .iter()
                .map(|n| (Some(("nic", n.nic.as_str())), n.rx_bytes))
                .collect()
        },
    );
    vm_family(
        e,
        vms,
        "vmlet_vm_nic_tx_bytes_total",
        Kind::Counter,
        "Bytes each NIC sent, from the guest's point of view (its host tap's \
         rx_bytes); nic is the MAC. NICs without a tap (user networking) are left out.",
        |vm| {
            vm.host
                .nics
                .iter()
                .map(|n| (Some(("nic", n.nic.as_str())), n.tx_bytes))
                .collect()
        },
    );
    encode_cgroups(e, vms);
    vm_family(
        e,
        vms,
        "vmlet_vm_balloon_actual_bytes",
        Kind::Gauge,
        "Memory the guest has after ballooning (query-balloon actual).",
        |vm| {
            vm.qmp
                .as_ref()
                .and_then(|q| q.balloon_bytes)
                .map(|b| (None, b))
                .into_iter()
                .collect()
        },
    );
}

/// Nanoseconds → seconds, for `_seconds_total` counters.
fn seconds(ns: Option<u64>) -> Option<f64> {
    ns.map(|ns| ns as f64 / 1e9)
}

/// The per-VM cgroup families. A figure the host does not offer (its
/// controller is missing, or the VM has no cgroup) has no sample.
fn encode_cgroups(e: &mut Encoder, vms: &[VmStats]) {
    type Seconds = fn(&CgroupStats) -> Option<f64>;
    type Number = fn(&CgroupStats) -> Option<u64>;
    let seconds_families: [(&str, &str, Seconds); 2] = [
        (
            "vmlet_vm_cgroup_cpu_usage_seconds_total",
            "CPU time used by every task of the VM's QEMU (its cgroup's \
             cpu.stat usage_usec, or cpuacct.usage on cgroup v1).",
            |c| seconds(c.cpu_usage_ns),
        ),
        (
            "vmlet_vm_cgroup_cpu_throttled_seconds_total",
            "Time the VM's QEMU was held back by its CPU quota \
             (resources.cpu_quota_percent; cpu.stat throttled_usec or throttled_time).",
            |c| seconds(c.cpu_throttled_ns),
        ),
    ];
    for (name, help, field) in seconds_families {
        vm_family(e, vms, name, Kind::Counter, help, |vm| {
            field(&vm.host.cgroup)
                .map(|v| (None, v))
                .into_iter()
                .collect()
        });
    }
    let numbers: [(&str, Kind, &str, Number); 5] = [
        (
            "vmlet_vm_cgroup_cpu_periods_total",
            Kind::Counter,
            "CPU quota enforcement periods (100 ms) the VM's QEMU ran in \
             (cpu.stat nr_periods; stays 0 without a quota).",
            |c| c.cpu_periods,
        ),
        (
            "vmlet_vm_cgroup_cpu_throttled_periods_total",
            Kind::Counter,
            "CPU quota enforcement periods in which the VM's QEMU used up its \
             quota and was throttled (cpu.stat nr_throttled).",
            |c| c.cpu_throttled_periods,
        ),
        (
            "vmlet_vm_cgroup_memory_bytes",
            Kind::Gauge,
            "Memory charged to the VM's cgroup, page cache included \
             (memory.current, or memory.usage_in_bytes on cgroup v1).",
            |c| c.memory_current_bytes,
        ),
        (
            "vmlet_vm_cgroup_memory_limit_bytes",
            Kind::Gauge,
            "Memory limit of the VM's cgroup: the guest's memory plus the \
             overhead (memory.max, or memory.limit_in_bytes on cgroup v1).",
            |c| c.memory_max_bytes,
        ),
        (
            "vmlet_vm_cgroup_tasks",
            Kind::Gauge,
            "Tasks (threads) in the VM's cgroup (pids.current).",
            |c| c.pids_current,
        ),
    ];
    for (name, kind, help, field) in numbers {
        vm_family(e, vms, name, kind, help, |vm| {
            field(&vm.host.cgroup)
                .map(|v| (None, v))
                .into_iter()
                .collect()
        });
    }
}

// ---- QMP -----------------------------------------------------------------------

/// VMs whose QMP queries from a concurrent scrape are still unanswered.
static IN_FLIGHT: Mutex<BTreeSet<Uuid>> = Mutex::new(BTreeSet::new());

/// A VM's place in [`IN_FLIGHT`], given back on drop.
struct InFlight(Uuid);

impl InFlight {
    fn claim(id: Uuid) -> Option<InFlight> {
        let mut set = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
        // A refused claim must not build a guard: dropping it would lock
        // IN_FLIGHT again (deadlock) and release the holder's claim.
        if set.insert(id) {
            Some(InFlight(id))
        } else {
            None
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut set = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.0);
    }
}

/// Block and balloon numbers of VM `id`, or `None` when its QMP link is
/// gone, busy with a concurrent scrape's queries, or does not answer within
/// `budget`. The queries are monitoring reads: their expiry leaves the QMP
/// link (and so the VM's state) alone.
async fn query_qmp(id: Uuid, qmp: Option<QmpClient>, budget: Duration) -> Option<QmpStats> {
    let qmp = qmp.filter(|q| !q.is_closed())?;
    let _claim = InFlight::claim(id)?;
    let (blocks, balloon) = tokio::join!(
        qmp.query_raw("query-blockstats", None, budget),
        qmp.query_raw("query-balloon", None, budget),
    );
    // query-balloon fails on a VM without a balloon; that is no outage.
    Some(QmpStats {
        disks: parse_blockstats(&blocks.ok()?),
        balloon_bytes: balloon
            .ok()
            .and_then(|b| b.get("actual").and_then(Value::as_u64)),
    })
}

/// The disks in a `query-blockstats` reply. vmlet's disks are `-device
/// …,id=NAME-dev` on the throttle node `NAME-io`; QEMU reports each device
/// once, with `qdev` `/machine/peripheral/NAME-dev[/virtio-backend]` and
/// the device's (guest-side) counters.
fn parse_blockstats(reply: &Value) -> Vec<BlockStats> {
    let mut seen = BTreeSet::new();
    reply
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let disk = disk_name(entry)?;
            let stats = entry.get("stats")?;
            let n = |key: &str| stats.get(key).and_then(Value::as_u64).unwrap_or(0);
            Some(BlockStats {
                disk,
                read_bytes: n("rd_bytes"),
                write_bytes: n("wr_bytes"),
                read_ops: n("rd_operations"),
                write_ops: n("wr_operations"),
            })
        })
        .filter(|b| seen.insert(b.disk.clone()))
        .collect()
}

fn disk_name(entry: &Value) -> Option<String> {
    let from_qdev = entry
        .get("qdev")
        .and_then(Value::as_str)
        .and_then(|q| q.strip_prefix("/machine/peripheral/"))
        .and_then(|rest| rest.split('/').next())
        .and_then(|id| id.strip_suffix("-dev"));
    let from_node = || {
        entry
            .get("node-name")
            .and_then(Value::as_str)
            .and_then(|n| n.strip_suffix("-io"))
    };
    from_qdev
        .or_else(from_node)
        .filter(|name| !name.is_empty())
        .map(str::to_string)
}

// ---- /proc ---------------------------------------------------------------------

fn read_host(
    t: &Target,
    net: &HashMap<String, (u64, u64)>,
    ticks: f64,
    cgroup: CgroupStats,
) -> HostStats {
    HostStats {
        vcpus: vcpu_seconds(t.pid, ticks),
        cgroup,
        rss_bytes: u32::try_from(t.pid)
            .ok()
            .and_then(crate::node::rss_kib)
            .map(|kib| kib * 1024),
        nics: t
            .nics
            .iter()
            .filter_map(|(mac, tap)| {
                let (tap_rx, tap_tx) = net.get(tap)?;
                Some(NicStats {
                    nic: if mac.is_empty() {
                        tap.clone()
                    } else {
                        mac.clone()
                    },
                    rx_bytes: *tap_tx,
                    tx_bytes: *tap_rx,
                })
            })
            .collect(),
    }
}

/// Clock ticks per second (`/proc` CPU times count these).
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU seconds of each vCPU thread of process `pid`, in vCPU order.
fn vcpu_seconds(pid: i32, ticks: f64) -> Vec<(String, f64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let dir = task.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Some(vcpu) = vcpu_of_thread(comm.trim_end()) else {
            continue;
        };
        let Some(cpu) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|stat| cpu_ticks(&stat))
        else {
            continue;
        };
        out.push((vcpu, cpu as f64 / ticks));
    }
    out.sort_by(|a, b| (a.0.len(), &a.0).cmp(&(b.0.len(), &b.0)));
    out
}

/// The vCPU a QEMU thread runs, from its name: `CPU 3/KVM` → `3`; with one
/// thread for all vCPUs (single-threaded TCG), `ALL CPUs/TCG` → `all`.
fn vcpu_of_thread(comm: &str) -> Option<String> {
    if comm.starts_with("ALL CPUs/") {
        return Some("all".to_string());
    }
    let (index, _accel) = comm.strip_prefix("CPU ")?.split_once('/')?;
    index.parse::<u32>().ok().map(|i| i.to_string())
}

/// utime + stime of a `/proc/PID/task/TID/stat` line, in clock ticks.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The name (field 2) may hold spaces and parentheses: count from the
    // last `)`. Then field 3 is index 0, utime (14) 11, stime (15) 12.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Interface → (rx_bytes, tx_bytes) from `/proc/self/net/dev`: the network
/// namespace vmlet (and so its taps) lives in.
fn read_net_dev() -> HashMap<String, (u64, u64)> {
    std::fs::read_to_string("/proc/self/net/dev")
        .map(|text| parse_net_dev(&text))
        .unwrap_or_default()
}

fn parse_net_dev(text: &str) -> HashMap<String, (u64, u64)> {
    text.lines()
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let fields: Vec<u64> = counters
                .split_whitespace()
                .map(|f| f.parse().ok())
                .collect::<Option<_>>()?;
            Some((name.trim().to_string(), (*fields.first()?, *fields.get(8)?)))
        })
        .collect()
}

#[cfg(test)]
#[path = "scrape_tests.rs"]
mod tests;
