//! The host as the scheduler sees it: `GET /v1/node`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::CapacitySettings;
use crate::spec::HugePageSize;

/// Facts about this host and its vmlet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// Every machine type that QEMU offers, by its versioned name (aliases
    /// such as `q35` resolved: `pc-q35-10.0`), sorted with version numbers
    /// compared as numbers. A VM pinned to one of them (`machine.type`) can
    /// run on this host.
    #[serde(default)]
    pub machine_types: Vec<String>,
    /// The machine type a new VM of the default profile (`q35`) gets here:
    /// its `machine.type` resolved through this QEMU (`pc-q35-10.0`).
    /// Absent when this QEMU cannot run that profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_machine_type: Option<String>,
    /// CPU models usable on this host with `accel` (QEMU reports no missing
    /// feature), sorted. A VM pinned to one of them (`machine.cpu`, its
    /// model before any flags) can run here.
    #[serde(default)]
    pub cpu_models: Vec<String>,
    /// The accelerator VMs get: `kvm` or `tcg`.
    pub accel: String,
    /// Why that accelerator (e.g. why KVM is not used).
    pub accel_reason: String,
    /// Machine profiles VMs may name.
    pub profiles: Vec<String>,
    /// How many VMs are in each state (states with none are left out).
    pub vms_by_state: BTreeMap<String, u64>,
    /// What the host offers, has given out and has left.
    pub inventory: Inventory,
    /// Seconds a graceful stop or reboot gives the guest to shut down
    /// unless the request says otherwise (`stop_grace_s`).
    #[serde(default)]
    pub stop_grace_s: u64,
}

/// The scheduler's view of the host, like Nova's placement inventory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Inventory {
    /// Virtual CPUs.
    pub vcpus: Resource,
    /// Guest memory, in MiB.
    pub memory_mib: Resource,
    /// VMs' own disks (overlays and blank disks, at their full size), in GiB.
    pub disk_gib: Resource,
    /// The host's huge-page pools, by page size (`2M`, `1G`): only sizes
    /// this kernel supports. Filled by the daemon from
    /// `/sys/kernel/mm/hugepages`.
    #[serde(default)]
    pub hugepages: BTreeMap<String, HugePagePool>,
}

/// One huge-page pool of the host kernel, and what this host's VMs with
/// `memory.hugepages` of that size ask of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HugePagePool {
    /// Pages the kernel has reserved (`nr_hugepages`).
    pub total: u64,
    /// Pages free right now (`free_hugepages` − `resv_hugepages`): what a
    /// VM started now can take.
    pub free: u64,
    /// Pages the VMs of this host need when they all run (whatever their
    /// state), VMs arriving by migration included.
    pub allocated: u64,
}

impl HugePagePool {
    /// Pages not promised to any VM of this host: `total − allocated`.
    pub fn unallocated(&self) -> u64 {
        self.total.saturating_sub(self.allocated)
    }
}

/// Where the kernel describes its huge-page pools.
pub const HUGEPAGES_SYSFS: &str = "/sys/kernel/mm/hugepages";

/// The kernel's huge-page pools under `root` (normally
/// [`HUGEPAGES_SYSFS`]), by size: `(total, free)` where free leaves out the
/// pages already promised to a mapping. Sizes the kernel lacks are left out.
pub fn hugepage_pools(root: &std::path::Path) -> BTreeMap<HugePageSize, (u64, u64)> {
    let read = |dir: &std::path::Path, name: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    };
    let mut pools = BTreeMap::new();
    for size in HugePageSize::ALL {
        let dir = root.join(size.sysfs_dir());
        let (Some(total), Some(free)) = (read(&dir, "nr_hugepages"), read(&dir, "free_hugepages"))
        else {
            continue;
        };
        let reserved = read(&dir, "resv_hugepages").unwrap_or(0);
        pools.insert(size, (total, free.saturating_sub(reserved)));
    }
    pools
}

/// Whether `pages` huge pages of `size` can be had from a pool with
/// `available` of them; the refusal says how many, and how to get more.
pub fn check_hugepages(
    size: HugePageSize,
    pages: u64,
    available: u64,
    of_what: &str,
) -> Result<(), String> {
    if pages > available {
        return Err(format!(
            "not enough {} huge pages on this host: memory.hugepages needs {pages}, {available} {of_what} (reserve more in /sys/kernel/mm/hugepages/{}/nr_hugepages)",
            size.as_str(),
            size.sysfs_dir()
        ));
    }
    Ok(())
}

/// One resource: `free = total × allocation_ratio − reserved − allocated`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Resource {
    /// What the host has.
    pub total: u64,
    /// Kept for the host.
    pub reserved: u64,
    /// Overcommit factor.
    pub allocation_ratio: f64,
    /// Given to the VMs that exist (whatever their state).
    pub allocated: u64,
    /// Left for new VMs (negative when overcommitted past the ratio).
    pub free: i64,
}

impl Resource {
    fn new(total: u64, reserved: u64, allocation_ratio: f64, allocated: u64) -> Resource {
        let capacity = (total as f64 * allocation_ratio).floor() as i64;
        Resource {
            total,
            reserved,
            allocation_ratio,
            allocated,
            free: capacity - reserved as i64 - allocated as i64,
        }
    }
}

/// What VMs use of each resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Own disks in GiB.
    pub disk_gib: u64,
}

/// The host's own totals, before configuration overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostTotals {
    /// Online CPUs.
    pub cpus: u64,
    /// Physical memory in MiB.
    pub memory_mib: u64,
    /// Size of the state directory's file system in GiB.
    pub disk_gib: u64,
}

