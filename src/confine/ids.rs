//! The user and group a VM's QEMU runs as: by default a uid of its own from a
//! configured range (gid = uid), so one VM's QEMU cannot open another VM's
//! files, nor anything of vmlet's (all root's, mode 0600/0700).

use std::collections::BTreeMap;
use std::sync::Mutex;

use uuid::Uuid;

/// Who a confined QEMU runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Supplementary groups (the group of `/dev/kvm`, when KVM is used).
    pub groups: Vec<u32>,
}

impl Ids {
    /// True when a process of these ids may read a file of `mode` owned by
    /// `owner`:`group`, by its permission bits as the kernel weighs them:
    /// the owner's bits when it owns the file, else the group's when the
    /// file's group is its gid or one of its groups, else the others'. A
    /// file with an access ACL is beyond this (the caller checks for one).
    pub fn may_read(&self, mode: u32, owner: u32, group: u32) -> bool {
        let bit = if owner == self.uid {
            0o400
        } else if group == self.gid || self.groups.contains(&group) {
            0o040
        } else {
            0o004
        };
        mode & bit != 0
    }
}

/// A range of uids, `first..first+count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// The first uid.
    pub first: u32,
    /// How many.
    pub count: u32,
}

impl IdRange {
    /// Parses `FIRST-LAST` (inclusive). The range must not include uid 0 or
    /// 65534 (`nobody`), and must not wrap.
    pub fn parse(text: &str) -> Result<IdRange, String> {
        let (first, last) = text
            .split_once('-')
            .ok_or_else(|| format!("{text:?} is not FIRST-LAST"))?;
        let first: u32 = first
            .trim()
            .parse()
            .map_err(|_| format!("{first:?} is not a uid"))?;
        let last: u32 = last
            .trim()
            .parse()
            .map_err(|_| format!("{last:?} is not a uid"))?;
        if first == 0 || last < first || last == u32::MAX {
            return Err(format!(
                "{text:?}: FIRST must be above 0, LAST at least FIRST and below 4294967295"
            ));
        }
        if (first..=last).contains(&65534) {
            return Err(format!("{text:?} includes 65534 (nobody)"));
        }
        Ok(IdRange {
            first,
            count: last - first + 1,
        })
    }

    /// True when `uid` lies in the range.
    pub fn contains(&self, uid: u32) -> bool {
        uid >= self.first && uid - self.first < self.count
    }
}

/// Why no uid could be had.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    /// Every uid of the range is taken by a running VM.
    #[error("all {count} uids of the QEMU uid range starting at {first} are in use: widen [qemu] uid_range")]
    Exhausted {
        /// The range's first uid.
        first: u32,
        /// Its size.
        count: u32,
    },
}

/// Hands out one uid of a range per running VM. A VM keeps its uid while
/// its QEMU runs; after a daemon restart the uids of the QEMUs found again
/// are marked taken ([`IdPool::mark`]) before any VM starts.
#[derive(Debug)]
pub struct IdPool {
    range: IdRange,
    taken: Mutex<BTreeMap<u32, Uuid>>,
}

impl IdPool {
    /// A pool over `range`, nothing taken.
    pub fn new(range: IdRange) -> IdPool {
        IdPool {
            range,
            taken: Mutex::new(BTreeMap::new()),
        }
    }

    /// The range.
    pub fn range(&self) -> IdRange {
        self.range
    }

    /// The uid for VM `vm`: the one it holds already, else the lowest one
    /// neither handed out nor `busy` (a uid some process runs as: a QEMU
    /// whose record is gone, another daemon's).
    pub fn claim(&self, vm: Uuid, busy: impl Fn(u32) -> bool) -> Result<u32, IdError> {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((uid, _)) = taken.iter().find(|(_, owner)| **owner == vm) {
            return Ok(*uid);
        }
        let free = (0..self.range.count)
            .map(|i| self.range.first + i)
            .find(|uid| !taken.contains_key(uid) && !busy(*uid))
            .ok_or(IdError::Exhausted {
                first: self.range.first,
                count: self.range.count,
            })?;
        taken.insert(free, vm);
        Ok(free)
    }

