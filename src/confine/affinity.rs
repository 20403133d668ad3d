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
}
