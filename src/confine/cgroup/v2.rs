//! cgroup v2: one directory in the unified hierarchy, with the controllers
//! enabled from vmlet's own cgroup (or the mount, for an absolute ROOT or a
//! vmlet in the root cgroup) down to ROOT.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{
    bfq_weight, ensure_empty, keyed, make_dir, read_number, read_value, words, write_value,
    CgroupError, CgroupStats, Limits, Member, Unapplied, V2_CONTROLLERS,
};

/// The controllers the hierarchy offers at its mount (`cgroup.controllers`).
pub(super) fn available_controllers(mount: &Path) -> Result<BTreeSet<String>, CgroupError> {
    Ok(words(&read_value(&mount.join("cgroup.controllers"))?))
}

/// Makes `ROOT/UUID` (`member.dir`), enabling the controllers vmlet uses
/// on the way, and writes `limits`; the VM directory, if made, is pushed to
/// `made` (for the caller to undo).
pub(super) fn create(
    member: &Member,
    root: &[String],
    limits: &Limits,
    made: &mut Vec<PathBuf>,
) -> Result<Vec<Unapplied>, CgroupError> {
    let available = available_controllers(&member.top)?;
    let wanted: Vec<&str> = V2_CONTROLLERS
        .into_iter()
        .filter(|c| available.contains(*c))
        .collect();
    let mut dir = member.top.clone();
    enable(&dir, &wanted)?;
    for component in root {
        dir.push(component);
        make_dir(&dir)?;
        enable(&dir, &wanted)?;
    }
    let vm = &member.dir;
    if make_dir(vm)? {
        made.push(vm.clone());
    } else {
        ensure_empty(vm)?;
    }

    let mut unapplied = Vec::new();
    write_value(&vm.join("cpu.weight"), &limits.cpu_weight.to_string())?;
    write_value(&vm.join("cpu.max"), &limits.cpu_max())?;
    write_value(&vm.join("memory.max"), &limits.memory_max_bytes.to_string())?;
    let swap = vm.join("memory.swap.max");
    if swap.exists() {
        write_value(&swap, "0")?;
    } else {
        unapplied.push(Unapplied::Swap {
            detail: format!("no memory.swap.max in {}", vm.display()),
        });
    }
    write_value(&vm.join("pids.max"), &limits.pids_max.to_string())?;
    let weight = limits.io_weight_or_default();
    if vm.join("io.weight").exists() {
        write_value(&vm.join("io.weight"), &format!("default {weight}"))?;
    } else if vm.join("io.bfq.weight").exists() {
        write_value(&vm.join("io.bfq.weight"), &bfq_weight(weight).to_string())?;
    } else if limits.io_weight.is_some() {
        unapplied.push(Unapplied::IoWeight {
            detail: format!("neither io.weight nor io.bfq.weight in {}", vm.display()),
        });
    }
    Ok(unapplied)
}

/// Enables `wanted` controllers for the children of `dir`, writing only
/// those not enabled yet (in one write, as the kernel accepts a list).
fn enable(dir: &Path, wanted: &[&str]) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = words(&read_value(&path)?);
    let missing: Vec<String> = wanted
        .iter()
        .filter(|c| !enabled.contains(**c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write_value(&path, &missing.join(" "))
}

/// Statistics from the VM's directory.
pub(super) fn stats(dir: &Path) -> CgroupStats {
    let cpu_stat = read_value(&dir.join("cpu.stat")).unwrap_or_default();
    let micros = |key| keyed(&cpu_stat, key).map(|us| us.saturating_mul(1000));
    CgroupStats {
        cpu_usage_ns: micros("usage_usec"),
        cpu_periods: keyed(&cpu_stat, "nr_periods"),
        cpu_throttled_periods: keyed(&cpu_stat, "nr_throttled"),
        cpu_throttled_ns: micros("throttled_usec"),
        memory_current_bytes: read_number(&dir.join("memory.current")),
        // "max" (no limit) is not a number: None.
        memory_max_bytes: read_number(&dir.join("memory.max")),
        pids_current: read_number(&dir.join("pids.current")),
    }
}
