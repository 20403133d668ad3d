//! The VMs the daemon holds: one actor handle per UUID. The manager adds a
//! VM when it is created or loaded and removes it once its actor reports
//! it deleted.

use std::collections::HashMap;
use std::sync::RwLock;

use uuid::Uuid;

use crate::vm::actor::VmHandle;

/// Every VM's actor handle, by UUID.
#[derive(Debug, Default)]
pub struct Registry(RwLock<HashMap<Uuid, VmHandle>>);

impl Registry {
    /// Adds a VM.
    pub fn register(&self, handle: VmHandle) {
        self.0.write().unwrap().insert(handle.id(), handle);
    }

    /// Removes a deleted VM.
    pub fn forget(&self, id: Uuid) {
        self.0.write().unwrap().remove(&id);
    }

    /// The VM with this UUID.
    pub fn handle(&self, id: Uuid) -> Option<VmHandle> {
        self.0.read().unwrap().get(&id).cloned()
    }

    /// Every VM's handle.
    pub fn handles(&self) -> Vec<VmHandle> {
        self.0.read().unwrap().values().cloned().collect()
    }
}
