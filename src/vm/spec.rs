//! `VmSpec`: what a VM is, as the API and `vmlet run` receive it, and its
//! validation. Pure: no I/O, so every rule is unit-tested.
//!
//! Validation collects every problem at once and names each field the way a
//! caller wrote it (`disks[1].path`), so a scheduler can show all errors.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Limits on a spec's sizes, so one request cannot ask for absurd resources or
/// build an argv QEMU would choke on.
pub mod limits {
    /// Most vCPUs a VM may have.
    pub const MAX_VCPUS: u32 = 288;
    /// Least guest memory, in MiB.
    pub const MIN_MEMORY_MIB: u64 = 16;
    /// Most guest memory, in MiB (16 TiB).
    pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;
    /// Longest VM name.
    pub const MAX_NAME_LEN: usize = 63;
    /// Longest disk or channel name. Disk names become QEMU node names
    /// (`NAME-file`, at most 31 characters in QEMU).
    pub const MAX_DEVICE_NAME_LEN: usize = 24;
    /// Most disks on one VM.
    pub const MAX_DISKS: usize = 24;
    /// Most virtio-serial channels on one VM.
    pub const MAX_CHANNELS: usize = 8;
    /// Longest host path.
    pub const MAX_PATH_LEN: usize = 4000;
    /// Longest kernel command line (x86 `COMMAND_LINE_SIZE`).
    pub const MAX_CMDLINE_LEN: usize = 2048;
    /// Longest disk serial (virtio-blk reports 20 bytes).
    pub const MAX_SERIAL_LEN: usize = 20;
}

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
    /// (like libvirt's `<channel>`; e.g. `org.qemu.guest_agent.0`).
    #[serde(default)]
    pub channels: Vec<ChannelSpec>,
    /// Start the VM when vmlet starts and finds it not running although its
    /// desired state is running (after a host reboot), like libvirt's
    /// autostart or Proxmox's `onboot`.
    #[serde(default)]
    pub autostart: bool,
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

/// One disk backed by a host file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Name unique within the VM (QEMU ids derive from it); defaults to `diskN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Absolute host path of the image.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Image format; never guessed (probing a raw image is a known escape).
    pub format: DiskFormat,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Firmware boot priority; lower boots first. Unset: not bootable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<u32>,
    /// Serial number the guest sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

impl DiskSpec {
    /// The disk's name: the given one, or `disk{index}`.
    pub fn name_or_default(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("disk{index}"))
    }
}

/// Disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    /// Raw image.
    Raw,
    /// qcow2 image.
    Qcow2,
}

impl DiskFormat {
    /// QEMU's block driver name.
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
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

/// A named virtio-serial port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    /// Port name the guest sees (`/sys/class/virtio-ports/*/name`).
    pub name: String,
}

/// One problem with a spec, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The field, as the caller wrote it: `name`, `disks[1].path`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// The problems, in field order.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
        write!(f, "invalid spec: {}", parts.join("; "))
    }
}

impl SpecError {
    /// The first field named, for APIs that report one.
    pub fn first_field(&self) -> Option<&str> {
        self.errors.first().map(|e| e.field.as_str())
    }
}

/// What a profile offers, as far as validation needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileCaps {
    /// Direct kernel boot is possible.
    pub kernel_boot: bool,
    /// Firmware boot from a disk is possible.
    pub firmware_boot: bool,
}

struct Collector(Vec<FieldError>);

