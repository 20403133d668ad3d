//! Validation of a spec and of the pieces the API changes on their own
//! (a disk, a NIC, I/O limits, names, sizes).

use std::collections::HashSet;
use std::path::Path;

use super::limits;
use super::{
    parse_mac, Boot, DiskBus, DiskSource, DiskSpec, FieldError, Firmware, IoLimits, NicModel,
    NicSpec, ProfileCaps, SpecError, VmSpec, SEED_DISK, UEFI_NODES,
};

struct Collector(Vec<FieldError>);

impl Collector {
    fn into_result(self) -> Result<(), SpecError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(SpecError { errors: self.0 })
        }
    }

    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Fewest tasks a QEMU may be limited to.
const MIN_PIDS: u64 = 16;
/// Most tasks a QEMU may be allowed.
const MAX_PIDS: u64 = 1 << 22;

impl VmSpec {
    /// Checks every field. `profile_caps` looks up a profile by name (`None`:
    /// unknown profile).
    pub fn validate(
        &self,
        profile_caps: impl Fn(&str) -> Option<ProfileCaps>,
    ) -> Result<(), SpecError> {
        let mut c = Collector(Vec::new());
        if self.uuid.is_nil() {
            c.add("uuid", "must not be the nil UUID");
        }
        check_name(&mut c, "name", &self.name, limits::MAX_NAME_LEN);
        if self.vcpus == 0 || self.vcpus > limits::MAX_VCPUS {
            c.add("vcpus", format!("must be 1..={}", limits::MAX_VCPUS));
        }
        if !(limits::MIN_MEMORY_MIB..=limits::MAX_MEMORY_MIB).contains(&self.memory_mib) {
            c.add(
                "memory_mib",
                format!(
                    "must be {}..={}",
                    limits::MIN_MEMORY_MIB,
                    limits::MAX_MEMORY_MIB
                ),
            );
        }
        let caps = profile_caps(&self.profile);
        if caps.is_none() {
            c.add("profile", format!("unknown profile {:?}", self.profile));
        }
        self.check_boot(&mut c, caps);
        self.check_disks(&mut c);
        if caps.is_some_and(|p| !p.scsi) {
            for (i, disk) in self.disks.iter().enumerate() {
                if disk.bus == DiskBus::VirtioScsi {
                    c.add(
                        format!("disks[{i}].bus"),
                        "this profile has no SCSI controller",
                    );
                }
            }
        }
        self.check_cloud_init(&mut c);
        self.check_nics(&mut c, caps);
        self.check_channels(&mut c);
        self.check_resources(&mut c);
        if self.tpm.is_some() && caps.is_some_and(|p| !p.tpm) {
            c.add(
                "tpm",
                format!("profile {:?} has no TPM device", self.profile),
            );
        }
        for (field, message) in super::cpu::check(
            self.cpu.as_ref(),
            self.topology.as_ref(),
            &self.numa,
            &self.memory,
            self.vcpus,
            self.memory_mib,
        ) {
            c.add(field, message);
        }
        c.into_result()
    }

    fn check_resources(&self, c: &mut Collector) {
        let r = &self.resources;
        for (field, weight) in [("cpu_weight", r.cpu_weight), ("io_weight", r.io_weight)] {
            if weight.is_some_and(|w| !(1..=10_000).contains(&w)) {
                c.add(format!("resources.{field}"), "must be 1..=10000");
            }
        }
        let most = self.vcpus.saturating_mul(100).max(100);
        if r.cpu_quota_percent.is_some_and(|q| q == 0 || q > most) {
            c.add(
                "resources.cpu_quota_percent",
                format!("must be 1..={most} (100 per vCPU)"),
            );
        }
        if r.memory_overhead_mib
            .is_some_and(|m| m > limits::MAX_MEMORY_MIB)
        {
            c.add(
                "resources.memory_overhead_mib",
                format!("must be at most {}", limits::MAX_MEMORY_MIB),
            );
        }
        if r.pids_max
            .is_some_and(|p| !(MIN_PIDS..=MAX_PIDS).contains(&p))
        {
            c.add(
                "resources.pids_max",
                format!("must be {MIN_PIDS}..={MAX_PIDS} (QEMU needs a thread per vCPU and more)"),
            );
        }
        if let Some(set) = &r.cpu_set {
            if let Err(e) = super::resources::parse_cpu_list(set) {
                c.add("resources.cpu_set", e);
            }
        }
    }

