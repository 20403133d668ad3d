//! VM records on disk: `STATE_DIR/vms/UUID/vm.json`, written atomically
//! (temp file in the same directory, fsync, rename, fsync the directory), so
//! a crash at any moment leaves either the old record or the new one.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::persist::{self, PersistError};
use crate::vm::record::{VmRecord, RECORD_VERSION};
use crate::vm::Vm;

/// A record that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system error.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A record could not be written durably.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The record is not valid JSON for a [`Vm`].
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

/// The directory of VM records.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    boot_id: Option<String>,
}

/// A record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The VM as recorded.
    pub vm: Vm,
    /// Whether the host rebooted since the record was written.
    pub host_rebooted: bool,
}

/// This boot of the host's id, if the kernel tells.
pub fn current_boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

const RECORD_FILE: &str = "vm.json";

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl Store {
    /// Opens (creating, mode 0700) `STATE_DIR/vms`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let root = state_dir.join("vms");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io("creating", &root))?;
        Ok(Store {
            root,
            boot_id: current_boot_id(),
        })
    }

    /// The directory holding VM `id`'s record (and later its disks).
    pub fn vm_dir(&self, id: Uuid) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// Writes `vm`'s record atomically.
    pub fn save(&self, vm: &Vm) -> Result<(), StoreError> {
        let dir = self.vm_dir(vm.id);
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io("creating", &dir))?;
            // The new directory's entry must be durable before the record
            // in it counts as written.
            sync_dir(&self.root)?;
        }
        let record = VmRecord {
            version: RECORD_VERSION,
            host_boot_id: self.boot_id.clone(),
            vm: vm.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&record).expect("a Vm always serializes");
        bytes.push(b'\n');
        write_atomically(&dir, RECORD_FILE, &bytes)
    }

    /// Reads every record. Unreadable ones are returned as errors beside the
    /// good ones, so one bad file never hides the other VMs.
    pub fn load_all(&self) -> Result<Vec<Result<Loaded, StoreError>>, StoreError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.root).map_err(io("reading", &self.root))?;
        for entry in entries {
            let entry = entry.map_err(io("reading", &self.root))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| Uuid::parse_str(n).ok()) else {
                continue;
            };
            let path = self.vm_dir(id).join(RECORD_FILE);
            if !path.exists() {
                // A directory without a record: a create that died (vmlet
                // killed) after making the VM's disks and before its first
                // write. Nothing lists it and nothing can be recovered from
                // it: sweep it, or it would hold its disk space forever.
                let dir = self.vm_dir(id);
                match fs::remove_dir_all(&dir) {
                    Ok(()) => {
                        tracing::warn!(dir = %dir.display(), "removed the directory of a VM whose create never finished")
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "could not remove an unfinished VM's directory")
                    }
                }
                continue;
            }
            out.push(read_record(&path, id).map(|record| Loaded {
                host_rebooted: match (&record.host_boot_id, &self.boot_id) {
                    (Some(then), Some(now)) => then != now,
                    _ => false,
                },
                vm: record.vm,
            }));
        }
        Ok(out)
    }

    /// Removes VM `id`'s directory and everything in it.
    pub fn remove(&self, id: Uuid) -> Result<(), StoreError> {
        let dir = self.vm_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing", &dir)(e)),
        }
        sync_dir(&self.root)
    }
}

fn read_record(path: &Path, id: Uuid) -> Result<VmRecord, StoreError> {
    let text = fs::read(path).map_err(io("reading", path))?;
    let record: VmRecord = serde_json::from_slice(&text).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if record.vm.id != id || record.vm.spec.uuid != id {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            message: format!("record is for VM {}, not {id}", record.vm.id),
        });
    }
    Ok(record)
}

fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    persist::write_atomically(dir, name, bytes).map_err(StoreError::from)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    persist::sync_dir(dir).map_err(StoreError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Boot, Firmware, SerialSpec, VmSpec};

    fn spec(name: &str) -> VmSpec {
        VmSpec {
            uuid: Uuid::new_v4(),
            name: name.into(),
            vcpus: 1,
            memory_mib: 64,
            profile: "q35".into(),
            boot: Boot::Firmware {
                firmware: Firmware::Bios,
            },
            disks: vec![],
            serial: SerialSpec::default(),
            channels: vec![],
            guest_agent: true,
            cloud_init: None,
            nics: vec![],
            autostart: true,
            resources: Default::default(),
            tpm: None,
            cpu: None,
            topology: None,
            numa: vec![],
            memory: Default::default(),
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_reported_beside_good_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut vm = Vm::new(spec("a"));
        store.save(&vm).unwrap();
        vm.generation = 7;
        store.save(&vm).unwrap();
        let broken = Uuid::new_v4();
        fs::create_dir_all(store.vm_dir(broken)).unwrap();
        fs::write(store.vm_dir(broken).join("vm.json"), b"{not json").unwrap();
        // A directory with no record (a create killed after making its
        // disks) is swept.
        let orphan = store.vm_dir(Uuid::new_v4());
        fs::create_dir_all(orphan.join("disks")).unwrap();
        fs::write(orphan.join("disks/disk0.qcow2"), b"x").unwrap();

        let loaded = store.load_all().unwrap();
        assert_eq!(loaded.len(), 2);
        let good: Vec<&Loaded> = loaded.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(good.len(), 1);
        assert_eq!(good[0].vm, vm);
        assert!(!good[0].host_rebooted);
        let bad = loaded.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(bad.to_string().contains(&broken.to_string()), "{bad}");
        assert!(!store.vm_dir(vm.id).join(".vm.json.tmp").exists());
        assert!(!orphan.exists(), "orphan directory swept");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(store.vm_dir(vm.id).join("vm.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "records are private");

        store.remove(vm.id).unwrap();
        store.remove(vm.id).unwrap();
        assert!(!store.vm_dir(vm.id).exists());
    }

    #[test]
    fn a_record_from_an_earlier_boot_says_the_host_rebooted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let vm = Vm::new(spec("a"));
        store.save(&vm).unwrap();
        let path = store.vm_dir(vm.id).join("vm.json");
        let mut record: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            record["host_boot_id"].as_str(),
            current_boot_id().as_deref()
        );
        record["host_boot_id"] = "00000000-0000-0000-0000-000000000000".into();
        fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
        let loaded = store.load_all().unwrap();
        assert!(loaded[0].as_ref().unwrap().host_rebooted);
    }

    #[test]
    fn a_record_in_the_wrong_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let vm = Vm::new(spec("a"));
        store.save(&vm).unwrap();
        let other = Uuid::new_v4();
        fs::rename(store.vm_dir(vm.id), store.vm_dir(other)).unwrap();
        let loaded = store.load_all().unwrap();
        assert!(matches!(loaded[0], Err(StoreError::Corrupt { .. })));
    }
}
