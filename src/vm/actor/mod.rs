//! One task per VM. The actor owns the VM's QEMU process, its QMP link and
//! its state; everything that changes the VM arrives as an [`Input`] in its
//! inbox: API actions, QMP events, the process's exit, and the results of
//! operations it spawned.
//!
//! Operations (start, stop, …) run as their own tasks so the actor keeps
//! answering while one is under way: a second conflicting action gets
//! [`VmError::Busy`] at once, and a hung QEMU only ever delays its own VM.
//! Readers never ask the actor: they read the latest [`Vm`] from a watch
//! channel, so a listing cannot block.
//!
//! This file owns the actor itself and its lifecycle operations (start,
//! stop, reboot, pause, resume, delete, reattach after a restart); the disk
//! and snapshot operations ([`StorageOp`]) live in `storage`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::console::serial::{SerialHub, SerialLog};
use crate::persist::timestamp;
use crate::qemu::argv::{LaunchInputs, RunPaths};
use crate::qemu::exit::{self, ExitEvents, RunEvent};
use crate::qemu::instance::{self, StopMode, StopOutcome};
use crate::qemu::launch_files::LaunchFiles;
use crate::qemu::process::{self, ExitStatus, ProcessError, QemuProcess};
use crate::qemu::qmp::{QmpClient, QmpError, QmpEvent};
use crate::spec::VmSpec;
use crate::vm::context::Context;
use crate::vm::nic_ops;
use crate::vm::state::{
    self, Action, Decision, Desired, ErrorNote, Found, FoundStatus, Observation, PowerState, Task,
};
use crate::vm::Vm;

mod storage;

pub use storage::StorageOp;

/// How long reattaching waits for a QEMU's QMP socket.
const REATTACH_QMP_DEADLINE: Duration = Duration::from_secs(5);
/// How often vmlet tries to reach a QEMU that stopped answering QMP.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(2);

pub use crate::error_chain;
pub use crate::vm::error::VmError;

/// Options of an action.
#[derive(Debug, Clone, Copy, Default)]
pub struct ActOptions {
    /// For a graceful stop: how long the guest gets to power off.
    pub stop_timeout: Option<Duration>,
}

type Reply = oneshot::Sender<Result<Vm, VmError>>;

/// What reaches the actor.
enum Input {
    Act {
        action: Action,
        options: ActOptions,
        reply: Option<Reply>,
    },
    Storage {
        op: StorageOp,
        reply: Reply,
    },
    OpDone(OpResult),
    Qmp {
        incarnation: u64,
        event: QmpEvent,
    },
    Exited {
        incarnation: u64,
        status: ExitStatus,
    },
    /// The QMP connection ended but QEMU still runs.
    LinkLost {
        incarnation: u64,
    },
    /// QMP answers again after the link was lost.
    Regained {
        incarnation: u64,
        qmp: QmpClient,
        events: tokio::sync::broadcast::Receiver<QmpEvent>,
        status: qapi::qmp::RunState,
    },
}

enum OpResult {
    Started(Result<(instance::QemuInstance, Option<Arc<SerialHub>>), VmError>),
    Stopped(Result<StopOutcome, ProcessError>),
    Qmp {
        task: Task,
        result: Result<(), QmpError>,
    },
    Deleted(Result<(), String>),
    Storage {
        /// The VM's new spec, when the operation changed it.
        result: Result<Option<Box<VmSpec>>, VmError>,
        /// QEMU's run state afterwards (snapshots pause the vCPUs).
        status: Option<qapi::qmp::RunState>,
    },
}

/// The API's way to one VM: its latest view and its inbox.
#[derive(Debug, Clone)]
pub struct VmHandle {
    id: Uuid,
    view: watch::Receiver<Vm>,
    live: watch::Receiver<Option<Live>>,
    inbox: mpsc::UnboundedSender<Input>,
}

/// The VM's QEMU while the actor holds one, for consoles and metrics: they
/// talk to QEMU themselves and never wait for the actor.
#[derive(Debug, Clone)]
pub struct Live {
    /// QEMU's pid.
    pub pid: i32,
    /// The QMP link; `None` while QEMU does not answer (state `error`).
    pub qmp: Option<QmpClient>,
    /// Its run directory (sockets).
    pub paths: RunPaths,
    /// The serial console, when the VM has one and vmlet reached it.
    pub serial: Option<Arc<SerialHub>>,
    /// Whether the VM has a display (and so a VNC socket).
    pub display: bool,
    incarnation: u64,
    gone: watch::Receiver<()>,
}

impl Live {
    /// Resolves when the actor lets go of this QEMU (it stopped, crashed or
    /// the VM was deleted).
    pub async fn gone(&self) {
        let mut gone = self.gone.clone();
        while gone.changed().await.is_ok() {}
    }
}