    fn check_boot(&self, c: &mut Collector, caps: Option<ProfileCaps>) {
        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
                ..
            } => {
                if caps.is_some_and(|p| !p.kernel_boot) {
                    c.add("boot.type", "this profile cannot boot a kernel directly");
                }
                check_path(c, "boot.kernel", kernel);
                if let Some(initrd) = initrd {
                    check_path(c, "boot.initrd", initrd);
                }
                if cmdline.len() > limits::MAX_CMDLINE_LEN {
                    c.add(
                        "boot.cmdline",
                        format!("longer than {} bytes", limits::MAX_CMDLINE_LEN),
                    );
                }
                if cmdline.chars().any(char::is_control) {
                    c.add("boot.cmdline", "contains control characters");
                }
            }
            Boot::Firmware { .. } => {
                if caps.is_some_and(|p| !p.firmware_boot) {
                    c.add("boot.type", "this profile cannot boot from firmware");
                }
                if !self.disks.iter().any(|d| d.boot_order.is_some()) {
                    c.add("disks", "firmware boot needs a disk with boot_order set");
                }
            }
        }
        let firmware = self.boot.firmware();
        match caps {
            Some(p) if firmware.is_uefi() && !p.uefi => c.add(
                "boot.firmware",
                format!(
                    "profile {:?} has no pflash for UEFI firmware: use bios, or a q35 profile",
                    self.profile
                ),
            ),
            Some(p) if firmware == Firmware::UefiSecure && !p.secure_boot => c.add(
                "boot.firmware",
                format!(
                    "uefi-secure needs a machine with SMM (q35); profile {:?} has none",
                    self.profile
                ),
            ),
            _ => {}
        }
    }

    fn check_disks(&self, c: &mut Collector) {
        if self.disks.len() > limits::MAX_DISKS {
            c.add("disks", format!("more than {} disks", limits::MAX_DISKS));
        }
        let mut names = HashSet::new();
        let mut orders = HashSet::new();
        let mut volumes = HashSet::new();
        for (i, disk) in self.disks.iter().enumerate() {
            let field = |f: &str| format!("disks[{i}].{f}");
            check_disk(c, &field(""), disk);
            if !names.insert(disk.name_or_default(i)) {
                c.add(field("name"), "duplicate disk name");
            }
            if disk.name_or_default(i) == SEED_DISK {
                c.add(field("name"), "`cidata` is the cloud-init seed's name");
            }
            if UEFI_NODES.contains(&disk.name_or_default(i).as_str()) {
                c.add(
                    field("name"),
                    format!(
                        "{:?} is reserved for the UEFI firmware",
                        disk.name_or_default(i)
                    ),
                );
            }
            if let Some(order) = disk.boot_order {
                if !orders.insert(order) {
                    c.add(field("boot_order"), "another disk has this boot_order");
                }
            }
            if let Ok(DiskSource::Volume { volume }) = disk.source() {
                if !volumes.insert(volume) {
                    c.add(field("volume"), "another disk uses this volume");
                }
            }
        }
    }

    fn check_nics(&self, c: &mut Collector, caps: Option<ProfileCaps>) {
        if self.nics.len() > limits::MAX_NICS {
            c.add("nics", format!("more than {} NICs", limits::MAX_NICS));
        }
        let mut macs = HashSet::new();
        for (i, nic) in self.nics.iter().enumerate() {
            check_nic(c, &format!("nics[{i}]."), nic, caps);
            if let Some(mac) = nic.mac.as_deref().and_then(parse_mac) {
                if !macs.insert(mac) {
                    c.add(format!("nics[{i}].mac"), "another NIC has this MAC");
                }
            }
        }
    }

    fn check_cloud_init(&self, c: &mut Collector) {
        let Some(ci) = &self.cloud_init else { return };
        let files = [
            ("cloud_init.user_data", Some(&ci.user_data)),
            ("cloud_init.meta_data", ci.meta_data.as_ref()),
            ("cloud_init.network_config", ci.network_config.as_ref()),
        ];
        for (field, text) in files {
            if text.is_some_and(|t| t.len() > limits::MAX_CLOUD_INIT_BYTES) {
                c.add(
                    field,
                    format!("longer than {} bytes", limits::MAX_CLOUD_INIT_BYTES),
                );
            }
        }
    }

    fn check_channels(&self, c: &mut Collector) {
        if self.channels.len() > limits::MAX_CHANNELS {
            c.add(
                "channels",
                format!("more than {} channels", limits::MAX_CHANNELS),
            );
        }
        let mut names = HashSet::new();
        for (i, ch) in self.channels.iter().enumerate() {
            let field = format!("channels[{i}].name");
            check_name(c, &field, &ch.name, limits::MAX_NAME_LEN);
            if !names.insert(&ch.name) {
                c.add(field, "duplicate channel name");
            } else if self.guest_agent && ch.name == super::vm::GUEST_AGENT_PORT {
                // vmlet owns that port's socket when it runs the agent.
                c.add(
                    field,
                    format!(
                        "{} is the guest agent's port: set guest_agent: true instead of a channel (or guest_agent: false to keep the channel)",
                        super::vm::GUEST_AGENT_PORT
                    ),
                );
            }
        }
    }
}

