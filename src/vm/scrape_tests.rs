//! Unit tests of `scrape.rs`, in a file of their own so that the code
//! stays short enough to read in one go.

use super::*;
use serde_json::json;

#[test]
fn every_vm_has_a_state_series_valued_1() {
    let states = vec![
        ("a".to_string(), "web".to_string(), PowerState::Running),
        ("b".to_string(), "db \"x\"".to_string(), PowerState::Crashed),
        ("c".to_string(), "old".to_string(), PowerState::Stopped),
    ];
    let mut e = Encoder::new();
    encode_states(&mut e, &states);
    let text = e.finish();
    assert!(
        text.contains("vmlet_vm_state{id=\"a\",name=\"web\",state=\"running\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("vmlet_vm_state{id=\"b\",name=\"db \\\"x\\\"\",state=\"crashed\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("vmlet_vm_state{id=\"c\",name=\"old\",state=\"stopped\"} 1\n"),
        "{text}"
    );
    assert_eq!(text.matches("vmlet_vm_state{").count(), 3, "{text}");
}

#[test]
fn vcpu_threads_are_found_by_name() {
    assert_eq!(vcpu_of_thread("CPU 0/TCG").as_deref(), Some("0"));
    assert_eq!(vcpu_of_thread("CPU 12/KVM").as_deref(), Some("12"));
    assert_eq!(vcpu_of_thread("ALL CPUs/TCG").as_deref(), Some("all"));
    assert_eq!(vcpu_of_thread("qemu-system-x86"), None);
    assert_eq!(vcpu_of_thread("CPU x/KVM"), None);
    assert_eq!(vcpu_of_thread("call_rcu"), None);
}

#[test]
fn cpu_ticks_count_from_the_last_parenthesis() {
    let stat = "4242 (CPU 0/TCG) S 1 4240 4240 0 -1 4194368 5 0 0 0 150 25 0 0 20 0 3 0";
    assert_eq!(cpu_ticks(stat), Some(175));
    let odd = "7 (a) b) R 1 7 7 0 -1 0 0 0 0 0 3 4 0 0";
    assert_eq!(cpu_ticks(odd), Some(7));
    assert_eq!(cpu_ticks("garbage"), None);
}

#[test]
fn net_dev_gives_rx_and_tx_bytes() {
    let text = "Inter-|   Receive                                                |  Transmit\n \
        face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
        lo:    1234      10    0    0    0     0          0         0     1234      10    0    0    0     0       0          0\n\
        vmt525400770002: 100 2 0 0 0 0 0 0 900 7 0 0 0 0 0 0\n";
    let net = parse_net_dev(text);
    assert_eq!(net["lo"], (1234, 1234));
    assert_eq!(net["vmt525400770002"], (100, 900));
    assert_eq!(net.len(), 2);
}

#[test]
fn blockstats_are_named_by_device_id() {
    let reply = json!([
        {"device": "", "node-name": "disk0-io",
         "qdev": "/machine/peripheral/disk0-dev/virtio-backend",
         "stats": {"rd_bytes": 4096, "wr_bytes": 512, "rd_operations": 3, "wr_operations": 1}},
        {"device": "", "node-name": "data-io", "qdev": "/machine/peripheral/data-dev",
         "stats": {"rd_bytes": 1, "wr_bytes": 2, "rd_operations": 3, "wr_operations": 4}},
        {"device": "", "node-name": "seed-io", "stats": {"rd_bytes": 9}},
        {"device": "", "node-name": "pflash0", "stats": {"rd_bytes": 9}},
        {"device": "", "node-name": "disk0-io",
         "qdev": "/machine/peripheral/disk0-dev/virtio-backend", "stats": {}},
    ]);
    let disks = parse_blockstats(&reply);
    let names: Vec<&str> = disks.iter().map(|d| d.disk.as_str()).collect();
    assert_eq!(names, ["disk0", "data", "seed"]);
    assert_eq!(
        disks[0],
        BlockStats {
            disk: "disk0".into(),
            read_bytes: 4096,
            write_bytes: 512,
            read_ops: 3,
            write_ops: 1,
        }
    );
    assert_eq!(disks[2].write_ops, 0);
    assert!(parse_blockstats(&json!({"not": "a list"})).is_empty());
}

#[test]
fn cgroup_figures_become_series_and_missing_ones_are_left_out() {
    let vm = |id: &str, cgroup: CgroupStats| VmStats {
        id: id.into(),
        name: format!("vm-{id}"),
        host: HostStats {
            cgroup,
            ..HostStats::default()
        },
        qmp: None,
    };
    let vms = [
        vm(
            "a",
            CgroupStats {
                cpu_usage_ns: Some(2_500_000_000),
                cpu_periods: Some(40),
                cpu_throttled_periods: Some(7),
                cpu_throttled_ns: Some(1_000),
                memory_current_bytes: Some(123 << 20),
                memory_max_bytes: Some(1280 << 20),
                pids_current: Some(9),
            },
        ),
        // A host without memory limits and pids controller, say.
        vm(
            "b",
            CgroupStats {
                cpu_usage_ns: Some(1),
                ..CgroupStats::default()
            },
        ),
        vm("c", CgroupStats::default()),
    ];
    let mut e = Encoder::new();
    encode_cgroups(&mut e, &vms);
    let text = e.finish();
    let parsed = openmetrics_parser::prometheus::parse_prometheus(&text)
        .unwrap_or_else(|err| panic!("{err}: {text}"));
    let get = |family: &str, id: &str| -> Option<f64> {
        let samples: Vec<f64> = parsed.families[family]
            .iter_samples()
            .filter(|s| s.get_labelset().unwrap().get_label_value("id") == Some(id))
            .map(|s| match &s.value {
                openmetrics_parser::PrometheusValue::Counter(c) => c.value.as_f64(),
                openmetrics_parser::PrometheusValue::Gauge(g) => g.as_f64(),
                other => panic!("{family}: {other:?}"),
            })
            .collect();
        assert!(samples.len() <= 1, "{family} {id}: {text}");
        samples.first().copied()
    };
    let name = "vmlet_vm_cgroup_cpu_usage_seconds_total";
    assert_eq!(get(name, "a"), Some(2.5));
    assert_eq!(get(name, "b"), Some(1e-9));
    assert_eq!(get(name, "c"), None);
    let throttled = "vmlet_vm_cgroup_cpu_throttled_seconds_total";
    assert_eq!(get(throttled, "a"), Some(1e-6));
    assert_eq!(get("vmlet_vm_cgroup_cpu_periods_total", "a"), Some(40.0));
    assert_eq!(
        get("vmlet_vm_cgroup_cpu_throttled_periods_total", "a"),
        Some(7.0)
    );
    assert_eq!(
        get("vmlet_vm_cgroup_memory_bytes", "a"),
        Some((123u64 << 20) as f64)
    );
    assert_eq!(
        get("vmlet_vm_cgroup_memory_limit_bytes", "a"),
        Some((1280u64 << 20) as f64)
    );
    assert_eq!(get("vmlet_vm_cgroup_tasks", "a"), Some(9.0));
    for family in [
        throttled,
        "vmlet_vm_cgroup_cpu_periods_total",
        "vmlet_vm_cgroup_cpu_throttled_periods_total",
        "vmlet_vm_cgroup_memory_bytes",
        "vmlet_vm_cgroup_memory_limit_bytes",
        "vmlet_vm_cgroup_tasks",
    ] {
        assert_eq!(get(family, "b"), None, "{family}");
        assert_eq!(get(family, "c"), None, "{family}");
    }
    assert!(
        text.contains("# TYPE vmlet_vm_cgroup_tasks gauge"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE vmlet_vm_cgroup_cpu_usage_seconds_total counter"),
        "{text}"
    );
}

#[test]
fn a_vm_has_one_claim_at_a_time() {
    let id = Uuid::new_v4();
    let first = InFlight::claim(id).expect("first claim");
    assert!(InFlight::claim(id).is_none());
    assert!(
        InFlight::claim(id).is_none(),
        "a refused claim released the first"
    );
    drop(first);
    assert!(InFlight::claim(id).is_some());
}

#[test]
fn this_process_has_no_vcpus_but_the_scrape_still_renders() {
    assert!(vcpu_seconds(std::process::id() as i32, clock_ticks()).is_empty());
    let text = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(render(&[], |_| None));
    let parsed = openmetrics_parser::prometheus::parse_prometheus(&text).unwrap();
    let vms = &parsed.families["vmlet_vms"];
    assert_eq!(vms.iter_samples().count(), PowerState::ALL.len());
    for family in [
        "vmlet_vm_vcpu_seconds_total",
        "vmlet_vm_block_read_bytes_total",
        "vmlet_vm_nic_tx_bytes_total",
        "vmlet_vm_balloon_actual_bytes",
        "vmlet_vm_cgroup_cpu_usage_seconds_total",
        "vmlet_vm_cgroup_tasks",
        "vmlet_api_request_duration_seconds",
        "vmlet_qmp_timeouts_total",
    ] {
        assert!(parsed.families.contains_key(family), "{family}: {text}");
    }
}
