//! `GET /metrics` through a real daemon and test guests under TCG: the
//! exposition parses with a strict Prometheus text-format parser, has every
//! family with HELP and TYPE, and has sane values for a running guest (vCPU
//! time grows, the guest's disk reads and NIC traffic show up, the balloon
//! is the VM's memory, its cgroup's figures match its `resources`); and a
//! SIGSTOPped QEMU neither hangs the scrape nor has its VM changed by it.

mod common;

use std::time::{Duration, Instant};

use common::api::{create_vm, expect, force_delete_vm, id_of, uuid_of};
use common::daemon::{guest_spec_json, unique_name, wait_until, Daemon};
use common::netns::NetNs;
use common::{wait_for_line, BOOT_TIMEOUT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{MetricsExposition, PrometheusType, PrometheusValue};
use serde_json::{json, Value};
use vmlet::client::Method;

type Exposition = MetricsExposition<PrometheusType, PrometheusValue>;

const MIB: f64 = 1024.0 * 1024.0;

/// Every family `/metrics` must have, with its type.
const FAMILIES: &[(&str, PrometheusType)] = &[
    ("vmlet_vms", PrometheusType::Gauge),
    ("vmlet_vm_state", PrometheusType::Gauge),
    ("vmlet_vm_metrics_up", PrometheusType::Gauge),
    ("vmlet_vm_vcpu_seconds_total", PrometheusType::Counter),
    ("vmlet_vm_memory_rss_bytes", PrometheusType::Gauge),
    ("vmlet_vm_block_read_bytes_total", PrometheusType::Counter),
    ("vmlet_vm_block_write_bytes_total", PrometheusType::Counter),
    ("vmlet_vm_block_read_ops_total", PrometheusType::Counter),
    ("vmlet_vm_block_write_ops_total", PrometheusType::Counter),
    ("vmlet_vm_nic_rx_bytes_total", PrometheusType::Counter),
    ("vmlet_vm_nic_tx_bytes_total", PrometheusType::Counter),
    ("vmlet_vm_balloon_actual_bytes", PrometheusType::Gauge),
    (
        "vmlet_vm_cgroup_cpu_usage_seconds_total",
        PrometheusType::Counter,
    ),
    ("vmlet_vm_cgroup_cpu_periods_total", PrometheusType::Counter),
    (
        "vmlet_vm_cgroup_cpu_throttled_periods_total",
        PrometheusType::Counter,
    ),
    (
        "vmlet_vm_cgroup_cpu_throttled_seconds_total",
        PrometheusType::Counter,
    ),
    ("vmlet_vm_cgroup_memory_bytes", PrometheusType::Gauge),
    ("vmlet_vm_cgroup_memory_limit_bytes", PrometheusType::Gauge),
    ("vmlet_vm_cgroup_tasks", PrometheusType::Gauge),
    (
        "vmlet_api_request_duration_seconds",
        PrometheusType::Histogram,
    ),
    (
        "vmlet_qmp_command_duration_seconds",
        PrometheusType::Histogram,
    ),
    ("vmlet_qmp_timeouts_total", PrometheusType::Counter),
];

/// How long a scrape may take before the test calls it hung (a healthy one
/// takes milliseconds; a hung QEMU may cost it two seconds).
const SCRAPE_LIMIT: Duration = Duration::from_secs(60);

// ---- helpers -------------------------------------------------------------------

/// `GET /metrics`: checks status and content type, parses the text (a
/// parse error fails the test) and checks every family's HELP and TYPE.
async fn scrape(d: &Daemon) -> (String, Exposition) {
    let response = tokio::time::timeout(
        SCRAPE_LIMIT,
        d.client.request(Method::GET, "/metrics", None),
    )
    .await
    .expect("GET /metrics hung")
    .expect("GET /metrics");
    let text = response.text();
    assert_eq!(response.status, 200, "{text}");
    assert_eq!(
        response.content_type(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let parsed =
        parse_prometheus(&text).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"));
    for (name, kind) in FAMILIES {
        let family = parsed
            .families
            .get(*name)
            .unwrap_or_else(|| panic!("no family {name} in:\n{text}"));
        assert_eq!(family.family_type, *kind, "TYPE of {name}");
        assert!(!family.help.trim().is_empty(), "no HELP for {name}");
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "no TYPE line for {name}"
        );
    }
    (text, parsed)
}

/// The samples of `family` whose labels include every pair of `labels`,
/// as (labels, value); a histogram's value is its count.
fn samples(
    e: &Exposition,
    family: &str,
    labels: &[(&str, &str)],
) -> Vec<(Vec<(String, String)>, f64)> {
    let Some(family) = e.families.get(family) else {
        return vec![];
    };
    family
        .iter_samples()
        .filter_map(|s| {
            let set = s.get_labelset().ok()?;
            if !labels
                .iter()
                .all(|(k, v)| set.get_label_value(k) == Some(*v))
            {
                return None;
            }
            let value = match &s.value {
                PrometheusValue::Counter(c) => c.value.as_f64(),
                PrometheusValue::Gauge(g) | PrometheusValue::Unknown(g) => g.as_f64(),
                PrometheusValue::Histogram(h) => h.count? as f64,
                PrometheusValue::Summary(s) => s.count? as f64,
            };
            let pairs = set.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            Some((pairs, value))
        })
        .collect()
}

/// The one sample of `family` with `labels`.
fn value(e: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
    let found = samples(e, family, labels);
    assert_eq!(
        found.len(),
        1,
        "want one {family} sample with {labels:?}, got {found:?}"
    );
    found[0].1
}

/// The sum of `family` over every sample with `labels` (e.g. all vCPUs).
fn sum(e: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
    samples(e, family, labels).iter().map(|(_, v)| v).sum()
}

/// Creates the VM and starts it; returns it (running).
async fn create_and_start(d: &Daemon, spec: &Value) -> Value {
    let vm = create_vm(d, spec).await;
    let id = id_of(&vm);
    let vm = expect(d, Method::POST, &format!("/v1/vms/{id}/start"), None, 200).await;
    assert_eq!(vm["state"], "running", "{vm}");
    vm
}

/// Why the daemon gives its VMs no cgroup on this host, if it does not:
/// not root, no usable hierarchy, or the daemon said it found none.
fn no_cgroups_because(d: &Daemon) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("cgroups need a root daemon".into());
    }
    if let Err(e) = vmlet::confine::cgroup::Hierarchy::detect() {
        return Some(format!("no usable cgroup hierarchy: {e}"));
    }
    let log = d.log_text();
    log.lines()
        .find(|line| line.contains("no cgroup hierarchy"))
        .map(|line| format!("the daemon found no cgroup hierarchy: {line}"))
}

