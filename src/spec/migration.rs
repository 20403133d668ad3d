//! What the API shows of a live migration: the request a scheduler makes,
//! the record both daemons keep and publish, and the phases it goes
//! through. Pure data and the phase table; the flows live in `migration/`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::errors::SpecError;

/// Default `max_downtime_ms` of a migration request.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;
/// Least `max_downtime_ms` a request may ask for.
pub const MIN_MAX_DOWNTIME_MS: u64 = 10;
/// Most `max_downtime_ms` a request may ask for (and the most the stepwise
/// raise goes to).
pub const MAX_MAX_DOWNTIME_MS: u64 = 60_000;

/// `POST /v1/vms/{id}/migrate`: move a running VM to another vmlet host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The daemon to move the VM to.
    pub target: MigrationTarget,
    /// The longest the guest may be paused at the switch, in milliseconds
    /// (raised stepwise, up to 10× this, when memory stops converging).
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: u64,
    /// Bandwidth cap for memory and disks, in MiB/s; `null`: no cap.
    #[serde(default)]
    pub max_bandwidth_mib_s: Option<u64>,
}

fn default_downtime() -> u64 {
    DEFAULT_MAX_DOWNTIME_MS
}

/// Where a migration goes: the target daemon's TCP API and its token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationTarget {
    /// `http://HOST:PORT` or `https://HOST:PORT` of the target daemon.
    pub url: String,
    /// The target daemon's bearer token (never shown back).
    pub token: String,
}

impl std::fmt::Debug for MigrationTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationTarget")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl MigrateRequest {
    /// Checks the request's fields; every problem names its field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut errors = Vec::new();
        let url = self.target.url.as_str();
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        match rest {
            None => errors.push((
                "target.url",
                "must start with http:// or https://".to_string(),
            )),
            Some(rest) => {
                let host = rest.trim_end_matches('/');
                if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
                    errors.push((
                        "target.url",
                        "must be http(s)://HOST:PORT with no path, query or credentials"
                            .to_string(),
                    ));
                }
            }
        }
        if self.target.token.trim().is_empty() {
            errors.push(("target.token", "must not be empty".to_string()));
        } else if self.target.token.len() > 4096
            || !self.target.token.bytes().all(|b| b.is_ascii_graphic())
        {
            errors.push((
                "target.token",
                "must be at most 4096 printable ASCII characters".to_string(),
            ));
        }
        if !(MIN_MAX_DOWNTIME_MS..=MAX_MAX_DOWNTIME_MS).contains(&self.max_downtime_ms) {
            errors.push((
                "max_downtime_ms",
                format!("must be between {MIN_MAX_DOWNTIME_MS} and {MAX_MAX_DOWNTIME_MS}"),
            ));
        }
        if self.max_bandwidth_mib_s == Some(0) || self.max_bandwidth_mib_s > Some(1 << 20) {
            errors.push((
                "max_bandwidth_mib_s",
                "must be between 1 and 1048576, or null".to_string(),
            ));
        }
        SpecError::from_pairs(errors)
    }
}

/// `POST /v1/migrations/{id}/finish` (daemon to daemon): what the source
/// measured, for the target's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {
    /// The guest's pause at the switch, in milliseconds, as the source's
    /// QEMU measured it.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// The whole migration, in milliseconds, as the source measured it.
    #[serde(default)]
    pub total_ms: Option<u64>,
}

/// Which end of a migration a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// This daemon sends the VM.
    Source,
    /// This daemon receives it.
    Target,
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Checking compatibility, claiming capacity, launching the target QEMU.
    Preparing,
    /// Copying the disks (memory not yet).
    Mirroring,
    /// Copying memory; disks are kept in step write by write.
    Ram,
    /// The guest is paused and ownership moves to the target: from here on
    /// the source never resumes the guest without the target's word.
    Switchover,
    /// Done: the VM runs on the target.
    Completed,
    /// Failed before the switch: the VM runs on the source as before.
    Failed,
    /// Cancelled before the switch: the VM runs on the source as before.
    Cancelled,
}

impl Phase {
    /// The API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Mirroring => "mirroring",
            Phase::Ram => "ram",
            Phase::Switchover => "switchover",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    /// Every phase, for exhaustive tests.
    pub const ALL: [Phase; 7] = [
        Phase::Preparing,
        Phase::Mirroring,
        Phase::Ram,
        Phase::Switchover,
        Phase::Completed,
        Phase::Failed,
        Phase::Cancelled,
    ];

    /// The migration is over.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }

