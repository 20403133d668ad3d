//! Confinement of the processes vmlet starts for a VM (QEMU): the pieces a
//! child process passes through between `fork` and `exec`.
//!
//! - `cgroup`: a cgroup per VM (v1 and v2) with its limits and statistics.
//! - `jail`: a private mount namespace rooted in a per-VM directory.
//! - `ids`: the uid/gid a VM's QEMU runs as.
//!
//! A leaf: it knows nothing of VMs beyond their UUIDs, and nothing of QEMU.

pub mod jail;
