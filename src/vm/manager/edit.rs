//! Changing a VM's spec (`PATCH`): the admission of the new spec (checked
//! like a create, identity kept, storage kept, capacity for any growth),
//! then the VM's actor applies it, live or pending.

use super::*;
use crate::spec::{adopt_disk_names, check_disk_changes, name_disks};
use crate::vm::actor::Edit;

impl Manager {
    /// Replaces VM `key`'s spec by `spec`, which was made from `base` (what
    /// its pending spec, else its spec). `generation`: the generation the caller
    /// read; another one is a stale generation. Every field error at once.
    pub async fn edit(
        &self,
        key: &str,
        mut spec: VmSpec,
        base: VmSpec,
        generation: Option<u64>,
    ) -> Result<Vm, VmError> {
        let handle = self.find(key)?;
        let vm = handle.view();
        if let Some(generation) = generation {
            if generation != vm.generation {
                return Err(VmError::StaleGeneration(format!(
                    "VM {} is at generation {}, not {generation}: read it again and retry",
                    vm.name, vm.generation
                )));
            }
        }
        let mut named_base = base.clone();
        name_disks(&mut named_base);
        adopt_disk_names(&named_base, &mut spec);
        let mut errors = Vec::new();
        if spec.uuid != vm.id {
            errors.push(FieldError {
                field: "uuid".into(),
                message: format!("cannot change (the VM is {})", vm.id),
            });
        }
        if spec.name != vm.name {
            errors.push(FieldError {
                field: "name".into(),
                message: format!(
                    "cannot change (the VM is called {:?}; its name names its files and taps)",
                    vm.name
                ),
            });
        }
        if let Err(e) = spec.validate(|name| self.ctx.profiles.caps(name)) {
            errors.extend(e.errors);
        }
        errors.extend(check_disk_changes(&named_base, &spec));
        // A new CPU model must run here, as at a create (pinned anew at
        // the next start).
        if errors.is_empty() && spec.cpu != vm.spec.cpu {
            if let Err(e) = self.ctx.vm_pin(&spec) {
                errors.push(e);
            }
        }
        // UEFI firmware this host offers for the machine type the VM will
        // start with, as at a create (not only at the next start).
        let firmware_changed =
            spec.boot.firmware() != vm.spec.boot.firmware() || spec.profile != vm.spec.profile;
        if errors.is_empty() && firmware_changed && spec.boot.firmware().is_uefi() {
            let machine = match &vm.machine {
                Some(pin) if spec.profile == vm.spec.profile => Ok(pin.machine_type.clone()),
                _ => self.ctx.vm_pin(&spec).map(|pin| pin.machine_type),
            };
            match machine {
                Ok(machine) => {
                    if let Err(e) = self.ctx.uefi_firmware(&spec, &machine) {
                        errors.extend(e.errors);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(VmError::Invalid(SpecError { errors }));
        }
        self.settle_nics(vm.id, &mut spec.nics, 0, "nics").await?;
        if spec == named_base {
            // Nothing to change: no operation, no new generation.
            return Ok(vm);
        }
        check_host_paths(&spec, &self.ctx.host_roots)?;
        // Held while the actor plugs devices in: only what this change
        // adds, and this VM's other changes, wait. The images the new spec
        // names are held as a create holds them, so none is deleted between
        // the check below and the spec that names it.
        let mut wanted = vec![(Claim::Vm(vm.id), Hold::Alone)];
        let images: HashSet<&str> = spec
            .disks
            .iter()
            .filter_map(|d| d.image.as_deref())
            .collect();
        for image in images {
            wanted.push((Claim::Image(image.to_string()), Hold::Shared));
        }
        let old_macs: HashSet<String> = named_base
            .nics
            .iter()
            .chain(&vm.spec.nics)
            .filter_map(|n| n.mac.as_deref().map(str::to_ascii_lowercase))
            .collect();
        for nic in &spec.nics {
            let mac = nic.mac.clone().unwrap_or_default().to_ascii_lowercase();
            if !old_macs.contains(&mac) {
                wanted.push((Claim::Mac(mac), Hold::Alone));
                wanted.push((Claim::Network(nic.network.clone()), Hold::Shared));
            }
        }
        let old_volumes: HashSet<&str> = named_base
            .disks
            .iter()
            .chain(&vm.spec.disks)
            .filter_map(|d| d.volume.as_deref())
            .collect();
        let new_volumes: Vec<(usize, &str)> = spec
            .disks
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.volume.as_deref().map(|v| (i, v)))
            .filter(|(_, v)| !old_volumes.contains(v))
            .collect();
        for (_, volume) in &new_volumes {
            wanted.push((Claim::Volume(volume.to_string()), Hold::Alone));
        }
        let _claims = self.claim(wanted)?;
        disks::check_references(&spec, &self.ctx.images, &self.ctx.volumes)?;
        for (i, volume) in new_volumes {
            if let Some(user) = self.volume_user(volume) {
                return Err(VmError::Conflict(format!(
                    "disks[{i}].volume: volume {volume} is in use by VM {} (disk {})",
                    user.vm_name, user.disk
                )));
            }
        }
        let now = self.reserved(&vm);
        let after = max_usage(self.usage(&vm.spec), self.usage(&spec));
        let growth = Usage {
            vcpus: after.vcpus.saturating_sub(now.vcpus),
            memory_mib: after.memory_mib.saturating_sub(now.memory_mib),
            disk_gib: after.disk_gib.saturating_sub(now.disk_gib),
        };
        // Held until the actor took the spec: a concurrent create or edit
        // sees this growth.
        let _place = self.reserve_growth(&vm, &spec, growth)?;
        handle
            .command(Command::Edit(Box::new(Edit {
                spec,
                base,
                generation,
            })))
            .await
    }
}

/// The larger of two usages, resource by resource.
pub(super) fn max_usage(a: Usage, b: Usage) -> Usage {
    Usage {
        vcpus: a.vcpus.max(b.vcpus),
        memory_mib: a.memory_mib.max(b.memory_mib),
        disk_gib: a.disk_gib.max(b.disk_gib),
    }
}
