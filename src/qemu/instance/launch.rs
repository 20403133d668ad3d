//! Launching QEMU: the run directory, the sockets and files vmlet hands
//! over, the confined spawn, the TPM emulator first, and the first QMP
//! answer.

use super::*;

/// Starts QEMU paused (`-S`), confined as `launch.confine` says, and
/// connects QMP. The guest does not run until [`QemuInstance::start_guest`].
///
/// vmlet binds the QMP, serial and channel sockets and opens the serial log
/// itself, so QEMU needs no path to them; QEMU is ready when it answers on
/// QMP. If it exits first, or does not answer within `launch.deadline`, the
/// start fails with what QEMU printed, and nothing is left behind.
pub async fn launch(launch: Launch<'_>) -> Result<QemuInstance, LaunchError> {
    launch_as(launch, false).await
}

/// Like [`launch`], for the target of a live migration: QEMU also waits
/// for an incoming migration (`-incoming defer`), which vmlet starts over
/// QMP once it has exported the disks; the guest runs only after the
/// migration completed and vmlet says so (`cont`).
pub async fn launch_incoming(launch: Launch<'_>) -> Result<QemuInstance, LaunchError> {
    launch_as(launch, true).await
}

async fn launch_as(launch: Launch<'_>, incoming: bool) -> Result<QemuInstance, LaunchError> {
    let paths = launch.paths.clone();
    if let Some(path) = paths.overlong_socket(launch.spec) {
        return Err(LaunchError::SocketPathTooLong { path });
    }
    prepare_run_dir(&paths).map_err(|source| LaunchError::RunDir {
        path: paths.dir.clone(),
        source,
    })?;
    match spawn_confined(&launch, incoming).await {
        Ok(instance) => Ok(instance),
        Err(e) => {
            remove_run_dir(&paths);
            Err(e)
        }
    }
}

/// What [`launch`] holds open until QEMU has inherited it.
struct Handover {
    _sockets: Vec<std::os::unix::net::UnixListener>,
    _serial_log: Option<std::fs::File>,
    run_fds: RunFds,
    passed: Vec<PassedFd>,
}

