//! The guest's processor and memory layout: CPU model and feature flags,
//! sockets/cores/threads, NUMA nodes and huge-page backing. Pure types and
//! their checks; the QEMU options they become are built in `qemu::argv`.

use serde::{Deserialize, Serialize};

use super::resources::parse_cpu_list;

/// Longest CPU model name.
pub const MAX_CPU_MODEL_LEN: usize = 64;
/// Most feature flags on one VM.
pub const MAX_CPU_FEATURES: usize = 64;
/// Longest feature name (without its `+`/`-`).
pub const MAX_CPU_FEATURE_LEN: usize = 48;
/// Most NUMA nodes on one VM.
pub const MAX_NUMA_NODES: usize = 64;

/// The guest CPU: a QEMU CPU model and feature flags on top of it.
/// Without it the VM gets its profile's portable, migratable model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CpuSpec {
    /// A CPU model of this host's QEMU (`GET /v1/node` lists the usable
    /// ones): `qemu64`, `Skylake-Client-v4`, … `host` and `max` pass this
    /// host's CPU through: such a VM cannot be live-migrated. Unset: the
    /// profile's model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Feature flags added (`+aes`) or removed (`-x2apic`), in order; each
    /// names a CPU feature of this host's QEMU.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// How the vCPUs are arranged: `sockets × cores × threads` must equal
/// `vcpus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// CPU sockets.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
}

/// One guest NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NumaNode {
    /// The vCPUs of this node, as a list like `0-1` or `0,2`. Every vCPU
    /// belongs to exactly one node.
    pub cpus: String,
    /// Memory of this node in MiB; the nodes' memory adds up to
    /// `memory_mib`.
    pub memory_mib: u64,
}

/// Size of the huge pages guest memory is backed by.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
pub enum HugePageSize {
    /// 2 MiB pages.
    #[serde(rename = "2M")]
    Size2M,
    /// 1 GiB pages.
    #[serde(rename = "1G")]
    Size1G,
}

impl HugePageSize {
    /// Every size, smallest first.
    pub const ALL: [HugePageSize; 2] = [HugePageSize::Size2M, HugePageSize::Size1G];

    /// The page size in MiB.
    pub fn mib(self) -> u64 {
        match self {
            HugePageSize::Size2M => 2,
            HugePageSize::Size1G => 1024,
        }
    }

    /// The page size in bytes (QEMU's `hugetlbsize`).
    pub fn bytes(self) -> u64 {
        self.mib() << 20
    }

    /// The name the API uses: `2M`, `1G`.
    pub fn as_str(self) -> &'static str {
        match self {
            HugePageSize::Size2M => "2M",
            HugePageSize::Size1G => "1G",
        }
    }

    /// The kernel's directory name under `/sys/kernel/mm/hugepages`.
    pub fn sysfs_dir(self) -> &'static str {
        match self {
            HugePageSize::Size2M => "hugepages-2048kB",
            HugePageSize::Size1G => "hugepages-1048576kB",
        }
    }

    /// Pages needed for `memory_mib` of guest memory (rounded up).
    pub fn pages_for(self, memory_mib: u64) -> u64 {
        memory_mib.div_ceil(self.mib())
    }
}

/// How guest memory is backed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemorySpec {
    /// Back all guest memory with preallocated huge pages of this size,
    /// taken from the host's reserved pool (`/proc/sys/vm/nr_hugepages`
    /// for 2M). Unset: ordinary memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<HugePageSize>,
}

impl MemorySpec {
    /// True when nothing is set (the field is then left out of the spec).
    pub fn is_default(&self) -> bool {
        *self == MemorySpec::default()
    }
}

/// Checks a CPU model name: letters, digits, `.`, `_`, `-`, so it cannot
/// carry a `-cpu` option of its own.
pub fn check_cpu_model(model: &str) -> Result<(), String> {
    if model.is_empty() {
        return Err("must not be empty".into());
    }
    if model.len() > MAX_CPU_MODEL_LEN {
        return Err(format!("longer than {MAX_CPU_MODEL_LEN} characters"));
    }
    if !model
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{model:?} is not a CPU model name (letters, digits, '.', '_', '-')"
        ));
    }
    Ok(())
}

