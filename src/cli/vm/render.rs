//! How `vm list` and `vm show` render VMs (and the one-line form other
//! commands print).

use super::super::{columns, key_values, mib};
use super::{cache_str, disk_source_str, limits_str, nic_str};
use crate::spec::{Boot, CacheMode, DiskBus, Resources};
use crate::vm::Vm;

/// `vm list` as aligned columns.
pub fn render_vm_list(vms: &[Vm]) -> String {
    let header = [
        "ID", "NAME", "STATE", "TASK", "DESIRED", "VCPUS", "MEMORY", "PID",
    ];
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            vec![
                vm.id.to_string(),
                vm.name.clone(),
                vm.state.as_str().to_string(),
                task_str(vm),
                desired_str(vm).to_string(),
                vm.spec.vcpus.to_string(),
                mib(vm.spec.memory_mib),
                vm.pid.map_or("-".to_string(), |p| p.to_string()),
            ]
        })
        .collect();
    columns(&header, &rows)
}

/// `vm show` as `key: value` lines.
pub fn render_vm(vm: &Vm) -> String {
    let spec = &vm.spec;
    let mut lines: Vec<(String, String)> = vec![
        ("id".into(), vm.id.to_string()),
        ("name".into(), vm.name.clone()),
        ("state".into(), vm.state.as_str().into()),
        ("task".into(), task_str(vm)),
        ("desired".into(), desired_str(vm).into()),
        ("generation".into(), vm.generation.to_string()),
        (
            "pid".into(),
            vm.pid.map_or("-".to_string(), |p| p.to_string()),
        ),
    ];
    if let Some(error) = &vm.error {
        lines.push(("error".into(), error.clone()));
    }
    lines.push(("boots".into(), vm.boots.to_string()));
    if let Some(stop) = vm.last_stop {
        lines.push(("last stop".into(), stop.as_str().into()));
    }
    if let Some(since) = &vm.console_silent_since {
        lines.push((
            "hint".into(),
            format!("the serial console has printed nothing since {since}: the guest may hang, or print its console elsewhere (vmlet vm console {} --print-log --boot current)", vm.name),
        ));
    }
    if let Some(pending) = &vm.pending {
        lines.push((
            "pending".into(),
            format!("{} (at the next start)", pending.fields.join(", ")),
        ));
    }
    lines.push(("vcpus".into(), spec.vcpus.to_string()));
    lines.push(("memory".into(), mib(spec.memory_mib)));
    // The CPU the VM is pinned to (model and flags); before a pin, what
    // the spec asks for.
    let cpu = match (&vm.machine, &spec.cpu) {
        (Some(pin), _) => Some(pin.cpu.clone()),
        (None, Some(cpu)) => Some(crate::spec::cpu_value(
            cpu.model.as_deref().unwrap_or("(profile's)"),
            &cpu.features,
        )),
        (None, None) => None,
    };
    if let Some(cpu) = cpu {
        lines.push(("cpu".into(), cpu));
    }
    if let Some(t) = &spec.topology {
        lines.push((
            "topology".into(),
            format!(
                "{} sockets × {} cores × {} threads",
                t.sockets, t.cores, t.threads
            ),
        ));
    }
    for (i, node) in spec.numa.iter().enumerate() {
        lines.push((
            format!("numa {i}"),
            format!("cpus {}, {}", node.cpus, mib(node.memory_mib)),
        ));
    }
    if let Some(size) = spec.memory.hugepages {
        lines.push(("hugepages".into(), size.as_str().into()));
    }
    if !spec.resources.is_default() {
        lines.push(("resources".into(), resources_str(&spec.resources)));
    }
    lines.push(("profile".into(), spec.profile.clone()));
    lines.push(("boot".into(), boot_str(&spec.boot)));
    lines.push(("firmware".into(), spec.boot.firmware().as_str().into()));
    if let Some(tpm) = &spec.tpm {
        let version = serde_json::to_value(tpm.version)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let value = match vm.tpm_pid {
            Some(pid) => format!("{version} (swtpm pid {pid})"),
            None => version,
        };
        lines.push(("tpm".into(), value));
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        let mut flags = vec![];
        if disk.bus != DiskBus::VirtioBlk {
            flags.push("scsi".to_string());
        }
        if disk.cache != CacheMode::Writeback {
            flags.push(format!("cache {}", cache_str(disk.cache)));
        }
        if disk.read_only {
            flags.push("read-only".into());
        }
        if let Some(order) = disk.boot_order {
            flags.push(format!("boot {order}"));
        }
        if let Some(serial) = &disk.serial {
            flags.push(format!("serial {serial}"));
        }
        if !disk.limits.is_unlimited() {
            flags.push(limits_str(&disk.limits));
        }
        lines.push((
            format!("disk {}", disk.name_or_default(i)),
            if flags.is_empty() {
                disk_source_str(disk)
            } else {
                format!("{} ({})", disk_source_str(disk), flags.join(", "))
            },
        ));
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        lines.push((format!("nic {i}"), nic_str(nic)));
    }
    lines.push((
        "serial".into(),
        if spec.serial.enabled { "yes" } else { "no" }.into(),
    ));
    for channel in &spec.channels {
        lines.push(("channel".into(), channel.name.clone()));
    }
    lines.push((
        "agent".into(),
        if spec.guest_agent { "yes" } else { "no" }.into(),
    ));
    if let Some(guest) = &vm.guest {
        lines.extend(guest_lines(guest));
    }
    lines.push((
        "autostart".into(),
        if spec.autostart { "yes" } else { "no" }.into(),
    ));
    lines.push(("created".into(), vm.created_at.clone()));
    lines.push(("updated".into(), vm.updated_at.clone()));
    key_values(&lines)
}

