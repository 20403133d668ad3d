//! How the client subcommands parse: options, values and their errors,
//! through clap as `vmlet` builds it.

use clap::Parser;

use super::*;
use crate::spec::IoLimits;

/// The storage commands as they parse.
#[derive(Parser)]
struct StorageCli {
    #[command(flatten)]
    opts: ClientOptions,
    #[command(subcommand)]
    cmd: StorageCmd,
}

#[derive(clap::Subcommand)]
enum StorageCmd {
    #[command(subcommand)]
    Image(ImageCommand),
    #[command(subcommand)]
    Volume(VolumeCommand),
    #[command(subcommand)]
    Vm(VmCommand),
    #[command(subcommand)]
    Network(NetworkCommand),
}

fn parse(args: &[&str]) -> Result<StorageCmd, clap::Error> {
    StorageCli::try_parse_from(std::iter::once("vmlet").chain(args.iter().copied())).map(|c| c.cmd)
}

#[test]
fn storage_commands_parse() {
    let Ok(StorageCmd::Image(cmd)) = parse(&[
        "image",
        "import",
        "deb",
        "--file",
        "/i/deb.raw",
        "--sha256",
        "ab",
        "--no-wait",
    ]) else {
        panic!("no parse");
    };
    assert_eq!(
        cmd,
        ImageCommand::Import {
            name: "deb".into(),
            file: Some("/i/deb.raw".into()),
            from_url: None,
            sha256: Some("ab".into()),
            no_wait: true
        }
    );
    // Exactly one source.
    assert!(parse(&["image", "import", "deb"]).is_err());
    assert!(parse(&[
        "image",
        "import",
        "deb",
        "--file",
        "a",
        "--from-url",
        "http://x/"
    ])
    .is_err());
    // `--url` still names the daemon.
    let cli = StorageCli::try_parse_from([
        "vmlet",
        "image",
        "import",
        "deb",
        "--from-url",
        "http://x/d.img",
        "--url",
        "http://node1:8780",
    ])
    .unwrap();
    assert_eq!(cli.opts.url.as_deref(), Some("http://node1:8780"));

    let Ok(StorageCmd::Volume(cmd)) = parse(&["volume", "resize", "data", "--size-mib", "2048"])
    else {
        panic!("no parse");
    };
    assert_eq!(
        cmd,
        VolumeCommand::Resize {
            name: "data".into(),
            size_mib: 2048
        }
    );
    assert!(parse(&["volume", "resize", "data"]).is_err());

    let Ok(StorageCmd::Vm(cmd)) = parse(&[
        "vm",
        "disk",
        "attach",
        "web",
        "--volume",
        "data",
        "--bus",
        "virtio_scsi",
        "--cache",
        "none",
        "--read-only",
        "--serial",
        "S1",
    ]) else {
        panic!("no parse");
    };
    assert_eq!(
        cmd,
        VmCommand::Disk {
            cmd: DiskCommand::Attach {
                vm: "web".into(),
                volume: "data".into(),
                name: None,
                bus: BusArg::VirtioScsi,
                cache: CacheArg::None,
                read_only: true,
                serial: Some("S1".into())
            }
        }
    );
    let Ok(StorageCmd::Vm(VmCommand::Disk {
        cmd: DiskCommand::Limits { limits, .. },
    })) = parse(&[
        "vm",
        "disk",
        "limits",
        "web",
        "disk1",
        "--iops-total",
        "100",
        "--bps-write",
        "8M",
    ])
    else {
        panic!("no parse");
    };
    assert_eq!(
        IoLimits::from(limits),
        IoLimits {
            iops_total: Some(100),
            bps_write: Some(8 << 20),
            ..IoLimits::default()
        }
    );
    let Ok(StorageCmd::Vm(cmd)) = parse(&["vm", "delete", "web", "--delete-volumes"]) else {
        panic!("no parse");
    };
    assert_eq!(
        cmd,
        VmCommand::Delete {
            vm: "web".into(),
            force: false,
            delete_volumes: true
        }
    );
    let Ok(StorageCmd::Vm(cmd)) = parse(&["vm", "snapshot", "revert", "web", "s1"]) else {
        panic!("no parse");
    };
    assert_eq!(
        cmd,
        VmCommand::Snapshot {
            cmd: SnapshotCommand::Revert {
                vm: "web".into(),
                name: "s1".into()
            }
        }
    );
}

#[test]
fn network_and_nic_commands_parse() {
    let Ok(StorageCmd::Network(cmd)) = parse(&[
        "network",
        "create",
        "lan",
        "--bridge",
        "br0",
        "--mtu",
        "9000",
        "--vlan-uplink",
        "eth0",
        "--vlan-id",
        "100",
    ]) else {
        panic!("no parse");
    };
    assert_eq!(
        cmd,
        NetworkCommand::Create {
            name: "lan".into(),
            bridge: Some("br0".into()),
            mtu: Some(9000),
            vlan_uplink: Some("eth0".into()),
            vlan_id: Some(100),
            user: false
        }
    );
    assert!(parse(&["network", "create", "nat", "--user"]).is_ok());
    // A VLAN needs both halves; user networks take no bridge options.
    assert!(parse(&["network", "create", "lan", "--vlan-id", "100"]).is_err());
    assert!(parse(&["network", "create", "lan", "--vlan-uplink", "eth0"]).is_err());
    assert!(parse(&["network", "create", "nat", "--user", "--mtu", "1400"]).is_err());

    let Ok(StorageCmd::Vm(cmd)) = parse(&[
        "vm",
        "nic",
        "attach",
        "web",
        "--network",
        "lan",
        "--model",
        "e1000e",
        "--mac",
        "52:54:00:12:34:56",
    ]) else {
        panic!("no parse");
    };
    assert_eq!(
        cmd,
        VmCommand::Nic {
            cmd: NicCommand::Attach {
                vm: "web".into(),
                network: "lan".into(),
                mac: Some("52:54:00:12:34:56".into()),
                model: NicModelArg::E1000e,
                queues: None
            }
        }
    );
    assert!(parse(&["vm", "nic", "attach", "web"]).is_err());
    let Ok(StorageCmd::Vm(cmd)) = parse(&["vm", "nic", "detach", "web", "1"]) else {
        panic!("no parse");
    };
    assert_eq!(
        cmd,
        VmCommand::Nic {
            cmd: NicCommand::Detach {
                vm: "web".into(),
                nic: "1".into()
            }
        }
    );
}

/// The options as they parse on a command line, without the environment
/// getting in the way of the defaults.
#[derive(Parser)]
struct TestCli {
    #[command(flatten)]
    opts: ClientOptions,
    #[command(subcommand)]
    cmd: VmCommand,
}

#[test]
fn options_parse_before_or_after_the_subcommand() {
    let cli = TestCli::try_parse_from([
        "vm",
        "--socket",
        "/tmp/s.sock",
        "stop",
        "web",
        "--force",
        "--timeout",
        "5",
        "-o",
        "json",
    ])
    .unwrap();
    assert_eq!(cli.opts.socket, Path::new("/tmp/s.sock"));
    assert_eq!(cli.opts.output, Output::Json);
    assert_eq!(
        cli.cmd,
        VmCommand::Stop {
            vm: "web".into(),
            force: true,
            timeout: Some(5)
        }
    );
    assert_eq!(
        cli.opts.endpoint().unwrap(),
        Endpoint::Unix("/tmp/s.sock".into())
    );
}
