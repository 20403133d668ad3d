//! `vmlet vm nic …`: adding and removing a VM's NICs, the command-line
//! spelling of NIC models, and how a NIC is described in `vm show`.

use crate::cli::{shown, CliError};
use crate::client::Client;
use crate::spec::{NicModel, NicSpec};

/// `vmlet vm nic …`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum NicCommand {
    /// Add a NIC on a network: hot-plugged into a running VM, or added to
    /// the spec of a stopped one.
    Attach {
        /// UUID or name.
        vm: String,
        /// The network to put it on.
        #[arg(long)]
        network: String,
        /// MAC address (default: derived from the VM's UUID).
        #[arg(long)]
        mac: Option<String>,
        /// Device model.
        #[arg(long, value_enum, default_value_t = NicModelArg::Virtio)]
        model: NicModelArg,
        /// Queue pairs (multi-queue virtio-net).
        #[arg(long, value_name = "N")]
        queues: Option<u32>,
    },
    /// Remove a NIC (unplugged from a running VM, its tap removed).
    Detach {
        /// UUID or name.
        vm: String,
        /// The NIC's MAC or index.
        nic: String,
    },
}

/// A NIC's device model, as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NicModelArg {
    /// virtio-net.
    Virtio,
    /// Intel e1000 (PCI), for guests without virtio drivers.
    E1000,
    /// Intel 82574 (PCIe).
    E1000e,
    /// Realtek RTL8139 (PCI).
    Rtl8139,
}

impl From<NicModelArg> for NicModel {
    fn from(m: NicModelArg) -> NicModel {
        match m {
            NicModelArg::Virtio => NicModel::Virtio,
            NicModelArg::E1000 => NicModel::E1000,
            NicModelArg::E1000e => NicModel::E1000e,
            NicModelArg::Rtl8139 => NicModel::Rtl8139,
        }
    }
}

pub(super) async fn nic_command(
    client: &Client,
    cmd: NicCommand,
    json: bool,
) -> Result<String, CliError> {
    Ok(match cmd {
        NicCommand::Attach {
            vm,
            network,
            mac,
            model,
            queues,
        } => {
            let nic = NicSpec {
                network,
                mac,
                model: model.into(),
                queues,
            };
            let vm = client.attach_nic(&vm, &nic).await?;
            shown(json, &vm, |vm| {
                // The new NIC is the last one; its MAC may have been derived.
                let mac = vm
                    .spec
                    .nics
                    .last()
                    .and_then(|n| n.mac.clone())
                    .unwrap_or_else(|| "?".into());
                format!(
                    "attached NIC {mac} on network {} to VM {}\n",
                    nic.network, vm.name
                )
            })
        }
        NicCommand::Detach { vm, nic } => {
            let vm = client.detach_nic(&vm, &nic).await?;
            shown(json, &vm, |vm| {
                format!("detached NIC {nic} from VM {}\n", vm.name)
            })
        }
    })
}

/// A NIC in words: `network lan, 52:54:00:12:34:56, virtio, 4 queues`.
pub(super) fn nic_str(nic: &NicSpec) -> String {
    let mut parts = vec![
        format!("network {}", nic.network),
        nic.mac.clone().unwrap_or_else(|| "-".into()),
        nic_model_str(nic.model).into(),
    ];
    if nic.queue_count() > 1 {
        parts.push(format!("{} queues", nic.queue_count()));
    }
    parts.join(", ")
}

fn nic_model_str(model: NicModel) -> &'static str {
    match model {
        NicModel::Virtio => "virtio",
        NicModel::E1000 => "e1000",
        NicModel::E1000e => "e1000e",
        NicModel::Rtl8139 => "rtl8139",
    }
}
