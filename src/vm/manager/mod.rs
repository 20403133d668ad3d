//! The registry of VMs: loads the records at start (each actor reattaches to
//! its QEMU), creates VMs, and routes actions to their actors.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::config::Settings;
use crate::confine::cgroup::CgroupStats;
use crate::console::ConsoleKind;
use crate::net::networks::{Network, NetworkNic, NetworkSpec};
use crate::node::{self, HostTotals, Inventory, NodeInfo, Usage};
use crate::qemu::accel::{self, Accel};
use crate::qemu::capabilities::{self, CapabilitiesError, PROBE_DEADLINE};
use crate::qemu::profile::{ProfileError, Profiles};
use crate::spec::{
    derived_mac, Boot, DiskFormat, DiskSource, FieldError, NicSpec, SpecError, VmSpec,
};
use crate::storage::files::OpenMode;
use crate::storage::images::ImageStore;
use crate::storage::volumes::{Volume, VolumeAttachment, VolumeCreate};
use crate::storage::{disks, MIB};
use crate::vm::actor::{self, error_chain, ActOptions, Change, Command, Live, VmError, VmHandle};
use crate::vm::claims::{Claim, Claims, Hold, Taken};
use crate::vm::context::Context;
use crate::vm::disk_ops::SnapshotKind;
use crate::vm::disk_ops::{self, Snapshot};
use crate::vm::events::EventBus;
use crate::vm::registry::Registry;

mod admission;
mod edit;
mod migration;
mod stores;

pub use migration::{IncomingDisk, IncomingImage, IncomingRequest};