impl VmHandle {
    /// The VM's id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Whether the VM is called `name`. Never waits for the actor.
    pub fn has_name(&self, name: &str) -> bool {
        self.view.borrow().name == name
    }

    /// The VM as last observed. Never waits for the actor.
    pub fn view(&self) -> Vm {
        self.view.borrow().clone()
    }

    /// The VM's QEMU, when one runs. Never waits for the actor.
    pub fn live(&self) -> Option<Live> {
        self.live.borrow().clone()
    }

    /// Runs `action` and waits until it is done.
    pub async fn act(&self, action: Action, options: ActOptions) -> Result<Vm, VmError> {
        let (reply, answer) = oneshot::channel();
        self.inbox
            .send(Input::Act {
                action,
                options,
                reply: Some(reply),
            })
            .map_err(|_| VmError::Gone)?;
        answer.await.map_err(|_| VmError::Gone)?
    }
}

/// A QEMU the actor holds.
struct Runtime {
    /// Distinguishes this QEMU's inputs from those of an earlier one.
    incarnation: u64,
    process: Arc<QemuProcess>,
    /// `None` when QMP could not be reached (reattach to a hung QEMU).
    qmp: Option<QmpClient>,
    paths: RunPaths,
    forwarders: Vec<JoinHandle<()>>,
    /// The QMP events that explain QEMU's exit (a `SHUTDOWN`, a panic),
    /// read as `vmlet run` reads them.
    exit_events: ExitEvents,
    /// A task is trying to reach QEMU's QMP socket again.
    reconnecting: bool,
    serial: Option<Arc<SerialHub>>,
    /// Its profile has a display adapter (a VNC socket).
    display: bool,
    /// Dropped with the runtime: tells [`Live::gone`] waiters.
    gone: watch::Sender<()>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for f in &self.forwarders {
            f.abort();
        }
        // Console sessions end with the QEMU they were attached to.
        if let Some(serial) = &self.serial {
            serial.close();
        }
    }
}

struct InFlight {
    task: Task,
    waiters: Vec<Reply>,
}

struct Actor {
    ctx: Arc<Context>,
    vm: Vm,
    view: watch::Sender<Vm>,
    live: watch::Sender<Option<Live>>,
    inbox: mpsc::UnboundedSender<Input>,
    runtime: Option<Runtime>,
    op: Option<InFlight>,
    incarnations: u64,
    /// Replies to send after the next flush.
    replies: Vec<(Reply, Result<(), VmError>)>,
    /// The record predates the host's last boot (reattach only).
    host_rebooted: bool,
}

/// Starts the actor of a newly created VM (already saved).
pub fn spawn_new(ctx: Arc<Context>, vm: Vm) -> VmHandle {
    let (handle, actor, rx) = make(ctx, vm);
    tokio::spawn(actor.run(rx, None));
    handle
}

/// Starts the actor of a VM loaded from its record: it first reattaches to
/// the VM's QEMU (or cleans up after it), then signals `ready`.
/// `host_rebooted`: the record was written before the host's last boot.
pub fn spawn_existing(
    ctx: Arc<Context>,
    vm: Vm,
    host_rebooted: bool,
    ready: oneshot::Sender<()>,
) -> VmHandle {
    let (handle, mut actor, rx) = make(ctx, vm);
    actor.host_rebooted = host_rebooted;
    tokio::spawn(actor.run(rx, Some(ready)));
    handle
}

