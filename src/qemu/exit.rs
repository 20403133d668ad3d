//! How a QEMU run ends: what its QMP events mean, how to read them until
//! the process is gone, and how its exit reads.
//!
//! The VM actor and `vmlet run` both watch a QEMU until it exits; reading
//! the events here keeps the two from telling the same exit apart
//! differently (a panic, a power-off, a crash).

use std::time::Duration;

use tokio::sync::broadcast;

use crate::qemu::process::{ExitStatus, QemuProcess};
use crate::qemu::qmp::QmpEvent;

/// How long, after QEMU exited, its last events may take to arrive (they
/// are read from the QMP socket, which closes with QEMU), and how long the
/// event stream may be closed before QEMU's exit is seen before the link
/// counts as lost.
pub const LAST_EVENTS_DEADLINE: Duration = Duration::from_secs(2);

/// The `SHUTDOWN` reason QEMU gives when the guest panicked (its default
/// `-action panic=shutdown`).
const PANIC_SHUTDOWN_REASON: &str = "guest-panic";

/// What one QMP event means for a running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvent {
    /// `SHUTDOWN`: QEMU is about to exit.
    Shutdown {
        /// QEMU's reason (`guest-shutdown`, `host-qmp-quit`, `host-signal`,
        /// `guest-panic`, …; `unknown` when QEMU sent none).
        reason: String,
        /// The guest asked for it (QEMU's `guest` member).
        by_guest: bool,
    },
    /// `GUEST_PANICKED`: the guest kernel reported a panic.
    Panicked,
    /// `STOP`: the vCPUs stopped.
    VcpusStopped,
    /// `RESUME`: the vCPUs run again.
    VcpusResumed,
    /// `RESET`: the machine was reset (a guest reboot, for one).
    Reset,
    /// Any other event: says nothing about the VM's life.
    Other,
}

impl RunEvent {
    /// Reads `event`. Data of the wrong shape (QEMU is trusted to follow
    /// its schema, but this never panics on it) reads as absent.
    pub fn of(event: &QmpEvent) -> RunEvent {
        match event.name.as_str() {
            "SHUTDOWN" => RunEvent::Shutdown {
                reason: event
                    .data
                    .get("reason")
                    .and_then(|r| r.as_str())
                    .unwrap_or("unknown")
                    .to_string(),
                by_guest: event.data.get("guest").and_then(|g| g.as_bool()) == Some(true),
            },
            "GUEST_PANICKED" => RunEvent::Panicked,
            "STOP" => RunEvent::VcpusStopped,
            "RESUME" => RunEvent::VcpusResumed,
            "RESET" => RunEvent::Reset,
            _ => RunEvent::Other,
        }
    }
}

/// The QMP events of one QEMU that explain its exit, noted as they come.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitEvents {
    /// The last `SHUTDOWN`: its reason and whether the guest asked for it.
    shutdown: Option<(String, bool)>,
    panicked: bool,
}

impl ExitEvents {
    /// Notes `event` and says what it means, for callers that act on more
    /// than the exit (following pauses, killing a panicked guest).
    pub fn note(&mut self, event: &QmpEvent) -> RunEvent {
        let meaning = RunEvent::of(event);
        match &meaning {
            RunEvent::Shutdown { reason, by_guest } => {
                self.panicked |= reason == PANIC_SHUTDOWN_REASON;
                self.shutdown = Some((reason.clone(), *by_guest));
            }
            RunEvent::Panicked => self.panicked = true,
            _ => {}
        }
        meaning
    }

    /// Forgets a `SHUTDOWN` that did not end QEMU: the guest shut down for
    /// a reboot (QEMU paused instead of exiting, and the machine was reset),
    /// so a later exit must be read on its own.
    pub fn forget_shutdown(&mut self) {
        self.shutdown = None;
    }

    /// The reason of the `SHUTDOWN` seen, if any: QEMU announced its exit.
    pub fn shutdown_reason(&self) -> Option<&str> {
        self.shutdown.as_ref().map(|(reason, _)| reason.as_str())
    }

