//! Which cgroup hierarchy the host has, read from `/proc/self/mountinfo`.

use super::*;

/// One cgroup v1 mount: a hierarchy with one or more controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Mount {
    /// Where it is mounted, e.g. `/sys/fs/cgroup/memory`.
    pub dir: PathBuf,
    /// The cgroup the mount shows, as `/proc/PID/cgroup` names it (`/`
    /// unless only a subtree is mounted, as in some containers).
    pub root: String,
    /// Its controllers, e.g. `["cpu", "cpuacct"]`.
    pub controllers: Vec<String>,
}

/// Which cgroup hierarchy the host has; detected from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// Controllers on cgroup v1 mounts (one mount may hold several).
    V1 {
        /// The mounts holding at least one known controller, in mountinfo order.
        mounts: Vec<V1Mount>,
    },
    /// The unified cgroup v2 hierarchy.
    V2 {
        /// Where it is mounted, e.g. `/sys/fs/cgroup`.
        mount: PathBuf,
        /// The cgroup the mount shows, as `/proc/PID/cgroup` names it.
        root: String,
    },
}

impl Hierarchy {
    /// The hierarchy of this host, from `/proc/self/mountinfo`.
    pub fn detect() -> Result<Hierarchy, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Hierarchy::from_mountinfo(&text)
    }

    /// The hierarchy described by the text of a mountinfo file: v1 when any
    /// controller vmlet uses is on a cgroup v1 mount (a controller bound to
    /// v1 is absent from v2), else the cgroup2 mount (the one at
    /// `/sys/fs/cgroup` when there are several).
    pub fn from_mountinfo(text: &str) -> Result<Hierarchy, CgroupError> {
        let mut v1 = Vec::<V1Mount>::new();
        let mut v2 = Vec::<(PathBuf, String)>::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason| CgroupError::Mountinfo {
                line: index + 1,
                reason,
            };
            // Optional fields sit between the mount options and " - ";
            // spaces inside paths are escaped, so the separator is unique.
            let (before, after) = line.split_once(" - ").ok_or(bad("no \" - \" separator"))?;
            let before: Vec<&str> = before.split(' ').collect();
            let after: Vec<&str> = after.split(' ').collect();
            if before.len() < 6 {
                return Err(bad("fewer than 6 fields before the separator"));
            }
            if after.len() < 3 {
                return Err(bad("fewer than 3 fields after the separator"));
            }
            let root = unescape(before[3]);
            let dir = PathBuf::from(unescape(before[4]));
            if !dir.is_absolute() {
                return Err(bad("mount point is not absolute"));
            }
            // Only a cgroup mount's root is a path: an nsfs mount (a named
            // network namespace, /run/netns/NAME) has `net:[INODE]`.
            if matches!(after[0], "cgroup" | "cgroup2") && !root.starts_with('/') {
                return Err(bad("cgroup mount root is not absolute"));
            }
            match after[0] {
                "cgroup" => {
                    let mut controllers: Vec<String> = after[2]
                        .split(',')
                        .filter(|o| KNOWN_V1_CONTROLLERS.contains(o))
                        .map(str::to_owned)
                        .collect();
                    // A bind mount of a hierarchy already seen adds nothing.
                    controllers.retain(|c| !v1.iter().any(|m| m.controllers.contains(c)));
                    if !controllers.is_empty() {
                        v1.push(V1Mount {
                            dir,
                            root,
                            controllers,
                        });
                    }
                }
                "cgroup2" => v2.push((dir, root)),
                _ => {}
            }
        }
        let uses_v1 = v1
            .iter()
            .any(|m| m.controllers.iter().any(|c| V1_CONTROLLERS.contains(&&**c)));
        if uses_v1 {
            return Ok(Hierarchy::V1 { mounts: v1 });
        }
        let preferred = v2
            .iter()
            .position(|(dir, _)| dir == Path::new("/sys/fs/cgroup"))
            .unwrap_or(0);
        match v2.into_iter().nth(preferred) {
            Some((mount, root)) => Ok(Hierarchy::V2 { mount, root }),
            None => Err(CgroupError::NoHierarchy),
        }
    }

    /// A cgroup v2 hierarchy mounted at `dir` showing its root cgroup: for
    /// tests on a fake layout of plain files, and hosts with a known mount.
    pub fn v2_at(dir: impl Into<PathBuf>) -> Hierarchy {
        Hierarchy::V2 {
            mount: dir.into(),
            root: "/".to_owned(),
        }
    }
}

/// Decodes the octal escapes (`\040` for a space, …) of mountinfo paths.
pub(super) fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
