//! What every VM actor shares: settings, profiles, the record store, the
//! event bus, the stores.

use std::sync::Arc;

use crate::config::Settings;
use crate::net::networks::NetworkStore;
use crate::qemu::accel::Accel;
use crate::qemu::capabilities::QemuCapabilities;
use crate::qemu::firmware::{FirmwareCatalog, UefiFirmware};
use crate::qemu::profile::Profiles;
use crate::spec::MachinePin;
use crate::storage::images::ImageStore;
use crate::storage::qemu_img::QemuImg;
use crate::storage::volumes::VolumeStore;
use crate::storage::Layout;
use crate::vm::confinement::Confiner;
use crate::vm::events::{EventBody, EventBus};
use crate::vm::store::Store;
use crate::vm::Vm;

/// Shared by the manager and every actor.
#[derive(Debug)]
pub struct Context {
    /// Daemon settings.
    pub settings: Settings,
    /// Machine profiles.
    pub profiles: Profiles,
    /// The accelerator VMs get.
    pub accel: Accel,
    /// What the QEMU binary offers (probed once, at start, with `accel`).
    pub qemu: Arc<QemuCapabilities>,
    /// VM records.
    pub store: Store,
    /// Change events.
    pub events: Arc<EventBus>,
    /// Where storage files live.
    pub layout: Layout,
    /// `qemu-img`.
    pub qemu_img: QemuImg,
    /// The image store.
    pub images: Arc<ImageStore>,
    /// The volume store.
    pub volumes: VolumeStore,
    /// The networks.
    pub networks: NetworkStore,
    /// The directories a spec's host files must lie below (canonical).
    pub host_roots: Vec<std::path::PathBuf>,
    /// How QEMUs are confined: users, jails, cgroups.
    pub confiner: Confiner,
    /// The UEFI firmware builds QEMU's firmware descriptors offer (read
    /// once, at start, from `settings.firmware_dirs`).
    pub firmware: FirmwareCatalog,
    /// Taken by a launch of a VM backed by huge pages from its check of
    /// the free pages until its QEMU answers (it has preallocated them by
    /// then): two such launches cannot both count the same free pages.
    pub hugepage_launches: tokio::sync::Mutex<()>,
}

impl Context {
    /// A context with no VMs yet; opens the image and volume stores.
    pub fn new(
        settings: Settings,
        profiles: Profiles,
        accel: Accel,
        qemu: Arc<QemuCapabilities>,
        store: Store,
        events: EventBus,
    ) -> std::io::Result<Context> {
        let host_roots = settings
            .checked_host_roots()
            .map_err(|message| std::io::Error::new(std::io::ErrorKind::InvalidInput, message))?;
        let events = Arc::new(events);
        let layout = Layout::new(&settings.state_dir);
        let qemu_img = QemuImg::new(&settings.qemu_img_binary);
        let images = Arc::new(ImageStore::open(
            layout.clone(),
            qemu_img.clone(),
            settings.import_dir(),
            &settings.images,
            events.clone(),
        )?);
        let volumes = VolumeStore::open(layout.clone(), qemu_img.clone(), events.clone())?;
        let networks = NetworkStore::open(&settings.state_dir)?;
        let confiner = Confiner::new(&settings.qemu)
            .map_err(|message| std::io::Error::new(std::io::ErrorKind::InvalidInput, message))?
            .with_tpm_state(layout.clone());
        let (firmware, warnings) = FirmwareCatalog::load(&settings.firmware_dirs);
        for warning in warnings {
            tracing::warn!(%warning, "skipping a firmware descriptor");
        }
        tracing::info!(
            descriptors = firmware.len(),
            "UEFI firmware descriptors read"
        );
        Ok(Context {
            firmware,
            settings,
            profiles,
            accel,
            qemu,
            store,
            events,
            layout,
            qemu_img,
            images,
            volumes,
            networks,
            host_roots,
            confiner,
            hugepage_launches: tokio::sync::Mutex::new(()),
        })
    }

    /// The pin a new VM of profile `profile` gets: its machine type
    /// resolved through the probed QEMU, its CPU model for the daemon's
    /// accelerator. The error names the profile and its field.
    pub fn machine_pin(&self, profile: &str) -> Result<MachinePin, String> {
        let profile = self.profiles.get(profile).map_err(|e| e.to_string())?;
        self.qemu.pin(profile, self.accel)
    }

    /// The pin VM `spec` gets: [`Context::machine_pin`] of its profile, with
    /// the CPU model and flags of its `cpu` field. The error names the
    /// field (`profile`, `cpu.model`).
    pub fn vm_pin(
        &self,
        spec: &crate::spec::VmSpec,
    ) -> Result<MachinePin, crate::spec::FieldError> {
        let profile = self
            .profiles
            .get(&spec.profile)
            .map_err(|e| crate::spec::FieldError {
                field: "profile".into(),
                message: e.to_string(),
            })?;
        self.qemu.pin_vm(profile, self.accel, spec.cpu.as_ref())
    }

    /// The UEFI firmware a VM with `spec`'s firmware gets on machine type
    /// `machine` (None for BIOS); refused, naming `boot.firmware`, when no
    /// descriptor offers it (`ovmf` not installed).
    pub fn uefi_firmware(
        &self,
        spec: &crate::spec::VmSpec,
        machine: &str,
    ) -> Result<Option<UefiFirmware>, crate::spec::SpecError> {
        let firmware = spec.boot.firmware();
        if !firmware.is_uefi() {
            return Ok(None);
        }
        self.firmware
            .select(firmware, machine)
            .map(Some)
            .map_err(|e| crate::spec::SpecError::field("boot.firmware", e.to_string()))
    }

    /// Publishes `vm`'s new view.
    pub fn publish_vm(&self, vm: &Vm) {
        self.events.publish(EventBody::Vm {
            vm: Box::new(vm.clone()),
        });
    }

    /// Publishes that `vm` moved to the daemon at `target` (the last event
    /// about it here).
    pub fn publish_migrated(&self, vm: &Vm, target: &str) {
        self.events.publish(EventBody::VmMigrated {
            id: vm.id,
            name: vm.name.clone(),
            target: target.to_string(),
        });
    }

    /// Publishes that `vm` was deleted.
    pub fn publish_deleted(&self, vm: &Vm) {
        self.events.publish(EventBody::VmDeleted {
            id: vm.id,
            name: vm.name.clone(),
        });
    }
}
