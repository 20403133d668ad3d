//! The host as the scheduler sees it: `GET /v1/node`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Facts about this host and its vmlet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeInfo {
    /// The host's name.
    pub hostname: String,
    /// vmlet's version.
    pub vmlet_version: String,
    /// Online CPUs.
    pub cpus: u32,
    /// Physical memory, in MiB.
    pub memory_mib: u64,
    /// The QEMU binary vmlet launches.
    pub qemu_binary: String,
    /// Its version (`major.minor.micro`), as it reports it.
    pub qemu_version: String,
    /// The accelerator VMs get: `kvm` or `tcg`.
    pub accel: String,
    /// Why that accelerator (e.g. why KVM is not used).
    pub accel_reason: String,
    /// Machine profiles VMs may name.
    pub profiles: Vec<String>,
    /// How many VMs are in each state (states with none are left out).
    pub vms_by_state: BTreeMap<String, u64>,
}

/// The host's name, from the kernel.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Online CPUs.
pub fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Physical memory in MiB, from `/proc/meminfo`.
pub fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| kib_field(&text, "MemTotal:"))
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

/// Resident memory of process `pid` in KiB (`VmRSS` in `/proc/PID/status`);
/// `None` when the process is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&status, "VmRSS:")
}

/// The number in a `Key:   1234 kB` line of a `/proc` file.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_kib() {
        let text = "MemFree: 5 kB\nMemTotal:       24594336 kB\n";
        assert_eq!(kib_field(text, "MemTotal:"), Some(24594336));
        assert_eq!(kib_field("nothing", "MemTotal:"), None);
    }

    #[test]
    fn this_host_has_cpus_and_memory() {
        assert!(cpus() >= 1);
        assert!(memory_mib() > 0);
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }
}
