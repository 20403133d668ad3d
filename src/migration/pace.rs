//! The pace of a migration before its switch, as pure decisions the source
//! flow asks at each poll: whether the copies stalled ([`StallWatch`]), the
//! limits that apply ([`Limits`]), and when memory that does not converge
//! gets a longer pause ([`Convergence`]).

use std::time::Duration;

/// How often the downtime limit may be raised when memory does not converge.
const RAISE_EVERY: Duration = Duration::from_secs(3);
/// How far the downtime limit may be raised, as a multiple of the request's.
const RAISE_UP_TO: u64 = 10;

/// The limits of a migration before its switch (`[migration]`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// How long the copies may make no progress.
    pub(super) stall: Option<Duration>,
    /// How long the migration may take until its switch.
    pub(super) deadline: Option<Duration>,
}

impl Limits {
    pub(super) fn of(settings: &crate::config::MigrationSettings) -> Limits {
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Limits {
            stall: secs(settings.stall_timeout_s),
            deadline: secs(settings.deadline_s),
        }
    }
}

/// Notices copies that stopped moving: the bytes copied so far, observed
/// at times counted from any fixed start.
#[derive(Debug, Clone, Copy)]
pub(super) struct StallWatch {
    limit: Option<Duration>,
    bytes: u64,
    since: Duration,
}

impl StallWatch {
    pub(super) fn new(limit: Option<Duration>, now: Duration) -> StallWatch {
        StallWatch {
            limit,
            bytes: 0,
            since: now,
        }
    }

    /// Observes `bytes` copied so far at `now`; returns how long nothing
    /// moved once that reached the limit.
    pub(super) fn observe(&mut self, bytes: u64, now: Duration) -> Option<Duration> {
        if bytes != self.bytes {
            self.bytes = bytes;
            self.since = now;
            return None;
        }
        let still = now.saturating_sub(self.since);
        self.limit.filter(|limit| still >= *limit).map(|_| still)
    }
}

/// How far the downtime limit may be raised for a request of
/// `requested_ms`: [`RAISE_UP_TO`] times it, within the API's maximum.
pub(super) fn raise_ceiling(requested_ms: u64) -> u64 {
    requested_ms
        .saturating_mul(RAISE_UP_TO)
        .min(crate::spec::MAX_MAX_DOWNTIME_MS)
}

/// Whether memory converges, and the downtime limit it is allowed: memory
/// that does not shrink to half over two more passes (QEMU's dirty-page
/// syncs) gets twice the pause, at most every [`RAISE_EVERY`], up to a
/// ceiling. Pure: the caller says the time and what QEMU reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Convergence {
    /// The limit in force, in milliseconds.
    downtime: u64,
    /// When it was last raised (or the copy began).
    raised_at: Duration,
    /// QEMU's pass count and remaining bytes then; `None` until QEMU
    /// finished its first pass.
    baseline: Option<(u64, u64)>,
}

impl Convergence {
    pub(super) fn new(downtime: u64) -> Convergence {
        Convergence {
            downtime,
            raised_at: Duration::ZERO,
            baseline: None,
        }
    }

