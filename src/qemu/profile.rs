//! Machine profiles: the data that says what QEMU machine, CPU model and
//! device models a VM gets. Profiles are TOML files an operator can read and
//! edit (`qemu-profiles/` in the source; copies in the profile directory
//! override or add to the built-in ones). Every profile is checked when loaded,
//! and a bad one is refused with its file named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::ProfileCaps;

/// Profiles compiled into the binary, so vmlet runs with no files installed.
const BUILT_IN: &[(&str, &str)] = &[
    ("q35", include_str!("../../qemu-profiles/q35.toml")),
    ("microvm", include_str!("../../qemu-profiles/microvm.toml")),
];

/// Most hot-plug root ports a profile may reserve.
pub const MAX_ROOT_PORTS: u32 = 32;

/// One machine profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The profile's name (its file stem); filled in by the loader.
    #[serde(skip_deserializing, default)]
    pub name: String,
    /// One line for people.
    pub description: String,
    /// `-machine`.
    pub machine: MachineSection,
    /// `-cpu`, by accelerator.
    pub cpu: CpuSection,
    /// Device model names.
    pub devices: DeviceSection,
    /// Devices every VM gets.
    pub defaults: DefaultsSection,
    /// What the profile can do.
    pub supports: SupportsSection,
    /// Hot-plug slots.
    #[serde(default)]
    pub hotplug: HotplugSection,
}

/// `-machine TYPE,key=value,…`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineSection {
    /// Machine type (`q35`, `microvm`, `pc-q35-10.0`).
    #[serde(rename = "type")]
    pub machine_type: String,
    /// Machine options, emitted sorted by key.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// CPU model per accelerator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuSection {
    /// Model under KVM.
    pub kvm: String,
    /// Model under TCG.
    pub tcg: String,
}

/// How devices attach: PCI(e) or virtio-mmio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceBus {
    /// PCI Express (q35).
    Pci,
    /// virtio-mmio (microvm).
    Mmio,
}

/// QEMU device model names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// Bus kind.
    pub bus: DeviceBus,
    /// Disk device (`virtio-blk-pci`).
    pub disk: String,
    /// NIC device (`virtio-net-pci`).
    pub net: String,
    /// Serial console device (`isa-serial`).
    pub serial_port: String,
    /// virtio-serial controller for channels.
    pub virtio_serial: String,
    /// Entropy device.
    pub rng: String,
    /// Memory balloon device.
    pub balloon: String,
    /// Guest panic notifier (`pvpanic`), through which QEMU learns of a
    /// guest kernel panic (`GUEST_PANICKED`). Optional: a profile without
    /// one cannot tell a panic from a plain reset or hang.
    #[serde(default)]
    pub panic: Option<String>,
    /// SCSI controller for `bus: virtio_scsi` disks (`virtio-scsi-pci`).
    /// Optional: without one, such disks are refused.
    #[serde(default)]
    pub scsi: Option<String>,
    /// Display adapter (`VGA`) shown by the VM's VNC server (a unix socket
    /// in its run directory, reached through a console token). Optional: a
    /// profile without one has no graphical console.
    #[serde(default)]
    pub display: Option<String>,
    /// TPM device model for specs with `tpm` (`tpm-crb`), backed by the
    /// VM's `swtpm`. Optional: without one, `tpm` is refused.
    #[serde(default)]
    pub tpm: Option<String>,
}

/// Default devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSection {
    /// Add a virtio-rng fed from `/dev/urandom`.
    pub rng: bool,
    /// Add a memory balloon.
    pub balloon: bool,
    /// Add the panic notifier (`devices.panic`). Off when absent, so profile
    /// copies written before it existed still load.
    #[serde(default)]
    pub panic: bool,
}

/// Capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupportsSection {
    /// Disks and NICs can be added to a running VM.
    pub hotplug: bool,
    /// `-kernel`/`-initrd`/`-append` boot.
    pub kernel_boot: bool,
    /// Firmware (BIOS) boot from a disk.
    pub firmware_boot: bool,
    /// UEFI firmware on pflash (`boot.firmware: uefi`). Off when absent, so
    /// profile copies written before it existed still load.
    #[serde(default)]
    pub uefi: bool,
    /// UEFI Secure Boot (`uefi-secure`): the machine has SMM, which vmlet
    /// turns on (`smm=on`) for such VMs. Needs `uefi`.
    #[serde(default)]
    pub secure_boot: bool,
}