/// Checks one disk; `prefix` is `disks[i].` (or empty for a disk given on
/// its own, as in a hot-plug request).
fn check_disk(c: &mut Collector, prefix: &str, disk: &DiskSpec) {
    let field = |f: &str| format!("{prefix}{f}");
    if let Some(name) = &disk.name {
        check_device_name(c, &field("name"), name);
    }
    match disk.source() {
        Err((f, message)) => c.add(field(f), message),
        Ok(DiskSource::File { path, .. }) => check_path(c, &field("path"), path),
        Ok(DiskSource::Image { image, size_mib }) => {
            check_name(c, &field("image"), image, limits::MAX_NAME_LEN);
            if let Some(size) = size_mib {
                check_size(c, &field("size_mib"), size);
            }
        }
        Ok(DiskSource::Volume { volume }) => {
            check_name(c, &field("volume"), volume, limits::MAX_NAME_LEN)
        }
        Ok(DiskSource::Blank { size_mib }) => check_size(c, &field("size_mib"), size_mib),
    }
    if disk.format.is_some() && disk.path.is_none() {
        c.add(field("format"), "only with path");
    }
    if let Some(serial) = &disk.serial {
        let ok = !serial.is_empty()
            && serial.len() <= limits::MAX_SERIAL_LEN
            && serial
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
        if !ok {
            c.add(
                field("serial"),
                format!(
                    "1..={} characters of A-Z a-z 0-9 . _ -",
                    limits::MAX_SERIAL_LEN
                ),
            );
        }
    }
    for (f, message) in disk.limits.problems() {
        c.add(field(&format!("limits.{f}")), message);
    }
}

fn check_nic(c: &mut Collector, prefix: &str, nic: &NicSpec, caps: Option<ProfileCaps>) {
    let field = |f: &str| format!("{prefix}{f}");
    check_name(c, &field("network"), &nic.network, limits::MAX_NAME_LEN);
    if let Some(mac) = &nic.mac {
        match parse_mac(mac) {
            None => c.add(
                field("mac"),
                "must be six hex octets like 52:54:00:12:34:56",
            ),
            Some(bytes) if bytes[0] & 1 == 1 => c.add(
                field("mac"),
                "is a multicast address (the first octet is odd)",
            ),
            Some([0, 0, 0, 0, 0, 0]) => c.add(field("mac"), "must not be all zero"),
            Some(_) => {}
        }
    }
    let queues = nic.queues.unwrap_or(1);
    if queues == 0 || queues > limits::MAX_NIC_QUEUES {
        c.add(
            field("queues"),
            format!("must be 1..={}", limits::MAX_NIC_QUEUES),
        );
    } else if queues > 1 && nic.model != NicModel::Virtio {
        c.add(field("queues"), "multi-queue needs model virtio");
    }
    if nic.model != NicModel::Virtio && caps.is_some_and(|p| !p.pci) {
        c.add(field("model"), "this profile has no PCI bus: only virtio");
    }
}

