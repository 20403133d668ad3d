//! cgroup v1: a directory per hierarchy (cpu, cpuacct, cpuset, memory,
//! pids, blkio, wherever each is mounted), each written on its own.

use std::path::Path;

use super::{
    bfq_weight, blkio_weight, ensure_empty, keyed, make_dir, read_number, read_value, write_value,
    CgroupError, CgroupStats, Limits, Member, Unapplied, CPU_PERIOD_US,
};

/// v1 shows "no limit" as the largest page-aligned signed 64-bit number;
/// anything from here up (for pages up to 64 KiB) is unlimited.
const UNLIMITED_FROM: u64 = (i64::MAX as u64) & !0xFFFF;

/// Makes `ROOT/UUID` below vmlet's cgroup in every hierarchy of `members` and writes `limits`;
/// VM directories made are pushed to `made` (for the caller to undo).
pub(super) fn create(
    members: &[Member],
    root: &[String],
    limits: &Limits,
    made: &mut Vec<std::path::PathBuf>,
) -> Result<Vec<Unapplied>, CgroupError> {
    for member in members {
        let cpuset = member.controllers.iter().any(|c| c == "cpuset");
        let mut dir = member.top.clone();
        for component in root {
            let parent = dir.clone();
            dir.push(component);
            make_dir(&dir)?;
            if cpuset {
                inherit_cpuset(&parent, &dir)?;
            }
        }
        if make_dir(&member.dir)? {
            made.push(member.dir.clone());
        } else {
            ensure_empty(&member.dir)?;
        }
        if cpuset {
            inherit_cpuset(&dir, &member.dir)?;
        }
    }
    let dir_of = |controller: &str| {
        members
            .iter()
            .find(|m| m.controllers.iter().any(|c| c == controller))
            .map(|m| m.dir.as_path())
    };
    // Cgroups::new made sure cpu, memory and pids are mounted.
    let missing = |controller: &'static str| CgroupError::MissingController {
        controller,
        detail: "no cgroup v1 mount has it".to_owned(),
    };
    let mut unapplied = Vec::new();

    let cpu = dir_of("cpu").ok_or_else(|| missing("cpu"))?;
    write_value(&cpu.join("cpu.shares"), &limits.cpu_shares().to_string())?;
    write_value(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
    let quota = limits
        .cpu_quota_us()
        .map_or_else(|| "-1".to_owned(), |q| q.to_string());
    write_value(&cpu.join("cpu.cfs_quota_us"), &quota)?;

    let memory = dir_of("memory").ok_or_else(|| missing("memory"))?;
    let limit = limits.memory_max_bytes.to_string();
    let memsw = memory.join("memory.memsw.limit_in_bytes");
    if memsw.exists() {
        // memsw may never be below the memory limit: lift it first, so a
        // reused cgroup can get a higher limit, then set both.
        write_value(&memsw, "-1")?;
        write_value(&memory.join("memory.limit_in_bytes"), &limit)?;
        write_value(&memsw, &limit)?;
    } else {
        write_value(&memory.join("memory.limit_in_bytes"), &limit)?;
        unapplied.push(Unapplied::Swap {
            detail: format!("no memory.memsw.limit_in_bytes in {}", memory.display()),
        });
    }

    let pids = dir_of("pids").ok_or_else(|| missing("pids"))?;
    write_value(&pids.join("pids.max"), &limits.pids_max.to_string())?;

    let weight = limits.io_weight_or_default();
    match dir_of("blkio") {
        Some(blkio) if blkio.join("blkio.weight").exists() => {
            write_value(
                &blkio.join("blkio.weight"),
                &blkio_weight(weight).to_string(),
            )?;
        }
        Some(blkio) if blkio.join("blkio.bfq.weight").exists() => {
            write_value(
                &blkio.join("blkio.bfq.weight"),
                &bfq_weight(weight).to_string(),
            )?;
        }
        Some(blkio) if limits.io_weight.is_some() => unapplied.push(Unapplied::IoWeight {
            detail: format!(
                "neither blkio.weight nor blkio.bfq.weight in {}",
                blkio.display()
            ),
        }),
        None if limits.io_weight.is_some() => unapplied.push(Unapplied::IoWeight {
            detail: "no cgroup v1 mount has the blkio controller".to_owned(),
        }),
        _ => {}
    }
    Ok(unapplied)
}

/// Gives cpuset `dir` its parent's CPUs and memory nodes when it has none:
/// a task cannot join a cpuset whose `cpuset.cpus` or `cpuset.mems` is empty.
fn inherit_cpuset(parent: &Path, dir: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        if read_value(&dir.join(file))?.trim().is_empty() {
            let inherited = read_value(&parent.join(file))?;
            write_value(&dir.join(file), inherited.trim())?;
        }
    }
    Ok(())
}

/// Statistics from the directory of each controller (`dir_of`).
pub(super) fn stats<'a>(dir_of: impl Fn(&str) -> Option<&'a Path>) -> CgroupStats {
    let cpu_stat = dir_of("cpu").and_then(|dir| read_value(&dir.join("cpu.stat")).ok());
    let cpu_stat = cpu_stat.as_deref().unwrap_or("");
    let memory = dir_of("memory");
    CgroupStats {
        cpu_usage_ns: dir_of("cpuacct").and_then(|dir| read_number(&dir.join("cpuacct.usage"))),
        cpu_periods: keyed(cpu_stat, "nr_periods"),
        cpu_throttled_periods: keyed(cpu_stat, "nr_throttled"),
        cpu_throttled_ns: keyed(cpu_stat, "throttled_time"),
        memory_current_bytes: memory
            .and_then(|dir| read_number(&dir.join("memory.usage_in_bytes"))),
        memory_max_bytes: memory
            .and_then(|dir| read_number(&dir.join("memory.limit_in_bytes")))
            .filter(|&max| max < UNLIMITED_FROM),
        pids_current: dir_of("pids").and_then(|dir| read_number(&dir.join("pids.current"))),
    }
}