    /// Whether a migration may go from `self` to `to`. Forward only; a
    /// failure or cancel only before the switch (after it, the target owns
    /// the guest and the migration can only complete).
    pub fn may_become(self, to: Phase) -> bool {
        use Phase as P;
        match (self, to) {
            (P::Preparing, P::Mirroring | P::Ram) => true,
            (P::Mirroring, P::Ram) => true,
            (P::Ram, P::Switchover) => true,
            (P::Switchover, P::Completed) => true,
            (P::Preparing | P::Mirroring | P::Ram, P::Failed | P::Cancelled) => true,
            // The switch could not be confirmed by the target, and the target
            // said it never resumed the guest: rolled back after all.
            (P::Switchover, P::Failed) => true,
            _ => false,
        }
    }
}

/// How far a disk's copy got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskProgress {
    /// The disk's name.
    pub name: String,
    /// Bytes to copy (the job's current estimate).
    pub total: u64,
    /// Bytes copied.
    pub done: u64,
}

/// How far a migration got (bytes; rates in bytes per second).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    /// Guest memory to send.
    pub ram_total: u64,
    /// Memory still to send (dirty pages included).
    pub ram_remaining: u64,
    /// Memory sent so far (resent pages counted again).
    pub ram_transferred: u64,
    /// How fast the guest dirties memory.
    pub dirty_rate: u64,
    /// Each copied disk.
    pub disks: Vec<DiskProgress>,
}

/// A live migration as both daemons keep and show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Migration {
    /// The migration's id (the same on both daemons).
    pub id: Uuid,
    /// The VM's UUID (the same on both daemons).
    pub vm: Uuid,
    /// The VM's name.
    pub vm_name: String,
    /// Which end this daemon is.
    pub role: Role,
    /// The source daemon (its host name).
    pub source: String,
    /// The target daemon's URL.
    pub target: String,
    /// Where it stands.
    pub phase: Phase,
    /// When it began (RFC 3339, UTC).
    pub started_at: String,
    /// When it ended, once it has.
    #[serde(default)]
    pub finished_at: Option<String>,
    /// The downtime asked for, in milliseconds.
    pub max_downtime_ms: u64,
    /// The bandwidth cap asked for, in MiB/s.
    #[serde(default)]
    pub max_bandwidth_mib_s: Option<u64>,
    /// How far it got.
    pub progress: Progress,
    /// How long the guest was paused at the switch, in milliseconds
    /// (as QEMU measured it), once completed.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// The whole migration's duration, in milliseconds, once completed.
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// Why it failed (or was cancelled).
    #[serde(default)]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(url: &str, token: &str) -> MigrateRequest {
        MigrateRequest {
            target: MigrationTarget {
                url: url.into(),
                token: token.into(),
            },
            max_downtime_ms: 300,
            max_bandwidth_mib_s: None,
        }
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        assert!(request("http://10.0.0.2:8780", "t0k3n").validate().is_ok());
        assert!(request("https://node2.example:8780/", "t")
            .validate()
            .is_ok());
        for (url, token, field) in [
            ("ftp://x:1", "t", "target.url"),
            ("http://", "t", "target.url"),
            ("http://a:1/v1/x", "t", "target.url"),
            ("http://user:pw@a:1", "t", "target.url"),
            ("http://a:1", "", "target.token"),
            ("http://a:1", "with space", "target.token"),
        ] {
            let e = request(url, token).validate().unwrap_err();
            assert_eq!(e.errors[0].field, field, "{url} {token}");
        }
        let mut r = request("http://a:1", "t");
        r.max_downtime_ms = 1;
        assert_eq!(r.validate().unwrap_err().errors[0].field, "max_downtime_ms");
        r.max_downtime_ms = 300;
        r.max_bandwidth_mib_s = Some(0);
        assert_eq!(
            r.validate().unwrap_err().errors[0].field,
            "max_bandwidth_mib_s"
        );
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let r = request("http://a:1", "secret-token");
        assert!(!format!("{r:?}").contains("secret-token"));
    }

    #[test]
    fn phases_only_move_forward_and_never_fail_after_the_target_owns_the_guest() {
        use Phase as P;
        for from in Phase::ALL {
            for to in Phase::ALL {
                let allowed = from.may_become(to);
                let expected = matches!(
                    (from, to),
                    (P::Preparing, P::Mirroring | P::Ram | P::Failed | P::Cancelled)
                        | (P::Mirroring, P::Ram | P::Failed | P::Cancelled)
                        | (P::Ram, P::Switchover | P::Failed | P::Cancelled)
                        | (P::Switchover, P::Completed | P::Failed)
                );
                assert_eq!(allowed, expected, "{from:?} -> {to:?}");
                if from.is_final() {
                    assert!(!allowed, "a final phase never moves: {from:?} -> {to:?}");
                }
            }
        }
    }
}
