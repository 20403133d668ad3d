//! Pinning threads to host CPUs (`sched_setaffinity`), done by vmlet for
//! QEMU's vCPU threads because QEMU's seccomp filter forbids QEMU doing it.

/// Restricts each thread in `threads` (kernel thread ids) to `cpus`.
pub fn pin(threads: &[i32], cpus: &[u32]) -> std::io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for cpu in cpus {
        set.set(*cpu as usize).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is beyond what this host can name"),
            )
        })?;
    }
    for tid in threads {
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(*tid), &set)
            .map_err(|e| std::io::Error::other(format!("thread {tid}: {e}")))?;
    }
    Ok(())
}

/// The CPUs each thread of a QEMU is pinned to: vCPU `index` (thread
/// `tid`, from `vcpus`) its entry of `per_vcpu` when given, every other
/// thread in `threads` (and a vCPU without an entry) `common` when given.
/// A thread with nothing to apply is left out.
pub fn plan(
    threads: &[i32],
    vcpus: &[(usize, i32)],
    common: Option<&[u32]>,
    per_vcpu: Option<&[Vec<u32>]>,
) -> Vec<(i32, Vec<u32>)> {
    let mut out = Vec::new();
    for &(index, tid) in vcpus {
        if let Some(cpus) = per_vcpu
            .and_then(|p| p.get(index))
            .map(Vec::as_slice)
            .or(common)
        {
            out.push((tid, cpus.to_vec()));
        }
    }
    if let Some(common) = common {
        for &tid in threads {
            if !vcpus.iter().any(|&(_, v)| v == tid) {
                out.push((tid, common.to_vec()));
            }
        }
    }
    out
}

/// The thread ids of process `pid` (`/proc/PID/task`).
pub fn threads(pid: i32) -> std::io::Result<Vec<i32>> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
            tids.push(tid);
        }
    }
    tids.sort_unstable();
    Ok(tids)
}

/// Applies `plan` (see [`plan`]) to threads of process `pid`. A thread
/// that ended meanwhile (QEMU's worker threads come and go) is skipped
/// unless it is one of `required` (the vCPU threads).
pub fn apply(pid: i32, plan: &[(i32, Vec<u32>)], required: &[i32]) -> std::io::Result<()> {
    for (tid, cpus) in plan {
        if let Err(e) = pin(&[*tid], cpus) {
            let gone = !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists();
            if required.contains(tid) || !gone {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The CPUs thread `tid` may run on (`Cpus_allowed_list` of its status).
pub fn allowed(pid: i32, tid: i32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_pinned_and_the_kernel_says_so() {
        let tid = nix::unistd::gettid().as_raw();
        let pid = std::process::id() as i32;
        let before = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(tid)).unwrap();
        pin(&[tid], &[0]).unwrap();
        assert_eq!(allowed(pid, tid).as_deref(), Some("0"));
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &before).unwrap();
        assert!(pin(&[tid], &[100_000]).is_err());
    }

    #[test]
    fn vcpus_get_their_own_lists_and_other_threads_the_common_set() {
        let threads = [10, 11, 12, 13];
        let vcpus = [(0, 11), (1, 12)];
        let per = vec![vec![2], vec![3, 4]];
        assert_eq!(
            plan(&threads, &vcpus, Some(&[0, 1]), Some(&per)),
            [
                (11, vec![2]),
                (12, vec![3, 4]),
                (10, vec![0, 1]),
                (13, vec![0, 1])
            ]
        );
        assert_eq!(
            plan(&threads, &vcpus, None, Some(&per)),
            [(11, vec![2]), (12, vec![3, 4])],
            "without cpu_set the other threads stay as they are"
        );
        assert_eq!(
            plan(&threads, &vcpus, Some(&[5]), None),
            [(11, vec![5]), (12, vec![5]), (10, vec![5]), (13, vec![5])]
        );
        assert_eq!(plan(&threads, &vcpus, None, None), []);
    }

    #[test]
    fn the_threads_of_this_process_are_listed() {
        let pid = std::process::id() as i32;
        let tids = threads(pid).unwrap();
        assert!(tids.contains(&nix::unistd::gettid().as_raw()), "{tids:?}");
        assert!(threads(-1).is_err());
    }
}