    /// Records that VM `vm`'s QEMU (found after a restart) runs as `uid`.
    /// A uid outside the range (the range changed) is not tracked.
    pub fn mark(&self, vm: Uuid, uid: u32) {
        if self.range.contains(uid) {
            let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
            taken.retain(|_, owner| *owner != vm);
            taken.insert(uid, vm);
        }
    }

    /// Gives VM `vm`'s uid back (its QEMU is gone).
    pub fn release(&self, vm: Uuid) {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        taken.retain(|_, owner| *owner != vm);
    }
}

/// The uids processes run as now (the owners of `/proc/PID`).
pub fn uids_in_use() -> std::collections::HashSet<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.uid())
        .collect()
}

/// The real uid of process `pid` (`Uid:` of `/proc/PID/status`).
pub fn process_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_permission_follows_the_one_class_the_ids_fall_in() {
        let ids = Ids {
            uid: 900,
            gid: 901,
            groups: vec![36],
        };
        let cases = [
            // (mode, owner, group, readable)
            (0o644, 0, 0, true),
            (0o640, 0, 0, false),
            (0o600, 0, 0, false),
            (0o604, 0, 0, true),
            (0o400, 900, 0, true),
            // The owner's bits decide for the owner, even when others may.
            (0o044, 900, 0, false),
            (0o640, 0, 901, true),
            (0o640, 0, 36, true),
            // The group's bits decide for a member, even when others may.
            (0o604, 0, 901, false),
            (0o604, 0, 36, false),
            (0o000, 0, 0, false),
        ];
        for (mode, owner, group, readable) in cases {
            assert_eq!(
                ids.may_read(mode, owner, group),
                readable,
                "mode {mode:o} owner {owner} group {group}"
            );
        }
    }

    #[test]
    fn processes_uids_are_seen() {
        let me = nix::unistd::geteuid().as_raw();
        assert!(uids_in_use().contains(&me));
    }

    #[test]
    fn ranges_parse_and_refuse_root_nobody_and_nonsense() {
        assert_eq!(
            IdRange::parse("900000000-900009999"),
            Ok(IdRange {
                first: 900_000_000,
                count: 10_000
            })
        );
        for bad in ["0-10", "10-5", "abc", "5", "60000-70000", "1-4294967295"] {
            assert!(IdRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_vm_gets_its_own_uid_and_gives_it_back() {
        let pool = IdPool::new(IdRange {
            first: 100,
            count: 2,
        });
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let free = |_| false;
        assert_eq!(pool.claim(a, free), Ok(100));
        assert_eq!(pool.claim(a, free), Ok(100), "a VM keeps its uid");
        assert_eq!(pool.claim(b, free), Ok(101));
        assert_eq!(
            pool.claim(c, free),
            Err(IdError::Exhausted {
                first: 100,
                count: 2
            })
        );
        pool.release(a);
        assert_eq!(pool.claim(c, free), Ok(100));
        pool.release(c);
        // A uid some process already runs as is skipped.
        assert_eq!(
            pool.claim(c, |uid| uid == 100),
            Err(IdError::Exhausted {
                first: 100,
                count: 2
            })
        );
        pool.release(b);
        assert_eq!(pool.claim(c, |uid| uid == 100), Ok(101));
    }

    #[test]
    fn marked_uids_of_reattached_vms_are_not_handed_out() {
        let pool = IdPool::new(IdRange {
            first: 100,
            count: 3,
        });
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        pool.mark(a, 100);
        pool.mark(a, 101); // found again under another uid: the last word counts
        pool.mark(b, 5000); // outside the range: not tracked
        assert_eq!(pool.claim(b, |_| false), Ok(100));
        assert_eq!(pool.claim(a, |_| false), Ok(101));
    }
}