    /// Observes QEMU's `passes` and `remaining` bytes at `now` (time since
    /// the memory copy began); returns the new limit when it is to be
    /// raised.
    pub(super) fn observe(
        &mut self,
        now: Duration,
        passes: u64,
        remaining: u64,
        ceiling: u64,
    ) -> Option<u64> {
        let Some((passes_then, remaining_then)) = self.baseline else {
            if passes > 0 {
                self.baseline = Some((passes, remaining));
            }
            return None;
        };
        let stuck = passes >= passes_then + 2 && remaining >= remaining_then / 2;
        if !stuck || now.saturating_sub(self.raised_at) < RAISE_EVERY || self.downtime >= ceiling {
            return None;
        }
        self.downtime = self.downtime.saturating_mul(2).min(ceiling);
        self.raised_at = now;
        self.baseline = Some((passes, remaining));
        Some(self.downtime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_downtime_limit_is_raised_only_when_memory_stops_converging() {
        // (what, state before, now, passes, remaining, ceiling, raised to)
        let at = |downtime, raised_at: u64, baseline| Convergence {
            downtime,
            raised_at: S(raised_at),
            baseline,
        };
        /// What, the state before, now (s), passes, remaining, ceiling,
        /// the limit it is raised to.
        type Case = (&'static str, Convergence, u64, u64, u64, u64, Option<u64>);
        let cases: &[Case] = &[
            (
                "before QEMU's first pass there is nothing to compare",
                at(300, 0, None),
                10,
                0,
                1000,
                3000,
                None,
            ),
            (
                "the first pass only sets the baseline",
                at(300, 0, None),
                10,
                1,
                1000,
                3000,
                None,
            ),
            (
                "two more passes without halving, after the wait: doubled",
                at(300, 0, Some((1, 1000))),
                3,
                3,
                600,
                3000,
                Some(600),
            ),
            (
                "memory that shrank below half converges: unchanged",
                at(300, 0, Some((1, 1000))),
                10,
                3,
                499,
                3000,
                None,
            ),
            (
                "exactly half is not converging",
                at(300, 0, Some((1, 1000))),
                10,
                3,
                500,
                3000,
                Some(600),
            ),
            (
                "one more pass is too early to judge",
                at(300, 0, Some((1, 1000))),
                10,
                2,
                1000,
                3000,
                None,
            ),
            (
                "too soon after the last raise",
                at(600, 8, Some((3, 1000))),
                10,
                9,
                1000,
                3000,
                None,
            ),
            (
                "the raise stops at the ceiling",
                at(2000, 0, Some((1, 1000))),
                10,
                5,
                1000,
                3000,
                Some(3000),
            ),
            (
                "at the ceiling nothing more",
                at(3000, 0, Some((1, 1000))),
                10,
                5,
                1000,
                3000,
                None,
            ),
        ];
        for (what, before, now, passes, remaining, ceiling, want) in cases {
            let mut state = *before;
            let got = state.observe(S(*now), *passes, *remaining, *ceiling);
            assert_eq!(got, *want, "{what}");
            match want {
                Some(raised) => {
                    assert_eq!(state.downtime, *raised, "{what}");
                    assert_eq!(state.raised_at, S(*now), "{what}");
                    assert_eq!(state.baseline, Some((*passes, *remaining)), "{what}");
                }
                None if before.baseline.is_some() => assert_eq!(state, *before, "{what}"),
                None => assert_eq!(state.downtime, before.downtime, "{what}"),
            }
        }
    }

    #[test]
    fn a_raise_waits_for_two_passes_after_the_last_one() {
        let mut c = Convergence::new(300);
        assert_eq!(c.observe(S(1), 1, 1000, 3000), None);
        assert_eq!(c.observe(S(4), 3, 900, 3000), Some(600));
        // The new baseline is the raise's: two more passes are needed.
        assert_eq!(c.observe(S(8), 4, 900, 3000), None);
        assert_eq!(c.observe(S(9), 5, 900, 3000), Some(1200));
    }

    #[test]
    fn the_ceiling_is_ten_times_the_request_within_the_maximum() {
        assert_eq!(raise_ceiling(300), 3000);
        assert_eq!(raise_ceiling(10_000), crate::spec::MAX_MAX_DOWNTIME_MS);
        assert_eq!(raise_ceiling(u64::MAX), crate::spec::MAX_MAX_DOWNTIME_MS);
    }

    #[test]
    fn copies_stall_when_their_bytes_stop_moving_for_the_limit() {
        let mut w = StallWatch::new(Some(S(5)), S(0));
        assert_eq!(w.observe(0, S(4)), None, "nothing moved, but not for long");
        assert_eq!(w.observe(0, S(5)), Some(S(5)), "nothing moved at all");
        let mut w = StallWatch::new(Some(S(5)), S(0));
        assert_eq!(w.observe(10, S(4)), None);
        assert_eq!(w.observe(10, S(8)), None, "moved 4 s ago");
        assert_eq!(w.observe(10, S(9)), Some(S(5)));
        assert_eq!(w.observe(11, S(20)), None, "moving again");
        let mut off = StallWatch::new(None, S(0));
        assert_eq!(off.observe(0, S(100_000)), None, "no limit set");
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let limits = Limits::of(&crate::config::MigrationSettings {
            stall_timeout_s: 0,
            deadline_s: 90,
        });
        assert_eq!(limits.stall, None);
        assert_eq!(limits.deadline, Some(S(90)));
    }
}