async fn spawn_confined(launch: &Launch<'_>, incoming: bool) -> Result<QemuInstance, LaunchError> {
    let paths = launch.paths;
    let run_dir_error = |source| LaunchError::RunDir {
        path: paths.dir.clone(),
        source,
    };
    let mut handover = hand_over(launch).map_err(run_dir_error)?;
    // The TPM emulator first: QEMU's tpm-emulator talks to it at once.
    let tpm = match (&launch.spec.tpm, launch.tpm) {
        (None, _) => None,
        (Some(_), None) => return Err(LaunchError::NoTpmPlan),
        (Some(_), Some(plan)) => {
            let bind = binary_bind(plan.binary);
            let started = crate::qemu::tpm::start(crate::qemu::tpm::TpmLaunch {
                binary: plan.binary,
                uuid: launch.spec.uuid,
                state_dir: plan.state_dir,
                log: plan.log,
                run_dir: &paths.dir,
                ids: launch.confine.ids,
                jail: launch.confine.jail,
                cgroup: launch.confine.cgroup,
                binary_bind: bind.as_deref(),
            })?;
            handover.run_fds.tpm = Some(std::os::fd::AsRawFd::as_raw_fd(&started.qemu_end));
            Some(started)
        }
    };
    let (tpm, tpm_end) = match tpm {
        Some(started) => (Some(started.process), Some(started.qemu_end)),
        None => (None, None),
    };
    // Whatever fails from here on, the swtpm goes too.
    let tpm_guard = TpmGuard(tpm.as_ref());
    let tpm_log_start = launch
        .tpm
        .and_then(|p| std::fs::metadata(p.log).ok())
        .map_or(0, |m| m.len());
    let jail = match (launch.confine.jail, launch.confine.ids) {
        (true, Some(ids)) => Some(
            jail::prepare(&JailSpec {
                root: paths.jail_root(),
                uid: ids.uid,
                gid: ids.gid,
                kvm: launch.confine.kvm,
                extra_ro: vec![],
                binary: binary_bind(launch.binary),
            })
            .map_err(LaunchError::Jail)?,
        ),
        (_, Some(ids)) => {
            make_qemu_run_dir(paths, ids).map_err(run_dir_error)?;
            None
        }
        (_, None) => None,
    };
    let boot = match (launch.boot_files, launch.confine.ids) {
        (Some(files), Some(ids)) => {
            Some(boot_files_for(files, paths, ids, jail.is_some()).map_err(run_dir_error)?)
        }
        (files, _) => files.cloned(),
    };
    let inputs = LaunchInputs {
        spec: launch.spec,
        profile: launch.profile,
        machine: launch.machine,
        accel: launch.accel,
        paths,
        jailed: jail.is_some(),
        run_fds: &handover.run_fds,
        disks: launch.disks,
        disk_sets: launch.disk_sets,
        passed_fds: &handover.passed,
        boot_files: boot.as_ref(),
        nics: launch.nics,
        pflash: launch.pflash,
    };
    let mut argv = argv::build(inputs);
    if incoming {
        argv.extend(["-incoming".to_string(), "defer".to_string()]);
    }
    tracing::debug!(uuid = %launch.spec.uuid, ?argv, "launching QEMU");
    let inherit = inherited_fds(&inputs);
    let log = open_qemu_log(launch.qemu_log).map_err(|source| LaunchError::RunDir {
        path: launch.qemu_log.to_path_buf(),
        source,
    })?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let binary = match (&jail, binary_bind(launch.binary)) {
        (Some(_), Some(_)) => Path::new(jail::JAIL_BINARY),
        _ => launch.binary,
    };
    let process = process::spawn(
        SpawnRequest {
            binary,
            argv: &argv,
            uuid: launch.spec.uuid,
            inherit: &inherit,
            log: &log,
            dir: &paths.dir,
        },
        Confinement {
            ids: launch.confine.ids,
            jail: jail.as_ref(),
            cgroup: launch.confine.cgroup,
        },
    )?;
    // QEMU holds its own copies now; vmlet's must go, so that a QEMU that
    // dies makes the QMP connection fail at once instead of hanging (and
    // the swtpm sees QEMU's end close when QEMU exits).
    drop(handover);
    drop(tpm_end);
    let failed = |process: &QemuProcess, why: String| {
        let printed = read_from(launch.qemu_log, log_start);
        let printed = printed.trim();
        let mut message = if printed.is_empty() {
            why
        } else {
            format!("{why}; it printed: {printed}")
        };
        if let Some(plan) = launch.tpm {
            let printed = read_from(plan.log, tpm_log_start);
            if !printed.trim().is_empty() {
                message = format!("{message}; swtpm printed: {}", printed.trim());
            }
        }
        let _ = process.kill_blocking(QUIT_DEADLINE);
        LaunchError::Process(ProcessError::StartFailed { message })
    };
    enum First {
        Connected(Result<(QmpClient, tokio::sync::broadcast::Receiver<QmpEvent>), QmpError>),
        Exited(ExitStatus),
    }
    let socket = paths.qmp_socket();
    let first = tokio::select! {
        connected = QmpClient::connect(&socket, launch.deadline) => First::Connected(connected),
        status = process.exited() => First::Exited(status),
    };
    match first {
        First::Connected(Ok((qmp, events))) => {
            tpm_guard.disarm();
            Ok(QemuInstance {
                process: Arc::new(process),
                qmp,
                paths: paths.clone(),
                tpm: tpm.map(Arc::new),
                events,
            })
        }
        First::Connected(Err(QmpError::ConnectTimeout { after })) => Err(failed(
            &process,
            format!("QEMU did not finish starting within {after:?} (no answer on QMP)"),
        )),
        First::Connected(Err(e)) => {
            // QEMU closing the socket is mostly QEMU exiting: give it a
            // moment, so its own message is what the caller reads.
            let why = match process.wait_exit(QUIT_DEADLINE).await {
                Some(status) => format!("QEMU exited ({status:?}) before answering on QMP: {e}"),
                None => format!("QMP on the new QEMU: {}", crate::error_chain(&e)),
            };
            Err(failed(&process, why))
        }
        First::Exited(status) => Err(failed(
            &process,
            format!("QEMU exited ({status:?}) before answering on QMP"),
        )),
    }
}

