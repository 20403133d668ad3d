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
    /// Host CPUs QEMU's threads run on, as a list like `0-3,6` (like
    /// libvirt's `<vcpu cpuset=…>`): every vCPU thread without an entry in
    /// `vcpu_affinity`, and QEMU's other threads. Unset: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_set: Option<String>,
    /// Host CPUs of each vCPU thread, one CPU list per vCPU in vCPU order
    /// (like libvirt's `<vcpupin>`), e.g. `["2", "3", "4-5"]`: exactly
    /// `vcpus` entries, each naming online CPUs of this host. QEMU's other
    /// threads keep `cpu_set`. Unset: every vCPU follows `cpu_set`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_affinity: Option<Vec<String>>,
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

/// The CPUs online on this host (`/sys/devices/system/cpu/online`);
/// `None` when that file cannot be read or parsed.
pub fn host_cpus() -> Option<Vec<u32>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    parse_cpu_list(text.trim()).ok()
}

/// Checks `resources.vcpu_affinity` for a VM of `vcpus` vCPUs on a host
/// whose online CPUs are `host` (`None`: unknown, not checked). Returns
/// `(field, message)` for each problem.
pub fn check_vcpu_affinity(
    lists: &[String],
    vcpus: u32,
    host: Option<&[u32]>,
) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    if lists.len() != vcpus as usize {
        errors.push((
            "resources.vcpu_affinity".to_owned(),
            format!(
                "has {} entries for {vcpus} vCPUs: give one CPU list per vCPU",
                lists.len()
            ),
        ));
    }
    // Bounded by the entries a VM can have: no message per extra entry.
    for (i, list) in lists
        .iter()
        .enumerate()
        .take(super::limits::MAX_VCPUS as usize)
    {
        let field = format!("resources.vcpu_affinity[{i}]");
        match parse_cpu_list(list) {
            Err(e) => errors.push((field, e)),
            Ok(cpus) => {
                if let Some(host) = host {
                    if let Some(cpu) = cpus.iter().find(|c| host.binary_search(c).is_err()) {
                        errors.push((
                            field,
                            format!(
                                "CPU {cpu} is not an online CPU of this host ({} online)",
                                format_cpu_list(host)
                            ),
                        ));
                    }
                }
            }
        }
    }
    errors
}

/// A sorted CPU list in the kernel's short form (`0-3,6`).
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_affinity_needs_one_list_per_vcpu_of_host_cpus() {
        let host = [0, 1, 2, 3];
        let lists = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_vcpu_affinity(&lists(&["2", "3", "0-1"]), 3, Some(&host)).is_empty());
        assert!(
            check_vcpu_affinity(&lists(&["7"]), 1, None).is_empty(),
            "host unknown"
        );
        let errors = check_vcpu_affinity(&lists(&["2", "9", "x", "1-0"]), 2, Some(&host));
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "resources.vcpu_affinity",
                "resources.vcpu_affinity[1]",
                "resources.vcpu_affinity[2]",
                "resources.vcpu_affinity[3]"
            ]
        );
        assert!(errors[0].1.contains("4 entries for 2 vCPUs"), "{errors:?}");
        assert!(
            errors[1]
                .1
                .contains("CPU 9 is not an online CPU of this host (0-3 online)"),
            "{errors:?}"
        );
        assert!(errors[2].1.contains("\"x\""), "{errors:?}");
        assert!(errors[3].1.contains("backwards"), "{errors:?}");
    }

    #[test]
    fn cpu_lists_format_short() {
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(format_cpu_list(&[5]), "5");
        assert_eq!(format_cpu_list(&[]), "");
    }

    #[test]
    fn cpu_lists_parse_like_the_kernels() {
        assert_eq!(parse_cpu_list("0-3,6"), Ok(vec![0, 1, 2, 3, 6]));
        assert_eq!(parse_cpu_list("5, 1,1-2"), Ok(vec![1, 2, 5]));
        for bad in ["", "a", "3-1", "1-", "-1", "4096", "0,,1"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad}");
        }
    }
}
