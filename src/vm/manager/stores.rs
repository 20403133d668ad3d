//! The manager's face for images, volumes, networks and snapshots: the
//! stores do the work; the manager adds what only it knows (which VM uses
//! which image, volume or network) and refuses what would break a VM.

use super::*;

impl Manager {
    /// Every network, with the NICs on it.
    pub async fn networks(&self) -> Vec<Network> {
        let mut networks = self.ctx.networks.list().await;
        for network in &mut networks {
            network.nics = self.nics_on(&network.spec.name);
        }
        networks
    }

    /// Network `name`, with the NICs on it.
    pub async fn network(&self, name: &str) -> Result<Network, VmError> {
        let mut network = self.ctx.networks.get(name).await?;
        network.nics = self.nics_on(name);
        Ok(network)
    }

    /// Creates a network (a bridge, adopted when it exists, and a VLAN).
    pub async fn create_network(&self, spec: NetworkSpec) -> Result<Network, VmError> {
        Ok(self.ctx.networks.create(spec).await?)
    }

    /// Deletes a network no NIC is on; only links vmlet created go.
    pub async fn delete_network(&self, name: &str) -> Result<(), VmError> {
        let _claims = self.claim(vec![(Claim::Network(name.to_string()), Hold::Alone)])?;
        let nics = self.nics_on(name);
        if !nics.is_empty() {
            let vms: Vec<String> = nics.iter().map(|n| n.vm_name.clone()).collect();
            return Err(VmError::Conflict(format!(
                "network {name} has NICs of VM {}; remove them first",
                vms.join(", ")
            )));
        }
        Ok(self.ctx.networks.delete(name).await?)
    }

    /// The NICs (of any VM, running or not) on network `name`.
    pub(super) fn nics_on(&self, name: &str) -> Vec<NetworkNic> {
        let mut nics = Vec::new();
        for handle in self.registry.handles() {
            let vm = handle.view();
            for nic in vm.spec.nics.iter().filter(|n| n.network == name) {
                nics.push(NetworkNic {
                    vm: vm.id,
                    vm_name: vm.name.clone(),
                    mac: nic.mac.clone().unwrap_or_default(),
                    tap: vm
                        .state
                        .has_process()
                        .then(|| crate::qemu::nic::tap_name(nic)),
                });
            }
        }
        nics.sort_by(|a, b| a.vm_name.cmp(&b.vm_name).then(a.mac.cmp(&b.mac)));
        nics
    }

    /// VM `key`'s snapshots.
    pub async fn snapshots(&self, key: &str) -> Result<Vec<Snapshot>, VmError> {
        let vm = self.find(key)?.view();
        let plans = crate::vm::launch::disk_plans(&self.ctx.layout, vm.id, &vm.spec.disks, false);
        let mut snapshots = disk_ops::list_snapshots(&self.ctx.qemu_img, &plans).await?;
        let quiesced = disk_ops::quiesced_names(&self.ctx.store.vm_dir(vm.id));
        for snapshot in &mut snapshots {
            snapshot.quiesced = quiesced.contains(&snapshot.name);
        }
        Ok(snapshots)
    }

    /// The image store.
    pub fn images(&self) -> &Arc<ImageStore> {
        &self.ctx.images
    }

    /// Deletes image `name` (or cancels its import), unless a VM disk (in
    /// its spec or its pending spec) is an overlay on it, or an operation
    /// in flight (a create, an attach, an edit) holds it.
    pub async fn delete_image(&self, name: &str) -> Result<(), VmError> {
        let _claims = self.claim(vec![(Claim::Image(name.to_string()), Hold::Alone)])?;
        let users: Vec<String> = self
            .registry
            .handles()
            .iter()
            .map(VmHandle::view)
            .filter(|vm| {
                let pending = vm.pending.iter().flat_map(|p| &p.spec.disks);
                vm.spec.disks.iter().chain(pending).any(
                    |d| matches!(d.source(), Ok(DiskSource::Image { image, .. }) if image == name),
                )
            })
            .map(|vm| vm.name)
            .collect();
        if !users.is_empty() {
            return Err(VmError::Conflict(format!(
                "image {name} is in use by VM {}",
                users.join(", ")
            )));
        }
        Ok(self.ctx.images.delete(name)?)
    }

    /// Which VM disk uses volume `name`.
    pub(super) fn volume_user(&self, name: &str) -> Option<VolumeAttachment> {
        self.registry.handles().iter().find_map(|h| {
            let vm = h.view();
            // A volume in a pending spec is taken too: that VM gets it at
            // its next start.
            let pending = vm
                .pending
                .iter()
                .flat_map(|p| p.spec.disks.iter().enumerate());
            vm.spec
                .disks
                .iter()
                .enumerate()
                .chain(pending)
                .find_map(|(i, d)| {
                    matches!(d.source(), Ok(DiskSource::Volume { volume }) if volume == name).then(
                        || VolumeAttachment {
                            vm: vm.id,
                            vm_name: vm.name.clone(),
                            disk: d.name_or_default(i),
                        },
                    )
                })
        })
    }

    /// Every volume, with the disk using it.
    pub async fn volumes(&self) -> Result<Vec<Volume>, VmError> {
        let mut out = Vec::new();
        for name in self.ctx.volumes.names() {
            out.push(self.volume(&name).await?);
        }
        Ok(out)
    }

    /// Volume `name`, with the disk using it.
    pub async fn volume(&self, name: &str) -> Result<Volume, VmError> {
        let mut volume = self.ctx.volumes.get(name).await?;
        volume.attached_to = self.volume_user(name);
        Ok(volume)
    }

    /// Creates a volume.
    pub async fn create_volume(&self, request: &VolumeCreate) -> Result<Volume, VmError> {
        Ok(self.ctx.volumes.create(request, &self.ctx.images).await?)
    }

    /// Deletes a volume no VM uses.
    pub async fn delete_volume(&self, name: &str) -> Result<(), VmError> {
        let _claims = self.claim(vec![(Claim::Volume(name.to_string()), Hold::Alone)])?;
        if let Some(user) = self.volume_user(name) {
            return Err(VmError::Conflict(format!(
                "volume {name} is in use by VM {} (disk {}); detach it first",
                user.vm_name, user.disk
            )));
        }
        Ok(self.ctx.volumes.delete(name).await?)
    }

    /// Grows a volume: through the VM using it (live `block_resize` while it
    /// runs, serialized with its other operations), else offline.
    pub async fn resize_volume(&self, name: &str, size_mib: u64) -> Result<Volume, VmError> {
        self.ctx.volumes.check_resize(name, size_mib).await?;
        match self.volume_user(name) {
            Some(user) => {
                self.change(
                    &user.vm.to_string(),
                    Change::ResizeDisk {
                        disk: user.disk,
                        size: size_mib * MIB,
                    },
                )
                .await?;
                let volume = self.volume(name).await?;
                self.ctx.volumes.publish(&volume);
                Ok(volume)
            }
            None => Ok(self.ctx.volumes.resize_offline(name, size_mib).await?),
        }
    }
}
