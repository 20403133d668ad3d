//! A VM's limits, their ranges and how each maps onto the cgroup files of
//! either version; and the limits a host could not apply.

use super::*;

/// Limits for one VM's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Relative CPU weight, 1..=10000 with v2 semantics (100 is the
    /// default). v1: `cpu.shares` = weight × 1024 / 100 (at least 2).
    pub cpu_weight: u32,
    /// CPU time as a percentage of one core (10 = a tenth of a core, 250 =
    /// two and a half cores), 1..=100000, over a 100 ms period; `None` = no
    /// quota.
    pub cpu_quota_percent: Option<u32>,
    /// Memory (and swap, where accounted) limit in bytes, at least 1 MiB.
    pub memory_max_bytes: u64,
    /// Maximum number of tasks (processes and threads), 1..=4194304.
    pub pids_max: u64,
    /// Relative I/O weight, 1..=10000 with v2 semantics (100 is the
    /// default), applied where the host's I/O scheduler offers weights;
    /// `None` = the default weight, without a report when unsupported.
    pub io_weight: Option<u32>,
}

impl Limits {
    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<(), CgroupError> {
        fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), CgroupError> {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(CgroupError::InvalidLimit {
                    field,
                    reason: format!("{value} is outside {min}..={max}"),
                })
            }
        }
        range("cpu_weight", self.cpu_weight.into(), 1, 10_000)?;
        if let Some(percent) = self.cpu_quota_percent {
            range("cpu_quota_percent", percent.into(), 1, 100_000)?;
        }
        // At most i64::MAX: v1 reads these files as signed 64-bit numbers.
        range(
            "memory_max_bytes",
            self.memory_max_bytes,
            1 << 20,
            i64::MAX as u64,
        )?;
        // The kernel refuses pids.max at or above PID_MAX_LIMIT + 1.
        range("pids_max", self.pids_max, 1, 4_194_304)?;
        if let Some(weight) = self.io_weight {
            range("io_weight", weight.into(), 1, 10_000)?;
        }
        Ok(())
    }

    /// v1 `cpu.shares` for [`Limits::cpu_weight`]: 100 (the v2 default) is
    /// 1024 (the v1 default); the kernel's minimum is 2.
    pub fn cpu_shares(&self) -> u64 {
        (u64::from(self.cpu_weight) * 1024 / 100).max(2)
    }

    /// The CFS quota in microseconds per [`CPU_PERIOD_US`], `None` for no quota.
    pub fn cpu_quota_us(&self) -> Option<u64> {
        self.cpu_quota_percent
            .map(|percent| u64::from(percent) * CPU_PERIOD_US / 100)
    }

    /// The v2 `cpu.max` line: `QUOTA PERIOD` or `max PERIOD`.
    pub fn cpu_max(&self) -> String {
        match self.cpu_quota_us() {
            Some(quota) => format!("{quota} {CPU_PERIOD_US}"),
            None => format!("max {CPU_PERIOD_US}"),
        }
    }

    /// The I/O weight in effect: the asked one or the default, 100.
    pub(super) fn io_weight_or_default(&self) -> u32 {
        self.io_weight.unwrap_or(100)
    }
}

/// A BFQ weight (1..=1000, default 100) for a v2 I/O weight (1..=10000,
/// default 100): the default maps to the default, each side of it linearly.
pub fn bfq_weight(io_weight: u32) -> u64 {
    let w = u64::from(io_weight.clamp(1, 10_000));
    if w <= 100 {
        w
    } else {
        100 + (w - 100) * 900 / 9_900
    }
}

/// A v1 `blkio.weight` (10..=1000, default 500) for a v2 I/O weight
/// (1..=10000, default 100): scaled by 5, clamped to the v1 range.
pub fn blkio_weight(io_weight: u32) -> u64 {
    (u64::from(io_weight) * 5).clamp(10, 1000)
}

/// A limit [`Cgroups::create`] could not apply because the host lacks the
/// file for it; the cgroup works without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unapplied {
    /// No I/O weight file (`io.weight`, `io.bfq.weight`, `blkio.weight`,
    /// `blkio.bfq.weight`) or no blkio controller: the asked weight is not set.
    IoWeight {
        /// Where the files were looked for.
        detail: String,
    },
    /// No swap accounting (`memory.swap.max` / `memory.memsw.limit_in_bytes`):
    /// the memory limit bounds memory only, not memory plus swap.
    Swap {
        /// Where the file was looked for.
        detail: String,
    },
}

impl fmt::Display for Unapplied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unapplied::IoWeight { detail } => write!(f, "io_weight not applied: {detail}"),
            Unapplied::Swap { detail } => write!(f, "swap not limited: {detail}"),
        }
    }
}