/// Hot-plug slots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotplugSection {
    /// Empty `pcie-root-port`s reserved at start.
    #[serde(default)]
    pub root_ports: u32,
}

impl Profile {
    /// The capabilities spec validation needs.
    pub fn caps(&self) -> ProfileCaps {
        ProfileCaps {
            kernel_boot: self.supports.kernel_boot,
            firmware_boot: self.supports.firmware_boot,
            scsi: self.devices.scsi.is_some(),
            pci: self.devices.bus == DeviceBus::Pci,
            tpm: self.devices.tpm.is_some(),
            uefi: self.supports.uefi,
            secure_boot: self.supports.secure_boot,
        }
    }

    /// Parses and checks one profile's TOML text.
    pub fn parse(name: &str, text: &str) -> Result<Profile, String> {
        check_word("profile name", name)?;
        let mut profile: Profile = toml::from_str(text).map_err(|e| e.to_string())?;
        profile.name = name.to_string();
        profile.check()?;
        Ok(profile)
    }

    fn check(&self) -> Result<(), String> {
        check_word("machine.type", &self.machine.machine_type)?;
        for (key, value) in &self.machine.options {
            check_word(&format!("machine.options key {key:?}"), key)?;
            check_word(&format!("machine.options.{key}"), value)?;
        }
        check_cpu("cpu.kvm", &self.cpu.kvm)?;
        check_cpu("cpu.tcg", &self.cpu.tcg)?;
        let d = &self.devices;
        for (field, model) in [
            ("devices.disk", &d.disk),
            ("devices.net", &d.net),
            ("devices.serial_port", &d.serial_port),
            ("devices.virtio_serial", &d.virtio_serial),
            ("devices.rng", &d.rng),
            ("devices.balloon", &d.balloon),
        ] {
            check_word(field, model)?;
        }
        if let Some(model) = &d.scsi {
            check_word("devices.scsi", model)?;
        }
        if let Some(model) = &d.display {
            check_word("devices.display", model)?;
        }
        match &d.panic {
            Some(model) => check_word("devices.panic", model)?,
            None if self.defaults.panic => {
                return Err("defaults.panic: needs devices.panic".into());
            }
            None => {}
        }
        if self.supports.secure_boot && !self.supports.uefi {
            return Err("supports.secure_boot: needs supports.uefi".into());
        }
        if self.supports.secure_boot && self.machine.options.get("smm").is_some_and(|v| v != "on") {
            return Err(
                "supports.secure_boot: needs SMM, but machine.options.smm is not \"on\"".into(),
            );
        }
        if !self.supports.kernel_boot && !self.supports.firmware_boot {
            return Err("supports: needs kernel_boot or firmware_boot".into());
        }
        if self.hotplug.root_ports > MAX_ROOT_PORTS {
            return Err(format!("hotplug.root_ports: at most {MAX_ROOT_PORTS}"));
        }
        if self.supports.hotplug {
            if d.bus != DeviceBus::Pci {
                return Err("supports.hotplug: needs devices.bus = \"pci\"".into());
            }
            if self.hotplug.root_ports == 0 {
                return Err("supports.hotplug: needs hotplug.root_ports > 0".into());
            }
        } else if self.hotplug.root_ports > 0 {
            return Err("hotplug.root_ports: set but supports.hotplug is false".into());
        }
        Ok(())
    }
}

/// Values that reach QEMU's command line from profiles: plain words only, so
/// an edited profile cannot smuggle extra options in.
fn check_word(field: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field}: {value:?} must be 1..=64 characters of A-Z a-z 0-9 . _ -"
        ))
    }
}

/// A `-cpu` value: a model, then feature flags after commas (`+aes`,
/// `-popcnt`, `pmu=off`). The whole value is QEMU's `-cpu` argument, so
/// each part is a plain word: nothing else can ride along.
fn check_cpu(field: &str, value: &str) -> Result<(), String> {
    let mut parts = value.split(',');
    check_word(field, parts.next().unwrap_or_default())?;
    let flags_ok = value.len() <= 512
        && parts.all(|flag| {
            let flag = flag.strip_prefix('+').unwrap_or(flag);
            !flag.is_empty()
                && flag.len() <= 64
                && flag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-=".contains(c))
        });
    if flags_ok {
        Ok(())
    } else {
        Err(format!(
            "{field}: {value:?} must be a CPU model then comma-separated flags (+name, -name, name=value) of A-Z a-z 0-9 . _ - ="
        ))
    }
}