/// What the guest agent told of the guest, as `vm show` lines. The
/// strings come from the guest: vmlet already dropped their control
/// characters.
fn guest_lines(guest: &crate::qemu::agent::GuestInfo) -> Vec<(String, String)> {
    let mut lines = vec![(
        "hostname".to_string(),
        guest.hostname.clone().unwrap_or_else(|| "-".into()),
    )];
    if let Some(os) = &guest.os {
        let name = os
            .pretty_name
            .clone()
            .or_else(|| os.name.clone())
            .or_else(|| os.id.clone())
            .unwrap_or_else(|| "-".into());
        let kernel = os
            .kernel_release
            .as_deref()
            .map_or(String::new(), |k| format!(" (kernel {k})"));
        lines.push(("guest os".into(), format!("{name}{kernel}")));
    }
    for iface in &guest.interfaces {
        // The name goes into the value: a long one must not widen the
        // key column.
        let mut value = format!("{} {}", iface.name, iface.mac.as_deref().unwrap_or("-"));
        for address in &iface.addresses {
            value.push(' ');
            value.push_str(address);
        }
        lines.push(("guest if".into(), value));
    }
    lines.push(("guest at".into(), guest.read_at.clone()));
    lines
}

/// `NAME state=… task=… gen=…`, with the error when there is one.
pub(in crate::cli) fn vm_line(vm: &Vm) -> String {
    let mut line = format!(
        "{} state={} task={} gen={}",
        vm.name,
        vm.state.as_str(),
        task_str(vm),
        vm.generation
    );
    if let Some(error) = &vm.error {
        line.push_str(&format!(" error={error:?}"));
    }
    line
}

fn task_str(vm: &Vm) -> String {
    vm.task.map_or("-", |t| t.as_str()).to_string()
}

fn desired_str(vm: &Vm) -> &'static str {
    use crate::vm::state::Desired;
    match vm.desired {
        Desired::Stopped => "stopped",
        Desired::Running => "running",
        Desired::Paused => "paused",
    }
}

/// The set fields of a spec's `resources`, as `key=value` pairs named like
/// the spec's fields (unset ones take the daemon's `[qemu]` defaults and
/// are left out).
fn resources_str(r: &Resources) -> String {
    let mut parts = Vec::new();
    if let Some(weight) = r.cpu_weight {
        parts.push(format!("cpu_weight={weight}"));
    }
    if let Some(quota) = r.cpu_quota_percent {
        parts.push(format!("cpu_quota={quota}%"));
    }
    if let Some(overhead) = r.memory_overhead_mib {
        parts.push(format!("memory_overhead={}", mib(overhead)));
    }
    if let Some(pids) = r.pids_max {
        parts.push(format!("pids_max={pids}"));
    }
    if let Some(weight) = r.io_weight {
        parts.push(format!("io_weight={weight}"));
    }
    if let Some(cpus) = &r.cpu_set {
        parts.push(format!("cpu_set={cpus}"));
    }
    if let Some(pins) = &r.vcpu_affinity {
        // One CPU list per vCPU, in vCPU order: `vcpu_affinity=2/3/4-5`.
        parts.push(format!("vcpu_affinity={}", pins.join("/")));
    }
    parts.join(" ")
}

