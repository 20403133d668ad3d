//! How this daemon confines its VMs' QEMUs: which user each runs as, whether
//! it is jailed, and its cgroup with the spec's limits. Built once at start
//! from the `[qemu]` settings and what the host offers; the launch itself
//! (fork, join, jail, drop root, exec) is `qemu::process`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use crate::config::QemuSettings;
use crate::confine::cgroup::{
    CgroupError, CgroupStats, Cgroups, Hierarchy, JoinFiles, Limits, VmCgroup,
};
use crate::confine::ids::{self, IdPool, IdRange, Ids};
use crate::qemu::instance::ConfinePlan;
use crate::qemu::process::QemuProcess;
use crate::spec::VmSpec;
use crate::vm::error::VmError;

/// Who QEMU runs as.
#[derive(Debug)]
enum Users {
    /// vmlet is not root: QEMU runs as vmlet's own user.
    Same,
    /// Every QEMU as one user.
    One(Ids),
    /// Each running VM its own uid (gid = uid).
    PerVm(IdPool),
}

/// The confinement of this daemon's QEMUs.
#[derive(Debug)]
pub struct Confiner {
    users: Users,
    jail: bool,
    kvm_group: Option<u32>,
    cgroups: Option<Cgroups>,
    settings: QemuSettings,
    /// The cgroups of running VMs, for statistics.
    live: Mutex<std::collections::HashMap<Uuid, VmCgroup>>,
    /// The `swtpm` of each running VM with a TPM: it runs with the VM's uid
    /// in its cgroup, so it is ended before either is released.
    tpms: Mutex<std::collections::HashMap<Uuid, Arc<QemuProcess>>>,
    /// Where the VMs' TPM state lives, to give it back to root when a VM's
    /// uid is released (see [`Confiner::with_tpm_state`]).
    tpm_state: Option<crate::storage::Layout>,
}

/// How long an `swtpm` gets to exit by itself once QEMU is gone (it does
/// at once when QEMU's end of its socket closes, after saving its state)
/// before it is killed.
pub const TPM_EXIT_GRACE: Duration = Duration::from_secs(2);

/// What a start of one VM holds while QEMU is spawned.
#[derive(Debug)]
pub struct Confined {
    ids: Option<Ids>,
    jail: bool,
    kvm: bool,
    procs: Option<JoinFiles>,
}

impl Confined {
    /// The plan `qemu::instance::launch` carries out.
    pub fn plan(&self) -> ConfinePlan<'_> {
        ConfinePlan {
            ids: self.ids.as_ref(),
            jail: self.jail,
            kvm: self.kvm,
            cgroup: self.procs.as_ref(),
        }
    }
}