/// A profile file that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The profile directory or a file in it could not be read.
    #[error("reading profile {path}")]
    Read {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A profile's content is wrong.
    #[error("profile {origin}: {message}")]
    Invalid {
        /// File path, or `built-in NAME`.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A spec asked for a profile that does not exist.
    #[error("unknown profile {0:?}")]
    Unknown(String),
}

/// All loaded profiles, by name.
#[derive(Debug, Clone)]
pub struct Profiles {
    by_name: BTreeMap<String, Profile>,
}

impl Profiles {
    /// The built-in profiles only.
    pub fn built_in() -> Result<Profiles, ProfileError> {
        let mut by_name = BTreeMap::new();
        for (name, text) in BUILT_IN {
            let profile = Profile::parse(name, text).map_err(|message| ProfileError::Invalid {
                origin: format!("built-in {name}"),
                message,
            })?;
            by_name.insert(name.to_string(), profile);
        }
        Ok(Profiles { by_name })
    }

    /// The built-in profiles, then every `*.toml` in `dir` (if it exists),
    /// which replaces a built-in profile of the same name or adds a new one.
    pub fn load(dir: Option<&Path>) -> Result<Profiles, ProfileError> {
        let mut profiles = Profiles::built_in()?;
        let Some(dir) = dir else {
            return Ok(profiles);
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(profiles),
            Err(source) => {
                return Err(ProfileError::Read {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(|source| ProfileError::Read {
                path: path.clone(),
                source,
            })?;
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            let profile =
                Profile::parse(&name, &text).map_err(|message| ProfileError::Invalid {
                    origin: path.display().to_string(),
                    message,
                })?;
            profiles.by_name.insert(name, profile);
        }
        Ok(profiles)
    }

    /// The profile called `name`.
    pub fn get(&self, name: &str) -> Result<&Profile, ProfileError> {
        self.by_name
            .get(name)
            .ok_or_else(|| ProfileError::Unknown(name.to_string()))
    }

    /// Capabilities of `name`, for spec validation.
    pub fn caps(&self, name: &str) -> Option<ProfileCaps> {
        self.by_name.get(name).map(Profile::caps)
    }

    /// Profile names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_profiles_load() {
        let p = Profiles::built_in().unwrap();
        assert_eq!(p.names().collect::<Vec<_>>(), ["microvm", "q35"]);
        let q35 = p.get("q35").unwrap();
        assert!(q35.supports.hotplug);
        assert_eq!(q35.devices.bus, DeviceBus::Pci);
        let micro = p.get("microvm").unwrap();
        assert!(!micro.supports.hotplug && !micro.supports.firmware_boot);
        assert!(matches!(p.get("nope"), Err(ProfileError::Unknown(_))));
    }

    #[test]
    fn uefi_support_is_declared_and_checked() {
        let p = Profiles::built_in().unwrap();
        let q35 = p.get("q35").unwrap().caps();
        assert!(q35.uefi && q35.secure_boot);
        let micro = p.get("microvm").unwrap().caps();
        assert!(!micro.uefi && !micro.secure_boot);
        // A profile copy from before UEFI loads without it.
        let old = BUILT_IN[0]
            .1
            .replace("uefi = true\n", "")
            .replace("secure_boot = true\n", "");
        let caps = Profile::parse("old", &old).unwrap().caps();
        assert!(!caps.uefi && !caps.secure_boot);
        // Secure Boot without pflash, or with SMM turned off, is refused.
        let no_uefi = BUILT_IN[0].1.replace("uefi = true\n", "");
        let err = Profile::parse("x", &no_uefi).unwrap_err();
        assert!(err.contains("supports.secure_boot"), "{err}");
        let smm_off = BUILT_IN[0]
            .1
            .replace("\"usb\" = \"off\"", "\"usb\" = \"off\", \"smm\" = \"off\"");
        assert_ne!(smm_off, BUILT_IN[0].1);
        let err = Profile::parse("x", &smm_off).unwrap_err();
        assert!(err.contains("SMM"), "{err}");
    }

    #[test]
    fn built_in_profiles_have_a_panic_device() {
        let p = Profiles::built_in().unwrap();
        for name in ["q35", "microvm"] {
            let profile = p.get(name).unwrap();
            assert!(profile.defaults.panic, "{name}");
            assert_eq!(profile.devices.panic.as_deref(), Some("pvpanic"), "{name}");
        }
    }

    #[test]
    fn panic_device_is_optional_and_checked() {
        // A profile from before the panic device loads, without one.
        let old = BUILT_IN[0]
            .1
            .replace("panic = \"pvpanic\"\n", "")
            .replace("panic = true\n", "");
        let profile = Profile::parse("old", &old).unwrap();
        assert_eq!(profile.devices.panic, None);
        assert!(!profile.defaults.panic);

        // Enabled but not named.
        let text = BUILT_IN[0].1.replace("panic = \"pvpanic\"\n", "");
        let err = Profile::parse("q", &text).unwrap_err();
        assert!(err.contains("defaults.panic"), "{err}");

        // Named but off: fine.
        let text = BUILT_IN[0].1.replace("panic = true", "panic = false");
        assert!(!Profile::parse("q", &text).unwrap().defaults.panic);

        // The model name reaches the command line, so it is checked.
        let text = BUILT_IN[0]
            .1
            .replace("panic = \"pvpanic\"", "panic = \"pvpanic,ioport=1\"");
        let err = Profile::parse("q", &text).unwrap_err();
        assert!(err.contains("devices.panic"), "{err}");
    }

    #[test]
    fn directory_overrides_and_adds() {
        let dir = tempfile::tempdir().unwrap();
        let q35 = BUILT_IN[0].1.replace("root_ports = 8", "root_ports = 2");
        std::fs::write(dir.path().join("q35.toml"), &q35).unwrap();
        std::fs::write(dir.path().join("big.toml"), &q35).unwrap();
        std::fs::write(dir.path().join("README"), "not a profile").unwrap();
        let p = Profiles::load(Some(dir.path())).unwrap();
        assert_eq!(p.get("q35").unwrap().hotplug.root_ports, 2);
        assert_eq!(p.get("big").unwrap().name, "big");
        assert!(Profiles::load(Some(&dir.path().join("missing"))).is_ok());
    }

    #[test]
    fn bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let bad = BUILT_IN[0]
            .1
            .replace("type = \"q35\"", "type = \"q35,accel=kvm\"");
        std::fs::write(dir.path().join("evil.toml"), bad).unwrap();
        let err = Profiles::load(Some(dir.path())).unwrap_err().to_string();
        assert!(
            err.contains("evil.toml") && err.contains("machine.type"),
            "{err}"
        );

        std::fs::write(dir.path().join("evil.toml"), "description = 1").unwrap();
        let err = Profiles::load(Some(dir.path())).unwrap_err().to_string();
        assert!(err.contains("evil.toml"), "{err}");
    }

    #[test]
    fn cpu_values_take_feature_flags_and_nothing_else() {
        for good in ["qemu64", "qemu64,+aes,+sse4.2,-popcnt", "host,pmu=off"] {
            assert_eq!(check_cpu("cpu.kvm", good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ",+aes",
            "qemu64,",
            "qemu64,+",
            "qemu64,+aes -device x",
            "qemu64,+aes,,+x",
            "qemu64\n",
        ] {
            let err = check_cpu("cpu.kvm", bad).unwrap_err();
            assert!(err.starts_with("cpu.kvm"), "{bad:?}: {err}");
        }
        let long = format!("qemu64{}", ",+aes".repeat(200));
        assert!(check_cpu("cpu.tcg", &long).is_err());
    }

    #[test]
    fn inconsistent_capabilities_are_refused() {
        let text = BUILT_IN[1].1.replace("hotplug = false", "hotplug = true");
        let err = Profile::parse("m", &text).unwrap_err();
        assert!(err.contains("supports.hotplug"), "{err}");
        let text = BUILT_IN[0].1.replace("colour", "x") + "\ncolour = 1\n";
        assert!(Profile::parse("q", &text).is_err());
    }
}