/// SIGCONTs a process on drop, so a failed test leaves no stopped QEMU.
struct Stopped(i32);

impl Stopped {
    fn stop(pid: i32) -> Stopped {
        kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

// ---- tests ---------------------------------------------------------------------

/// One guest with a disk and a NIC on a bridge (inside a network namespace):
/// every family is there, and the guest's series make sense.
#[tokio::test]
async fn metrics_of_a_running_guest() {
    let ns = NetNs::new();
    let d = Daemon::start_in_netns(&ns, &[]).await;
    expect(
        &d,
        Method::POST,
        "/v1/networks",
        Some(&json!({"name": "lan"})),
        201,
    )
    .await;
    ns.ip(&["addr", "add", "10.78.0.1/24", "dev", "vmbr-lan"]);
    let mac = "52:54:00:78:00:02";
    let name = unique_name("metrics");
    let mut spec = guest_spec_json(&name, "guest.ip=10.78.0.2/24 guest.ping=10.78.0.1");
    spec["disks"] = json!([{"name": "data", "size_mib": 16}]);
    spec["nics"] = json!([{"network": "lan", "mac": mac}]);
    let vm = create_and_start(&d, &spec).await;
    let id = id_of(&vm);
    let log = d.serial_log(uuid_of(&vm));
    wait_for_line(&log, "GUEST-READY", BOOT_TIMEOUT).await;
    let ping = wait_for_line(&log, "GUEST-PING-", BOOT_TIMEOUT).await;
    assert!(ping.contains("GUEST-PING-OK 10.78.0.1"), "{ping}");
    expect(&d, Method::GET, &format!("/v1/vms/{id}"), None, 200).await;
    expect(&d, Method::GET, "/no/such/route", None, 404).await;

    let (text, first) = scrape(&d).await;
    let vm_labels = [("id", id.as_str()), ("name", name.as_str())];
    let with = |extra: (&'static str, &'static str)| {
        let mut labels = vm_labels.to_vec();
        labels.push(extra);
        labels
    };

    // Host: every state, this VM running.
    assert_eq!(samples(&first, "vmlet_vms", &[]).len(), 7, "{text}");
    assert_eq!(value(&first, "vmlet_vms", &[("state", "running")]), 1.0);
    assert_eq!(value(&first, "vmlet_vms", &[("state", "crashed")]), 0.0);

    // The VM's own series.
    assert_eq!(value(&first, "vmlet_vm_metrics_up", &vm_labels), 1.0);
    let rss = value(&first, "vmlet_vm_memory_rss_bytes", &vm_labels);
    assert!(rss > 10.0 * MIB, "RSS {rss}");
    assert_eq!(
        value(&first, "vmlet_vm_balloon_actual_bytes", &vm_labels),
        256.0 * MIB
    );
    let vcpus = samples(&first, "vmlet_vm_vcpu_seconds_total", &vm_labels);
    assert_eq!(vcpus.len(), 1, "one vCPU thread: {vcpus:?}");
    let vcpu0 = value(&first, "vmlet_vm_vcpu_seconds_total", &with(("vcpu", "0")));
    assert!(vcpu0 > 0.0, "vCPU time {vcpu0}");
    let read = value(
        &first,
        "vmlet_vm_block_read_bytes_total",
        &with(("disk", "data")),
    );
    assert!(read > 0.0, "the guest read nothing of its disk:\n{text}");
    assert!(
        value(
            &first,
            "vmlet_vm_block_read_ops_total",
            &with(("disk", "data"))
        ) > 0.0
    );
    // The guest only read its disk; the write series exists all the same.
    value(
        &first,
        "vmlet_vm_block_write_bytes_total",
        &with(("disk", "data")),
    );
    value(
        &first,
        "vmlet_vm_block_write_ops_total",
        &with(("disk", "data")),
    );
    // The guest pinged the bridge and got answers.
    let nic = with(("nic", mac));
    assert!(
        value(&first, "vmlet_vm_nic_tx_bytes_total", &nic) > 0.0,
        "{text}"
    );
    assert!(
        value(&first, "vmlet_vm_nic_rx_bytes_total", &nic) > 0.0,
        "{text}"
    );

    // Daemon: API latency by route template, never by raw path.
    let show = [
        ("route", "/v1/vms/{id}"),
        ("method", "GET"),
        ("status", "200"),
    ];
    assert!(value(&first, "vmlet_api_request_duration_seconds", &show) >= 1.0);
    let start = [("route", "/v1/vms/{id}/start"), ("method", "POST")];
    assert!(value(&first, "vmlet_api_request_duration_seconds", &start) >= 1.0);
    let unmatched = [("route", "unmatched"), ("status", "404")];
    assert!(value(&first, "vmlet_api_request_duration_seconds", &unmatched) >= 1.0);
    assert!(!text.contains(&format!("route=\"/v1/vms/{id}")), "{text}");
    // QMP latency by command: the start's `cont` and this scrape's queries.
    for command in ["cont", "query-blockstats"] {
        let count = value(
            &first,
            "vmlet_qmp_command_duration_seconds",
            &[("command", command)],
        );
        assert!(count >= 1.0, "{command}: {count}");
    }
    assert!(samples(&first, "vmlet_qmp_timeouts_total", &[]).is_empty());

    // Counters grow: the guest keeps running (and pinging is over, but its
    // timer ticks cost CPU under TCG).
    let grown = wait_until("vCPU time to grow", Duration::from_secs(60), || async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_, later) = scrape(&d).await;
        let now = value(&later, "vmlet_vm_vcpu_seconds_total", &with(("vcpu", "0")));
        (now > vcpu0).then_some(later)
    })
    .await;
    assert!(
        value(
            &grown,
            "vmlet_vm_block_read_bytes_total",
            &with(("disk", "data"))
        ) >= read,
        "block bytes went down"
    );
    // The first scrape shows up in the second one.
    let scrapes = [("route", "/metrics"), ("method", "GET"), ("status", "200")];
    assert!(value(&grown, "vmlet_api_request_duration_seconds", &scrapes) >= 1.0);