impl Collector {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

impl VmSpec {
    /// Checks every field. `profile_caps` looks up a profile by name (`None`:
    /// unknown profile).
    pub fn validate(
        &self,
        profile_caps: impl Fn(&str) -> Option<ProfileCaps>,
    ) -> Result<(), SpecError> {
        let mut c = Collector(Vec::new());
        if self.uuid.is_nil() {
            c.add("uuid", "must not be the nil UUID");
        }
        check_name(&mut c, "name", &self.name, limits::MAX_NAME_LEN);
        if self.vcpus == 0 || self.vcpus > limits::MAX_VCPUS {
            c.add("vcpus", format!("must be 1..={}", limits::MAX_VCPUS));
        }
        if !(limits::MIN_MEMORY_MIB..=limits::MAX_MEMORY_MIB).contains(&self.memory_mib) {
            c.add(
                "memory_mib",
                format!(
                    "must be {}..={}",
                    limits::MIN_MEMORY_MIB,
                    limits::MAX_MEMORY_MIB
                ),
            );
        }
        let caps = profile_caps(&self.profile);
        if caps.is_none() {
            c.add("profile", format!("unknown profile {:?}", self.profile));
        }
        self.check_boot(&mut c, caps);
        self.check_disks(&mut c);
        self.check_channels(&mut c);
        if c.0.is_empty() {
            Ok(())
        } else {
            Err(SpecError { errors: c.0 })
        }
    }

    fn check_boot(&self, c: &mut Collector, caps: Option<ProfileCaps>) {
        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                if caps.is_some_and(|p| !p.kernel_boot) {
                    c.add("boot.type", "this profile cannot boot a kernel directly");
                }
                check_path(c, "boot.kernel", kernel);
                if let Some(initrd) = initrd {
                    check_path(c, "boot.initrd", initrd);
                }
                if cmdline.len() > limits::MAX_CMDLINE_LEN {
                    c.add(
                        "boot.cmdline",
                        format!("longer than {} bytes", limits::MAX_CMDLINE_LEN),
                    );
                }
                if cmdline.chars().any(char::is_control) {
                    c.add("boot.cmdline", "contains control characters");
                }
            }
            Boot::Firmware { .. } => {
                if caps.is_some_and(|p| !p.firmware_boot) {
                    c.add("boot.type", "this profile cannot boot from firmware");
                }
                if !self.disks.iter().any(|d| d.boot_order.is_some()) {
                    c.add("disks", "firmware boot needs a disk with boot_order set");
                }
            }
        }
    }

    fn check_disks(&self, c: &mut Collector) {
        if self.disks.len() > limits::MAX_DISKS {
            c.add("disks", format!("more than {} disks", limits::MAX_DISKS));
        }
        let mut names = HashSet::new();
        let mut orders = HashSet::new();
        for (i, disk) in self.disks.iter().enumerate() {
            let field = |f: &str| format!("disks[{i}].{f}");
            if let Some(name) = &disk.name {
                check_device_name(c, &field("name"), name);
            }
            if !names.insert(disk.name_or_default(i)) {
                c.add(field("name"), "duplicate disk name");
            }
            check_path(c, &field("path"), &disk.path);
            if let Some(order) = disk.boot_order {
                if !orders.insert(order) {
                    c.add(field("boot_order"), "another disk has this boot_order");
                }
            }
            if let Some(serial) = &disk.serial {
                let ok = !serial.is_empty()
                    && serial.len() <= limits::MAX_SERIAL_LEN
                    && serial
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
                if !ok {
                    c.add(
                        field("serial"),
                        format!(
                            "1..={} characters of A-Z a-z 0-9 . _ -",
                            limits::MAX_SERIAL_LEN
                        ),
                    );
                }
            }
        }
    }

    fn check_channels(&self, c: &mut Collector) {
        if self.channels.len() > limits::MAX_CHANNELS {
            c.add(
                "channels",
                format!("more than {} channels", limits::MAX_CHANNELS),
            );
        }
        let mut names = HashSet::new();
        for (i, ch) in self.channels.iter().enumerate() {
            let field = format!("channels[{i}].name");
            check_name(c, &field, &ch.name, limits::MAX_NAME_LEN);
            if !names.insert(&ch.name) {
                c.add(field, "duplicate channel name");
            }
        }
    }
}

