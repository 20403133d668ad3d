//! Admission: what a create, a hot-plug or a delete must check before it
//! runs, and what it takes meanwhile. Host files are opened as a start
//! would open them, MACs are settled, capacity is checked, and every
//! operation claims the UUIDs, names, MACs, volumes, images and networks it
//! uses.

use std::collections::HashMap;

use super::*;

impl Manager {
    /// Takes `wanted` for an operation, or says which of them another
    /// operation in progress holds (409).
    pub(super) fn claim(&self, wanted: Vec<(Claim, Hold)>) -> Result<Taken<'_>, VmError> {
        self.claims.take(wanted).map_err(|claim| {
            VmError::Conflict(format!(
                "{claim} is in use by another operation in progress; retry"
            ))
        })
    }

    /// Fills in the MACs `nics` lack (derived from the VM's UUID and each
    /// NIC's index from `first_index`, skipping MACs in use) and checks
    /// that every MAC is free on the host and every network exists.
    /// `field` prefixes error fields (`nics` → `nics[0].mac`). The caller
    /// then claims the MACs, so two operations cannot both get one.
    pub(super) async fn settle_nics(
        &self,
        vm: Uuid,
        nics: &mut [NicSpec],
        first_index: usize,
        field: &str,
    ) -> Result<(), VmError> {
        let taken: HashSet<String> = self
            .registry
            .handles()
            .iter()
            .filter(|h| h.id() != vm)
            .flat_map(|h| h.view().spec.nics)
            .filter_map(|n| n.mac.map(|m| m.to_ascii_lowercase()))
            .collect();
        let mut errors = Vec::new();
        for (offset, nic) in nics.iter_mut().enumerate() {
            let index = first_index + offset;
            let at = |f: &str| {
                if field.is_empty() {
                    f.to_string()
                } else {
                    format!("{field}[{offset}].{f}")
                }
            };
            match &nic.mac {
                Some(mac) => {
                    let mac = mac.to_ascii_lowercase();
                    if taken.contains(&mac) {
                        return Err(VmError::Conflict(format!(
                            "{}: MAC {mac} is in use by another VM",
                            at("mac")
                        )));
                    }
                    nic.mac = Some(mac);
                }
                None => {
                    let mac = (0..)
                        .map(|attempt| derived_mac(vm, index, attempt))
                        .find(|mac| !taken.contains(mac))
                        .expect("some derived MAC is free");
                    nic.mac = Some(mac);
                }
            }
            if self.ctx.networks.get(&nic.network).await.is_err() {
                errors.push(FieldError {
                    field: at("network"),
                    message: format!("no network {:?}", nic.network),
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(VmError::Invalid(SpecError { errors }))
        }
    }

    /// The host's inventory with every VM's allocation.
    pub(super) fn inventory(&self) -> Inventory {
        let incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        self.inventory_locked(&incoming)
    }

    /// Checks that `spec` fits (capacity when enforced; huge pages always:
    /// QEMU preallocates them, so they are never overcommitted) beside
    /// every VM, arriving VM and promise in flight, and holds its place
    /// until the returned guard drops. Check and hold are one step under
    /// `incoming`'s lock: two creates that each fit alone cannot both pass.
    pub(super) fn reserve_capacity(&self, spec: &VmSpec) -> Result<Place<'_>, VmError> {
        let incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        let inventory = self.inventory_locked(&incoming);
        let usage = self.usage(spec);
        if self.ctx.settings.capacity.enforce {
            inventory.check_fits(usage).map_err(VmError::Conflict)?;
        }
        Self::check_hugepages_unallocated(&inventory, spec)?;
        Ok(self.promise(spec, usage))
    }

    /// Like [`Manager::reserve_capacity`], for an edit of `vm` to `spec`:
    /// checks and holds only what the edit adds to what the VM holds now
    /// (`growth`; huge pages beyond the ones its spec or pending spec
    /// already take), until the guard drops (once the VM's actor took the
    /// new spec, when it counts as the VM's own).
    pub(super) fn reserve_growth(
        &self,
        vm: &Vm,
        spec: &VmSpec,
        growth: Usage,
    ) -> Result<Place<'_>, VmError> {
        let incoming = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        let inventory = self.inventory_locked(&incoming);
        if self.ctx.settings.capacity.enforce && growth != Usage::default() {
            inventory.check_fits(growth).map_err(VmError::Conflict)?;
        }
        if let Some(size) = spec.memory.hugepages {
            let held = std::iter::once(&vm.spec)
                .chain(vm.pending.as_ref().map(|p| &p.spec))
                .filter(|s| s.memory.hugepages == Some(size))
                .map(|s| size.pages_for(s.memory_mib))
                .max()
                .unwrap_or(0);
            let more = size.pages_for(spec.memory_mib).saturating_sub(held);
            if more > 0 {
                let unallocated = inventory
                    .hugepages
                    .get(size.as_str())
                    .map_or(0, node::HugePagePool::unallocated);
                node::check_hugepages(size, more, unallocated, "not allocated to other VMs")
                    .map_err(VmError::Conflict)?;
            }
        }
        Ok(self.promise(spec, growth))
    }

    /// Records the place `usage` (and `spec`'s huge pages) as promised;
    /// the caller holds `incoming`'s lock.
    fn promise(&self, spec: &VmSpec, usage: Usage) -> Place<'_> {
        self.promised
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                spec.uuid,
                Promise {
                    spec: spec.clone(),
                    usage,
                },
            );
        Place {
            promised: &self.promised,
            id: spec.uuid,
        }
    }

    /// The inventory, with the VMs arriving by migration (`incoming`, held
    /// locked by the caller) and the places promised (creates and edits in
    /// flight) counted as allocated.
    pub(super) fn inventory_locked(&self, incoming: &HashMap<Uuid, VmSpec>) -> Inventory {
        let promised: Vec<Promise> = self
            .promised
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut used = Usage::default();
        let arriving = incoming
            .values()
            .map(|spec| self.usage(spec))
            .chain(promised.iter().map(|p| p.usage));
        for u in self
            .list()
            .iter()
            .map(|vm| self.reserved(vm))
            .chain(arriving)
        {
            used.vcpus += u.vcpus;
            used.memory_mib += u.memory_mib;
            used.disk_gib += u.disk_gib;
        }
        let host = HostTotals {
            cpus: u64::from(node::cpus()),
            memory_mib: node::memory_mib(),
            disk_gib: node::filesystem_gib(&self.ctx.settings.state_dir),
        };
        let mut inventory = Inventory::new(&self.ctx.settings.capacity, host, used);
        // Huge pages: what every VM here (its spec or pending spec, the
        // larger) and every arriving VM would take when running.
        let specs: Vec<VmSpec> = self
            .list()
            .into_iter()
            .flat_map(|vm| {
                std::iter::once(vm.spec)
                    .chain(vm.pending.map(|p| p.spec))
                    .collect::<Vec<_>>()
            })
            .chain(incoming.values().cloned())
            .chain(promised.into_iter().map(|p| p.spec))
            .collect();
        let mut wanted: HashMap<(Uuid, crate::spec::HugePageSize), u64> = HashMap::new();
        for spec in &specs {
            if let Some(size) = spec.memory.hugepages {
                let pages = wanted.entry((spec.uuid, size)).or_default();
                *pages = (*pages).max(size.pages_for(spec.memory_mib));
            }
        }
        for (size, (total, free)) in node::hugepage_pools(Path::new(node::HUGEPAGES_SYSFS)) {
            let allocated = wanted
                .iter()
                .filter(|((_, s), _)| *s == size)
                .map(|(_, pages)| pages)
                .sum();
            inventory.hugepages.insert(
                size.as_str().to_string(),
                node::HugePagePool {
                    total,
                    free,
                    allocated,
                },
            );
        }
        inventory
    }

    /// Whether `spec`'s huge pages fit in what `inventory` has not
    /// promised to other VMs (409 otherwise).
    pub(super) fn check_hugepages_unallocated(
        inventory: &Inventory,
        spec: &VmSpec,
    ) -> Result<(), VmError> {
        let Some(size) = spec.memory.hugepages else {
            return Ok(());
        };
        let unallocated = inventory
            .hugepages
            .get(size.as_str())
            .map_or(0, node::HugePagePool::unallocated);
        node::check_hugepages(
            size,
            size.pages_for(spec.memory_mib),
            unallocated,
            "not allocated to other VMs",
        )
        .map_err(VmError::Conflict)
    }

    /// What a VM holds: the larger of what its spec and its pending spec
    /// take, so a pending change is never started on a host it no longer
    /// fits.
    pub(super) fn reserved(&self, vm: &Vm) -> Usage {
        let now = self.usage(&vm.spec);
        match &vm.pending {
            Some(pending) => super::edit::max_usage(now, self.usage(&pending.spec)),
            None => now,
        }
    }

    /// What a VM takes: its vCPUs, memory and own disks (overlays at their
    /// full size, blank disks), rounded up to whole GiB.
    pub(super) fn usage(&self, spec: &VmSpec) -> Usage {
        let disk_mib: u64 = spec
            .disks
            .iter()
            .map(|d| match d.source() {
                Ok(DiskSource::Blank { size_mib }) => size_mib,
                Ok(DiskSource::Image { image, size_mib }) => {
                    let image_mib = self
                        .ctx
                        .images
                        .get(image)
                        .ok()
                        .and_then(|i| i.virtual_size)
                        .map_or(0, |b| b.div_ceil(MIB));
                    size_mib.unwrap_or(0).max(image_mib)
                }
                _ => 0,
            })
            .sum();
        Usage {
            vcpus: u64::from(spec.vcpus),
            memory_mib: spec.memory_mib,
            disk_gib: disk_mib.div_ceil(1024),
        }
    }
}

