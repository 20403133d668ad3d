//! A VM as the caller describes it: its identity, size, boot, serial port,
//! channels and cloud-init seed (disks and NICs have their own modules).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
    pub name: String,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
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
        #[schema(value_type = String)]
        kernel: PathBuf,
        /// Host path of the initial ramdisk.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[serde(default)]
        cmdline: String,
    },
    /// Firmware boot from the disks, in `boot_order`.
    Firmware {
        /// Which firmware.
        #[serde(default)]
        firmware: Firmware,
    },
}

/// Guest firmware for [`Boot::Firmware`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS, shipped with QEMU).
    #[default]
    Bios,
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
}