fn make(ctx: Arc<Context>, vm: Vm) -> (VmHandle, Actor, mpsc::UnboundedReceiver<Input>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (view_tx, view_rx) = watch::channel(vm.clone());
    let (live_tx, live_rx) = watch::channel(None);
    let handle = VmHandle {
        id: vm.id,
        view: view_rx,
        live: live_rx,
        inbox: tx.clone(),
    };
    let actor = Actor {
        ctx,
        vm,
        view: view_tx,
        live: live_tx,
        inbox: tx,
        runtime: None,
        op: None,
        incarnations: 0,
        replies: Vec::new(),
        host_rebooted: false,
    };
    (handle, actor, rx)
}

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Input>,
        ready: Option<oneshot::Sender<()>>,
    ) {
        if let Some(ready) = ready {
            self.reattach().await;
            self.flush();
            let _ = ready.send(());
            self.autostart();
            self.flush();
        }
        while let Some(input) = rx.recv().await {
            let deleted = self.handle(input);
            if deleted {
                break;
            }
            self.flush();
        }
        tracing::debug!(vm = %self.vm.id, "actor ended");
    }

    /// Handles one input; true when the VM is gone and the actor must end.
    fn handle(&mut self, input: Input) -> bool {
        match input {
            Input::Act {
                action,
                options,
                reply,
            } => self.on_action(action, options, reply),
            Input::Storage { op, reply } => self.on_storage(op, reply),
            Input::OpDone(result) => return self.on_op_done(result),
            Input::Qmp { incarnation, event } => {
                if self.current(incarnation) {
                    self.on_qmp_event(event);
                }
            }
            Input::Exited {
                incarnation,
                status,
            } => {
                if self.current(incarnation) {
                    self.on_exit(status);
                }
            }
            Input::LinkLost { incarnation } => {
                if self.current(incarnation) && self.op.is_none() {
                    tracing::warn!(vm = %self.vm.name, "QMP connection closed while QEMU runs");
                    if self.observe(Observation::ControlLost) {
                        self.commit(|vm| {
                            vm.error = Some("QMP connection closed while QEMU runs".into())
                        });
                        self.reconnect();
                    }
                }
            }
            Input::Regained {
                incarnation,
                qmp,
                events,
                status,
            } => {
                if self.current(incarnation) {
                    self.on_regained(qmp, events, status);
                }
            }
        }
        false
    }

    fn current(&self, incarnation: u64) -> bool {
        self.runtime
            .as_ref()
            .is_some_and(|rt| rt.incarnation == incarnation)
    }

    /// Applies `change` to the VM. Changes made while handling one input
    /// are saved and published together by [`Actor::flush`], as one
    /// generation.
    fn commit(&mut self, change: impl FnOnce(&mut Vm)) {
        change(&mut self.vm);
    }

    /// Bumps the generation, saves the record and publishes the view when
    /// the VM differs from the view last published; then answers the
    /// replies waiting for that view.
    fn flush(&mut self) {
        self.publish_live();
        let changed = *self.view.borrow() != self.vm;
        if changed {
            self.vm.generation += 1;
            self.vm.updated_at = timestamp(SystemTime::now());
            if let Err(e) = self.ctx.store.save(&self.vm) {
                tracing::error!(vm = %self.vm.id, error = %error_chain(&e), "could not save VM record");
            }
            self.view.send_replace(self.vm.clone());
            self.ctx.publish_vm(&self.vm);
        }
        for (reply, result) in self.replies.drain(..) {
            let _ = reply.send(result.map(|()| self.vm.clone()));
        }
    }

    /// Publishes the QEMU the actor holds when it changed (another QEMU, or
    /// the QMP link lost or regained).
    fn publish_live(&mut self) {
        let unchanged = match (self.live.borrow().as_ref(), self.runtime.as_ref()) {
            (None, None) => true,
            (Some(live), Some(rt)) => {
                live.incarnation == rt.incarnation && live.qmp.is_some() == rt.qmp.is_some()
            }
            _ => false,
        };
        if unchanged {
            return;
        }
        let next = self.runtime.as_ref().map(|rt| Live {
            pid: rt.process.pid(),
            qmp: rt.qmp.clone(),
            paths: rt.paths.clone(),
            serial: rt.serial.clone(),
            display: rt.display,
            incarnation: rt.incarnation,
            gone: rt.gone.subscribe(),
        });
        self.live.send_replace(next);
    }

    /// Answers `reply` once this input's changes are flushed.
    fn reply(&mut self, reply: Option<Reply>, result: Result<(), VmError>) {
        if let Some(reply) = reply {
            self.replies.push((reply, result));
        }
    }

    /// Applies `observation` to the VM's state through the transition
    /// table (the only way the state changes); true when it moved.
    fn observe(&mut self, observation: Observation) -> bool {
        let from = self.vm.state;
        match state::apply(&mut self.vm.state, observation) {
            Some(to) => {
                tracing::info!(vm = %self.vm.name, from = from.as_str(), to = to.as_str(), ?observation, "state change");
                true
            }
            None => {
                tracing::debug!(vm = %self.vm.name, state = from.as_str(), ?observation, "observation ignored");
                false
            }
        }
    }

    fn spawn_op(&self, op: impl std::future::Future<Output = OpResult> + Send + 'static) {
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            let result = op.await;
            let _ = inbox.send(Input::OpDone(result));
        });
    }

    fn finish_op(&mut self, result: Result<(), VmError>) {
        let waiters = self.op.take().map(|op| op.waiters).unwrap_or_default();
        self.commit(|vm| vm.task = None);
        for waiter in waiters {
            self.reply(Some(waiter), result.clone());
        }
    }

    fn on_action(&mut self, action: Action, options: ActOptions, reply: Option<Reply>) {
        let task = self.op.as_ref().map(|op| op.task);
        match state::decide(self.vm.state.get(), task, action) {
            Decision::Satisfied => {
                let desired = match action {
                    Action::Start | Action::Resume => Some(Desired::Running),
                    Action::Stop { .. } => Some(Desired::Stopped),
                    Action::Pause => Some(Desired::Paused),
                    _ => None,
                };
                if let Some(desired) = desired {
                    self.commit(|vm| vm.desired = desired);
                }
                self.reply(reply, Ok(()));
            }
            Decision::Busy(task) => self.reply(reply, Err(VmError::Busy(task))),
            Decision::Refused(message) => self.reply(reply, Err(VmError::Refused(message))),
            Decision::Run(task) => {
                if let Some(op) = &mut self.op {
                    // A forced stop overtaking a graceful one: kill QEMU; the
                    // running stop sees the exit and answers everyone.
                    if let Some(reply) = reply {
                        op.waiters.push(reply);
                    }
                    if let Some(rt) = &self.runtime {
                        tracing::info!(vm = %self.vm.name, "forced stop overtakes the graceful stop");
                        let _ = rt.process.signal(libc::SIGKILL);
                    }
                    return;
                }
                self.op = Some(InFlight {
                    task,
                    waiters: reply.into_iter().collect(),
                });
                match action {
                    Action::Start => self.begin_start(),
                    Action::Stop { force } => self.begin_stop(force, options.stop_timeout),
                    Action::Reboot => self.begin_qmp(Task::Reboot),
                    Action::Pause => self.begin_qmp(Task::Pause),
                    Action::Resume => self.begin_qmp(Task::Resume),
                    Action::Delete { .. } => self.begin_delete(),
                    Action::Snapshot | Action::Disks | Action::Nics => {
                        unreachable!("storage actions arrive as Input::Storage")
                    }
                }
            }
        }
    }

    fn begin_start(&mut self) {
        self.observe(Observation::StartBegun);
        self.commit(|vm| {
            vm.task = Some(Task::Start);
            vm.desired = Desired::Running;
            vm.error = None;
        });
        // A VM in `error` may still hold a QEMU that stopped answering.
        let leftover = self.runtime.take();
        let ctx = self.ctx.clone();
        let spec = self.vm.spec.clone();
        self.spawn_op(async move {
            if let Some(rt) = leftover {
                let _ = rt.process.kill().await;
                instance::remove_run_dir(&rt.paths);
            }
            let result = async {
                let profile = ctx
                    .profiles
                    .get(&spec.profile)
                    .map_err(|e| VmError::Failed(error_chain(&e)))?;
                let paths = RunPaths::new(&ctx.settings.run_dir, spec.uuid);
                // A full disk stays a full disk (507).
                crate::storage::disks::write_seed(&ctx.layout, &spec)?;
                // The taps live while `_host_nics` holds their fds: until
                // QEMU has inherited them (or the start failed, and they go).
                let (nics, _host_nics) = nic_ops::open_all(&ctx.networks, &spec.nics).await?;
                // Every disk, kernel and initrd opened now, by vmlet: QEMU
                // gets fds and never resolves a path from the spec.
                let files = LaunchFiles::open(&spec, &ctx.layout, &ctx.host_roots)?;
                let serial_log = ctx.layout.console_log(spec.uuid);
                let inputs = LaunchInputs {
                    spec: &spec,
                    profile,
                    accel: ctx.accel,
                    paths: &paths,
                    serial_log: &serial_log,
                    disks: &files.disks,
                    disk_sets: &files.sets,
                    passed_fds: &files.passed,
                    boot_files: files.boot.as_ref(),
                    nics: &nics,
                };
                let deadline = Duration::from_secs(ctx.settings.start_timeout_s);
                let qemu =
                    instance::launch_with_deadline(&ctx.settings.qemu_binary, inputs, deadline)
                        .await
                        .map_err(|e| VmError::Failed(error_chain(&e)))?;
                // Attached before the guest runs, so the live stream has
                // every byte of this boot.
                let serial = open_serial(&ctx, &spec, &paths).await;
                if let Err(e) = qemu.start_guest().await {
                    let _ = qemu.process.kill().await;
                    instance::remove_run_dir(&qemu.paths);
                    return Err(crate::vm::disk_ops::qmp_error("starting the guest", e));
                }
                Ok((qemu, serial))
            }
            .await;
            OpResult::Started(result)
        });
    }

    fn begin_stop(&mut self, force: bool, timeout: Option<Duration>) {
        self.observe(Observation::StopBegun);
        self.commit(|vm| {
            vm.task = Some(Task::Stop);
            vm.desired = Desired::Stopped;
        });
        let Some(rt) = &self.runtime else {
            self.spawn_op(async { OpResult::Stopped(Ok(StopOutcome::AlreadyExited)) });
            return;
        };
        let mode = if force {
            StopMode::Force
        } else {
            StopMode::Graceful {
                grace: timeout.unwrap_or(Duration::from_secs(self.ctx.settings.stop_grace_s)),
            }
        };
        let process = rt.process.clone();
        let qmp = rt.qmp.clone();
        self.spawn_op(async move {
            OpResult::Stopped(instance::stop_process(&process, qmp.as_ref(), mode).await)
        });
    }

    fn begin_qmp(&mut self, task: Task) {
        self.commit(|vm| vm.task = Some(task));
        let qmp = self.runtime.as_ref().and_then(|rt| rt.qmp.clone());
        self.spawn_op(async move {
            let Some(qmp) = qmp else {
                return OpResult::Qmp {
                    task,
                    result: Err(QmpError::Protocol("no QMP link to this QEMU".into())),
                };
            };
            let result = match task {
                Task::Reboot => qmp.execute(qapi::qmp::system_reset {}).await.map(drop),
                Task::Pause => qmp.execute(qapi::qmp::stop {}).await.map(drop),
                Task::Resume => qmp.execute(qapi::qmp::cont {}).await.map(drop),
                _ => unreachable!("not a QMP task"),
            };
            OpResult::Qmp { task, result }
        });
    }

    fn begin_delete(&mut self) {
        self.commit(|vm| vm.task = Some(Task::Delete));
        let ctx = self.ctx.clone();
        let id = self.vm.id;
        let rt = self
            .runtime
            .as_ref()
            .map(|rt| (rt.process.clone(), rt.paths.clone()));
        let paths = RunPaths::new(&ctx.settings.run_dir, id);
        self.spawn_op(async move {
            if let Some((process, _)) = &rt {
                if let Err(e) = instance::stop_process(process, None, StopMode::Force).await {
                    return OpResult::Deleted(Err(error_chain(&e)));
                }
            }
            instance::remove_run_dir(&paths);
            OpResult::Deleted(ctx.store.remove(id).map_err(|e| error_chain(&e)))
        });
    }

    /// Handles an operation's result; true when the VM was deleted.
    fn on_op_done(&mut self, result: OpResult) -> bool {
        match result {
            OpResult::Started(Ok((qemu, serial))) => {
                let pid = qemu.process.pid();
                self.attach(
                    qemu.process.clone(),
                    Some(qemu.qmp.clone()),
                    qemu.paths.clone(),
                    Some(qemu.events),
                    serial,
                );
                self.commit(|vm| vm.pid = Some(pid));
                self.observe(Observation::GuestStarted);
                self.finish_op(Ok(()));
            }
            OpResult::Started(Err(e)) => {
                let e = e.during("start failed");
                tracing::warn!(vm = %self.vm.name, error = %e, "start failed");
                self.observe(Observation::StartFailed);
                let error = match &e {
                    VmError::Invalid(spec) => format!("start failed: {spec}"),
                    other => other.to_string(),
                };
                self.commit(|vm| {
                    vm.pid = None;
                    vm.error = Some(error);
                });
                self.finish_op(Err(e));
            }
            OpResult::Stopped(result) => match result {
                Ok(outcome) => {
                    tracing::info!(vm = %self.vm.name, ?outcome, "stopped");
                    self.teardown();
                    self.observe(Observation::StopFinished);
                    self.commit(|vm| {
                        vm.pid = None;
                        vm.error = None;
                    });
                    self.finish_op(Ok(()));
                }
                Err(e) => {
                    let error = format!("stop failed: {}", error_chain(&e));
                    self.observe(Observation::StopFailed);
                    self.commit(|vm| vm.error = Some(error.clone()));
                    self.finish_op(Err(VmError::Failed(error)));
                }
            },
            OpResult::Qmp { task, result } => match result {
                Ok(()) => {
                    match task {
                        Task::Pause => {
                            self.observe(Observation::VcpusStopped);
                            self.commit(|vm| vm.desired = Desired::Paused);
                        }
                        Task::Resume => {
                            self.observe(Observation::VcpusResumed);
                            self.commit(|vm| vm.desired = Desired::Running);
                        }
                        _ => {}
                    }
                    self.finish_op(Ok(()));
                }
                Err(e) => {
                    let message = format!("{}: {}", task.as_str(), error_chain(&e));
                    let error = match e {
                        QmpError::Timeout { .. } => VmError::Timeout(message.clone()),
                        _ => VmError::Failed(message.clone()),
                    };
                    // A timeout closes the link; QEMU may still run, but
                    // vmlet can no longer command it.
                    let lost = matches!(e, QmpError::Timeout { .. } | QmpError::Closed { .. })
                        && self
                            .runtime
                            .as_ref()
                            .is_some_and(|rt| rt.process.is_running());
                    if lost {
                        self.observe(Observation::ControlLost);
                        self.commit(|vm| vm.error = Some(message));
                        self.reconnect();
                    }
                    self.finish_op(Err(error));
                }
            },
            OpResult::Deleted(Ok(())) => {
                self.teardown();
                self.ctx.publish_deleted(&self.vm);
                tracing::info!(vm = %self.vm.name, id = %self.vm.id, "deleted");
                let waiters = self.op.take().map(|op| op.waiters).unwrap_or_default();
                self.vm.task = None;
                for w in waiters {
                    let _ = w.send(Ok(self.vm.clone()));
                }
                return true;
            }
            OpResult::Storage { result, status } => self.on_storage_done(result, status),
            OpResult::Deleted(Err(message)) => {
                self.teardown();
                let error = format!("delete failed: {message}");
                self.observe(Observation::DeleteFailed);
                self.commit(|vm| {
                    vm.pid = None;
                    vm.error = Some(error.clone());
                });
                self.finish_op(Err(VmError::Failed(error)));
            }
        }
        false
    }

    /// Takes hold of a QEMU: forwards its QMP events and its exit into the
    /// inbox.
    fn attach(
        &mut self,
        process: Arc<QemuProcess>,
        qmp: Option<QmpClient>,
        paths: RunPaths,
        events: Option<tokio::sync::broadcast::Receiver<QmpEvent>>,
        serial: Option<Arc<SerialHub>>,
    ) {
        self.incarnations += 1;
        let incarnation = self.incarnations;
        // One task forwards both the events and the exit, so the exit always
        // comes after every event QEMU sent before it (a `SHUTDOWN` must be
        // seen before the exit it explains).
        let inbox = self.inbox.clone();
        let watched = process.clone();
        let forwarders = vec![tokio::spawn(async move {
            let mut events = events;
            let status = exit::watch(
                &watched,
                events.as_mut(),
                |event| {
                    let _ = inbox.send(Input::Qmp { incarnation, event });
                },
                || {
                    let _ = inbox.send(Input::LinkLost { incarnation });
                },
            )
            .await;
            let _ = inbox.send(Input::Exited {
                incarnation,
                status,
            });
        })];
        self.runtime = Some(Runtime {
            incarnation,
            process,
            qmp,
            paths,
            forwarders,
            exit_events: ExitEvents::default(),
            reconnecting: false,
            serial,
            display: self
                .ctx
                .profiles
                .get(&self.vm.spec.profile)
                .is_ok_and(|p| p.devices.display.is_some()),
            gone: watch::channel(()).0,
        });
    }

    /// Keeps trying to reach a QEMU whose QMP link was lost (a QEMU that was
    /// stopped or starved may answer again) until it answers or exits.
    fn reconnect(&mut self) {
        let Some(rt) = &mut self.runtime else { return };
        if std::mem::replace(&mut rt.reconnecting, true) {
            return;
        }
        let incarnation = rt.incarnation;
        let process = rt.process.clone();
        let socket = rt.paths.qmp_socket();
        let inbox = self.inbox.clone();
        let name = self.vm.name.clone();
        rt.forwarders.push(tokio::spawn(async move {
            while process.is_running() {
                tokio::time::sleep(RECONNECT_INTERVAL).await;
                let Ok((qmp, events)) = QmpClient::connect(&socket, REATTACH_QMP_DEADLINE).await
                else {
                    continue;
                };
                let status = qmp
                    .execute_with_deadline(qapi::qmp::query_status {}, REATTACH_QMP_DEADLINE)
                    .await;
                if let Ok(status) = status {
                    tracing::info!(vm = %name, "QMP answers again");
                    let _ = inbox.send(Input::Regained {
                        incarnation,
                        qmp,
                        events,
                        status: status.status,
                    });
                    return;
                }
            }
        }));
    }

    fn on_regained(
        &mut self,
        qmp: QmpClient,
        events: tokio::sync::broadcast::Receiver<QmpEvent>,
        status: qapi::qmp::RunState,
    ) {
        if self.vm.state != PowerState::Error || self.op.is_some() {
            return;
        }
        let Some(incarnation) = self.runtime.as_ref().map(|rt| rt.incarnation) else {
            return;
        };
        let inbox = self.inbox.clone();
        let mut events = events;
        let forwarder = tokio::spawn(async move {
            exit::read_events(&mut events, |event| {
                let _ = inbox.send(Input::Qmp { incarnation, event });
            })
            .await
        });
        if let Some(rt) = &mut self.runtime {
            rt.qmp = Some(qmp);
            rt.forwarders.push(forwarder);
            rt.reconnecting = false;
        }
        let observation = if status == qapi::qmp::RunState::running {
            Observation::RegainedRunning
        } else {
            Observation::RegainedPaused
        };
        self.observe(observation);
        self.commit(|vm| vm.error = None);
    }

    /// Lets go of the QEMU (which has exited or is being abandoned) and
    /// removes its run directory.
    fn teardown(&mut self) {
        if let Some(rt) = self.runtime.take() {
            instance::remove_run_dir(&rt.paths);
        }
    }

    fn on_qmp_event(&mut self, event: QmpEvent) {
        tracing::debug!(vm = %self.vm.name, event = %event.name, data = %event.data, "QMP event");
        let task = self.op.as_ref().map(|op| op.task);
        let Some(rt) = &mut self.runtime else { return };
        match rt.exit_events.note(&event) {
            RunEvent::Panicked => {
                // Like libvirt's default on_crash=destroy: a panicked guest
                // holds nothing worth keeping running.
                let _ = rt.process.signal(libc::SIGKILL);
            }
            // A pause vmlet did not ask for (guest I/O error, a panic
            // action): follow it. Pauses of our own are settled by their op.
            // Snapshot jobs pause the vCPUs while they run; their op reads
            // the state afterwards.
            RunEvent::VcpusStopped if task != Some(Task::Pause) && task != Some(Task::Snapshot) => {
                self.observe(Observation::VcpusStopped);
            }
            RunEvent::VcpusResumed
                if task != Some(Task::Resume) && task != Some(Task::Snapshot) =>
            {
                self.observe(Observation::VcpusResumed);
            }
            RunEvent::Reset => tracing::info!(vm = %self.vm.name, "guest reset"),
            _ => {}
        }
    }

    fn on_exit(&mut self, status: ExitStatus) {
        let task = self.op.as_ref().map(|op| op.task);
        if matches!(task, Some(Task::Stop | Task::Delete)) {
            // The stop or delete in progress settles the state.
            return;
        }
        let Some(rt) = &self.runtime else { return };
        let ending = rt.exit_events.ending(status);
        let observation = state::exit_observation(&ending);
        let clean = observation == Observation::ExitedCleanly;
        let reason = ending.error().unwrap_or_default();
        let shutdown_reason = rt.exit_events.shutdown_reason().map(str::to_string);
        self.teardown();
        if clean {
            tracing::info!(vm = %self.vm.name, reason = ?shutdown_reason, "guest powered off");
            self.observe(Observation::ExitedCleanly);
            self.commit(|vm| {
                vm.pid = None;
                vm.desired = Desired::Stopped;
                vm.error = None;
            });
        } else {
            tracing::warn!(vm = %self.vm.name, %reason, "VM crashed");
            let crashed = self.observe(observation);
            self.commit(|vm| {
                vm.pid = None;
                if crashed || vm.state == PowerState::Error {
                    vm.error = Some(reason);
                }
            });
        }
    }

    /// After a daemon restart: find the VM's QEMU again (or learn it is gone)
    /// and set the state from what QEMU says.
    async fn reattach(&mut self) {
        let paths = RunPaths::new(&self.ctx.settings.run_dir, self.vm.id);
        // No process survives a host reboot: a recorded pid would be
        // someone else's.
        let pid = if self.host_rebooted {
            None
        } else {
            self.vm
                .pid
                .or_else(|| process::read_pidfile(&paths.pidfile()).ok())
        };
        // A half-finished operation's task means nothing any more.
        self.vm.task = None;
        let process = match pid.map(|pid| QemuProcess::adopt(pid, self.vm.id)) {
            Some(Ok(process)) => Arc::new(process),
            other => {
                if let Some(Err(e)) = other {
                    tracing::info!(vm = %self.vm.name, error = %e, "recorded QEMU is gone");
                }
                instance::remove_run_dir(&paths);
                self.settle_gone();
                return;
            }
        };
        let pid = process.pid();
        let serial = open_serial(&self.ctx, &self.vm.spec, &paths).await;
        match QmpClient::connect(&paths.qmp_socket(), REATTACH_QMP_DEADLINE).await {
            Ok((qmp, events)) => {
                let status = qmp
                    .execute_with_deadline(qapi::qmp::query_status {}, REATTACH_QMP_DEADLINE)
                    .await;
                match status {
                    Ok(status) => self.reattach_with_status(
                        process,
                        (qmp, events),
                        paths,
                        serial,
                        status.status,
                    ),
                    Err(e) => {
                        self.attach(process, None, paths, None, serial);
                        self.lost_on_reattach(pid, error_chain(&e));
                    }
                }
            }
            Err(e) => {
                self.attach(process, None, paths, None, serial);
                self.lost_on_reattach(pid, error_chain(&e));
            }
        }
    }

    fn reattach_with_status(
        &mut self,
        process: Arc<QemuProcess>,
        (qmp, events): (QmpClient, tokio::sync::broadcast::Receiver<QmpEvent>),
        paths: RunPaths,
        serial: Option<Arc<SerialHub>>,
        status: qapi::qmp::RunState,
    ) {
        use qapi::qmp::RunState as R;
        let found = match status {
            R::prelaunch | R::inmigrate => FoundStatus::Unstarted,
            R::running => FoundStatus::Running,
            R::shutdown => FoundStatus::ShutDown,
            R::guest_panicked | R::internal_error | R::io_error => FoundStatus::Dead,
            _ => FoundStatus::Paused,
        };
        tracing::info!(vm = %self.vm.name, pid = process.pid(), ?status, "QEMU found");
        let held = FoundQemu {
            process,
            qmp,
            events,
            paths,
            serial,
        };
        self.settle_reattach(Found::Status(found), Some(held));
    }

    fn lost_on_reattach(&mut self, pid: i32, why: String) {
        tracing::warn!(vm = %self.vm.name, pid, error = %why, "QEMU runs but QMP does not answer");
        self.settle_reattach(Found::Unanswering, None);
        self.commit(|vm| {
            vm.pid = Some(pid);
            vm.error = Some(format!("QEMU (pid {pid}) does not answer on QMP: {why}"));
        });
        self.reconnect();
    }

    /// The VM's QEMU is gone: record how that looks from here.
    fn settle_gone(&mut self) {
        let found = Found::Gone {
            host_rebooted: self.host_rebooted,
        };
        self.settle_reattach(found, None);
    }

    /// Carries out what [`state::reattach`] decides for what was found;
    /// `held` is the QEMU found alive, with its QMP link.
    fn settle_reattach(&mut self, found: Found, held: Option<FoundQemu>) {
        let plan = state::reattach(self.vm.state.get(), found);
        let mut pid = None;
        if let Some(FoundQemu {
            process,
            qmp,
            events,
            paths,
            serial,
        }) = held
        {
            if plan.kill {
                tracing::warn!(vm = %self.vm.name, pid = process.pid(), ?found, "the QEMU found can never run again: killing it");
                let _ = process.signal(libc::SIGKILL);
                instance::remove_run_dir(&paths);
            } else if plan.attach {
                pid = Some(process.pid());
                self.attach(process, Some(qmp), paths, Some(events), serial);
            }
        }
        self.observe(plan.observation);
        self.commit(|vm| {
            if pid.is_some() || !plan.attach {
                vm.pid = pid;
            }
            match plan.error {
                ErrorNote::Keep => {}
                ErrorNote::Clear => vm.error = None,
                ErrorNote::Set(message) => vm.error = Some(message),
            }
            if plan.desired_stopped {
                vm.desired = Desired::Stopped;
            }
        });
    }

    /// Starts a VM marked `autostart` whose desired state is running but
    /// which does not run (its QEMU vanished, as after a host reboot).
    fn autostart(&mut self) {
        let down = matches!(
            self.vm.state.get(),
            PowerState::Stopped | PowerState::Crashed | PowerState::Error
        );
        if self.vm.spec.autostart
            && self.vm.desired == Desired::Running
            && down
            && self.runtime.is_none()
        {
            tracing::info!(vm = %self.vm.name, "autostart: starting");
            self.on_action(Action::Start, ActOptions::default(), None);
        }
    }
}

/// Where VM `spec`'s serial log lives and how big it may grow.
pub fn serial_log(ctx: &Context, spec: &VmSpec) -> SerialLog {
    SerialLog {
        path: ctx.layout.console_log(spec.uuid),
        max_bytes: ctx.settings.console.log_max_bytes,
        backups: ctx.settings.console.log_backups,
    }
}

/// Attaches vmlet to the serial console of the QEMU in `paths`. A console
/// vmlet cannot reach is logged and left out: the VM runs without it.
async fn open_serial(ctx: &Context, spec: &VmSpec, paths: &RunPaths) -> Option<Arc<SerialHub>> {
    if !spec.serial.enabled {
        return None;
    }
    match SerialHub::open(&paths.serial_socket(), serial_log(ctx, spec)).await {
        Ok(hub) => Some(hub),
        Err(e) => {
            tracing::warn!(vm = %spec.name, error = %e, "cannot attach to the serial console");
            None
        }
    }
}

/// A QEMU found alive at vmlet's start, with its QMP link.
struct FoundQemu {
    process: Arc<QemuProcess>,
    qmp: QmpClient,
    events: tokio::sync::broadcast::Receiver<QmpEvent>,
    paths: RunPaths,
    serial: Option<Arc<SerialHub>>,
}
