//! One task per VM. The actor owns the VM's QEMU process, its QMP link and
//! its state; everything that changes the VM arrives as an `Input` in its
//! inbox: API actions, QMP events, the process's exit, and the results of
//! operations it spawned.
//!
//! Operations (start, stop, …) run as their own tasks so the actor keeps
//! answering while one is under way: a second conflicting action gets
//! [`VmError::Busy`] at once, and a hung QEMU only ever delays its own VM.
//! Readers never ask the actor: they read the latest [`Vm`] from a watch
//! channel, so a listing cannot block.
//!
//! This file holds the actor's types, its handle and its loop (inputs,
//! commits, the one way its state changes). The rest, by topic:
//! `lifecycle` (start, stop, reboot, pause, resume, delete), `watcher` (QMP
//! events, the exit, a lost link), `reattach` (after a vmlet restart),
//! `storage` (disk, NIC and snapshot changes: [`Change`] and
//! [`Command::Snapshot`]), `edit` (a new spec, live or pending) and
//! `migrate` (the source side of a live migration).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::console::serial::{SerialHub, SerialLog};
use crate::persist::timestamp;
use crate::qemu::accel::Accel;
use crate::qemu::agent::{GuestAgent, GuestInfo};
use crate::qemu::argv::RunPaths;
use crate::qemu::exit::{self, ExitEvents, RunEvent};
use crate::qemu::instance::{self, Launch, QemuInstance, StopMode, StopOutcome};
use crate::qemu::process::{ExitStatus, ProcessError, QemuProcess};
use crate::qemu::qmp::{QmpClient, QmpError, QmpEvent};
use crate::spec::VmSpec;
use crate::vm::context::Context;
use crate::vm::launch::LaunchFiles;
use crate::vm::nic_ops;
use crate::vm::state::{
    self, Action, Decision, Desired, ErrorNote, Found, FoundStatus, Observation, PowerAction,
    PowerState, Task,
};
use crate::vm::Vm;

mod edit;
mod lifecycle;
pub use lifecycle::{check_hugepages_free, launch_qemu};
mod migrate;
mod reattach;
mod storage;
mod watcher;

pub use edit::Edit;
pub use migrate::{MigrationEnd, MigrationStep};
pub use storage::Change;
use storage::Work;

/// How long reattaching waits for a QEMU's QMP socket.
const REATTACH_QMP_DEADLINE: Duration = Duration::from_secs(5);
/// How often vmlet tries to reach a QEMU that stopped answering QMP.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(2);
/// Deadline of one read of the guest agent's view of the guest.
const AGENT_INFO_DEADLINE: Duration = Duration::from_secs(3);
/// How often the guest agent is asked until it first answers (the guest
/// is still booting), and afterwards.
const AGENT_FIRST_INTERVAL: Duration = Duration::from_secs(2);
const AGENT_REFRESH_INTERVAL: Duration = Duration::from_secs(15);

pub use crate::error_chain;
use crate::vm::disk_ops::SnapshotKind;
pub use crate::vm::error::VmError;

/// Options of an action.
#[derive(Debug, Clone, Copy, Default)]
pub struct ActOptions {
    /// For a graceful stop or reboot: how long the guest gets to shut down.
    pub stop_timeout: Option<Duration>,
    /// For a reboot: reset the machine at once (`system_reset`) instead of
    /// asking the guest.
    pub force: bool,
}

type Reply = oneshot::Sender<Result<Vm, VmError>>;

/// Everything the API asks of a VM's actor: one type, decided by the
/// state table in one place.
#[derive(Debug, Clone)]
pub enum Command {
    /// A power action, with its options.
    Power {
        /// The action.
        action: PowerAction,
        /// Its options.
        options: ActOptions,
    },
    /// A change of the VM's disks or NICs (boxed: a disk spec is large).
    Change(Box<Change>),
    /// Change the spec (boxed: two specs are large).
    Edit(Box<Edit>),
    /// Take, revert to or delete a snapshot.
    Snapshot {
        /// Which.
        kind: SnapshotKind,
        /// The snapshot's name.
        name: String,
    },
    /// A step of a live migration of this VM to another host.
    Migration(MigrationStep),
}

impl Command {
    /// What the state table decides on.
    pub fn action(&self) -> Action {
        match self {
            Command::Power { action, .. } => (*action).into(),
            Command::Change(change)
                if matches!(**change, Change::AttachNic(_) | Change::DetachNic(_)) =>
            {
                Action::Nics
            }
            Command::Change(_) => Action::Disks,
            Command::Snapshot { .. } => Action::Snapshot,
            Command::Edit(_) => Action::Edit,
            Command::Migration(_) => Action::Migrate,
        }
    }
}

