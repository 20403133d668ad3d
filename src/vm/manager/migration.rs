//! The VM side of live migration (the flows are in `migration/`): lending
//! a running VM to a migration and settling it afterwards, and on the
//! target, receiving one: the checks, the capacity it holds meanwhile, its
//! disks, its QEMU waiting for the memory, and adopting the VM once the
//! guest moved.

use std::sync::Arc;

use super::*;
use crate::console::serial::SerialHub;
use crate::qemu::instance::QemuInstance;
use crate::vm::actor::{MigrationEnd, MigrationStep};
use crate::vm::state::{self, Desired};

/// A disk of an arriving VM, as the source sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct IncomingDisk {
    /// The disk's name.
    pub name: String,
    /// Its size as the guest sees it, in bytes.
    pub virtual_size: u64,
}

/// An image an arriving VM's overlay reads, as the source has it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct IncomingImage {
    /// The image's name.
    pub name: String,
    /// The SHA-256 of the stored image.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The SHA-256 of what it was imported from.
    #[serde(default)]
    pub source_sha256: Option<String>,
}

/// `POST /v1/migrations/incoming`: what the source daemon sends the
/// target to prepare for a VM (daemon to daemon).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// The migration's id (chosen by the source).
    pub id: Uuid,
    /// The source daemon's host name.
    pub source: String,
    /// The source's QEMU version: the target's may not be older.
    pub qemu_version: String,
    /// The downtime asked for, in milliseconds.
    pub max_downtime_ms: u64,
    /// The bandwidth cap, in MiB/s.
    #[serde(default)]
    pub max_bandwidth_mib_s: Option<u64>,
    /// The VM as the source has it (spec, generation, pinned machine).
    pub vm: Vm,
    /// The images its overlays read.
    pub images: Vec<IncomingImage>,
    /// Its disks' sizes.
    pub disks: Vec<IncomingDisk>,
}

impl Manager {
    /// Shared daemon state, for the migration flows.
    pub fn context(&self) -> Arc<Context> {
        self.ctx.clone()
    }

    /// Why VM `vm` cannot be live-migrated from here, if anything: its
    /// disks must all be vmlet's own, and its hardware pinned and portable.
    pub fn migration_refusal(&self, vm: &Vm) -> Option<String> {
        for (i, disk) in vm.spec.disks.iter().enumerate() {
            if let Ok(DiskSource::File { .. }) = disk.source() {
                return Some(format!(
                    "disks[{i}] is a host file (path): live migration moves vmlet's own disks only (images, blank disks, volumes)"
                ));
            }
        }
        match &vm.machine {
            None => {
                Some("the VM has no pinned machine type yet (start it once with this vmlet)".into())
            }
            Some(pin) => self.ctx.qemu.cpu_migration_blocker(&pin.cpu),
        }
    }

    /// Takes VM `key` for a migration: its task is `migrate` until
    /// [`Manager::settle_migration`]. Returns the VM and its QEMU. A new
    /// migration needs a running VM; `resuming` (a migration a restart
    /// interrupted) takes a paused one too.
    pub async fn lend_for_migration(
        &self,
        key: &str,
        resuming: bool,
    ) -> Result<(VmHandle, Live), VmError> {
        let handle = self.find(key)?;
        let vm = handle.view();
        if !resuming {
            if vm.state != crate::vm::state::PowerState::Running {
                return Err(VmError::Refused(format!(
                    "VM {} is {}: live migration moves a running VM",
                    vm.name,
                    vm.state.as_str()
                )));
            }
            if let Some(why) = self.migration_refusal(&vm) {
                return Err(VmError::Refused(why));
            }
        }
        handle
            .command(Command::Migration(MigrationStep::Begin))
            .await?;
        match handle.live().filter(|live| live.qmp.is_some()) {
            Some(live) => Ok((handle, live)),
            None => {
                let _ = handle
                    .command(Command::Migration(MigrationStep::End(
                        MigrationEnd::Stayed { status: None },
                    )))
                    .await;
                Err(VmError::Refused(
                    "the VM's QEMU does not answer on QMP".to_string(),
                ))
            }
        }
    }