    force_delete_vm(&d, &id).await;
    let (_, after) = scrape(&d).await;
    assert!(samples(&after, "vmlet_vm_metrics_up", &vm_labels).is_empty());
    assert_eq!(value(&after, "vmlet_vms", &[("state", "running")]), 0.0);
}

/// The cgroup series of a running guest (a daemon outside any network
/// namespace: `ip netns exec` mounts a sysfs of its own, without the cgroup
/// file systems): present, with the limit its `resources` ask for, growing
/// CPU usage, and gone with the VM.
#[tokio::test]
async fn cgroup_series_of_a_running_guest() {
    let d = Daemon::start().await;
    let name = unique_name("cgmetrics");
    let mut spec = guest_spec_json(&name, "");
    // A quota (one core, the most a one-vCPU VM may have) makes the cgroup
    // count its periods; the memory limit is 256 + 768 MiB.
    spec["resources"] = json!({"cpu_quota_percent": 100, "memory_overhead_mib": 768});
    let vm = create_and_start(&d, &spec).await;
    let id = id_of(&vm);
    wait_for_line(&d.serial_log(uuid_of(&vm)), "GUEST-READY", BOOT_TIMEOUT).await;
    let vm_labels = [("id", id.as_str()), ("name", name.as_str())];
    let (text, first) = scrape(&d).await;
    let cgroup_families: Vec<&str> = FAMILIES
        .iter()
        .map(|(family, _)| *family)
        .filter(|family| family.contains("_cgroup_"))
        .collect();
    if let Some(reason) = no_cgroups_because(&d) {
        common::skip("cgroup_series_of_a_running_guest", reason);
        // Without a cgroup, the families are there but have no sample.
        for family in &cgroup_families {
            assert!(
                samples(&first, family, &vm_labels).is_empty(),
                "{family} without a cgroup:\n{text}"
            );
        }
        force_delete_vm(&d, &id).await;
        return;
    }

    let usage = value(
        &first,
        "vmlet_vm_cgroup_cpu_usage_seconds_total",
        &vm_labels,
    );
    assert!(usage > 0.0, "cgroup CPU usage {usage}");
    let memory = value(&first, "vmlet_vm_cgroup_memory_bytes", &vm_labels);
    let limit = value(&first, "vmlet_vm_cgroup_memory_limit_bytes", &vm_labels);
    assert_eq!(limit, (256.0 + 768.0) * MIB, "{text}");
    assert!(
        memory > MIB && memory <= limit,
        "cgroup memory {memory} (limit {limit})"
    );
    // QEMU's main, vCPU and RCU threads at least; pids_max is 1024.
    let tasks = value(&first, "vmlet_vm_cgroup_tasks", &vm_labels);
    assert!((2.0..=1024.0).contains(&tasks), "tasks {tasks}");
    let periods = value(&first, "vmlet_vm_cgroup_cpu_periods_total", &vm_labels);
    assert!(periods > 0.0, "a quota is set, yet no periods:\n{text}");
    let throttled = value(
        &first,
        "vmlet_vm_cgroup_cpu_throttled_periods_total",
        &vm_labels,
    );
    assert!(throttled <= periods, "{throttled} of {periods} throttled");
    let throttled_s = value(
        &first,
        "vmlet_vm_cgroup_cpu_throttled_seconds_total",
        &vm_labels,
    );
    assert!(
        throttled_s >= 0.0 && throttled_s <= usage,
        "throttled {throttled_s} s of {usage} s"
    );

    // CPU usage grows: the guest's timer ticks cost CPU under TCG.
    wait_until(
        "cgroup CPU usage to grow",
        Duration::from_secs(60),
        || async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (_, later) = scrape(&d).await;
            let now = value(
                &later,
                "vmlet_vm_cgroup_cpu_usage_seconds_total",
                &vm_labels,
            );
            (now > usage).then_some(())
        },
    )
    .await;

    force_delete_vm(&d, &id).await;
    let (text, after) = scrape(&d).await;
    for family in &cgroup_families {
        assert!(
            samples(&after, family, &vm_labels).is_empty(),
            "{family} of a deleted VM:\n{text}"
        );
    }
}