/// What reaches the actor.
enum Input {
    Command {
        command: Command,
        reply: Option<Reply>,
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
    /// A reboot, and QEMU's run state afterwards when it could be read.
    Rebooted {
        result: Result<(), instance::RebootError>,
        status: Option<qapi::qmp::RunState>,
    },
    Qmp {
        task: Task,
        result: Result<(), QmpError>,
    },
    /// The VM's QEMU, run directory and record are gone (or the error
    /// that stopped it, its kind kept: a full disk stays 507).
    Deleted(Result<(), VmError>),
    /// The VM's QEMU is gone after the VM moved to `target`.
    MovedAway {
        target: String,
        result: Result<(), VmError>,
    },
    Storage {
        /// The VM's new spec, when the operation changed it.
        result: Result<Option<Box<VmSpec>>, VmError>,
        /// QEMU's run state afterwards (snapshots pause the vCPUs).
        status: Option<qapi::qmp::RunState>,
    },
    Edit(Box<edit::EditDone>),
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
    /// The guest agent, when the VM has its port.
    pub agent: Option<Arc<GuestAgent>>,
    /// What the agent last told of the guest.
    guest: Arc<std::sync::Mutex<Option<GuestInfo>>>,
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

    /// What the guest agent last told of the guest; `None` before it
    /// first answered. Never waits for the agent.
    pub fn guest_info(&self) -> Option<GuestInfo> {
        self.guest.lock().map(|g| g.clone()).unwrap_or(None)
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

    /// Runs `command` and waits until it is done.
    pub async fn command(&self, command: Command) -> Result<Vm, VmError> {
        let (reply, answer) = oneshot::channel();
        self.inbox
            .send(Input::Command {
                command,
                reply: Some(reply),
            })
            .map_err(|_| VmError::Gone)?;
        answer.await.map_err(|_| VmError::Gone)?
    }

    /// Runs power action `action` and waits until it is done.
    pub async fn act(&self, action: PowerAction, options: ActOptions) -> Result<Vm, VmError> {
        self.command(Command::Power { action, options }).await
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
    /// The guest agent, when the VM has its port.
    agent: Option<Arc<GuestAgent>>,
    /// What the agent last told of the guest (refreshed by a forwarder).
    guest: Arc<std::sync::Mutex<Option<GuestInfo>>>,
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

/// Starts the actor of VM `vm` that arrived by live migration (already
/// saved, `paused`): it holds `qemu`, whose guest waits for `cont`.
pub fn spawn_migrated_in(
    ctx: Arc<Context>,
    vm: Vm,
    qemu: QemuInstance,
    serial: Option<Arc<SerialHub>>,
) -> VmHandle {
    let (handle, mut actor, rx) = make(ctx, vm);
    actor.attach(
        qemu.process.clone(),
        Some(qemu.qmp.clone()),
        qemu.paths.clone(),
        Some(qemu.events),
        serial,
    );
    actor.publish_live();
    tokio::spawn(actor.run(rx, None));
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
            Input::Command { command, reply } => self.on_command(command, reply),
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
            agent: rt.agent.clone(),
            guest: rt.guest.clone(),
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

    /// Decides whether `command` may run now (the state table) and starts
    /// it, or answers `reply` at once: satisfied, busy or refused.
    fn on_command(&mut self, command: Command, reply: Option<Reply>) {
        let task = self.op.as_ref().map(|op| op.task);
        // The end of a migration is not a new action: it settles the one
        // under way.
        if let Command::Migration(MigrationStep::End(end)) = command {
            self.end_migration(end, reply);
            return;
        }
        match state::decide(self.vm.state.get(), task, command.action()) {
            Decision::Satisfied => {
                let desired = match &command {
                    Command::Power {
                        action: PowerAction::Start | PowerAction::Resume,
                        ..
                    } => Some(Desired::Running),
                    Command::Power {
                        action: PowerAction::Stop { .. },
                        ..
                    } => Some(Desired::Stopped),
                    Command::Power {
                        action: PowerAction::Pause,
                        ..
                    } => Some(Desired::Paused),
                    _ => None,
                };
                if let Some(desired) = desired {
                    self.commit(|vm| vm.desired = desired);
                }
                self.reply(reply, Ok(()));
            }
            Decision::Busy(task) => self.reply(reply, Err(VmError::Busy(task))),
            Decision::Refused(refusal) => self.reply(reply, Err(VmError::NotNow(refusal))),
            Decision::Run(task) => match command {
                Command::Power { action, options } => self.run_power(task, action, options, reply),
                Command::Change(change) => self.run_storage(task, Work::Change(*change), reply),
                Command::Snapshot { kind, name } => {
                    self.run_storage(task, Work::Snapshot { kind, name }, reply)
                }
                Command::Edit(edit) => self.run_edit(task, *edit, reply),
                Command::Migration(_) => self.begin_migration(task, reply),
            },
        }
    }

    /// Starts power action `action` as the VM's operation `task`.
    fn run_power(
        &mut self,
        task: Task,
        action: PowerAction,
        options: ActOptions,
        reply: Option<Reply>,
    ) {
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
            PowerAction::Start => self.begin_start(),
            PowerAction::Stop { force } => self.begin_stop(force, options.stop_timeout),
            PowerAction::Reboot if options.force => self.begin_qmp(Task::Reboot),
            PowerAction::Reboot => self.begin_reboot(options.stop_timeout),
            PowerAction::Pause => self.begin_qmp(Task::Pause),
            PowerAction::Resume => self.begin_qmp(Task::Resume),
            PowerAction::Delete { .. } => self.begin_delete(),
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
pub async fn open_serial(ctx: &Context, spec: &VmSpec, paths: &RunPaths) -> Option<Arc<SerialHub>> {
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