/// Names: `[A-Za-z0-9][A-Za-z0-9._-]*`. They reach QEMU options and logs, so
/// nothing that could be an option separator, a path, or a shell word.
fn check_name(c: &mut Collector, field: &str, name: &str, max: usize) {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_alphanumeric());
    let rest_ok = name
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch));
    if name.is_empty() || name.len() > max || !first_ok || !rest_ok {
        c.add(
            field,
            format!(
                "must be 1..={max} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
            ),
        );
    }
}

/// Device names become QEMU ids and node names, which must start with a letter.
fn check_device_name(c: &mut Collector, field: &str, name: &str) {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_alphabetic());
    let rest_ok = name
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
    if name.is_empty() || name.len() > limits::MAX_DEVICE_NAME_LEN || !first_ok || !rest_ok {
        c.add(
            field,
            format!(
                "must be 1..={} characters of A-Z a-z 0-9 _ -, starting with a letter",
                limits::MAX_DEVICE_NAME_LEN
            ),
        );
    }
}

/// Host paths must be absolute and normal: no `..`, no `.`, no control
/// characters, so a path means what it says and cannot walk out of the
/// directory it names.
fn check_path(c: &mut Collector, field: &str, path: &Path) {
    let Some(s) = path.to_str() else {
        c.add(field, "must be valid UTF-8");
        return;
    };
    if s.is_empty() {
        c.add(field, "must not be empty");
        return;
    }
    if s.len() > limits::MAX_PATH_LEN {
        c.add(field, format!("longer than {} bytes", limits::MAX_PATH_LEN));
    }
    if !path.is_absolute() {
        c.add(field, "must be an absolute path");
    }
    if s.chars().any(char::is_control) {
        c.add(field, "contains control characters");
    }
    // By segment, not Path::components(), which silently drops `.` and `//`.
    let inner: Vec<&str> = s.split('/').skip(1).collect();
    if inner.iter().any(|seg| *seg == "." || *seg == "..") {
        c.add(field, "must not contain `.` or `..` components");
    } else if s.ends_with('/') {
        c.add(field, "must name a file, not a directory");
    } else if inner.iter().any(|seg| seg.is_empty()) {
        c.add(field, "must not contain `//`");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn caps(name: &str) -> Option<ProfileCaps> {
        match name {
            "q35" => Some(ProfileCaps {
                kernel_boot: true,
                firmware_boot: true,
            }),
            "microvm" => Some(ProfileCaps {
                kernel_boot: true,
                firmware_boot: false,
            }),
            _ => None,
        }
    }

    fn base() -> serde_json::Value {
        json!({
            "uuid": "5b0c2d4e-8a51-4f3e-9b1c-2a7f4d6e8c10",
            "name": "web-1",
            "vcpus": 2,
            "memory_mib": 512,
            "boot": {"type": "kernel", "kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img", "cmdline": "console=ttyS0"},
            "disks": [{"path": "/var/lib/vmlet/a.qcow2", "format": "qcow2"}]
        })
    }

    fn parse(v: serde_json::Value) -> VmSpec {
        serde_json::from_value(v).expect("spec parses")
    }

    fn fields(v: serde_json::Value) -> Vec<String> {
        match parse(v).validate(caps) {
            Ok(()) => vec![],
            Err(e) => e.errors.into_iter().map(|e| e.field).collect(),
        }
    }

    #[test]
    fn good_spec_is_valid_and_gets_defaults() {
        let spec = parse(base());
        assert_eq!(spec.validate(caps), Ok(()));
        assert_eq!(spec.profile, "q35");
        assert!(spec.serial.enabled);
        assert_eq!(spec.disks[0].name_or_default(0), "disk0");
    }

    #[test]
    fn unknown_fields_are_refused_at_every_level() {
        let mut v = base();
        v["colour"] = json!("red");
        assert!(serde_json::from_value::<VmSpec>(v).is_err());
        let mut v = base();
        v["disks"][0]["cache"] = json!("none");
        assert!(serde_json::from_value::<VmSpec>(v).is_err());
        let mut v = base();
        v["boot"]["firmware"] = json!("bios");
        assert!(serde_json::from_value::<VmSpec>(v).is_err());
    }

    #[test]
    fn bad_values_name_their_field() {
        let mut v = base();
        v["name"] = json!("../etc");
        v["vcpus"] = json!(0);
        v["memory_mib"] = json!(1);
        v["profile"] = json!("nope");
        assert_eq!(fields(v), ["name", "vcpus", "memory_mib", "profile"]);
    }

    #[test]
    fn paths_must_be_absolute_and_normal() {
        for bad in [
            "relative.qcow2",
            "/var/../etc/shadow",
            "/a/./b",
            "/a/b/",
            "/a//b",
            "/a\nb",
            "",
        ] {
            let mut v = base();
            v["disks"] = json!([
                {"path": "/ok.qcow2", "format": "qcow2"},
                {"path": bad, "format": "raw"}
            ]);
            assert_eq!(fields(v), ["disks[1].path"], "path {bad:?}");
        }
        let mut v = base();
        v["boot"]["kernel"] = json!("vmlinuz");
        v["boot"]["initrd"] = json!("/x/../y");
        assert_eq!(fields(v), ["boot.kernel", "boot.initrd"]);
    }

    #[test]
    fn commas_and_spaces_in_paths_are_allowed() {
        let mut v = base();
        v["disks"][0]["path"] = json!("/srv/my disks/a,b.qcow2");
        assert_eq!(fields(v), Vec::<String>::new());
    }

    #[test]
    fn disk_names_orders_and_serials() {
        let mut v = base();
        v["disks"] = json!([
            {"name": "root", "path": "/a", "format": "raw", "boot_order": 1},
            {"name": "root", "path": "/b", "format": "raw", "boot_order": 1},
            {"name": "9lives", "path": "/c", "format": "raw", "serial": "has space"},
        ]);
        assert_eq!(
            fields(v),
            [
                "disks[1].name",
                "disks[1].boot_order",
                "disks[2].name",
                "disks[2].serial"
            ]
        );
        // A default name colliding with an explicit one is a duplicate too.
        let mut v = base();
        v["disks"] = json!([
            {"path": "/a", "format": "raw"},
            {"name": "disk0", "path": "/b", "format": "raw"},
        ]);
        assert_eq!(fields(v), ["disks[1].name"]);
    }

    #[test]
    fn firmware_boot_needs_a_boot_disk_and_a_capable_profile() {
        let mut v = base();
        v["boot"] = json!({"type": "firmware"});
        assert_eq!(fields(v.clone()), ["disks"]);
        v["disks"][0]["boot_order"] = json!(1);
        assert_eq!(fields(v.clone()), Vec::<String>::new());
        v["profile"] = json!("microvm");
        assert_eq!(fields(v), ["boot.type"]);
    }

    #[test]
    fn cmdline_limits() {
        let mut v = base();
        v["boot"]["cmdline"] = json!("a".repeat(limits::MAX_CMDLINE_LEN + 1));
        assert_eq!(fields(v), ["boot.cmdline"]);
        let mut v = base();
        v["boot"]["cmdline"] = json!("console=ttyS0\nrm");
        assert_eq!(fields(v), ["boot.cmdline"]);
    }

    #[test]
    fn channels_are_checked() {
        let mut v = base();
        v["channels"] =
            json!([{"name": "org.vmlet.guest.0"}, {"name": "org.vmlet.guest.0"}, {"name": "a,b"}]);
        assert_eq!(fields(v), ["channels[1].name", "channels[2].name"]);
    }

    #[test]
    fn nil_uuid_is_refused() {
        let mut v = base();
        v["uuid"] = json!("00000000-0000-0000-0000-000000000000");
        assert_eq!(fields(v), ["uuid"]);
    }
}
