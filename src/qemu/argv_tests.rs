//! Unit tests of `argv.rs`, in a file of their own so that the code
//! stays short enough to read in one go.

use super::*;
use crate::qemu::profile::Profiles;
use crate::spec::{DiskFormat, DiskSpec, Firmware, SerialSpec};

fn spec() -> VmSpec {
    VmSpec {
        uuid: Uuid::parse_str("5b0c2d4e-8a51-4f3e-9b1c-2a7f4d6e8c10").unwrap(),
        name: "t".into(),
        vcpus: 1,
        memory_mib: 128,
        profile: "q35".into(),
        boot: Boot::Kernel {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            firmware: Firmware::Bios,
        },
        disks: vec![DiskSpec {
            read_only: true,
            ..DiskSpec::file("/a,b/c.img", DiskFormat::Raw)
        }],
        serial: SerialSpec::default(),
        channels: vec![],
        guest_agent: true,
        cloud_init: None,
        nics: vec![],
        autostart: false,
        resources: Default::default(),
        tpm: None,
        cpu: None,
        topology: None,
        numa: vec![],
        memory: Default::default(),
    }
}

fn files_of(spec: &VmSpec) -> (Vec<DiskPlan>, crate::qemu::launch_files::Numbered) {
    // The test specs' disks are host files.
    let disks: Vec<DiskPlan> = spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let Ok(crate::spec::DiskSource::File { path, format }) = d.source() else {
                panic!("argv tests use host-file disks")
            };
            DiskPlan {
                name: d.name_or_default(i),
                file: path.to_path_buf(),
                format,
                spec: d.clone(),
                base: None,
                origin: crate::qemu::disk::FileOrigin::Host,
            }
        })
        .collect();
    let numbered = crate::qemu::launch_files::numbered(spec, &disks, 100, false);
    (disks, numbered)
}

fn pin(machine_type: &str) -> MachinePin {
    MachinePin {
        machine_type: machine_type.into(),
        cpu: "qemu64".into(),
    }
}

#[test]
fn machine_and_cpu_come_from_the_pin() {
    let profiles = Profiles::built_in().unwrap();
    let spec = spec();
    let paths = RunPaths::new(Path::new("/run/vmlet"), spec.uuid);
    let (disks, n) = files_of(&spec);
    let machine = MachinePin {
        machine_type: "pc-q35-9.2".into(),
        cpu: "Westmere,+aes".into(),
    };
    let argv = build(LaunchInputs {
        spec: &spec,
        profile: profiles.get("q35").unwrap(),
        machine: &machine,
        accel: Accel::Kvm,
        paths: &paths,
        jailed: false,
        run_fds: &n.run,
        disks: &disks,
        disk_sets: &n.sets,
        passed_fds: &n.passed,
        boot_files: n.boot.as_ref(),
        nics: &[],
        pflash: n.pflash,
    });
    let value = |option: &str| {
        let at = argv.iter().position(|a| a == option).expect(option);
        argv[at + 1].clone()
    };
    // The profile's options stay; its type and CPU give way to the pin.
    assert_eq!(
        value("-machine"),
        "pc-q35-9.2,dump-guest-core=off,usb=off,vmport=off"
    );
    assert_eq!(value("-cpu"), "Westmere,+aes");
}

#[test]
fn topology_numa_and_huge_pages_shape_cpus_and_memory() {
    let profiles = Profiles::built_in().unwrap();
    let mut spec = spec();
    spec.vcpus = 4;
    spec.memory_mib = 256;
    spec.topology = Some(crate::spec::Topology {
        sockets: 2,
        cores: 2,
        threads: 1,
    });
    spec.numa = vec![
        crate::spec::NumaNode {
            cpus: "0,2".into(),
            memory_mib: 128,
        },
        crate::spec::NumaNode {
            cpus: "1,3".into(),
            memory_mib: 128,
        },
    ];
    let paths = RunPaths::new(Path::new("/run/vmlet"), spec.uuid);
    let argv_of = |spec: &VmSpec| {
        let (disks, n) = files_of(spec);
        build(LaunchInputs {
            spec,
            profile: profiles.get("q35").unwrap(),
            machine: &pin("pc-q35-10.0"),
            accel: Accel::Tcg,
            paths: &paths,
            jailed: true,
            run_fds: &n.run,
            disks: &disks,
            disk_sets: &n.sets,
            passed_fds: &n.passed,
            boot_files: n.boot.as_ref(),
            nics: &[],
            pflash: n.pflash,
        })
    };
    let values = |argv: &[String], option: &str| -> Vec<String> {
        argv.windows(2)
            .filter(|w| w[0] == option)
            .map(|w| w[1].clone())
            .collect()
    };
    let argv = argv_of(&spec);
    assert_eq!(values(&argv, "-smp"), ["4,sockets=2,cores=2,threads=1"]);
    assert_eq!(
        values(&argv, "-numa"),
        [
            "node,nodeid=0,cpus=0,cpus=2,memdev=ram-node0",
            "node,nodeid=1,cpus=1,cpus=3,memdev=ram-node1"
        ]
    );
    assert_eq!(
        values(&argv, "-object")[..2],
        [
            "memory-backend-ram,id=ram-node0,size=128M",
            "memory-backend-ram,id=ram-node1,size=128M",
        ]
    );
    assert!(!values(&argv, "-machine")[0].contains("memory-backend"));

    // Huge pages without nodes: one memfd backend for the machine,
    // never a host path.
    spec.numa.clear();
    spec.memory.hugepages = Some(crate::spec::HugePageSize::Size2M);
    let argv = argv_of(&spec);
    assert!(values(&argv, "-machine")[0].ends_with(",memory-backend=ram0"));
    assert_eq!(
        values(&argv, "-object")[0],
        "memory-backend-memfd,id=ram0,size=256M,hugetlb=on,hugetlbsize=2097152,prealloc=on"
    );
    assert!(!argv
        .iter()
        .any(|a| a.contains("hugetlbfs") || a.contains("mem-path")));
    assert_eq!(cpu_ranges(&[0, 1, 2, 5, 7, 8]), [(0, 2), (5, 5), (7, 8)]);
}