fn boot_str(boot: &Boot) -> String {
    match boot {
        Boot::Kernel { kernel, .. } => format!("kernel {}", kernel.display()),
        Boot::Firmware { firmware } => format!("firmware {}", firmware.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::fixtures::{as_received, vm};
    use crate::spec::{DiskFormat, DiskSpec, IoLimits, NicModel, NicSpec};
    use crate::vm::state::{Desired, PowerState, Task};

    #[test]
    fn vm_list_is_aligned_columns() {
        let a = vm("web", 1);
        let mut b = vm("database-primary", 2);
        b.state = as_received(PowerState::Stopping);
        b.task = Some(Task::Stop);
        b.desired = Desired::Stopped;
        b.pid = Some(4242);
        b.spec.memory_mib = 4096;
        let text = render_vm_list(&[a, b]);
        let expected = "\
ID                                    NAME              STATE     TASK  DESIRED  VCPUS  MEMORY  PID
00000000-0000-0000-0000-000000000001  web               stopped   -     stopped  2      512MiB  -
00000000-0000-0000-0000-000000000002  database-primary  stopping  stop  stopped  2      4GiB    4242
";
        assert_eq!(text, expected);
        assert_eq!(
            render_vm_list(&[]),
            "ID  NAME  STATE  TASK  DESIRED  VCPUS  MEMORY  PID\n"
        );
    }

    #[test]
    fn vm_show_lists_what_the_guest_agent_told() {
        use crate::qemu::agent::{GuestInfo, GuestInterface, GuestOs};
        let mut v = vm("web", 1);
        v.guest = Some(GuestInfo {
            hostname: Some("web-1".into()),
            os: Some(GuestOs {
                pretty_name: Some("Debian GNU/Linux 12 (bookworm)".into()),
                kernel_release: Some("6.1.0-1-cloud-amd64".into()),
                ..GuestOs::default()
            }),
            interfaces: vec![GuestInterface {
                name: "eth0".into(),
                mac: Some("52:54:00:12:34:56".into()),
                addresses: vec!["10.0.0.2/24".into(), "fe80::1/64".into()],
            }],
            read_at: "2024-05-01T10:00:01Z".into(),
        });
        let text = render_vm(&v);
        for line in [
            "\nagent:      yes\n",
            "\nhostname:   web-1\n",
            "\nguest os:   Debian GNU/Linux 12 (bookworm) (kernel 6.1.0-1-cloud-amd64)\n",
            "\nguest if:   eth0 52:54:00:12:34:56 10.0.0.2/24 fe80::1/64\n",
            "\nguest at:   2024-05-01T10:00:01Z\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        v.spec.guest_agent = false;
        v.guest = None;
        let text = render_vm(&v);
        assert!(
            text.contains("\nagent:      no\n") && !text.contains("hostname"),
            "{text}"
        );
    }

    #[test]
    fn vm_show_lists_fields_and_the_error() {
        let mut v = vm("web", 1);
        v.state = as_received(PowerState::Error);
        v.error = Some("qemu exited: bad disk".into());
        v.boots = 3;
        v.last_stop = Some(crate::vm::record::StopResult::Quit);
        v.console_silent_since = Some("2024-05-01T10:00:01Z".into());
        v.spec.disks.push(DiskSpec {
            read_only: true,
            boot_order: Some(1),
            ..DiskSpec::file("/var/lib/vmlet/web.qcow2", DiskFormat::Qcow2)
        });
        let text = render_vm(&v);
        let expected = "\
id:         00000000-0000-0000-0000-000000000001
name:       web
state:      error
task:       -
desired:    stopped
generation: 1
pid:        -
error:      qemu exited: bad disk
boots:      3
last stop:  quit
hint:       the serial console has printed nothing since 2024-05-01T10:00:01Z: the guest may hang, or print its console elsewhere (vmlet vm console web --print-log --boot current)
vcpus:      2
memory:     512MiB
profile:    q35
boot:       kernel /k/vmlinuz
firmware:   bios
disk disk0: qcow2 /var/lib/vmlet/web.qcow2 (read-only, boot 1)
serial:     yes
agent:      yes
autostart:  no
created:    2024-05-01T10:00:00.000Z
updated:    2024-05-01T10:00:05.000Z
";
        assert_eq!(text, expected);
    }

    #[test]
    fn vm_show_lists_nics_after_the_disks() {
        let mut v = vm("web", 1);
        v.spec
            .disks
            .push(DiskSpec::file("/d/web.raw", DiskFormat::Raw));
        v.spec.nics = vec![
            NicSpec {
                network: "lan".into(),
                mac: Some("52:54:00:12:34:56".into()),
                model: NicModel::Virtio,
                queues: Some(4),
            },
            NicSpec {
                network: "nat".into(),
                mac: Some("52:54:00:ab:cd:ef".into()),
                model: NicModel::E1000,
                queues: None,
            },
        ];
        let text = render_vm(&v);
        let expected = "\
disk disk0: raw /d/web.raw
nic 0:      network lan, 52:54:00:12:34:56, virtio, 4 queues
nic 1:      network nat, 52:54:00:ab:cd:ef, e1000
serial:     yes
";
        assert!(text.contains(expected), "{text}");
    }

    #[test]
    fn vm_show_prints_the_tpm_and_its_swtpm() {
        let mut v = vm("web", 1);
        assert!(!render_vm(&v).contains("\ntpm:"), "no TPM: no line");
        v.spec.tpm = Some(vmlet_spec_tpm());
        assert!(
            render_vm(&v).contains("\ntpm:        2.0\n"),
            "{}",
            render_vm(&v)
        );
        v.tpm_pid = Some(4242);
        assert!(
            render_vm(&v).contains("\ntpm:        2.0 (swtpm pid 4242)\n"),
            "{}",
            render_vm(&v)
        );
    }

    fn vmlet_spec_tpm() -> crate::spec::TpmSpec {
        crate::spec::TpmSpec {
            version: crate::spec::TpmVersion::V2_0,
        }
    }

    #[test]
    fn vm_show_prints_cpu_topology_numa_and_huge_pages() {
        let mut v = vm("web", 1);
        let text = render_vm(&v);
        for absent in ["topology", "numa", "hugepages"] {
            assert!(!text.contains(absent), "unset: no {absent} line: {text}");
        }
        v.spec.cpu = Some(crate::spec::CpuSpec {
            model: Some("max".into()),
            features: vec!["+aes".into()],
        });
        v.spec.topology = Some(crate::spec::Topology {
            sockets: 2,
            cores: 1,
            threads: 2,
        });
        v.spec.numa = vec![
            crate::spec::NumaNode {
                cpus: "0-1".into(),
                memory_mib: 256,
            },
            crate::spec::NumaNode {
                cpus: "2-3".into(),
                memory_mib: 256,
            },
        ];
        v.spec.memory.hugepages = Some(crate::spec::HugePageSize::Size2M);
        v.machine = None;
        let text = render_vm(&v);
        let expected = "\
memory:     512MiB
cpu:        max,+aes
topology:   2 sockets × 1 cores × 2 threads
numa 0:     cpus 0-1, 256MiB
numa 1:     cpus 2-3, 256MiB
hugepages:  2M
";
        assert!(text.contains(expected), "{text}");
        // Once pinned, the pin is what runs.
        v.machine = Some(crate::spec::MachinePin {
            machine_type: "pc-q35-10.0".into(),
            cpu: "max,+aes".into(),
        });
        assert!(render_vm(&v).contains("\ncpu:        max,+aes\n"));
    }

    #[test]
    fn vm_show_prints_the_resources_that_are_set() {
        let mut v = vm("web", 1);
        assert!(!render_vm(&v).contains("resources"), "unset: no line");
        v.spec.resources = Resources {
            cpu_weight: Some(200),
            cpu_quota_percent: Some(50),
            memory_overhead_mib: Some(1536),
            pids_max: Some(256),
            io_weight: Some(300),
            cpu_set: Some("0-3,6".into()),
            vcpu_affinity: Some(vec!["2".into(), "3".into(), "4-5".into()]),
        };
        let text = render_vm(&v);
        let expected = "\
memory:     512MiB
resources:  cpu_weight=200 cpu_quota=50% memory_overhead=1536MiB pids_max=256 io_weight=300 cpu_set=0-3,6 vcpu_affinity=2/3/4-5
profile:    q35
";
        assert!(text.contains(expected), "{text}");
        v.spec.resources = Resources {
            memory_overhead_mib: Some(64),
            ..Resources::default()
        };
        assert!(
            render_vm(&v).contains("\nresources:  memory_overhead=64MiB\n"),
            "{}",
            render_vm(&v)
        );
    }

    #[test]
    fn vm_show_names_volume_disks_with_their_cache_and_limits() {
        let mut v = vm("web", 1);
        v.spec.disks.push(DiskSpec {
            path: None,
            format: None,
            volume: Some("data".into()),
            name: Some("data0".into()),
            cache: CacheMode::None,
            limits: IoLimits {
                iops_total: Some(500),
                bps_read: Some(10 << 20),
                ..IoLimits::default()
            },
            ..DiskSpec::file("", DiskFormat::Raw)
        });
        let text = render_vm(&v);
        assert!(
            text.contains(
                "disk data0: volume data (cache none, iops_total=500 bps_read=10MiB/s)\n"
            ),
            "{text}"
        );
        assert_eq!(limits_str(&IoLimits::default()), "unlimited");
    }
}