    /// The guest panicked (`GUEST_PANICKED`, or `SHUTDOWN` because of one).
    pub fn panicked(&self) -> bool {
        self.panicked
    }

    /// How the run ended, now that QEMU exited with `status`.
    pub fn ending(&self, status: ExitStatus) -> Ending {
        match &self.shutdown {
            _ if self.panicked => Ending::Panicked,
            Some((reason, by_guest)) => Ending::ShutDown {
                reason: reason.clone(),
                by_guest: *by_guest,
            },
            None => Ending::Unannounced(status),
        }
    }
}

/// How a QEMU run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The guest panicked.
    Panicked,
    /// QEMU announced its exit (`SHUTDOWN`) and the guest did not panic:
    /// the guest powered off, or someone asked QEMU to quit.
    ShutDown {
        /// QEMU's reason.
        reason: String,
        /// The guest asked for it.
        by_guest: bool,
    },
    /// QEMU exited without announcing it: it crashed or was killed.
    Unannounced(ExitStatus),
}

impl Ending {
    /// A shutdown rather than a crash: nothing went wrong.
    pub fn is_clean(&self) -> bool {
        matches!(self, Ending::ShutDown { .. })
    }

    /// What went wrong, for a log line or a VM's error; `None` for a clean
    /// ending.
    pub fn error(&self) -> Option<String> {
        match self {
            Ending::Panicked => Some("guest panicked".into()),
            Ending::ShutDown { .. } => None,
            Ending::Unannounced(status) => {
                Some(format!("QEMU exited unexpectedly ({})", describe(*status)))
            }
        }
    }
}

/// An exit status in words: `exit code 1`, `killed by SIGKILL`.
pub fn describe(status: ExitStatus) -> String {
    match status {
        ExitStatus::Code(code) => format!("exit code {code}"),
        ExitStatus::Signal(sig) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        ExitStatus::Unknown => "exit status unknown".into(),
    }
}

/// Hands every event of `events` to `on_event` until the channel closes
/// (the QMP connection ended). Events lost because the reader fell behind
/// are logged.
pub async fn read_events(
    events: &mut broadcast::Receiver<QmpEvent>,
    mut on_event: impl FnMut(QmpEvent),
) {
    use broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(event) => on_event(event),
            Err(RecvError::Lagged(n)) => tracing::warn!(missed = n, "QMP events lagged"),
            Err(RecvError::Closed) => return,
        }
    }
}