#[test]
fn uefi_firmware_is_two_flash_nodes_on_fd_sets() {
    let profiles = Profiles::built_in().unwrap();
    let q35 = profiles.get("q35").unwrap();
    let paths = RunPaths::new(Path::new("/run/vmlet"), Uuid::nil());
    let argv_for = |firmware: Firmware| {
        let mut spec = spec();
        if let Boot::Kernel { firmware: f, .. } = &mut spec.boot {
            *f = firmware;
        }
        let (disks, n) = files_of(&spec);
        build(LaunchInputs {
            spec: &spec,
            profile: q35,
            machine: &pin("pc-q35-10.0"),
            accel: Accel::Tcg,
            paths: &paths,
            jailed: true,
            run_fds: &n.run,
            disks: &disks,
            disk_sets: &n.sets,
            passed_fds: &n.passed,
            boot_files: n.boot.as_ref(),
            nics: &[],
            pflash: n.pflash,
        })
    };
    let value = |argv: &[String], option: &str| {
        let at = argv.iter().position(|a| a == option).expect(option);
        argv[at + 1].clone()
    };
    let bios = argv_for(Firmware::Bios);
    assert!(!value(&bios, "-machine").contains("pflash"));
    assert!(!bios.iter().any(|a| a.contains("efi-")), "{bios:?}");

    let uefi = argv_for(Firmware::Uefi);
    assert_eq!(
        value(&uefi, "-machine"),
        "pc-q35-10.0,dump-guest-core=off,usb=off,vmport=off,pflash0=efi-code,pflash1=efi-vars"
    );
    // Disk set 1, serial log 2, then code 3 and NVRAM 4 (fds after
    // the QMP socket, disk, serial socket and log, and kernel).
    assert!(uefi.contains(&"fd=105,set=3,opaque=firmware:code".to_string()));
    assert!(uefi.contains(&"fd=106,set=4,opaque=firmware:nvram".to_string()));
    let node = |argv: &[String], name: &str| -> serde_json::Value {
        argv.iter()
            .filter_map(|a| serde_json::from_str::<serde_json::Value>(a).ok())
            .find(|v| v["node-name"] == name)
            .expect(name)
    };
    assert_eq!(node(&uefi, "efi-code-file")["filename"], "/dev/fdset/3");
    assert_eq!(node(&uefi, "efi-vars-file")["filename"], "/dev/fdset/4");
    assert_eq!(node(&uefi, "efi-vars")["driver"], "qcow2");
    assert!(!uefi.iter().any(|a| a == "-global"));
    assert!(!uefi.iter().any(|a| a.contains("OVMF")), "{uefi:?}");

    let secure = argv_for(Firmware::UefiSecure);
    assert!(value(&secure, "-machine").ends_with(",pflash0=efi-code,pflash1=efi-vars,smm=on"));
    assert_eq!(
        value(&secure, "-global"),
        "driver=cfi.pflash01,property=secure,value=on"
    );
    assert_eq!(
        value(&secure, "-fw_cfg"),
        "name=opt/org.tianocore/EnableLegacyLoader,string=no"
    );
    assert!(!uefi.iter().any(|a| a == "-fw_cfg"));
    // A profile that sets SMM itself gets no second `smm=`.
    let mut smm = q35.clone();
    smm.machine.options.insert("smm".into(), "on".into());
    let mut spec = spec();
    if let Boot::Kernel { firmware, .. } = &mut spec.boot {
        *firmware = Firmware::UefiSecure;
    }
    let (disks, n) = files_of(&spec);
    let argv = build(LaunchInputs {
        spec: &spec,
        profile: &smm,
        machine: &pin("pc-q35-10.0"),
        accel: Accel::Tcg,
        paths: &paths,
        jailed: true,
        run_fds: &n.run,
        disks: &disks,
        disk_sets: &n.sets,
        passed_fds: &n.passed,
        boot_files: n.boot.as_ref(),
        nics: &[],
        pflash: n.pflash,
    });
    assert_eq!(value(&argv, "-machine").matches("smm=").count(), 1);
}