/// A SIGSTOPped QEMU: the scrape still answers, without waiting for QMP's
/// deadline, with the hung VM's host-side series (`metrics_up` 0) and the
/// healthy VM's full set; a scrape while the first one's queries are still
/// unanswered answers too.
#[tokio::test]
async fn a_hung_qemu_does_not_hang_the_scrape() {
    let d = Daemon::start().await;
    let mut spec = guest_spec_json(&unique_name("hung"), "");
    spec["disks"] = json!([{"name": "data", "size_mib": 16}]);
    let hung = create_and_start(&d, &spec).await;
    let healthy = create_and_start(&d, &guest_spec_json(&unique_name("healthy"), "")).await;
    for vm in [&hung, &healthy] {
        wait_for_line(&d.serial_log(uuid_of(vm)), "GUEST-READY", BOOT_TIMEOUT).await;
    }
    let hung_id = id_of(&hung);
    let healthy_id = id_of(&healthy);
    let pid = hung["pid"].as_i64().expect("pid of a running VM") as i32;

    let stopped = Stopped::stop(pid);
    for round in 0..2 {
        let sent = Instant::now();
        let (text, scraped) = scrape(&d).await;
        let took = sent.elapsed();
        // The QMP deadline (10 s) never passed inside a scrape: no QMP
        // command has timed out yet, so the scrape did not wait for one.
        assert!(
            samples(&scraped, "vmlet_qmp_timeouts_total", &[]).is_empty(),
            "round {round} took {took:?}:\n{text}"
        );
        let hung_labels = [("id", hung_id.as_str())];
        assert_eq!(
            value(&scraped, "vmlet_vm_metrics_up", &hung_labels),
            0.0,
            "{text}"
        );
        // What needs no QMP is still there.
        assert!(value(&scraped, "vmlet_vm_memory_rss_bytes", &hung_labels) > 0.0);
        assert_eq!(
            samples(&scraped, "vmlet_vm_vcpu_seconds_total", &hung_labels).len(),
            1
        );
        assert!(samples(&scraped, "vmlet_vm_block_read_bytes_total", &hung_labels).is_empty());
        assert!(samples(&scraped, "vmlet_vm_balloon_actual_bytes", &hung_labels).is_empty());
        // The other VM is unaffected.
        let healthy_labels = [("id", healthy_id.as_str())];
        assert_eq!(value(&scraped, "vmlet_vm_metrics_up", &healthy_labels), 1.0);
        assert_eq!(
            value(&scraped, "vmlet_vm_balloon_actual_bytes", &healthy_labels),
            256.0 * MIB
        );
        assert!(sum(&scraped, "vmlet_vms", &[]) >= 2.0);
    }

    drop(stopped);
    force_delete_vm(&d, &hung_id).await;
    force_delete_vm(&d, &healthy_id).await;
}

