//! `vm start/reboot --wait-ready` and what `vm stop`/`vm reboot` say
//! while they wait: the announcements, the wait for the ready marker or the
//! guest agent, and how a stop ended.

use super::super::CliError;
use crate::vm::Vm;

/// `vm start --wait-ready`'s default marker: a login prompt.
pub const DEFAULT_READY_MARKER: &str = "login:";
/// `vm start --wait-ready`'s default timeout, in seconds.
pub const DEFAULT_READY_TIMEOUT_S: u64 = 300;
/// How often `--wait-ready` reads the console log.
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// What `vm stop` says before it waits; `agent`: the VM has a guest agent
/// port, so the daemon asks the agent halfway through the wait.
pub(super) fn stop_announcement(vm: &str, grace: u64, agent: bool) -> String {
    if agent {
        format!(
            "asking the guest of {vm} to shut down (ACPI power button, then its guest agent, if it answers, after {}); waiting up to {grace}s, then QEMU is quit",
            half_of(grace)
        )
    } else {
        format!(
            "asking the guest of {vm} to shut down (ACPI power button); waiting up to {grace}s, then QEMU is quit"
        )
    }
}

/// What `vm reboot` says before it waits; `agent`: the guest agent has
/// answered, so the daemon asks it halfway through the wait.
pub(super) fn reboot_announcement(vm: &str, grace: u64, agent: bool) -> String {
    if agent {
        format!(
            "asking the guest of {vm} to reboot (ACPI power button, then its guest agent's guest-shutdown mode=reboot after {}); waiting up to {grace}s for it to go down, else it keeps running",
            half_of(grace)
        )
    } else {
        format!(
            "asking the guest of {vm} to reboot (ACPI power button); waiting up to {grace}s for it to shut down, then resetting it"
        )
    }
}

/// Half of `seconds`, as the daemon splits the grace time (`1.5s`, `30s`).
fn half_of(seconds: u64) -> String {
    if seconds.is_multiple_of(2) {
        format!("{}s", seconds / 2)
    } else {
        format!("{}.5s", seconds / 2)
    }
}

/// What `--wait-ready` says before it waits.
pub(super) fn ready_announcement(vm: &str, timeout: u64, marker: &str, agent: bool) -> String {
    let agent = if agent {
        ", or for its guest agent to answer"
    } else {
        ""
    };
    format!("waiting up to {timeout}s for {marker:?} on the serial console of {vm}{agent}")
}

/// How the last stop ended, in words.
pub(super) fn stop_result_str(vm: &Vm) -> &'static str {
    use crate::vm::record::StopResult;
    match vm.last_stop {
        Some(StopResult::GuestPoweredOff) => "the guest powered off",
        Some(StopResult::GuestAgentShutdown) => {
            "the guest ignored the power button and powered off when its guest agent asked"
        }
        Some(StopResult::Quit) => {
            "QEMU was quit (the guest did not power off in time, or the stop was forced)"
        }
        Some(StopResult::Killed) => "QEMU did not quit and was killed",
        Some(StopResult::AlreadyExited) => "QEMU had already exited",
        None => "the VM was not running",
    }
}

/// How many bytes of the log's end `vm reboot --wait-ready` remembers to
/// find where the output after the reboot starts.
pub(super) const LOG_ANCHOR: usize = 256;

/// Which answer of the guest agent makes `--wait-ready` ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AgentAnswer {
    /// Any answer in this QEMU (the view's `guest` is kept per QEMU).
    Any,
    /// One read after this time (RFC 3339 with milliseconds, as the daemon
    /// writes both, so they compare as strings).
    After(String),
}

impl AgentAnswer {
    /// Whether `guest` (the view's `guest`) is such an answer.
    fn seen_in(&self, guest: Option<&crate::qemu::agent::GuestInfo>) -> bool {
        match (self, guest) {
            (_, None) => false,
            (AgentAnswer::Any, Some(_)) => true,
            (AgentAnswer::After(t), Some(g)) => g.read_at.as_str() > t.as_str(),
        }
    }
}

/// What made `--wait-ready` ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ready {
    /// The serial console printed the marker.
    Marker,
    /// The guest agent answered.
    Agent,
}

impl Ready {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Ready::Marker => "ready (the serial console printed the marker)",
            Ready::Agent => "ready (the guest agent answered)",
        }
    }
}