use crate::vm::state::PowerAction;
use crate::vm::store::{Store, StoreError};
use crate::vm::Vm;
pub use admission::check_host_paths;
use admission::create_claims;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// Profiles could not be loaded.
    #[error("loading machine profiles")]
    Profiles(#[source] ProfileError),
    /// The state directory is unusable.
    #[error("opening the state directory")]
    Store(#[source] StoreError),
    /// The run directory could not be made.
    #[error("creating run directory {path}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The image or volume store is unusable.
    #[error("opening the image and volume stores under {path}")]
    Storage {
        /// The state directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU is missing or broken: its capability probe failed (the cause
    /// names the binary).
    #[error("probing QEMU (is it installed? scripts/setup.sh installs it)")]
    Qemu(#[source] CapabilitiesError),
}

/// Whether a create made a VM or found the same one already there.
#[derive(Debug)]
pub enum Created {
    /// A new VM.
    New(Vm),
    /// A VM with this UUID and the same spec already existed (a retried PUT).
    Existing(Vm),
}

/// All VMs of this host.
#[derive(Debug)]
pub struct Manager {
    ctx: Arc<Context>,
    /// The VMs.
    registry: Registry,
    /// What operations in flight have taken (UUIDs, names, MACs, volumes,
    /// images and networks), so their checks cannot race.
    claims: Claims,
    /// VMs arriving by live migration: their place (UUID, name, capacity)
    /// is held until they arrived or the migration failed.
    incoming: std::sync::Mutex<std::collections::HashMap<Uuid, VmSpec>>,
    /// Places promised past a capacity check and not yet part of a VM's
    /// record: creates still making their disks (until the VM is
    /// registered or the create fails) and edits' growth (until the VM's
    /// actor took the new spec). Counted as allocated. Only changed with
    /// `incoming` held (locked first), so a capacity check and the place
    /// it promises are one step.
    promised: std::sync::Mutex<std::collections::HashMap<Uuid, admission::Promise>>,
    /// Why `accel` was chosen (probed once, at start).
    accel_reason: String,
}

impl Manager {
    /// Loads settings' profiles and records, reattaches every VM's QEMU (or
    /// records what became of it) and starts `autostart` VMs. Returns once
    /// every VM has been reattached.
    pub async fn open(settings: Settings) -> Result<Manager, ManagerError> {
        let profiles =
            Profiles::load(Some(&settings.profile_dir)).map_err(ManagerError::Profiles)?;
        let (accel, accel_reason) = accel::resolve_on_host_explained(settings.accel);
        // Once, with the accelerator VMs get: which CPU models are usable
        // depends on it.
        let qemu = capabilities::probe(&settings.qemu_binary, accel, PROBE_DEADLINE)
            .await
            .map_err(ManagerError::Qemu)?;
        for name in profiles.names() {
            // A profile this QEMU cannot run is not fatal (other profiles
            // work); creating a VM of it is refused with the same reason.
            if let Ok(Err(reason)) = profiles.get(name).map(|p| qemu.pin(p, accel)) {
                tracing::warn!(profile = name, %reason, "profile unusable with this QEMU");
            }
        }
        let qemu = Arc::new(qemu);
        let store = Store::open(&settings.state_dir).map_err(ManagerError::Store)?;
        std::fs::create_dir_all(settings.run_dir.join("vms")).map_err(|source| {
            ManagerError::RunDir {
                path: settings.run_dir.clone(),
                source,
            }
        })?;
        let events = EventBus::new(settings.event_buffer);
        let records = store.load_all().map_err(ManagerError::Store)?;
        let state_dir = settings.state_dir.clone();
        let ctx = Arc::new(
            Context::new(settings, profiles, accel, qemu.clone(), store, events).map_err(
                |source| ManagerError::Storage {
                    path: state_dir,
                    source,
                },
            )?,
        );
        // Bridges first: autostart VMs put their taps on them.
        ctx.networks.restore_all().await;
        let registry = Registry::default();
        let mut waiting = Vec::new();
        for record in records {
            match record {
                Ok(loaded) => {
                    let (ready, done) = oneshot::channel();
                    registry.register(actor::spawn_existing(
                        ctx.clone(),
                        loaded.vm,
                        loaded.host_rebooted,
                        ready,
                    ));
                    waiting.push(done);
                }
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "skipping unreadable VM record")
                }
            }
        }
        for done in waiting {
            let _ = done.await;
        }
        remove_stale_taps(&ctx, &registry).await;
        // Cgroups of VMs whose records are gone (deleted while a QEMU
        // outlived the daemon, or never saved).
        let known = registry.handles().iter().map(VmHandle::id).collect();
        ctx.confiner.remove_unknown_cgroups(&known);
        tracing::info!(vms = registry.handles().len(), accel = accel.as_str(), qemu_version = %qemu.version, "VMs loaded");
        Ok(Manager {
            ctx,
            registry,
            claims: Claims::default(),
            incoming: Default::default(),
            promised: Default::default(),
            accel_reason,
        })
    }

    /// Every VM, by name.
    pub fn list(&self) -> Vec<Vm> {
        let mut vms: Vec<Vm> = self.registry.handles().iter().map(VmHandle::view).collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        vms
    }

    /// The VM whose UUID or name is `key`.
    pub fn find(&self, key: &str) -> Result<VmHandle, VmError> {
        if let Ok(id) = Uuid::parse_str(key) {
            if let Some(handle) = self.registry.handle(id) {
                return Ok(handle);
            }
        }
        self.registry
            .handles()
            .into_iter()
            .find(|h| h.has_name(key))
            .ok_or_else(|| VmError::NotFound(format!("no VM {key}")))
    }

    /// The running QEMU of VM `key`, checked to offer the `kind` console.
    /// Not running, or no such console on this VM: refused (409).
    pub fn console(&self, key: &str, kind: ConsoleKind) -> Result<(Uuid, Live), VmError> {
        let handle = self.find(key)?;
        let vm = handle.view();
        let live = handle.live().ok_or_else(|| {
            VmError::Refused(format!(
                "VM {} is {}: consoles need a running QEMU",
                vm.name,
                vm.state.as_str()
            ))
        })?;
        match kind {
            ConsoleKind::Vnc if !live.display => Err(VmError::Refused(format!(
                "VM {} has no display (profile {} has no devices.display): use the serial console",
                vm.name, vm.spec.profile
            ))),
            ConsoleKind::Serial if live.serial.is_none() => Err(VmError::Refused(format!(
                "VM {} has no serial console attached (spec.serial.enabled is {})",
                vm.name, vm.spec.serial.enabled
            ))),
            _ => Ok((vm.id, live)),
        }
    }

    /// The last `tail_bytes` of VM `key`'s serial console log (whatever its
    /// state: the log outlives the QEMU that wrote it).
    /// `current_boot`: only the part from the last boot banner on.
    pub async fn console_log(
        &self,
        key: &str,
        tail_bytes: u64,
        current_boot: bool,
    ) -> Result<Vec<u8>, VmError> {
        let spec = self.find(key)?.view().spec;
        let log = crate::vm::actor::serial_log(&self.ctx, &spec);
        let search = self.console_log_limit();
        tokio::task::spawn_blocking(move || match current_boot {
            true => log.current_boot_tail(tail_bytes, search),
            false => log.tail(tail_bytes),
        })
        .await
        .map_err(|e| VmError::Failed(e.to_string()))?
        .map_err(|e| VmError::Failed(format!("reading the serial log: {e}")))
    }

    /// VM `key` as `GET /v1/vms/{id}` shows it: with
    /// `console_silent_since` when it runs but its serial log has not grown
    /// for `[console] silent_hint_s` seconds (0: never).
    pub fn show(&self, key: &str) -> Result<crate::vm::Vm, VmError> {
        let handle = self.find(key)?;
        let mut vm = handle.view();
        vm.guest = handle.live().and_then(|live| live.guest_info());
        let hint_after = self.ctx.settings.console.silent_hint_s;
        if hint_after > 0
            && vm.spec.serial.enabled
            && vm.state == crate::vm::state::PowerState::Running
        {
            let log = crate::vm::actor::serial_log(&self.ctx, &vm.spec);
            let silent_for = log.last_growth().and_then(|t| {
                std::time::SystemTime::now()
                    .duration_since(t)
                    .ok()
                    .map(|d| (t, d))
            });
            if let Some((since, silent)) = silent_for {
                if silent.as_secs() >= hint_after {
                    vm.console_silent_since = Some(crate::persist::timestamp(since));
                }
            }
        }
        Ok(vm)
    }

    /// The most a console-log request may ask for: the log and its backups.
    pub fn console_log_limit(&self) -> u64 {
        let c = &self.ctx.settings.console;
        c.log_max_bytes.saturating_mul(u64::from(c.log_backups) + 1)
    }

    /// Creates a VM from `spec` (stopped). A VM with the same UUID and spec
    /// already present is returned as [`Created::Existing`], so a retried
    /// create is safe; a different spec under that UUID is a conflict.
    pub async fn create(&self, mut spec: VmSpec) -> Result<Created, VmError> {
        spec.validate(|name| self.ctx.profiles.caps(name))?;
        self.settle_nics(spec.uuid, &mut spec.nics, 0, "nics")
            .await?;
        let _claims = self.claim(create_claims(&spec))?;
        if self
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|arriving| arriving.uuid == spec.uuid || arriving.name == spec.name)
        {
            return Err(VmError::Conflict(format!(
                "VM {} ({:?}) is arriving here by live migration",
                spec.uuid, spec.name
            )));
        }
        if let Some(existing) = self.registry.handle(spec.uuid) {
            let vm = existing.view();
            return if vm.spec == spec {
                Ok(Created::Existing(vm))
            } else {
                Err(VmError::Conflict(format!(
                    "VM {} already exists with a different spec",
                    spec.uuid
                )))
            };
        }
        // The profile names a machine type this QEMU must have and a CPU
        // model this host must run: refused here rather than at every start.
        let machine = self
            .ctx
            .vm_pin(&spec)
            .map_err(|e| VmError::Invalid(SpecError { errors: vec![e] }))?;
        check_host_paths(&spec, &self.ctx.host_roots)?;
        // Held until the VM is registered (then it counts as one) or the
        // create fails: a concurrent create sees this one's share.
        let _place = self.reserve_capacity(&spec)?;
        disks::check_references(&spec, &self.ctx.images, &self.ctx.volumes)?;
        for (i, disk) in spec.disks.iter().enumerate() {
            if let Ok(DiskSource::Volume { volume }) = disk.source() {
                if let Some(user) = self.volume_user(volume) {
                    return Err(VmError::Conflict(format!(
                        "disks[{i}].volume: volume {volume} is in use by VM {} (disk {})",
                        user.vm_name, user.disk
                    )));
                }
            }
        }
        if let Some(other) = self
            .registry
            .handles()
            .iter()
            .find(|h| h.view().name == spec.name)
        {
            return Err(VmError::Conflict(format!(
                "name {:?} is taken by VM {}",
                spec.name,
                other.id()
            )));
        }
        let firmware = self.ctx.uefi_firmware(&spec, &machine.machine_type)?;
        disks::provision(
            &self.ctx.layout,
            &self.ctx.qemu_img,
            &self.ctx.images,
            &spec,
        )
        .await?;
        if let Some(firmware) = &firmware {
            // The VM's own variable store, from the template of the
            // firmware it will boot.
            if let Err(e) = disks::provision_nvram(
                &self.ctx.layout,
                &self.ctx.qemu_img,
                spec.uuid,
                &firmware.vars_template,
            )
            .await
            {
                let _ = self.ctx.store.remove(spec.uuid);
                return Err(e.into());
            }
        }
        let mut vm = Vm::new(spec);
        vm.machine = Some(machine);
        if let Err(e) = self.ctx.store.save(&vm) {
            // Nothing half-made: the disks just made go too.
            let _ = self.ctx.store.remove(vm.id);
            return Err(VmError::from(e).during("saving the VM record"));
        }
        tracing::info!(vm = %vm.name, id = %vm.id, "created");
        self.registry
            .register(actor::spawn_new(self.ctx.clone(), vm.clone()));
        self.ctx.publish_vm(&vm);
        Ok(Created::New(vm))
    }

    /// Deletes VM `key` (`force`: even when it runs). Its own disks go with
    /// it; its volumes too when `delete_volumes`.
    pub async fn delete(
        &self,
        key: &str,
        force: bool,
        delete_volumes: bool,
    ) -> Result<Vm, VmError> {
        let vm = self
            .act(key, PowerAction::Delete { force }, ActOptions::default())
            .await?;
        // The actor has ended; its record and directory are gone.
        self.registry.forget(vm.id);
        if delete_volumes {
            for disk in &vm.spec.disks {
                if let Ok(DiskSource::Volume { volume }) = disk.source() {
                    if let Err(e) = self.ctx.volumes.delete(volume).await {
                        tracing::warn!(vm = %vm.name, %volume, error = %e, "could not delete the VM's volume");
                    }
                }
            }
        }
        Ok(vm)
    }

    /// Changes VM `key`'s disks or NICs. Attaching a volume checks,
    /// holding that volume's claim, that no other VM uses it; a disk naming
    /// an image holds that image as a create does, so the image cannot be
    /// deleted meanwhile.
    pub async fn change(&self, key: &str, change: Change) -> Result<Vm, VmError> {
        let handle = self.find(key)?;
        if let Change::AttachDisk(disk) = &change {
            let claim = match disk.source() {
                Ok(DiskSource::Volume { volume }) => {
                    vec![(Claim::Volume(volume.to_string()), Hold::Alone)]
                }
                Ok(DiskSource::Image { image, .. }) => {
                    vec![(Claim::Image(image.to_string()), Hold::Shared)]
                }
                _ => vec![],
            };
            // Held while the actor hot-plugs: only this volume or image
            // waits.
            let _claims = self.claim(claim)?;
            if let Ok(DiskSource::Volume { volume }) = disk.source() {
                if !self.ctx.volumes.exists(volume) {
                    return Err(VmError::Invalid(SpecError::field(
                        "volume",
                        format!("no volume {volume:?}"),
                    )));
                }
                if let Some(user) = self.volume_user(volume) {
                    return Err(VmError::Conflict(format!(
                        "volume {volume} is in use by VM {} (disk {})",
                        user.vm_name, user.disk
                    )));
                }
            }
            return handle.command(Command::Change(Box::new(change))).await;
        }
        handle.command(Command::Change(Box::new(change))).await
    }

    /// Takes, reverts to or deletes snapshot `name` of VM `key`.
    pub async fn snapshot(
        &self,
        key: &str,
        kind: SnapshotKind,
        name: String,
    ) -> Result<Vm, VmError> {
        self.find(key)?
            .command(Command::Snapshot { kind, name })
            .await
    }

    /// Attaches a NIC to VM `key` (hot-plugged when it runs).
    pub async fn attach_nic(&self, key: &str, mut nic: NicSpec) -> Result<Vm, VmError> {
        let handle = self.find(key)?;
        let vm = handle.view();
        let profile_caps = self.ctx.profiles.caps(&vm.spec.profile);
        crate::spec::validate_nic(&nic, profile_caps)?;
        let index = vm.spec.nics.len();
        let mut one = [nic.clone()];
        self.settle_nics(vm.id, &mut one, index, "").await?;
        // Held while the actor hot-plugs: only this MAC and network wait.
        let _claims = self.claim(vec![
            (
                Claim::Mac(one[0].mac.clone().unwrap_or_default().to_ascii_lowercase()),
                Hold::Alone,
            ),
            (Claim::Network(one[0].network.clone()), Hold::Shared),
        ])?;
        if vm
            .spec
            .nics
            .iter()
            .any(|n| n.mac.as_deref() == one[0].mac.as_deref())
        {
            return Err(VmError::Conflict(format!(
                "the VM already has a NIC with MAC {}",
                one[0].mac.as_deref().unwrap_or("?")
            )));
        }
        nic = one[0].clone();
        handle
            .command(Command::Change(Box::new(Change::AttachNic(nic))))
            .await
    }

    /// Runs `action` on the VM `key` and waits for it to finish.
    pub async fn act(
        &self,
        key: &str,
        action: PowerAction,
        options: ActOptions,
    ) -> Result<Vm, VmError> {
        let handle = self.find(key)?;
        if action == PowerAction::Start {
            // Refused before the VM is touched, so it stays as it was; the
            // launch checks again (autostart, arriving migrations).
            let vm = handle.view();
            if !vm.state.has_process() {
                let spec = vm.pending.map_or(vm.spec, |p| p.spec);
                crate::vm::actor::check_hugepages_free(&spec)?;
            }
        }
        handle.act(action, options).await
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.ctx.events
    }

    /// The accelerator VMs get.
    pub fn accel(&self) -> Accel {
        self.ctx.accel
    }

    /// Facts about this host.
    pub fn node(&self) -> NodeInfo {
        let mut by_state = BTreeMap::new();
        for vm in self.list() {
            *by_state.entry(vm.state.as_str().to_string()).or_insert(0) += 1;
        }
        let accel = self.ctx.accel;
        NodeInfo {
            hostname: node::hostname(),
            vmlet_version: env!("CARGO_PKG_VERSION").to_string(),
            cpus: node::cpus(),
            memory_mib: node::memory_mib(),
            qemu_binary: self.ctx.settings.qemu_binary.display().to_string(),
            qemu_version: self.ctx.qemu.version.clone(),
            machine_types: self.ctx.qemu.machine_types(),
            default_machine_type: self
                .ctx
                .machine_pin(crate::spec::DEFAULT_PROFILE)
                .ok()
                .map(|pin| pin.machine_type),
            cpu_models: self.ctx.qemu.usable_cpu_models(),
            accel: accel.as_str().to_string(),
            accel_reason: self.accel_reason.clone(),
            profiles: self.ctx.profiles.names().map(str::to_string).collect(),
            vms_by_state: by_state,
            inventory: self.inventory(),
            stop_grace_s: self.ctx.settings.stop_grace_s,
        }
    }

    /// Every VM's handle (for the metrics scrape).
    pub fn handles(&self) -> Vec<VmHandle> {
        self.registry.handles()
    }

    /// Reads a running VM's cgroup statistics (for the metrics scrape):
    /// owns what it needs, so the scrape can call it off the async threads.
    pub fn cgroup_stats(&self) -> impl Fn(Uuid) -> Option<CgroupStats> + Send + Sync + 'static {
        let ctx = self.ctx.clone();
        move |vm| ctx.confiner.stats(vm)
    }
}