impl Inventory {
    /// The inventory for `allocated` use, from the settings and the host.
    pub fn new(settings: &CapacitySettings, host: HostTotals, allocated: Usage) -> Inventory {
        Inventory {
            vcpus: Resource::new(
                settings.vcpus_total.unwrap_or(host.cpus),
                settings.reserved_vcpus,
                settings.cpu_allocation_ratio,
                allocated.vcpus,
            ),
            memory_mib: Resource::new(
                settings.memory_mib_total.unwrap_or(host.memory_mib),
                settings.reserved_memory_mib,
                settings.ram_allocation_ratio,
                allocated.memory_mib,
            ),
            disk_gib: Resource::new(
                settings.disk_gib_total.unwrap_or(host.disk_gib),
                settings.reserved_disk_gib,
                settings.disk_allocation_ratio,
                allocated.disk_gib,
            ),
            hugepages: BTreeMap::new(),
        }
    }

    /// Whether `request` fits; otherwise which resource does not, in words.
    pub fn check_fits(&self, request: Usage) -> Result<(), String> {
        for (name, resource, asked) in [
            ("vcpus", &self.vcpus, request.vcpus),
            ("memory_mib", &self.memory_mib, request.memory_mib),
            ("disk_gib", &self.disk_gib, request.disk_gib),
        ] {
            if asked as i64 > resource.free {
                return Err(format!(
                    "not enough {name} on this host: {asked} asked, {} free ({} total × {} ratio − {} reserved − {} allocated)",
                    resource.free.max(0),
                    resource.total,
                    resource.allocation_ratio,
                    resource.reserved,
                    resource.allocated
                ));
            }
        }
        Ok(())
    }
}

/// Size of the file system holding `path`, in GiB (0 when unknown).
pub fn filesystem_gib(path: &std::path::Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|st| st.blocks() * st.fragment_size() / (1024 * 1024 * 1024))
        .unwrap_or(0)
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

#[cfg(test)]
mod inventory_tests {
    use super::*;

    #[test]
    fn hugepage_pools_are_read_from_sysfs_less_reserved_pages() {
        let root = std::env::temp_dir().join(format!("vmlet-hp-{}", uuid::Uuid::new_v4()));
        let two = root.join("hugepages-2048kB");
        std::fs::create_dir_all(&two).unwrap();
        std::fs::write(two.join("nr_hugepages"), "80\n").unwrap();
        std::fs::write(two.join("free_hugepages"), "70\n").unwrap();
        std::fs::write(two.join("resv_hugepages"), "6\n").unwrap();
        // A size the kernel lacks, or a broken file, is left out.
        let gig = root.join("hugepages-1048576kB");
        std::fs::create_dir_all(&gig).unwrap();
        std::fs::write(gig.join("nr_hugepages"), "x").unwrap();
        let pools = hugepage_pools(&root);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[&HugePageSize::Size2M], (80, 64));
        assert!(hugepage_pools(std::path::Path::new("/nonexistent")).is_empty());

        assert_eq!(
            check_hugepages(HugePageSize::Size2M, 64, 64, "free"),
            Ok(())
        );
        let err = check_hugepages(HugePageSize::Size2M, 65, 64, "free").unwrap_err();
        assert!(
            err.contains("not enough 2M huge pages") && err.contains("needs 65, 64 free"),
            "{err}"
        );
        let pool = HugePagePool {
            total: 10,
            free: 3,
            allocated: 12,
        };
        assert_eq!(pool.unallocated(), 0);
    }

    fn host() -> HostTotals {
        HostTotals {
            cpus: 8,
            memory_mib: 16384,
            disk_gib: 100,
        }
    }

    #[test]
    fn free_is_total_times_ratio_minus_reserved_and_allocated() {
        let settings = CapacitySettings::default();
        let used = Usage {
            vcpus: 10,
            memory_mib: 4096,
            disk_gib: 30,
        };
        let inv = Inventory::new(&settings, host(), used);
        assert_eq!(inv.vcpus.free, 8 * 4 - 10);
        assert_eq!(inv.memory_mib.free, 16384 - 512 - 4096);
        assert_eq!(inv.disk_gib.free, 100 - 30);
        assert_eq!(inv.vcpus.total, 8);
        assert_eq!(inv.memory_mib.reserved, 512);
    }

    #[test]
    fn configured_totals_override_the_host_and_the_misfit_is_named() {
        let settings = CapacitySettings {
            vcpus_total: Some(4),
            memory_mib_total: Some(1024),
            reserved_memory_mib: 0,
            cpu_allocation_ratio: 1.0,
            ..CapacitySettings::default()
        };
        let inv = Inventory::new(
            &settings,
            host(),
            Usage {
                vcpus: 3,
                memory_mib: 512,
                disk_gib: 0,
            },
        );
        assert_eq!(inv.vcpus.free, 1);
        let one = Usage {
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 1,
        };
        assert_eq!(inv.check_fits(one), Ok(()));
        let err = inv.check_fits(Usage { vcpus: 2, ..one }).unwrap_err();
        assert!(err.starts_with("not enough vcpus"), "{err}");
        let err = inv
            .check_fits(Usage {
                memory_mib: 513,
                ..one
            })
            .unwrap_err();
        assert!(err.starts_with("not enough memory_mib"), "{err}");
        let err = inv
            .check_fits(Usage {
                disk_gib: 101,
                ..one
            })
            .unwrap_err();
        assert!(err.starts_with("not enough disk_gib"), "{err}");
    }

    #[test]
    fn overcommit_past_the_ratio_shows_negative_free() {
        let settings = CapacitySettings {
            vcpus_total: Some(2),
            cpu_allocation_ratio: 1.0,
            ..CapacitySettings::default()
        };
        let inv = Inventory::new(
            &settings,
            host(),
            Usage {
                vcpus: 5,
                ..Usage::default()
            },
        );
        assert_eq!(inv.vcpus.free, -3);
    }
}
