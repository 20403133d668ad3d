//! Choosing the accelerator: `auto` picks KVM only where KVM can really boot
//! a guest, otherwise TCG.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What the operator asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccelChoice {
    /// KVM when usable, else TCG.
    #[default]
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(format!("accel: {other:?} is not auto, kvm or tcg")),
        }
    }
}

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// QEMU's name (`-accel NAME`).
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the host offers, as read by [`probe_host`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmProbe {
    /// `/dev/kvm` opens read-write.
    pub dev_kvm_opens: bool,
    /// `kvm_intel` or `kvm_amd` is loaded (a hardware KVM, not a paravirtual one).
    pub hardware_module: bool,
}

/// The rule: `auto` means KVM only when `/dev/kvm` opens *and* a hardware KVM
/// module is loaded. Some nested hosts expose a `/dev/kvm` (e.g. `kvm_pvm`)
/// that cannot boot an ordinary guest kernel.
pub fn resolve(choice: AccelChoice, probe: KvmProbe) -> Accel {
    match choice {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto if probe.dev_kvm_opens && probe.hardware_module => Accel::Kvm,
        AccelChoice::Auto => Accel::Tcg,
    }
}

/// Reads the host's KVM facts.
pub fn probe_host() -> KvmProbe {
    let dev_kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let hardware_module = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| Path::new("/sys/module").join(m).exists());
    KvmProbe {
        dev_kvm_opens,
        hardware_module,
    }
}

/// Why `choice` gives the accelerator it gives on a host with `probe`.
pub fn explain(choice: AccelChoice, probe: KvmProbe) -> String {
    match (choice, resolve(choice, probe)) {
        (AccelChoice::Kvm, _) => "kvm chosen in the settings".into(),
        (AccelChoice::Tcg, _) => "tcg chosen in the settings".into(),
        (AccelChoice::Auto, Accel::Kvm) => "auto: /dev/kvm and a hardware KVM module".into(),
        (AccelChoice::Auto, Accel::Tcg) if !probe.dev_kvm_opens => {
            "auto: /dev/kvm does not open; software emulation".into()
        }
        (AccelChoice::Auto, Accel::Tcg) => {
            "auto: no kvm_intel or kvm_amd module; software emulation".into()
        }
    }
}

/// Resolves `choice` on this host, logging when `auto` falls back to TCG.
pub fn resolve_on_host(choice: AccelChoice) -> Accel {
    resolve_on_host_explained(choice).0
}

/// [`resolve_on_host`], also saying why (see [`explain`]), from one probe.
pub fn resolve_on_host_explained(choice: AccelChoice) -> (Accel, String) {
    let probe = probe_host();
    let accel = resolve(choice, probe);
    if choice == AccelChoice::Auto && accel == Accel::Tcg {
        tracing::warn!(
            dev_kvm_opens = probe.dev_kvm_opens,
            hardware_kvm_module = probe.hardware_module,
            "no usable hardware KVM: guests run under TCG (software emulation, much slower)"
        );
    }
    (accel, explain(choice, probe))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_needs_both_dev_kvm_and_a_hardware_module() {
        for dev in [false, true] {
            for hw in [false, true] {
                let probe = KvmProbe {
                    dev_kvm_opens: dev,
                    hardware_module: hw,
                };
                let want = if dev && hw { Accel::Kvm } else { Accel::Tcg };
                assert_eq!(resolve(AccelChoice::Auto, probe), want, "{probe:?}");
                assert_eq!(resolve(AccelChoice::Kvm, probe), Accel::Kvm);
                assert_eq!(resolve(AccelChoice::Tcg, probe), Accel::Tcg);
            }
        }
    }

    #[test]
    fn parses_choice() {
        assert_eq!("kvm".parse::<AccelChoice>(), Ok(AccelChoice::Kvm));
        assert!("hvf".parse::<AccelChoice>().unwrap_err().contains("accel"));
    }
}