/// Kills the swtpm of a launch that failed (dropped armed).
struct TpmGuard<'a>(Option<&'a QemuProcess>);

impl TpmGuard<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TpmGuard<'_> {
    fn drop(&mut self) {
        if let Some(process) = self.0 {
            let _ = process.kill_blocking(QUIT_DEADLINE);
        }
    }
}

/// A QEMU binary outside `/usr` (a build of its own, a wrapper) is bound
/// into the jail at [`jail::JAIL_BINARY`], and run from there.
pub(crate) fn binary_bind(binary: &Path) -> Option<std::path::PathBuf> {
    if !binary.is_absolute() {
        return None;
    }
    match std::fs::canonicalize(binary) {
        Ok(real) if !real.starts_with("/usr") => Some(real),
        _ => None,
    }
}

/// Binds the sockets and opens the serial log QEMU is handed.
fn hand_over(launch: &Launch<'_>) -> std::io::Result<Handover> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let paths = launch.paths;
    let bind = |path: &Path| -> std::io::Result<std::os::unix::net::UnixListener> {
        let listener = std::os::unix::net::UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(listener)
    };
    let qmp = bind(&paths.qmp_socket())?;
    let mut run_fds = RunFds {
        qmp: qmp.as_raw_fd(),
        ..RunFds::default()
    };
    let mut sockets = vec![qmp];
    let mut passed = launch.passed_fds.to_vec();
    let mut serial_log = None;
    if launch.spec.serial.enabled {
        let serial = bind(&paths.serial_socket())?;
        run_fds.serial = Some(serial.as_raw_fd());
        sockets.push(serial);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(launch.serial_log)?;
        if let Some(banner) = launch.serial_banner {
            write_banner(&log, banner)?;
        }
        let set = launch_files::next_set(launch.disk_sets);
        run_fds.serial_log_set = Some(set);
        passed.push(PassedFd {
            fd: log.as_raw_fd(),
            set,
            opaque: launch_files::SERIAL_LOG_TAG.into(),
        });
        serial_log = Some(log);
    }
    for index in 0..launch.spec.channels.len() {
        let channel = bind(&paths.channel_socket(index))?;
        run_fds.channels.push(channel.as_raw_fd());
        sockets.push(channel);
    }
    if launch.spec.guest_agent {
        let agent = bind(&paths.agent_socket())?;
        run_fds.agent = Some(agent.as_raw_fd());
        sockets.push(agent);
    }
    Ok(Handover {
        _sockets: sockets,
        _serial_log: serial_log,
        run_fds,
        passed,
    })
}

/// Appends `banner` to the serial log as its own line: after a newline
/// when the guest's last line was left unfinished.
fn write_banner(log: &std::fs::File, banner: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let len = log.metadata()?.len();
    let mut last = [b'\n'];
    if len > 0 {
        // The log is open for appending only (QEMU gets this very fd): its
        // end is read through a read-only handle on the same file.
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(log));
        std::fs::File::open(path)?.read_at(&mut last, len - 1)?;
    }
    let mut text = String::with_capacity(banner.len() + 2);
    if last[0] != b'\n' {
        text.push('\n');
    }
    text.push_str(banner.trim_end_matches('\n'));
    text.push('\n');
    (&mut &*log).write_all(text.as_bytes())
}

/// The writable directory of a QEMU running unjailed as a user of its own,
/// owned by that user.
/// It reaches its kernel copy and VNC socket by host path, so the run
/// directories on the way must let others pass (mode `o+x`, never `o+r`).
fn make_qemu_run_dir(paths: &RunPaths, ids: &Ids) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().create(paths.jail_root())?;
    let dir = paths.qemu_run_dir();
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    std::os::unix::fs::chown(&dir, Some(ids.uid), Some(ids.gid))?;
    for passage in paths.jail_root().ancestors().take(4) {
        let mode = std::fs::metadata(passage)?.permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(
                passage,
                std::fs::Permissions::from_mode((mode & 0o7777) | 0o001),
            )?;
        }
    }
    Ok(())
}