impl Confiner {
    /// Reads the host: are we root, which cgroup hierarchy, who owns
    /// `/dev/kvm`. Logs one line saying what confinement QEMU gets.
    pub fn new(settings: &QemuSettings) -> Result<Confiner, String> {
        let root = nix::unistd::geteuid().is_root();
        let range =
            IdRange::parse(&settings.uid_range).map_err(|e| format!("[qemu] uid_range: {e}"))?;
        let users = match (&settings.user, root) {
            (_, false) => Users::Same,
            (Some(name), true) => {
                let user = nix::unistd::User::from_name(name)
                    .map_err(|e| format!("[qemu] user {name:?}: {e}"))?
                    .ok_or_else(|| format!("[qemu] user {name:?} does not exist"))?;
                if user.uid.is_root() {
                    return Err(format!("[qemu] user {name:?} is root"));
                }
                Users::One(Ids {
                    uid: user.uid.as_raw(),
                    gid: user.gid.as_raw(),
                    groups: vec![],
                })
            }
            (None, true) => Users::PerVm(IdPool::new(range)),
        };
        let cgroups = if !root || settings.cgroup_root.is_empty() {
            None
        } else {
            match Hierarchy::detect().and_then(|h| Cgroups::new(h, &settings.cgroup_root)) {
                Ok(cgroups) => Some(cgroups),
                // A setting that can never work is the operator's to fix.
                Err(e @ CgroupError::InvalidRoot { .. }) => {
                    return Err(format!("[qemu] cgroup_root: {}", crate::error_chain(&e)))
                }
                // A host without the controllers still runs VMs, unlimited.
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "no usable cgroup hierarchy: VMs run without CPU, memory and task limits");
                    None
                }
            }
        };
        let kvm_group = kvm_group();
        let jail = root && settings.jail;
        if root {
            tracing::info!(
                user = match &users {
                    Users::One(ids) => format!("uid {}", ids.uid),
                    _ => format!("a uid per VM from {}", settings.uid_range),
                },
                jail,
                cgroups = ?cgroups.as_ref().map(Cgroups::root_dirs),
                "QEMU runs unprivileged with the full seccomp sandbox"
            );
        } else {
            tracing::info!(
                "vmlet is not root: QEMU runs as vmlet's own user, without jail or cgroup"
            );
        }
        Ok(Confiner {
            users,
            jail,
            kvm_group,
            cgroups,
            settings: settings.clone(),
            live: Mutex::new(Default::default()),
            tpms: Mutex::new(Default::default()),
            tpm_state: None,
        })
    }

    /// Everything VM `spec`'s QEMU needs before it is spawned: its uid, its
    /// cgroup (created with the spec's limits). `kvm`: the VM uses KVM.
    pub fn prepare(&self, spec: &VmSpec, kvm: bool) -> Result<Confined, VmError> {
        let ids = match &self.users {
            Users::Same => None,
            Users::One(ids) => Some(ids.clone()),
            Users::PerVm(pool) => {
                let in_use = ids::uids_in_use();
                let uid = pool
                    .claim(spec.uuid, |uid| in_use.contains(&uid))
                    .map_err(|e| VmError::Refused(e.to_string()))?;
                Some(Ids {
                    uid,
                    gid: uid,
                    groups: vec![],
                })
            }
        };
        let ids = ids.map(|mut ids| {
            if kvm {
                ids.groups.extend(self.kvm_group);
            }
            ids
        });
        let procs = match &self.cgroups {
            None => None,
            Some(cgroups) => {
                let limits = self.limits(spec);
                let made = cgroups
                    .create(spec.uuid, &limits)
                    .and_then(|cg| cg.open_join().map(|p| (cg, p)));
                match made {
                    Ok((cgroup, procs)) => {
                        for note in cgroup.unapplied() {
                            tracing::info!(vm = %spec.name, "cgroup: {note}");
                        }
                        self.live_map().insert(spec.uuid, cgroup);
                        Some(procs)
                    }
                    Err(e) => {
                        self.release(spec.uuid);
                        return Err(VmError::Failed(format!(
                            "creating the VM's cgroup: {}",
                            crate::error_chain(&e)
                        )));
                    }
                }
            }
        };
        Ok(Confined {
            jail: self.jail && ids.is_some(),
            kvm,
            ids,
            procs,
        })
    }

    /// The cgroup limits of `spec`.
    pub fn limits(&self, spec: &VmSpec) -> Limits {
        let r = &spec.resources;
        let overhead = r
            .memory_overhead_mib
            .unwrap_or(self.settings.memory_overhead_mib);
        Limits {
            cpu_weight: r.cpu_weight.unwrap_or(self.settings.cpu_weight),
            cpu_quota_percent: r.cpu_quota_percent,
            memory_max_bytes: spec
                .memory_mib
                .saturating_add(overhead)
                .saturating_mul(1 << 20),
            pids_max: r.pids_max.unwrap_or(self.settings.pids_max),
            io_weight: r.io_weight,
        }
    }

    /// VM `vm`'s QEMU (pid `pid`) was found running after a restart: its uid
    /// stays taken and its cgroup is watched again: the one below this
    /// daemon's root, else the one the QEMU is in when that is named for
    /// the VM (made under another root, before an upgrade).
    pub fn found(&self, vm: Uuid, pid: i32) {
        if let (Users::PerVm(pool), Some(uid)) = (&self.users, ids::process_uid(pid)) {
            pool.mark(vm, uid);
        }
        let Some(cgroups) = &self.cgroups else { return };
        let cgroup = cgroups.open(vm).or_else(|| {
            // Made by a vmlet with another root or cgroup of its own (an
            // upgrade): found by the QEMU's membership, and removed with it.
            let elsewhere = cgroups.open_of_process(vm, pid)?;
            tracing::info!(%vm, dirs = ?elsewhere.dirs(), "the VM's QEMU runs in a cgroup outside this daemon's root");
            Some(elsewhere)
        });
        if let Some(cgroup) = cgroup {
            self.live_map().insert(vm, cgroup);
        }
    }

    /// VM `vm`'s `swtpm` (started with its QEMU, or found again after a
    /// restart): ended by [`Confiner::release`].
    pub fn hold_tpm(&self, vm: Uuid, tpm: Arc<QemuProcess>) {
        let old = self.tpm_map().insert(vm, tpm);
        if let Some(old) = old {
            end_tpm(vm, &old);
        }
    }

    /// The pid of VM `vm`'s `swtpm`, while it is held.
    pub fn tpm_pid(&self, vm: Uuid) -> Option<i32> {
        self.tpm_map().get(&vm).map(|t| t.pid())
    }

    /// The VMs' TPM state lives in `layout`: when a VM's own uid is
    /// released, its TPM state directory goes back to root, so a VM that
    /// gets that uid next owns nothing of it.
    pub fn with_tpm_state(mut self, layout: crate::storage::Layout) -> Confiner {
        self.tpm_state = Some(layout);
        self
    }

    /// VM `vm` has no QEMU any more: its `swtpm` ends, its cgroup goes, its
    /// uid is free (and its TPM state root's again).
    pub fn release(&self, vm: Uuid) {
        let tpm = self.tpm_map().remove(&vm);
        if let Some(tpm) = tpm {
            end_tpm(vm, &tpm);
        }
        let live = self.live_map().remove(&vm);
        if let Some(cgroups) = &self.cgroups {
            // The cgroup it was found in, when that is not below this root.
            let elsewhere = live.map_or(Ok(()), |cgroup| cgroup.remove());
            let here = cgroups.remove(vm);
            if let Err(e) = elsewhere.and(here) {
                tracing::warn!(%vm, error = %crate::error_chain(&e), "could not remove the VM's cgroup");
            }
        }
        if let Users::PerVm(pool) = &self.users {
            if let Some(layout) = &self.tpm_state {
                let dir = layout.vm_tpm_dir(vm);
                if let Err(e) = crate::qemu::tpm::take_back_state_dir(&dir) {
                    tracing::warn!(%vm, dir = %dir.display(), error = %e, "could not give the TPM state back to root");
                }
            }
            pool.release(vm);
        }
    }

    /// At start, once every recorded VM has been reattached (or released):
    /// removes the cgroups below this daemon's root of VMs it has no
    /// record of (`known` holds the VMs it has). A cgroup that still holds
    /// a process stays, with a warning.
    pub fn remove_unknown_cgroups(&self, known: &std::collections::HashSet<Uuid>) {
        let Some(cgroups) = &self.cgroups else { return };
        for vm in cgroups.vm_cgroups() {
            if known.contains(&vm) {
                continue;
            }
            match cgroups.remove(vm) {
                Ok(()) => {
                    tracing::info!(%vm, "removed the cgroup of a VM this daemon has no record of")
                }
                Err(e) => {
                    tracing::warn!(%vm, error = %crate::error_chain(&e), "could not remove the cgroup of a VM this daemon has no record of")
                }
            }
        }
    }

    /// The statistics of VM `vm`'s cgroup, while its QEMU runs.
    pub fn stats(&self, vm: Uuid) -> Option<CgroupStats> {
        self.live_map().get(&vm).map(VmCgroup::stats)
    }

    /// The directories of VM `vm`'s cgroup, while its QEMU runs.
    pub fn cgroup_dirs(&self, vm: Uuid) -> Vec<std::path::PathBuf> {
        self.live_map()
            .get(&vm)
            .map(|c| c.dirs().to_vec())
            .unwrap_or_default()
    }

    fn tpm_map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Uuid, Arc<QemuProcess>>> {
        self.tpms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live_map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Uuid, VmCgroup>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Waits up to [`TPM_EXIT_GRACE`] for `tpm` to exit by itself (its QEMU is
/// gone), then kills it. Blocks the thread: release paths cannot await.
fn end_tpm(vm: Uuid, tpm: &QemuProcess) {
    let started = std::time::Instant::now();
    while tpm.is_running() && started.elapsed() < TPM_EXIT_GRACE {
        std::thread::sleep(Duration::from_millis(10));
    }
    if tpm.is_running() {
        tracing::warn!(%vm, pid = tpm.pid(), "swtpm did not exit with its QEMU: killing it");
    }
    if tpm.kill_blocking(TPM_EXIT_GRACE).is_none() {
        tracing::warn!(%vm, pid = tpm.pid(), "swtpm survived SIGKILL");
    }
}

/// The group that may open `/dev/kvm`, when its mode lets a group in.
fn kvm_group() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/dev/kvm").ok()?;
    if meta.mode() & 0o060 == 0o060 && meta.gid() != 0 {
        Some(meta.gid())
    } else {
        if meta.mode() & 0o006 != 0o006 {
            tracing::warn!("/dev/kvm is not open to a group (chgrp kvm /dev/kvm; chmod 660 /dev/kvm): an unprivileged QEMU cannot use KVM");
        }
        None
    }
}