/// Checks one feature flag: `+name` or `-name`, the name lowercase letters,
/// digits, `.`, `_`, `-`.
pub fn check_cpu_feature(flag: &str) -> Result<(), String> {
    let name = flag
        .strip_prefix('+')
        .or_else(|| flag.strip_prefix('-'))
        .ok_or_else(|| format!("{flag:?} must start with '+' (add) or '-' (remove)"))?;
    if name.is_empty() || name.len() > MAX_CPU_FEATURE_LEN {
        return Err(format!(
            "{flag:?}: the feature name must be 1..={MAX_CPU_FEATURE_LEN} characters"
        ));
    }
    let first_ok = name.as_bytes()[0].is_ascii_alphanumeric();
    if !first_ok
        || !name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
    {
        return Err(format!(
            "{flag:?}: a feature name is lowercase letters, digits, '.', '_', '-'"
        ));
    }
    Ok(())
}

/// The feature name of a flag (`+aes` → `aes`).
pub fn feature_name(flag: &str) -> &str {
    flag.get(1..).unwrap_or_default()
}

/// The `-cpu` value of `model` with `features`: `qemu64,+aes,-x2apic`.
/// Both must have passed [`check_cpu_model`] and [`check_cpu_feature`].
pub fn cpu_value(model: &str, features: &[String]) -> String {
    let mut value = model.to_string();
    for flag in features {
        value.push(',');
        value.push_str(flag);
    }
    value
}