/// Removes this daemon's taps that no VM with a QEMU owns (left by a QEMU
/// that is gone): a tap never outlives its VM. Only taps carrying this
/// daemon's mark are touched: another daemon on the same host (its own
/// state dir) owns taps with the same kind of name.
async fn remove_stale_taps(ctx: &Context, registry: &Registry) {
    let mark = ctx.networks.tap_mark();
    let owned: HashSet<String> = registry
        .handles()
        .iter()
        .map(VmHandle::view)
        .filter(|vm| vm.state.has_process() || vm.pid.is_some())
        .flat_map(|vm| vm.spec.nics)
        .map(|nic| crate::qemu::nic::tap_name(&nic))
        .collect();
    let links = match crate::net::bridge::links().await {
        Ok(links) => links,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list links to clean up taps");
            return;
        }
    };
    for link in links {
        let ours = link.kind.as_deref() == Some("tun")
            && crate::qemu::nic::is_tap_name(&link.name)
            && link.alias.as_deref() == Some(mark);
        if ours && !owned.contains(&link.name) {
            match crate::net::bridge::delete_link(&link.name).await {
                Ok(()) => tracing::info!(tap = %link.name, "removed a tap no VM owns"),
                Err(e) => {
                    tracing::warn!(tap = %link.name, error = %e, "could not remove a stale tap")
                }
            }
        }
    }
}
