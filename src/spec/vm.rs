//! A VM as the caller describes it: its identity, size, boot, serial port,
//! channels and cloud-init seed (disks and NICs have their own modules).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::cpu::{CpuSpec, MemorySpec, NumaNode, Topology};
use super::resources::Resources;
use uuid::Uuid;

use super::{DiskSpec, NicSpec};

/// The profile a spec gets when it names none.
pub const DEFAULT_PROFILE: &str = "q35";

/// A VM as the caller describes it. Unknown fields are refused so a typo never
/// silently means "default".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM's identity; also QEMU's `-uuid` and the name of its directories.
    pub uuid: Uuid,
    /// Human name: letters, digits, `.`, `_`, `-`; starts with a letter or digit.
    #[schema(
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        min_length = 1,
        max_length = 63
    )]
    pub name: String,
    /// Number of virtual CPUs.
    #[schema(minimum = 1, maximum = 288)]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[schema(minimum = 16, maximum = 16_777_216)]
    pub memory_mib: u64,
    /// Machine profile (a file in `qemu-profiles/`).
    #[serde(default = "default_profile")]
    pub profile: String,
    /// How the guest boots.
    pub boot: Boot,
    /// Block devices, in guest order.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// The serial console (ttyS0).
    #[serde(default)]
    pub serial: SerialSpec,
    /// Named virtio-serial ports, each backed by a unix socket on the host
    /// (like libvirt's `<channel>`; e.g. `org.example.app.0`). The guest
    /// agent's port is [`VmSpec::guest_agent`], not a channel.
    #[serde(default)]
    pub channels: Vec<ChannelSpec>,
    /// Give the guest the QEMU guest agent's port (`org.qemu.guest_agent.0`,
    /// a virtio-serial channel whose socket vmlet keeps for itself). With an
    /// agent answering in the guest, vmlet shows the guest's hostname, OS
    /// and addresses, asks the agent to shut down a guest that ignores the
    /// ACPI power button, and freezes the guest's filesystems around disk
    /// snapshots. Every profile has virtio-serial, so the default is on; a
    /// guest without an agent costs a few deadlines at most.
    #[serde(default = "yes")]
    pub guest_agent: bool,
    /// Network interfaces, in guest order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    /// A cloud-init NoCloud seed for the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// Start the VM when vmlet starts and finds it not running although its
    /// desired state is running (after a host reboot), like libvirt's
    /// autostart or Proxmox's `onboot`.
    #[serde(default)]
    pub autostart: bool,
    /// What the VM's QEMU may take from the host (its cgroup's limits,
    /// vCPU pinning).
    #[serde(default, skip_serializing_if = "Resources::is_default")]
    pub resources: Resources,
    /// A virtual TPM for the guest (an `swtpm` per VM, its state kept with
    /// the VM); absent: no TPM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmSpec>,
    /// The guest CPU model and feature flags. Unset: the profile's
    /// portable, migratable model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuSpec>,
    /// Sockets, cores and threads (their product is `vcpus`). Unset: one
    /// socket per vCPU, as QEMU does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
    /// Guest NUMA nodes. Empty: one node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numa: Vec<NumaNode>,
    /// How guest memory is backed (huge pages).
    #[serde(default, skip_serializing_if = "MemorySpec::is_default")]
    pub memory: MemorySpec,
}

fn default_profile() -> String {
    DEFAULT_PROFILE.to_string()
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Boot {
    /// Direct kernel boot: QEMU loads the kernel and initrd itself.
    Kernel {
        /// Host path of the kernel image.
        #[schema(value_type = String, pattern = "^/", max_length = 4000)]
        kernel: PathBuf,
        /// Host path of the initial ramdisk.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>, pattern = "^/", max_length = 4000)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[serde(default)]
        #[schema(max_length = 2048)]
        cmdline: String,
        /// The firmware that loads the kernel: `uefi` gives the guest EFI
        /// runtime services (`/sys/firmware/efi`) and its own NVRAM.
        #[serde(default, skip_serializing_if = "Firmware::is_bios")]
        firmware: Firmware,
    },
    /// Firmware boot from the disks, in `boot_order`.
    Firmware {
        /// Which firmware.
        #[serde(default)]
        firmware: Firmware,
    },
}

impl Boot {
    /// The guest's firmware, whichever way it boots.
    pub fn firmware(&self) -> Firmware {
        match self {
            Boot::Kernel { firmware, .. } | Boot::Firmware { firmware } => *firmware,
        }
    }
}

/// The block node names of a UEFI VM's firmware code and NVRAM (reserved:
/// no disk may take them).
pub const UEFI_NODES: [&str; 2] = ["efi-code", "efi-vars"];

/// Guest firmware (`boot.firmware`), for both boot types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS, shipped with QEMU).
    #[default]
    #[serde(rename = "bios")]
    Bios,
    /// UEFI (OVMF) without Secure Boot, with a per-VM NVRAM (its variable
    /// store), chosen from QEMU's firmware descriptors.
    #[serde(rename = "uefi")]
    Uefi,
    /// UEFI with Secure Boot enforced (Microsoft keys enrolled) and SMM, so
    /// the guest cannot write the variable store behind the firmware's
    /// back. Needs a profile with SMM (q35).
    #[serde(rename = "uefi-secure")]
    UefiSecure,
}

impl Firmware {
    /// True for legacy BIOS (the default, left out when serialized).
    pub fn is_bios(&self) -> bool {
        *self == Firmware::Bios
    }

    /// True for either UEFI variant: the VM has pflash firmware and NVRAM.
    pub fn is_uefi(&self) -> bool {
        !self.is_bios()
    }

    /// The name the spec uses.
    pub fn as_str(&self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
            Firmware::UefiSecure => "uefi-secure",
        }
    }
}

/// A cloud-init NoCloud seed: vmlet writes these files to a small read-only
/// vfat disk labelled `cidata` (the disk named `cidata`, last on the VM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// `user-data` (e.g. `#cloud-config …`).
    #[serde(default)]
    pub user_data: String,
    /// `meta-data`. Default: `instance-id` = the VM's UUID and
    /// `local-hostname` = its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<String>,
    /// `network-config` (version 1 or 2), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
}

/// The serial console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SerialSpec {
    /// Give the guest a serial port (ttyS0) backed by a socket and a log file.
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for SerialSpec {
    fn default() -> Self {
        SerialSpec { enabled: true }
    }
}

fn yes() -> bool {
    true
}

/// The virtio-serial port name of the QEMU guest agent.
pub const GUEST_AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// A named virtio-serial port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    /// Port name the guest sees (`/sys/class/virtio-ports/*/name`).
    pub name: String,
}

/// A virtual TPM, emulated by `swtpm` on the host (QEMU's `tpm-emulator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TpmSpec {
    /// The TPM version the guest sees; only `"2.0"`.
    pub version: TpmVersion,
}

/// A TPM version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum TpmVersion {
    /// TPM 2.0.
    #[serde(rename = "2.0")]
    V2_0,
}

/// What a profile offers, as far as validation needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileCaps {
    /// Direct kernel boot is possible.
    pub kernel_boot: bool,
    /// Firmware boot from a disk is possible.
    pub firmware_boot: bool,
    /// Disks may use `bus: virtio_scsi`.
    pub scsi: bool,
    /// Devices sit on PCI (other NIC models than virtio exist).
    pub pci: bool,
    /// The profile has a TPM device model (`tpm-crb`), so `tpm` is possible.
    pub tpm: bool,
    /// The machine has pflash for UEFI firmware.
    pub uefi: bool,
    /// The machine has SMM, which Secure Boot needs.
    pub secure_boot: bool,
}