/// A place promised in the host's capacity: what a create or an edit in
/// flight takes beyond the VM records.
#[derive(Debug, Clone)]
pub(super) struct Promise {
    /// The spec being created, or the edit's new spec (its huge pages
    /// count once per VM: the larger of this and the VM's own).
    spec: VmSpec,
    /// The vCPUs, memory and disk it takes beyond the VM records.
    usage: Usage,
}

/// The place a create or an edit in flight holds in the host's capacity;
/// given back when dropped (after the VM is registered or took the new
/// spec, or when the operation fails).
#[derive(Debug)]
#[must_use = "the place is given back when the guard drops"]
pub(super) struct Place<'a> {
    promised: &'a std::sync::Mutex<HashMap<Uuid, Promise>>,
    id: Uuid,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.promised
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// What creating `spec` takes: its UUID, name, MACs and volumes alone,
/// the images and networks it uses beside other creates.
pub(super) fn create_claims(spec: &VmSpec) -> Vec<(Claim, Hold)> {
    let mut wanted = vec![
        (Claim::Vm(spec.uuid), Hold::Alone),
        (Claim::VmName(spec.name.clone()), Hold::Alone),
    ];
    for nic in &spec.nics {
        if let Some(mac) = &nic.mac {
            wanted.push((Claim::Mac(mac.to_ascii_lowercase()), Hold::Alone));
        }
        wanted.push((Claim::Network(nic.network.clone()), Hold::Shared));
    }
    for disk in &spec.disks {
        match disk.source() {
            Ok(DiskSource::Volume { volume }) => {
                wanted.push((Claim::Volume(volume.to_string()), Hold::Alone))
            }
            Ok(DiskSource::Image { image, .. }) => {
                wanted.push((Claim::Image(image.to_string()), Hold::Shared))
            }
            _ => {}
        }
    }
    wanted
}