/// Watches `process` until it exits and returns its exit status, handing
/// `events` to `on_event` meanwhile. Every event QEMU sent before it
/// exited is handed over before this returns (the ones still in flight get
/// [`LAST_EVENTS_DEADLINE`]), so a `SHUTDOWN` is always seen before the exit
/// it explains. When the event stream ends but QEMU keeps running past
/// that deadline, `on_link_lost` is called once and the watch goes on.
pub async fn watch(
    process: &QemuProcess,
    events: Option<&mut broadcast::Receiver<QmpEvent>>,
    mut on_event: impl FnMut(QmpEvent),
    on_link_lost: impl FnOnce(),
) -> ExitStatus {
    let Some(events) = events else {
        return process.exited().await;
    };
    let exited = tokio::select! {
        status = process.exited() => Some(status),
        () = read_events(events, &mut on_event) => None,
    };
    if let Some(status) = exited {
        let _ = tokio::time::timeout(LAST_EVENTS_DEADLINE, read_events(events, on_event)).await;
        return status;
    }
    // The link ends with QEMU, normally: give the exit a moment before
    // calling the link lost.
    if let Some(status) = process.wait_exit(LAST_EVENTS_DEADLINE).await {
        return status;
    }
    on_link_lost();
    process.exited().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(name: &str, data: serde_json::Value) -> QmpEvent {
        QmpEvent {
            name: name.into(),
            data,
            timestamp: Default::default(),
        }
    }

    #[test]
    fn events_read_as_their_meaning() {
        let shutdown = event(
            "SHUTDOWN",
            json!({"guest": true, "reason": "guest-shutdown"}),
        );
        assert_eq!(
            RunEvent::of(&shutdown),
            RunEvent::Shutdown {
                reason: "guest-shutdown".into(),
                by_guest: true
            }
        );
        let cases = [
            ("GUEST_PANICKED", RunEvent::Panicked),
            ("STOP", RunEvent::VcpusStopped),
            ("RESUME", RunEvent::VcpusResumed),
            ("RESET", RunEvent::Reset),
            ("BLOCK_JOB_COMPLETED", RunEvent::Other),
        ];
        for (name, meaning) in cases {
            assert_eq!(RunEvent::of(&event(name, json!({}))), meaning, "{name}");
        }
    }

    #[test]
    fn a_shutdown_of_the_wrong_shape_reads_as_unknown_and_not_by_the_guest() {
        for data in [
            json!({}),
            json!({"reason": 7, "guest": "yes"}),
            json!(null),
            json!([1, 2]),
        ] {
            assert_eq!(
                RunEvent::of(&event("SHUTDOWN", data.clone())),
                RunEvent::Shutdown {
                    reason: "unknown".into(),
                    by_guest: false
                },
                "{data}"
            );
        }
    }

    #[test]
    fn a_guest_power_off_ends_cleanly_whatever_the_exit_code() {
        let mut seen = ExitEvents::default();
        seen.note(&event(
            "SHUTDOWN",
            json!({"guest": true, "reason": "guest-shutdown"}),
        ));
        assert_eq!(seen.shutdown_reason(), Some("guest-shutdown"));
        assert!(!seen.panicked());
        for status in [
            ExitStatus::Code(0),
            ExitStatus::Code(1),
            ExitStatus::Unknown,
        ] {
            let ending = seen.ending(status);
            assert_eq!(
                ending,
                Ending::ShutDown {
                    reason: "guest-shutdown".into(),
                    by_guest: true
                }
            );
            assert!(ending.is_clean());
            assert_eq!(ending.error(), None);
        }
    }

    #[test]
    fn a_host_quit_is_clean_but_not_by_the_guest() {
        let mut seen = ExitEvents::default();
        seen.note(&event(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        ));
        assert_eq!(
            seen.ending(ExitStatus::Code(0)),
            Ending::ShutDown {
                reason: "host-qmp-quit".into(),
                by_guest: false
            }
        );
    }

    #[test]
    fn a_panic_wins_over_a_shutdown_in_either_order() {
        let panicked = event("GUEST_PANICKED", json!({"action": "poweroff"}));
        let shutdown = event(
            "SHUTDOWN",
            json!({"guest": true, "reason": "guest-shutdown"}),
        );
        for order in [[&panicked, &shutdown], [&shutdown, &panicked]] {
            let mut seen = ExitEvents::default();
            for e in order {
                seen.note(e);
            }
            assert!(seen.panicked());
            let ending = seen.ending(ExitStatus::Code(0));
            assert_eq!(ending, Ending::Panicked);
            assert!(!ending.is_clean());
            assert_eq!(ending.error().as_deref(), Some("guest panicked"));
        }
    }

    #[test]
    fn a_shutdown_because_of_a_panic_is_a_panic() {
        let mut seen = ExitEvents::default();
        let meaning = seen.note(&event(
            "SHUTDOWN",
            json!({"guest": true, "reason": "guest-panic"}),
        ));
        assert!(matches!(meaning, RunEvent::Shutdown { .. }));
        assert_eq!(seen.ending(ExitStatus::Code(0)), Ending::Panicked);
    }

    #[test]
    fn an_exit_nobody_announced_is_a_crash_with_its_status() {
        let mut seen = ExitEvents::default();
        for name in ["STOP", "RESUME", "RESET"] {
            seen.note(&event(name, json!({})));
        }
        let ending = seen.ending(ExitStatus::Signal(libc::SIGKILL));
        assert_eq!(ending, Ending::Unannounced(ExitStatus::Signal(9)));
        assert!(!ending.is_clean());
        assert_eq!(
            ending.error().as_deref(),
            Some("QEMU exited unexpectedly (killed by SIGKILL)")
        );
    }

    #[test]
    fn exit_statuses_in_words() {
        assert_eq!(describe(ExitStatus::Code(0)), "exit code 0");
        assert_eq!(describe(ExitStatus::Code(-1)), "exit code -1");
        assert_eq!(
            describe(ExitStatus::Signal(libc::SIGTERM)),
            "killed by SIGTERM"
        );
        assert_eq!(describe(ExitStatus::Signal(250)), "killed by signal 250");
        assert_eq!(describe(ExitStatus::Unknown), "exit status unknown");
    }

    /// A child process `QemuProcess::adopt` accepts: its command line names
    /// `uuid` after `-uuid`, as QEMU's does. It runs `script`.
    // The QemuProcess reaps the child when it exits (it is ours).
    #[allow(clippy::zombie_processes)]
    fn child(script: &str, uuid: uuid::Uuid) -> QemuProcess {
        let child = std::process::Command::new("sh")
            .args(["-c", script, "-uuid", &uuid.to_string()])
            .spawn()
            .expect("sh runs");
        // A just-spawned child may not show its new command line for a
        // moment (the parent resumes before exec sets it up).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match QemuProcess::adopt(child.id() as i32, uuid, None) {
                Ok(process) => return process,
                Err(e) if std::time::Instant::now() > deadline => panic!("adopting: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    #[tokio::test]
    async fn watch_hands_over_the_events_sent_before_the_exit_then_returns_the_status() {
        let uuid = uuid::Uuid::new_v4();
        let process = child("sleep 0.3; exit 3", uuid);
        let (tx, mut rx) = broadcast::channel(16);
        let sender = tokio::spawn(async move {
            tx.send(event("STOP", json!({}))).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(event(
                "SHUTDOWN",
                json!({"guest": true, "reason": "guest-shutdown"}),
            ))
            .unwrap();
            // Still in flight when the process is gone: the QMP reader
            // has not closed the channel yet.
            tokio::time::sleep(Duration::from_millis(600)).await;
            tx.send(event("RESET", json!({}))).unwrap();
        });
        let mut names = vec![];
        let mut lost = false;
        let status = watch(
            &process,
            Some(&mut rx),
            |e| names.push(e.name),
            || lost = true,
        )
        .await;
        sender.await.unwrap();
        assert_eq!(status, ExitStatus::Code(3));
        assert_eq!(names, ["STOP", "SHUTDOWN", "RESET"]);
        assert!(!lost);
    }

    #[tokio::test]
    async fn watch_calls_a_link_lost_when_events_end_but_the_process_runs_on() {
        let uuid = uuid::Uuid::new_v4();
        let process = child("sleep 3; exit 0", uuid);
        let (tx, mut rx) = broadcast::channel::<QmpEvent>(4);
        drop(tx);
        let mut lost = 0;
        let started = std::time::Instant::now();
        let status = watch(&process, Some(&mut rx), |_| {}, || lost += 1).await;
        assert_eq!(lost, 1);
        assert_eq!(status, ExitStatus::Code(0));
        assert!(started.elapsed() >= LAST_EVENTS_DEADLINE);
    }

    #[tokio::test]
    async fn watch_without_events_waits_for_the_exit() {
        let uuid = uuid::Uuid::new_v4();
        let process = child("sleep 0.2; exit 5", uuid);
        let status = watch(
            &process,
            None,
            |_| panic!("no events"),
            || panic!("no link"),
        )
        .await;
        assert_eq!(status, ExitStatus::Code(5));
    }
}