    /// Ends VM `handle`'s migration here: it stayed, or it moved away and
    /// is removed from this host (its volumes too: they moved with it).
    pub async fn settle_migration(
        &self,
        handle: &VmHandle,
        end: MigrationEnd,
    ) -> Result<(), VmError> {
        let moved = matches!(end, MigrationEnd::Moved { .. });
        let vm = handle
            .command(Command::Migration(MigrationStep::End(end)))
            .await?;
        if moved {
            self.registry.forget(vm.id);
            for disk in &vm.spec.disks {
                if let Ok(DiskSource::Volume { volume }) = disk.source() {
                    if let Err(e) = self.ctx.volumes.delete(volume).await {
                        tracing::warn!(vm = %vm.name, %volume, error = %e, "could not remove a volume that moved away");
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks that VM `vm` may arrive here and holds its place (UUID, name,
    /// MACs, capacity) until [`Manager::adopt_migrated`] or
    /// [`Manager::discard_incoming`]. Refusals name the field: an unknown
    /// profile, image, network or CPU model is invalid (422); a UUID, name,
    /// MAC or volume in use, or too little capacity, a conflict (409).
    pub async fn reserve_incoming(&self, vm: &Vm, images: &[IncomingImage]) -> Result<(), VmError> {
        let spec = &vm.spec;
        spec.validate(|name| self.ctx.profiles.caps(name))?;
        let mut nics = spec.nics.clone();
        self.settle_nics(spec.uuid, &mut nics, 0, "nics").await?;
        if nics != spec.nics {
            return Err(VmError::Invalid(SpecError::field(
                "nics",
                "every NIC of an arriving VM must have its MAC",
            )));
        }
        self.check_machine(vm)?;
        if let Some(pin) = &vm.machine {
            // Its NVRAM arrives by copy, but the firmware code is this host's.
            self.ctx
                .uefi_firmware(spec, &pin.machine_type)
                .map_err(|e| VmError::Invalid(prefixed("vm.spec.", e)))?;
        }
        check_host_paths(spec, &self.ctx.host_roots)?;
        let _claims = self.claim(create_claims(spec))?;
        if self.registry.handle(spec.uuid).is_some() || self.is_incoming(spec.uuid) {
            return Err(VmError::Conflict(format!(
                "VM {} already exists on this host",
                spec.uuid
            )));
        }
        if let Some(other) = self
            .registry
            .handles()
            .iter()
            .find(|h| h.view().name == spec.name)
        {
            return Err(VmError::Conflict(format!(
                "name {:?} is taken by VM {} on this host",
                spec.name,
                other.id()
            )));
        }
        for (i, disk) in spec.disks.iter().enumerate() {
            match disk.source() {
                Ok(DiskSource::Image { image, .. }) => {
                    let field = format!("disks[{i}].image");
                    let here = self.ctx.images.get(image).map_err(|_| {
                        VmError::Invalid(SpecError::field(
                            field.clone(),
                            format!("no image {image:?} on this host: import it here first"),
                        ))
                    })?;
                    let there = images.iter().find(|x| x.name == *image);
                    let same = there.is_some_and(|there| {
                        (there.sha256.is_some() && there.sha256 == here.sha256)
                            || (there.source_sha256.is_some()
                                && there.source_sha256 == here.source_sha256)
                    });
                    if !same {
                        return Err(VmError::Invalid(SpecError::field(
                            field,
                            format!(
                                "image {image:?} on this host is not the source's (sha256 differs): the overlay would read other data"
                            ),
                        )));
                    }
                }
                Ok(DiskSource::Volume { volume }) if self.ctx.volumes.exists(volume) => {
                    return Err(VmError::Conflict(format!(
                        "disks[{i}].volume: a volume {volume:?} already exists on this host"
                    )));
                }
                Ok(DiskSource::File { .. }) => {
                    return Err(VmError::Invalid(SpecError::field(
                        format!("disks[{i}].path"),
                        "host files do not migrate",
                    )))
                }
                _ => {}
            }
        }
        let mut incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        if self.ctx.settings.capacity.enforce {
            self.inventory_locked(&incoming)
                .check_fits(self.usage(spec))
                .map_err(VmError::Conflict)?;
        }
        if let Some(size) = spec.memory.hugepages {
            // The arriving QEMU preallocates its huge pages as it starts:
            // they must be free now, less what other arriving VMs will take.
            let free =
                crate::node::hugepage_pools(std::path::Path::new(crate::node::HUGEPAGES_SYSFS))
                    .get(&size)
                    .map_or(0, |(_, free)| *free);
            let promised: u64 = incoming
                .values()
                .filter(|other| other.uuid != spec.uuid && other.memory.hugepages == Some(size))
                .map(|other| size.pages_for(other.memory_mib))
                .sum();
            crate::node::check_hugepages(
                size,
                size.pages_for(spec.memory_mib),
                free.saturating_sub(promised),
                "free (less what other arriving VMs take)",
            )
            .map_err(VmError::Conflict)?;
        }
        incoming.insert(spec.uuid, spec.clone());
        Ok(())
    }

    fn is_incoming(&self, id: Uuid) -> bool {
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&id)
    }

    /// This host's QEMU may not be older than the source's (`source`): an
    /// older QEMU may not read what a newer one sends.
    pub fn check_qemu_version(&self, source: &str) -> Result<(), VmError> {
        let here = &self.ctx.qemu.version;
        match (version_triple(source), version_triple(here)) {
            (Some(there), Some(mine)) if mine < there => Err(VmError::Invalid(SpecError::field(
                "qemu_version",
                format!("QEMU {here} on this host is older than the source's {source}"),
            ))),
            (None, _) => Err(VmError::Invalid(SpecError::field(
                "qemu_version",
                format!("not a QEMU version: {source:?}"),
            ))),
            _ => Ok(()),
        }
    }

    /// The machine type and CPU model `vm` was made with must exist (and
    /// be usable) here, so the guest sees the same hardware.
    fn check_machine(&self, vm: &Vm) -> Result<(), VmError> {
        let Some(pin) = &vm.machine else {
            return Err(VmError::Invalid(SpecError::field(
                "vm.machine",
                "the VM has no pinned machine type",
            )));
        };
        let qemu = &self.ctx.qemu;
        if !qemu.has_machine(&pin.machine_type) {
            return Err(VmError::Invalid(SpecError::field(
                "vm.machine.type",
                format!(
                    "machine type {} is not available in QEMU {} on this host",
                    pin.machine_type, qemu.version
                ),
            )));
        }
        qemu.cpu_usable(&pin.cpu).map_err(|why| {
            VmError::Invalid(SpecError::field(
                "vm.machine.cpu",
                format!("CPU model {} cannot run on this host: {why}", pin.cpu),
            ))
        })
    }

    /// Makes the disks of arriving VM `spec`: overlays on the same images
    /// and blank disks, of the source's sizes, and its volumes, empty.
    /// Returns the volumes made (to remove if the migration fails).
    pub async fn provision_incoming(
        &self,
        spec: &VmSpec,
        disks: &[IncomingDisk],
    ) -> Result<Vec<String>, VmError> {
        // Its directory holds the disks, the seed and the logs; the record
        // comes only when the VM arrived.
        let dir = self.ctx.layout.vm_dir(spec.uuid);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| VmError::Failed(format!("creating {}: {e}", dir.display())))?;
        }
        disks::provision(&self.ctx.layout, &self.ctx.qemu_img, &self.ctx.images, spec).await?;
        let mut volumes = Vec::new();
        let result = async {
            for (i, disk) in spec.disks.iter().enumerate() {
                let name = disk.name_or_default(i);
                let size = disks
                    .iter()
                    .find(|d| d.name == name)
                    .map(|d| d.virtual_size)
                    .ok_or_else(|| {
                        VmError::Invalid(SpecError::field(
                            format!("disks[{i}]"),
                            format!("the source did not say how large disk {name} is"),
                        ))
                    })?;
                match disk.source() {
                    Ok(DiskSource::Volume { volume }) => {
                        self.ctx
                            .volumes
                            .create(
                                &VolumeCreate {
                                    name: volume.to_string(),
                                    size_mib: Some(size.div_ceil(MIB)),
                                    image: None,
                                },
                                &self.ctx.images,
                            )
                            .await?;
                        volumes.push(volume.to_string());
                    }
                    Ok(DiskSource::Image { .. } | DiskSource::Blank { .. }) => {
                        let file = self.ctx.layout.vm_disk(spec.uuid, &name);
                        let info = self.ctx.qemu_img.info(&file, Some("qcow2"), false).await?;
                        if info.virtual_size < size {
                            self.ctx.qemu_img.resize(&file, size).await?;
                        }
                    }
                    _ => {}
                }
            }
            Ok::<(), VmError>(())
        }
        .await;
        if let Err(e) = result {
            self.discard_files(spec, &volumes).await;
            return Err(e);
        }
        Ok(volumes)
    }

    /// Launches arriving VM `spec`'s QEMU, waiting for the memory
    /// (`-incoming defer`), and attaches to its serial console.
    pub async fn launch_incoming(
        &self,
        spec: &VmSpec,
        machine: Option<&crate::spec::MachinePin>,
        banner: &str,
    ) -> Result<(QemuInstance, Option<Arc<SerialHub>>), VmError> {
        let machine = machine.ok_or_else(|| {
            VmError::Invalid(SpecError::field(
                "machine",
                "the VM has no pinned machine type",
            ))
        })?;
        let qemu = actor::launch_qemu(&self.ctx, spec, machine, Some(banner), true).await?;
        let serial = actor::open_serial(&self.ctx, spec, &qemu.paths).await;
        Ok((qemu, serial))
    }

    /// Makes arriving VM `vm` one of this host's: saves its record (the
    /// point from which the target owns the guest), and hands its QEMU,
    /// paused, to a new actor. The caller then resumes it.
    pub fn adopt_migrated(
        &self,
        mut vm: Vm,
        qemu: QemuInstance,
        serial: Option<Arc<SerialHub>>,
    ) -> Result<VmHandle, VmError> {
        state::arrive(&mut vm.state);
        vm.task = None;
        vm.desired = Desired::Running;
        vm.pid = Some(qemu.process.pid());
        vm.pid_start = qemu.process.start_time();
        // The swtpm started for it holds the TPM state that arrived.
        vm.tpm_pid = qemu.tpm.as_ref().map(|t| t.pid());
        vm.tpm_pid_start = qemu.tpm.as_ref().and_then(|t| t.start_time());
        vm.tpm_pid = qemu.tpm.as_ref().map(|t| t.pid());
        vm.tpm_pid_start = qemu.tpm.as_ref().and_then(|t| t.start_time());
        vm.error = None;
        vm.pending = None;
        vm.generation += 1;
        vm.updated_at = crate::persist::timestamp(std::time::SystemTime::now());
        self.ctx.store.save(&vm).map_err(|e| {
            VmError::Failed(format!(
                "saving the arriving VM's record: {}",
                error_chain(&e)
            ))
        })?;
        let handle = actor::spawn_migrated_in(self.ctx.clone(), vm.clone(), qemu, serial);
        self.registry.register(handle.clone());
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vm.id);
        self.ctx.publish_vm(&vm);
        Ok(handle)
    }

    /// Removes everything an arriving VM that did not arrive left here: its
    /// QEMU (`qemu`, if launched), disks, volumes, run directory, cgroup
    /// and its place.
    pub async fn discard_incoming(
        &self,
        spec: &VmSpec,
        qemu: Option<QemuInstance>,
        volumes: &[String],
    ) {
        if let Some(qemu) = qemu {
            let _ = qemu.process.kill().await;
        }
        let paths = crate::qemu::argv::RunPaths::new(&self.ctx.settings.run_dir, spec.uuid);
        crate::qemu::instance::remove_run_dir(&paths);
        self.ctx.confiner.release(spec.uuid);
        self.discard_files(spec, volumes).await;
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&spec.uuid);
    }

    async fn discard_files(&self, spec: &VmSpec, volumes: &[String]) {
        if self.registry.handle(spec.uuid).is_none() {
            if let Err(e) = self.ctx.store.remove(spec.uuid) {
                tracing::warn!(vm = %spec.name, error = %error_chain(&e), "could not remove an arriving VM's files");
            }
        }
        for volume in volumes {
            if let Err(e) = self.ctx.volumes.delete(volume).await {
                tracing::warn!(%volume, error = %e, "could not remove an arriving VM's volume");
            }
        }
    }
}

/// `errors` with each field named from the request's top (`vm.spec.…`).
fn prefixed(prefix: &str, mut errors: SpecError) -> SpecError {
    for e in &mut errors.errors {
        e.field = format!("{prefix}{}", e.field);
    }
    errors
}

/// `10.0.2` → `(10, 0, 2)` (a missing part is 0).
fn version_triple(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.trim().split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().unwrap_or(Some(0))?;
    let micro = parts.next().unwrap_or(Some(0))?;
    Some((major, minor, micro))
}

#[cfg(test)]
mod tests {
    use super::version_triple;

    #[test]
    fn qemu_versions_compare_as_numbers() {
        assert!(version_triple("10.0.2") > version_triple("9.2.0"));
        assert_eq!(version_triple("8"), Some((8, 0, 0)));
        assert_eq!(version_triple("10.x"), None);
        assert_eq!(version_triple(""), None);
    }
}