/// A scrape is a read: scraping a VM whose QEMU is SIGSTOPped answers
/// within a few seconds and leaves the VM's state and QMP link alone, even
/// when QEMU stays stopped past QMP's command deadline (10 s); after
/// SIGCONT the VM still obeys (pause, resume, stop).
#[tokio::test]
async fn scraping_a_stopped_qemu_does_not_change_its_vm() {
    let d = Daemon::start().await;
    let vm = create_and_start(&d, &guest_spec_json(&unique_name("sigstop"), "")).await;
    wait_for_line(&d.serial_log(uuid_of(&vm)), "GUEST-READY", BOOT_TIMEOUT).await;
    let id = id_of(&vm);
    let pid = vm["pid"].as_i64().expect("pid of a running VM") as i32;

    let stopped = Stopped::stop(pid);
    let sent = Instant::now();
    let (text, scraped) = scrape(&d).await;
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(5), "the scrape took {took:?}");
    assert_eq!(
        value(&scraped, "vmlet_vm_metrics_up", &[("id", id.as_str())]),
        0.0,
        "{text}"
    );
    // Past QMP's command deadline: an expired scrape query is no lost link.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (text, scraped) = scrape(&d).await;
    assert!(
        samples(&scraped, "vmlet_qmp_timeouts_total", &[]).is_empty(),
        "{text}"
    );
    let shown = expect(&d, Method::GET, &format!("/v1/vms/{id}"), None, 200).await;
    assert_eq!(shown["state"], "running", "{shown}");
    assert!(shown["error"].is_null(), "{shown}");
    assert!(
        !d.log_text().contains("QMP connection closed"),
        "{}",
        d.log_text()
    );

    drop(stopped);
    let (text, scraped) = wait_until("QMP answers again", Duration::from_secs(30), || async {
        let (text, scraped) = scrape(&d).await;
        (value(&scraped, "vmlet_vm_metrics_up", &[("id", id.as_str())]) == 1.0)
            .then_some((text, scraped))
    })
    .await;
    assert_eq!(
        value(
            &scraped,
            "vmlet_vm_balloon_actual_bytes",
            &[("id", id.as_str())]
        ),
        256.0 * MIB,
        "{text}"
    );
    for (action, state) in [
        ("pause", "paused"),
        ("resume", "running"),
        ("stop", "stopped"),
    ] {
        let body = (action == "stop").then(|| json!({"force": true}));
        let vm = expect(
            &d,
            Method::POST,
            &format!("/v1/vms/{id}/{action}"),
            body.as_ref(),
            200,
        )
        .await;
        assert_eq!(vm["state"], state, "{action}: {vm}");
    }
    force_delete_vm(&d, &id).await;
}