#[test]
fn escape_doubles_commas() {
    assert_eq!(escape("a,b,,c"), "a,,b,,,,c");
    assert_eq!(escape("plain"), "plain");
}

#[test]
fn comma_in_disk_path_cannot_add_an_option() {
    let profiles = Profiles::built_in().unwrap();
    let spec = spec();
    let paths = RunPaths::new(Path::new("/run/vmlet"), spec.uuid);
    let (disks, n) = files_of(&spec);
    let argv = build(LaunchInputs {
        spec: &spec,
        profile: profiles.get("q35").unwrap(),
        machine: &pin("pc-q35-10.0"),
        accel: Accel::Tcg,
        paths: &paths,
        jailed: false,
        run_fds: &n.run,
        disks: &disks,
        disk_sets: &n.sets,
        passed_fds: &n.passed,
        boot_files: n.boot.as_ref(),
        nics: &[],
        pflash: n.pflash,
    });
    // QEMU gets no path at all: the disk is an fd set, the kernel an
    // inherited fd.
    assert!(!argv.iter().any(|a| a.contains("/a,b/c.img")), "{argv:?}");
    let file_node: serde_json::Value = argv
        .iter()
        .find(|a| a.contains("disk0-file") && a.contains("\"driver\":\"file\""))
        .map(|a| serde_json::from_str(a).unwrap())
        .expect("the file node");
    assert_eq!(file_node["filename"], "/dev/fdset/1");
    assert_eq!(file_node["read-only"], true);
    let add_fd = argv.iter().position(|a| a == "-add-fd").expect("-add-fd");
    assert_eq!(argv[add_fd + 1], "fd=101,set=1,opaque=disk:disk0");
    let kernel = argv.iter().position(|a| a == "-kernel").unwrap();
    assert_eq!(argv[kernel + 1], "/proc/self/fd/104");
    // The argv always starts paused, never daemonized, fully sandboxed,
    // with sockets vmlet bound.
    for flag in ["-S", "-nodefaults", "-no-user-config"] {
        assert!(argv.iter().any(|a| a == flag), "{flag}");
    }
    assert!(!argv.iter().any(|a| a == "-daemonize" || a == "-pidfile"));
    assert!(argv.contains(
        &"on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".to_string()
    ));
    assert!(argv.contains(&"socket,id=qmp,fd=100,server=on,wait=off".to_string()));
    assert!(argv.contains(
        &"socket,id=serial0,fd=102,server=on,wait=off,logfile=/dev/fdset/2,logappend=on"
            .to_string()
    ));
    assert!(argv.contains(&"fd=103,set=2,opaque=serial-log".to_string()));
}

#[test]
fn panic_device_follows_the_profile() {
    let profiles = Profiles::built_in().unwrap();
    let spec = spec();
    let paths = RunPaths::new(Path::new("/run/vmlet"), spec.uuid);
    let argv_with = |profile: &Profile| {
        let (disks, n) = files_of(&spec);
        build(LaunchInputs {
            spec: &spec,
            profile,
            machine: &pin(&profile.machine.machine_type),
            accel: Accel::Tcg,
            paths: &paths,
            jailed: true,
            run_fds: &n.run,
            disks: &disks,
            disk_sets: &n.sets,
            passed_fds: &n.passed,
            boot_files: n.boot.as_ref(),
            nics: &[],
            pflash: n.pflash,
        })
    };
    let device = "pvpanic,id=panic0".to_string();
    for name in ["q35", "microvm"] {
        let argv = argv_with(profiles.get(name).unwrap());
        let at = argv.iter().position(|a| *a == device).expect(name);
        assert_eq!(argv[at - 1], "-device", "{name}");
    }
    let mut off = profiles.get("q35").unwrap().clone();
    off.defaults.panic = false;
    assert!(!argv_with(&off).iter().any(|a| a.contains("panic0")));
}

#[test]
fn overlong_socket_paths_are_found() {
    let spec = spec();
    let short = RunPaths::new(Path::new("/run/vmlet"), spec.uuid);
    assert_eq!(short.overlong_socket(&spec), None);
    // 55 bytes of run root: qmp.sock (107 bytes) fits, serial.sock does not.
    let deep = RunPaths::new(Path::new(&format!("/{}", "d".repeat(55))), spec.uuid);
    let found = deep.overlong_socket(&spec).expect("too long");
    assert!(found.ends_with("serial.sock"), "{found:?}");
}

#[test]
fn run_paths_are_named_by_uuid_only() {
    let uuid = Uuid::new_v4();
    let paths = RunPaths::new(Path::new("/run/vmlet"), uuid);
    assert_eq!(
        paths.dir,
        Path::new("/run/vmlet/vms").join(uuid.to_string())
    );
    assert!(paths.qmp_socket().starts_with(&paths.dir));
    assert!(paths.channel_socket(3).ends_with("channel3.sock"));
}