/// Validates a NIC given on its own (a hot-plug request).
pub fn validate_nic(nic: &NicSpec, caps: Option<ProfileCaps>) -> Result<(), SpecError> {
    let mut c = Collector(Vec::new());
    check_nic(&mut c, "", nic, caps);
    c.into_result()
}

fn check_size(c: &mut Collector, field: &str, size_mib: u64) {
    if size_mib == 0 || size_mib > limits::MAX_DISK_MIB {
        c.add(field, format!("must be 1..={} MiB", limits::MAX_DISK_MIB));
    }
}

/// Validates a disk given on its own (a hot-plug request): field names have
/// no `disks[i].` prefix.
pub fn validate_disk(disk: &DiskSpec) -> Result<(), SpecError> {
    let mut c = Collector(Vec::new());
    check_disk(&mut c, "", disk);
    c.into_result()
}

/// Validates I/O limits given on their own.
pub fn validate_limits(limits: &IoLimits) -> Result<(), SpecError> {
    let mut c = Collector(Vec::new());
    for (f, message) in limits.problems() {
        c.add(f, message);
    }
    c.into_result()
}

/// Validates the name of an image, volume or snapshot (`field` names it).
pub fn validate_name(field: &str, name: &str) -> Result<(), SpecError> {
    let mut c = Collector(Vec::new());
    check_name(&mut c, field, name, limits::MAX_NAME_LEN);
    c.into_result()
}

/// Validates a disk size in MiB (`field` names it).
pub fn validate_size(field: &str, size_mib: u64) -> Result<(), SpecError> {
    let mut c = Collector(Vec::new());
    check_size(&mut c, field, size_mib);
    c.into_result()
}

/// Names: `[A-Za-z0-9][A-Za-z0-9._-]*`. They reach QEMU options and logs, so
/// nothing that could be an option separator, a path, or a shell word.
fn check_name(c: &mut Collector, field: &str, name: &str, max: usize) {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_alphanumeric());
    let rest_ok = name
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch));
    if name.is_empty() || name.len() > max || !first_ok || !rest_ok {
        c.add(
            field,
            format!(
                "must be 1..={max} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
            ),
        );
    }
}

/// Device names become QEMU ids and node names, which must start with a letter.
fn check_device_name(c: &mut Collector, field: &str, name: &str) {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_alphabetic());
    let rest_ok = name
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
    if name.is_empty() || name.len() > limits::MAX_DEVICE_NAME_LEN || !first_ok || !rest_ok {
        c.add(
            field,
            format!(
                "must be 1..={} characters of A-Z a-z 0-9 _ -, starting with a letter",
                limits::MAX_DEVICE_NAME_LEN
            ),
        );
    }
}

/// Host paths must be absolute and normal: no `..`, no `.`, no control
/// characters, so a path means what it says and cannot walk out of the
/// directory it names.
fn check_path(c: &mut Collector, field: &str, path: &Path) {
    let Some(s) = path.to_str() else {
        c.add(field, "must be valid UTF-8");
        return;
    };
    if s.is_empty() {
        c.add(field, "must not be empty");
        return;
    }
    if s.len() > limits::MAX_PATH_LEN {
        c.add(field, format!("longer than {} bytes", limits::MAX_PATH_LEN));
    }
    if !path.is_absolute() {
        c.add(field, "must be an absolute path");
    }
    if s.chars().any(char::is_control) {
        c.add(field, "contains control characters");
    }
    // By segment, not Path::components(), which silently drops `.` and `//`.
    let inner: Vec<&str> = s.split('/').skip(1).collect();
    if inner.iter().any(|seg| *seg == "." || *seg == "..") {
        c.add(field, "must not contain `.` or `..` components");
    } else if s.ends_with('/') {
        c.add(field, "must name a file, not a directory");
    } else if inner.iter().any(|seg| seg.is_empty()) {
        c.add(field, "must not contain `//`");
    }
}

#[cfg(test)]
#[path = "validation_tests.rs"]
mod tests;