/// The kernel and initrd as a QEMU running as another user reads them.
/// It reopens what vmlet opened through `/proc/self/fd/N`, and the kernel
/// checks the file's permissions again on that reopen: a file its user may
/// read (by the permission bits, with no ACL) is handed over as it is; any
/// other gets a copy readable by that user alone, in `boot/` of its jail
/// root. Copying is what a start would otherwise pay for every boot (some
/// 20 MiB written for a distribution kernel and initrd).
fn boot_files_for(
    files: &BootFiles,
    paths: &RunPaths,
    ids: &Ids,
    jailed: bool,
) -> std::io::Result<BootFiles> {
    let dir = paths.jail_root().join("boot");
    let hand = |file: &BootFile, name: &str, inside: &str| -> std::io::Result<BootFile> {
        let BootFile::Fd(fd) = file else {
            return Ok(file.clone());
        };
        // SAFETY: `fd` is open for as long as the launch holds its files;
        // the borrow does not outlive this call.
        let original = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
        if readable_as_is(original, ids)? {
            return Ok(file.clone());
        }
        copy_boot_file(original, &dir, name, ids)?;
        Ok(BootFile::Copy(if jailed {
            inside.to_string()
        } else {
            dir.join(name).to_string_lossy().into_owned()
        }))
    };
    Ok(BootFiles {
        kernel: hand(&files.kernel, "kernel", launch_files::JAIL_KERNEL)?,
        initrd: files
            .initrd
            .as_ref()
            .map(|i| hand(i, "initrd", launch_files::JAIL_INITRD))
            .transpose()?,
    })
}

/// True when a process of `ids` may reopen `file` for reading: its
/// permission bits let it, and no access ACL could say otherwise.
fn readable_as_is(file: std::os::fd::BorrowedFd<'_>, ids: &Ids) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::File::from(file.try_clone_to_owned()?).metadata()?;
    if !ids.may_read(meta.mode(), meta.uid(), meta.gid()) {
        return Ok(false);
    }
    // SAFETY: a valid fd, a NUL-terminated name, and no buffer (size 0
    // asks only whether the attribute exists).
    let acl = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            c"system.posix_acl_access".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    if acl >= 0 {
        return Ok(false);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(true),
        _ => Ok(false),
    }
}

/// Copies `from` to `dir/name`, mode 0400, owned by `ids`; makes `dir`
/// (mode 0711: QEMU passes through it, lists nothing) on the first copy.
fn copy_boot_file(
    from: std::os::fd::BorrowedFd<'_>,
    dir: &Path,
    name: &str,
    ids: &Ids,
) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    match std::fs::DirBuilder::new().mode(0o711).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    // Set apart from the umask (vmlet's is 077): QEMU must pass through.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(name))?;
    let mut from = std::fs::File::from(from.try_clone_to_owned()?);
    std::io::Seek::seek(&mut from, std::io::SeekFrom::Start(0))?;
    std::io::copy(&mut from, &mut to)?;
    std::os::unix::fs::fchown(&to, Some(ids.uid), Some(ids.gid))
}

/// Opens QEMU's log for appending (never through a symlink).
fn open_qemu_log(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// What was appended to `path` after byte `from` (at most 4 KiB, the end).
fn read_from(path: &Path, from: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = (from as usize).min(text.len());
    let tail = &text[start..];
    let tail = &tail[tail.len().saturating_sub(4096)..];
    String::from_utf8_lossy(tail).into_owned()
}

/// The fd numbers the argv names (the NICs' netdevs, `-add-fd`, the
/// sockets, and `/proc/self/fd/N` for the kernel and initrd): QEMU inherits
/// exactly these.
fn inherited_fds(inputs: &LaunchInputs<'_>) -> Vec<std::os::fd::RawFd> {
    let nic_fds = inputs.nics.iter().flat_map(|nic| match &nic.backend {
        NicBackend::Tap { fds, vhost_fds } => fds.iter().chain(vhost_fds).cloned().collect(),
        NicBackend::User => vec![],
    });
    nic_fds
        .filter_map(|fd| fd.parse().ok())
        .chain(inputs.passed_fds.iter().map(|p| p.fd))
        .chain(inputs.run_fds.fds())
        .chain(inputs.boot_files.iter().flat_map(|b| b.fds()))
        .collect()
}