/// The part of `log` after the last place `anchor` (the log's end as it
/// was) appears; all of it when the anchor is gone from the tail (more was
/// printed since than the tail holds).
fn after_anchor<'a>(log: &'a [u8], anchor: Option<&[u8]>) -> &'a [u8] {
    match anchor {
        Some(anchor) if !anchor.is_empty() && anchor.len() <= log.len() => log
            .windows(anchor.len())
            .rposition(|w| w == anchor)
            .map_or(log, |at| &log[at + anchor.len()..]),
        _ => log,
    }
}

/// Waits until the serial console of the VM's current boot shows `marker`
/// after `anchor` (see [`after_anchor`]; read through the console-log
/// endpoint), or the VM's view shows the `agent` answer, for at most
/// `timeout_s`.
pub(super) async fn wait_ready_marker_after(
    client: &crate::client::Client,
    vm: &str,
    marker: &str,
    timeout_s: u64,
    anchor: Option<Vec<u8>>,
    agent: Option<AgentAnswer>,
) -> Result<Ready, CliError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
    let needle = marker.as_bytes();
    loop {
        let log = client.console_log_of(vm, None, true).await?;
        let fresh = after_anchor(&log, anchor.as_deref());
        if !needle.is_empty() && fresh.windows(needle.len()).any(|w| w == needle) {
            return Ok(Ready::Marker);
        }
        let view = client.get_vm(vm).await?;
        if agent
            .as_ref()
            .is_some_and(|a| a.seen_in(view.guest.as_ref()))
        {
            return Ok(Ready::Agent);
        }
        let state = view.state.as_str();
        if !matches!(state, "running" | "starting" | "paused") {
            return Err(CliError::StoppedWhileWaiting {
                vm: vm.to_string(),
                state: state.to_string(),
                marker: marker.to_string(),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::NotReady {
                vm: vm.to_string(),
                marker: marker.to_string(),
                timeout_s,
                agent: agent.is_some(),
            });
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_after_the_anchor_is_what_a_reboot_wait_reads() {
        let before = b"boot\nGUEST-READY\nlast line\n";
        let anchor = &before[before.len() - 12..];
        let now = b"boot\nGUEST-READY\nlast line\nreset\nGUEST-READY\n";
        assert_eq!(after_anchor(now, Some(anchor)), b"reset\nGUEST-READY\n");
        // Nothing new yet: the old marker does not count.
        assert_eq!(after_anchor(before, Some(anchor)), b"");
        // The anchor scrolled out of the tail: everything is new.
        assert_eq!(
            after_anchor(b"GUEST-READY\n", Some(anchor)),
            b"GUEST-READY\n"
        );
        assert_eq!(after_anchor(now, None), &now[..]);
    }

    #[test]
    fn the_announcements_name_the_agent_step_when_there_is_one() {
        assert_eq!(half_of(60), "30s");
        assert_eq!(half_of(3), "1.5s");
        let stop = stop_announcement("web", 60, true);
        assert!(
            stop.contains("then its guest agent, if it answers, after 30s")
                && stop.contains("waiting up to 60s"),
            "{stop}"
        );
        assert!(!stop_announcement("web", 60, false).contains("agent"));
        let reboot = reboot_announcement("web", 10, true);
        assert!(
            reboot.contains("guest-shutdown mode=reboot after 5s"),
            "{reboot}"
        );
        assert!(!reboot_announcement("web", 10, false).contains("agent"));
        assert!(ready_announcement("web", 5, "login:", true)
            .ends_with("or for its guest agent to answer"));
    }

    #[test]
    fn only_an_agent_answer_after_the_reboot_counts() {
        let info = |read_at: &str| crate::qemu::agent::GuestInfo {
            hostname: None,
            os: None,
            interfaces: Vec::new(),
            read_at: read_at.into(),
        };
        let old = info("2026-01-01T10:00:00.000Z");
        let new = info("2026-01-01T10:00:05.000Z");
        let after = AgentAnswer::After("2026-01-01T10:00:01.000Z".into());
        assert!(!after.seen_in(Some(&old)));
        assert!(after.seen_in(Some(&new)));
        assert!(!after.seen_in(None));
        assert!(AgentAnswer::Any.seen_in(Some(&old)));
        assert!(!AgentAnswer::Any.seen_in(None));
    }
}
