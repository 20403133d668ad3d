//! `resources`: what a VM's QEMU may take from the host, enforced through
//! its cgroup (CPU weight and quota, memory, tasks, I/O weight) and vCPU
//! pinning.

use serde::{Deserialize, Serialize};

/// Host resources of a VM. Unset fields take the daemon's defaults
/// (`[qemu]` settings); the memory limit is always the guest's memory plus
/// the overhead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Relative CPU share against other VMs when the host is busy, 1–10000
    /// (100 is the norm; cgroup v1 `cpu.shares` = weight × 1024 / 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// Hard CPU cap in percent of one host core (e.g. 50, or 200 for two
    /// cores), enforced over 100 ms periods. Unset: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_percent: Option<u32>,
    /// MiB QEMU may use beyond the guest's memory (its own code, device
    /// buffers, the TCG translation cache) before the cgroup's memory limit
    /// stops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_overhead_mib: Option<u64>,
    /// Most tasks (threads) QEMU may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// Relative block I/O share, 1–10000 (100 is the norm), where the host's
    /// I/O scheduler supports weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u32>,
    /// Host CPUs the vCPU threads run on, as a list like `0-3,6` (like
    /// libvirt's `<vcpupin>` for every vCPU). Unset: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_set: Option<String>,
}

impl Resources {
    /// True when nothing is set (the field is then left out of the spec).
    pub fn is_default(&self) -> bool {
        *self == Resources::default()
    }
}

/// Highest host CPU number a `cpu_set` may name.
pub const MAX_HOST_CPU: u32 = 4095;

/// Parses a CPU list (`0-3,6`): sorted, without duplicates.
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, String> {
    let mut cpus = Vec::new();
    if text.trim().is_empty() {
        return Err("is empty".into());
    }
    for part in text.split(',') {
        let part = part.trim();
        let number = |s: &str| -> Result<u32, String> {
            let n: u32 = s
                .parse()
                .map_err(|_| format!("{s:?} is not a CPU number"))?;
            if n > MAX_HOST_CPU {
                return Err(format!("CPU {n} is above {MAX_HOST_CPU}"));
            }
            Ok(n)
        };
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (number(first.trim())?, number(last.trim())?);
                if last < first {
                    return Err(format!("range {part:?} runs backwards"));
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(number(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_the_kernels() {
        assert_eq!(parse_cpu_list("0-3,6"), Ok(vec![0, 1, 2, 3, 6]));
        assert_eq!(parse_cpu_list("5, 1,1-2"), Ok(vec![1, 2, 5]));
        for bad in ["", "a", "3-1", "1-", "-1", "4096", "0,,1"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad}");
        }
    }
}