/// Every VM has one `vmlet_vm_state` series valued 1 with its state:
/// stopped, running and crashed alike; histogram sums print without float
/// noise.
#[tokio::test]
async fn every_vm_has_a_state_series_and_sums_have_no_float_noise() {
    let d = Daemon::start().await;
    let stopped = unique_name("st-stopped");
    let running = unique_name("st-running");
    let crashed = unique_name("st-crashed");
    let stopped_id = id_of(&create_vm(&d, &guest_spec_json(&stopped, "")).await);
    let running_id = id_of(&create_and_start(&d, &guest_spec_json(&running, "")).await);
    let doomed = create_and_start(&d, &guest_spec_json(&crashed, "")).await;
    let crashed_id = id_of(&doomed);
    let pid = doomed["pid"].as_i64().expect("a running VM has a pid") as i32;
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL QEMU");
    wait_until(
        "the killed VM to be crashed",
        Duration::from_secs(60),
        || async {
            let vm = d.client.get_vm(&crashed_id).await.ok()?;
            (vm.state.get() == vmlet::vm::state::PowerState::Crashed).then_some(())
        },
    )
    .await;

    let (text, e) = scrape(&d).await;
    for (id, name, state) in [
        (&stopped_id, &stopped, "stopped"),
        (&running_id, &running, "running"),
        (&crashed_id, &crashed, "crashed"),
    ] {
        let series = samples(&e, "vmlet_vm_state", &[("id", id.as_str())]);
        assert_eq!(series.len(), 1, "one series for {name}: {text}");
        let (labels, value) = &series[0];
        assert_eq!(*value, 1.0, "{text}");
        let label = |k: &str| {
            labels
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(label("name"), Some(name.as_str()), "{text}");
        assert_eq!(label("state"), Some(state), "{text}");
    }
    assert_eq!(samples(&e, "vmlet_vm_state", &[]).len(), 3, "{text}");
    // The crashed VM has no other per-VM series: this one is how it shows.
    assert!(
        samples(&e, "vmlet_vm_metrics_up", &[("id", crashed_id.as_str())]).is_empty(),
        "{text}"
    );

    // Sums are whole nanoseconds: never more than 9 decimals.
    let sums: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("_seconds_sum"))
        .collect();
    assert!(!sums.is_empty(), "no histogram sums: {text}");
    for line in sums {
        let value = line.rsplit(' ').next().unwrap();
        let decimals = value.split_once('.').map_or(0, |(_, f)| f.len());
        assert!(decimals <= 9, "float noise in {line}");
    }
    force_delete_vm(&d, &running_id).await;
    force_delete_vm(&d, &crashed_id).await;
}