/// Refuses host files that vmlet would not open at start: outside `roots`
/// (canonical), reached through a symlink, not regular files, or qcow2
/// files naming a backing or data file. Checked again at every start, when
/// the files are opened for QEMU; this makes a bad spec fail at create.
pub fn check_host_paths(spec: &VmSpec, roots: &[PathBuf]) -> Result<(), SpecError> {
    let mut paths: Vec<(String, &Path, Option<DiskFormat>)> = Vec::new();
    if let Boot::Kernel { kernel, initrd, .. } = &spec.boot {
        paths.push(("boot.kernel".into(), kernel, None));
        if let Some(initrd) = initrd {
            paths.push(("boot.initrd".into(), initrd, None));
        }
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        if let Ok(DiskSource::File { path, format }) = disk.source() {
            paths.push((format!("disks[{i}].path"), path, Some(format)));
        }
    }
    let mut errors = Vec::new();
    for (field, path, format) in paths {
        // Kernels and initrds are read raw.
        let format = format.unwrap_or(DiskFormat::Raw);
        let opened = crate::vm::launch::open_host_file(roots, path, OpenMode::READ, format);
        if let Err(e) = opened {
            errors.push(FieldError {
                field,
                message: e.to_string(),
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(SpecError { errors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskFormat, DiskSpec, SerialSpec};

    #[test]
    fn host_paths_must_resolve_inside_the_roots() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let inside_file = root.path().join("ok.img");
        std::fs::write(&inside_file, b"x").unwrap();
        let outside_file = outside.path().join("secret");
        std::fs::write(&outside_file, b"x").unwrap();
        // A symlink inside the root pointing out of it must not pass.
        let link = root.path().join("link.img");
        std::os::unix::fs::symlink(&outside_file, &link).unwrap();
        let disk = |path: &Path| DiskSpec::file(path, DiskFormat::Raw);
        let spec = VmSpec {
            uuid: Uuid::new_v4(),
            name: "a".into(),
            vcpus: 1,
            memory_mib: 64,
            profile: "q35".into(),
            boot: Boot::Kernel {
                kernel: inside_file.clone(),
                initrd: Some(root.path().join("missing")),
                cmdline: String::new(),
                firmware: crate::spec::Firmware::Bios,
            },
            disks: vec![disk(&inside_file), disk(&outside_file), disk(&link)],
            serial: SerialSpec::default(),
            channels: vec![],
            guest_agent: true,
            cloud_init: None,
            nics: vec![],
            autostart: false,
            resources: Default::default(),
            tpm: None,
            cpu: None,
            topology: None,
            numa: vec![],
            memory: Default::default(),
        };
        let roots = [std::fs::canonicalize(root.path()).unwrap()];
        let err = check_host_paths(&spec, &roots).unwrap_err();
        let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["boot.initrd", "disks[1].path", "disks[2].path"]
        );
        assert!(err.errors[1].message.contains("outside"), "{err}");
    }
}