/// Every problem with a VM's CPU, topology, NUMA and memory fields, as
/// (field, message) pairs. `vcpus` and `memory_mib` are the spec's own.
pub fn check(
    cpu: Option<&CpuSpec>,
    topology: Option<&Topology>,
    numa: &[NumaNode],
    memory: &MemorySpec,
    vcpus: u32,
    memory_mib: u64,
) -> Vec<(String, String)> {
    let mut errors: Vec<(String, String)> = Vec::new();
    let mut add = |field: String, message: String| errors.push((field, message));
    if let Some(cpu) = cpu {
        if let Some(model) = &cpu.model {
            if let Err(e) = check_cpu_model(model) {
                add("cpu.model".into(), e);
            }
        }
        if cpu.features.len() > MAX_CPU_FEATURES {
            add(
                "cpu.features".into(),
                format!("more than {MAX_CPU_FEATURES} flags"),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, flag) in cpu.features.iter().enumerate() {
            match check_cpu_feature(flag) {
                Err(e) => add(format!("cpu.features[{i}]"), e),
                Ok(()) => {
                    if !seen.insert(feature_name(flag)) {
                        add(
                            format!("cpu.features[{i}]"),
                            format!("feature {:?} is named more than once", feature_name(flag)),
                        );
                    }
                }
            }
        }
    }
    if let Some(t) = topology {
        for (name, value) in [
            ("sockets", t.sockets),
            ("cores", t.cores),
            ("threads", t.threads),
        ] {
            if value == 0 {
                add(format!("topology.{name}"), "must be at least 1".into());
            }
        }
        let product = u128::from(t.sockets) * u128::from(t.cores) * u128::from(t.threads);
        if product != u128::from(vcpus) && t.sockets > 0 && t.cores > 0 && t.threads > 0 {
            add(
                "topology".into(),
                format!(
                    "sockets × cores × threads = {} × {} × {} = {product}, but vcpus is {vcpus}",
                    t.sockets, t.cores, t.threads
                ),
            );
        }
    }
    if !numa.is_empty() {
        if numa.len() > MAX_NUMA_NODES {
            add("numa".into(), format!("more than {MAX_NUMA_NODES} nodes"));
        }
        // Which node each vCPU is in, to find vCPUs in none or in two.
        let mut owner: Vec<Option<usize>> = vec![None; vcpus as usize];
        let mut total: u64 = 0;
        for (i, node) in numa.iter().enumerate() {
            match parse_cpu_list(&node.cpus) {
                Err(e) => add(format!("numa[{i}].cpus"), e),
                Ok(cpus) => {
                    let mut shared = false;
                    for cpu in cpus {
                        match owner.get_mut(cpu as usize) {
                            None => {
                                add(
                                    format!("numa[{i}].cpus"),
                                    format!("vCPU {cpu} does not exist (vcpus is {vcpus})"),
                                );
                                break;
                            }
                            // One error per node; its other vCPUs still count.
                            Some(Some(other)) => {
                                if !shared {
                                    add(
                                        format!("numa[{i}].cpus"),
                                        format!("vCPU {cpu} is already in numa[{other}]"),
                                    );
                                }
                                shared = true;
                            }
                            Some(slot) => *slot = Some(i),
                        }
                    }
                }
            }
            if node.memory_mib == 0 {
                add(format!("numa[{i}].memory_mib"), "must be at least 1".into());
            }
            if let Some(size) = memory.hugepages {
                if !node.memory_mib.is_multiple_of(size.mib()) {
                    add(
                        format!("numa[{i}].memory_mib"),
                        format!(
                            "must be a multiple of the huge page size ({} MiB)",
                            size.mib()
                        ),
                    );
                }
            }
            total = total.saturating_add(node.memory_mib);
        }
        if let Some(missing) = owner.iter().position(Option::is_none) {
            add(
                "numa".into(),
                format!(
                    "vCPU {missing} is in no node: the nodes' cpus must cover 0-{}",
                    vcpus.saturating_sub(1)
                ),
            );
        }
        if total != memory_mib {
            add(
                "numa".into(),
                format!("the nodes' memory_mib adds up to {total}, but memory_mib is {memory_mib}"),
            );
        }
    }
    if let Some(size) = memory.hugepages {
        if !memory_mib.is_multiple_of(size.mib()) {
            add(
                "memory.hugepages".into(),
                format!(
                    "memory_mib ({memory_mib}) must be a multiple of the huge page size ({} MiB)",
                    size.mib()
                ),
            );
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cpus: &str, memory_mib: u64) -> NumaNode {
        NumaNode {
            cpus: cpus.into(),
            memory_mib,
        }
    }

    fn fields(errors: Vec<(String, String)>) -> Vec<String> {
        errors.into_iter().map(|(f, _)| f).collect()
    }

    #[test]
    fn models_and_features_are_plain_names() {
        assert_eq!(check_cpu_model("Skylake-Client-v4"), Ok(()));
        assert_eq!(check_cpu_model("qemu64"), Ok(()));
        for bad in ["", "qemu64,+aes", "a b", "x=y", &"m".repeat(65)] {
            assert!(check_cpu_model(bad).is_err(), "{bad}");
        }
        for good in [
            "+aes",
            "-x2apic",
            "+sse4.2",
            "+avx512-vp2intersect",
            "+lahf_lm",
        ] {
            assert_eq!(check_cpu_feature(good), Ok(()), "{good}");
        }
        for bad in [
            "aes", "+", "+AES", "+a,b", "+a=on", "-", "++aes", "+-aes", "+ aes",
        ] {
            assert!(check_cpu_feature(bad).is_err(), "{bad}");
        }
        assert_eq!(
            cpu_value("qemu64", &["+aes".into(), "-x2apic".into()]),
            "qemu64,+aes,-x2apic"
        );
    }

    #[test]
    fn features_are_named_once() {
        let cpu = CpuSpec {
            model: None,
            features: vec!["+aes".into(), "-aes".into()],
        };
        let errors = check(Some(&cpu), None, &[], &MemorySpec::default(), 1, 128);
        assert_eq!(fields(errors), ["cpu.features[1]"]);
    }

    #[test]
    fn topology_must_multiply_to_vcpus() {
        let t = |sockets, cores, threads| Topology {
            sockets,
            cores,
            threads,
        };
        let mem = MemorySpec::default();
        assert!(check(None, Some(&t(1, 2, 2)), &[], &mem, 4, 128).is_empty());
        assert!(check(None, Some(&t(2, 1, 1)), &[], &mem, 2, 128).is_empty());
        let errors = check(None, Some(&t(2, 2, 2)), &[], &mem, 4, 128);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, "topology");
        assert!(
            errors[0].1.contains("= 8, but vcpus is 4"),
            "{}",
            errors[0].1
        );
        assert_eq!(
            fields(check(None, Some(&t(0, 2, 2)), &[], &mem, 4, 128)),
            ["topology.sockets"]
        );
        // No overflow with absurd values.
        assert_eq!(
            fields(check(
                None,
                Some(&t(u32::MAX, u32::MAX, 2)),
                &[],
                &mem,
                4,
                128
            )),
            ["topology"]
        );
    }

    #[test]
    fn numa_nodes_cover_every_vcpu_once_and_all_memory() {
        let mem = MemorySpec::default();
        let two = [node("0-1", 128), node("2,3", 128)];
        assert!(check(None, None, &two, &mem, 4, 256).is_empty());

        let errors = check(
            None,
            None,
            &[node("0-1", 128), node("1-3", 128)],
            &mem,
            4,
            256,
        );
        assert_eq!(fields(errors.clone()), ["numa[1].cpus"]);
        assert!(
            errors[0].1.contains("vCPU 1 is already in numa[0]"),
            "{errors:?}"
        );

        let errors = check(
            None,
            None,
            &[node("0", 128), node("2-3", 128)],
            &mem,
            4,
            256,
        );
        assert_eq!(fields(errors.clone()), ["numa"]);
        assert!(errors[0].1.contains("vCPU 1 is in no node"), "{errors:?}");

        let errors = check(None, None, &[node("0-4", 256)], &mem, 4, 256);
        assert_eq!(fields(errors.clone()), ["numa[0].cpus"]);
        assert!(errors[0].1.contains("vCPU 4 does not exist"), "{errors:?}");

        let errors = check(
            None,
            None,
            &[node("0-1", 100), node("2-3", 100)],
            &mem,
            4,
            256,
        );
        assert_eq!(fields(errors.clone()), ["numa"]);
        assert!(errors[0].1.contains("adds up to 200"), "{errors:?}");

        assert_eq!(
            fields(check(None, None, &[node("x", 0)], &mem, 1, 1)),
            ["numa[0].cpus", "numa[0].memory_mib", "numa", "numa"]
        );
    }

    #[test]
    fn huge_pages_need_whole_pages() {
        let huge = MemorySpec {
            hugepages: Some(HugePageSize::Size2M),
        };
        assert!(check(None, None, &[], &huge, 1, 128).is_empty());
        assert_eq!(
            fields(check(None, None, &[], &huge, 1, 129)),
            ["memory.hugepages"]
        );
        let errors = check(None, None, &[node("0", 65), node("1", 65)], &huge, 2, 130);
        assert_eq!(fields(errors), ["numa[0].memory_mib", "numa[1].memory_mib"]);
        let gig = MemorySpec {
            hugepages: Some(HugePageSize::Size1G),
        };
        assert_eq!(
            fields(check(None, None, &[], &gig, 1, 512)),
            ["memory.hugepages"]
        );
        assert_eq!(HugePageSize::Size2M.pages_for(128), 64);
        assert_eq!(HugePageSize::Size1G.pages_for(2048), 2);
        assert_eq!(HugePageSize::Size2M.bytes(), 2 * 1024 * 1024);
    }

    #[test]
    fn sizes_read_and_write_as_the_api_names_them() {
        let m: MemorySpec = serde_json::from_str(r#"{"hugepages":"2M"}"#).unwrap();
        assert_eq!(m.hugepages, Some(HugePageSize::Size2M));
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"hugepages":"2M"}"#);
        assert!(serde_json::from_str::<MemorySpec>(r#"{"hugepages":"4K"}"#).is_err());
        assert!(serde_json::from_str::<MemorySpec>(r#"{"huge":"2M"}"#).is_err());
    }
}
