//! The rotation decision: pure functions of `now` and what the rotator knows, no I/O.
//!
//! [`next_action`] is the whole rule; `docs/ROTATION.md` states it in prose. Everything is in
//! wall-clock time ([`SystemTime`]) because a token's expiry is an absolute instant.

use std::time::{Duration, SystemTime};

pub use crate::databricks::backoff::Backoff;

/// What to do when no session is active (`PAT_IDLE_POLICY`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IdlePolicy {
    /// Keep the token alive: rotate before it expires even with nobody using it.
    #[default]
    Keepalive,
    /// Let the token expire, report it, and wait for a new token in the config file.
    Lapse,
}

/// Whether anyone is using the proxy, as far as the session probe can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sessions {
    /// At least one session is active.
    Active,
    /// No session is active.
    Idle,
    /// The probe could not tell (sessions URL unreachable). Treated as [`Sessions::Active`]:
    /// an unneeded rotation costs one API call, a lapsed token costs a user their session.
    Unknown,
}

impl Sessions {
    fn active(self) -> bool {
        !matches!(self, Self::Idle)
    }
}

/// The fixed parameters of the schedule, derived from `PAT_TOKEN_LIFETIME`,
/// `PAT_ROTATION_INTERVAL` and `PAT_IDLE_POLICY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationPlan {
    /// Lifetime of each minted token.
    pub lifetime: Duration,
    /// Time between rotations while sessions are active.
    pub interval: Duration,
    /// What to do while no session is active.
    pub idle_policy: IdlePolicy,
    /// `lifetime - interval`: a rotation is due at the latest this long before expiry, which
    /// leaves this much time for retries.
    pub margin: Duration,
    /// A token with less than this left is treated as dead: no API call is made with it, so a
    /// request in flight cannot outlive it.
    pub guard: Duration,
    /// Delays between failed attempts.
    pub backoff: Backoff,
}

impl RotationPlan {
    /// The plan for these settings. `interval` must be below `lifetime` (the binary checks
    /// this at start); if it is not, the margin is taken as a tenth of the lifetime.
    pub fn new(lifetime: Duration, interval: Duration, idle_policy: IdlePolicy) -> Self {
        let margin = match lifetime.checked_sub(interval) {
            Some(margin) if !margin.is_zero() => margin,
            _ => lifetime / 10,
        };
        Self {
            lifetime,
            interval,
            idle_policy,
            margin,
            guard: (margin / 4).min(Duration::from_secs(2)),
            backoff: Backoff {
                base: (margin / 32).clamp(Duration::from_millis(10), Duration::from_secs(1)),
                cap: (margin / 4).clamp(Duration::from_millis(10), Duration::from_secs(60)),
            },
        }
    }

    /// Whether `expires_at` leaves too little time for an API call at `now`.
    pub fn is_dead_at(&self, expires_at: Option<SystemTime>, now: SystemTime) -> bool {
        expires_at.is_some_and(|at| at <= now + self.guard)
    }
}

/// What the rotator knows about the token it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldToken {
    /// When it was minted, or adopted if it was not minted here.
    pub obtained_at: SystemTime,
    /// When it expires, if known.
    pub expires_at: Option<SystemTime>,
    /// Known to be refused by the API (revoked, or its owner lost access).
    pub dead: bool,
}

/// A token that this proxy minted and will revoke once `due`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRevoke {
    /// Token id.
    pub token_id: String,
    /// When to revoke it: publication of its successor plus `PAT_REVOKE_GRACE`.
    pub due: SystemTime,
    /// When it expires by itself, if known. Past that, there is nothing to revoke.
    pub expires_at: Option<SystemTime>,
}

/// Everything [`next_action`] looks at.
#[derive(Clone, Copy, Debug)]
pub struct ScheduleState<'a> {
    /// The token held now, if any.
    pub token: Option<HeldToken>,
    /// The session probe's answer.
    pub sessions: Sessions,
    /// After a failed mint: not before this instant.
    pub retry_at: Option<SystemTime>,
    /// Tokens waiting to be revoked.
    pub revokes: &'a [PendingRevoke],
    /// The held token has not reached the config file, the state file or a sink: when to try
    /// writing it again. While set, no token is minted until the held one nears expiry.
    pub persist_retry_at: Option<SystemTime>,
}

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Mint a new token now.
    Rotate,
    /// Write the held token to the config file, the state file and the sinks again.
    Persist,
    /// Revoke this token now.
    Revoke {
        /// Token id.
        token_id: String,
    },
    /// Nothing to do before this instant (decide again then, or earlier if something changes).
    Sleep {
        /// When to decide again.
        until: SystemTime,
    },
    /// The token is missing, dead or expired: make no API call, report it and wait for a new
    /// token to appear in the config file.
    Expired,
}

/// The next thing the rotator should do at `now`.
///
/// 1. No token, or one that is dead or within [`RotationPlan::guard`] of expiry: [`Action::Expired`].
///    Nothing is ever sent with such a token.
/// 2. A pending revoke that is due (and not expired by itself): [`Action::Revoke`].
/// 3. The held token has not been saved and `persist_retry_at` has come: [`Action::Persist`].
/// 4. A rotation is due at
///    * the moment the token was obtained, when its expiry is unknown (a bootstrap token is
///      replaced at once);
///    * while the held token is unsaved: `expiry - margin / 2`, later than usual, since each
///      token minted meanwhile would fail to be saved too (idle under `lapse`: never);
///    * with sessions active (or unknown): `min(obtained + interval, expiry - margin)`;
///    * idle under `keepalive`: `expiry - margin`;
///    * idle under `lapse`: never (the token is left to expire);
///
///    but not before `retry_at` after a failed attempt. Due: [`Action::Rotate`].
/// 5. Otherwise sleep until the earliest of: the rotation, the next revoke, the next attempt
///    to save, and the moment the token becomes dead (step 1).
pub fn next_action(now: SystemTime, state: ScheduleState<'_>, plan: &RotationPlan) -> Action {
    let Some(token) = state.token.filter(|t| !t.dead) else {
        return Action::Expired;
    };
    if plan.is_dead_at(token.expires_at, now) {
        return Action::Expired;
    }
    let live_revokes = || {
        state
            .revokes
            .iter()
            .filter(|r| r.expires_at.is_none_or(|at| at > now))
    };
    if let Some(revoke) = live_revokes()
        .filter(|r| r.due <= now)
        .min_by_key(|r| r.due)
    {
        return Action::Revoke {
            token_id: revoke.token_id.clone(),
        };
    }
    if state.persist_retry_at.is_some_and(|at| at <= now) {
        return Action::Persist;
    }
    let unsaved = state.persist_retry_at.is_some();
    let rotate_at = match token.expires_at {
        None => Some(token.obtained_at),
        Some(expires_at) => {
            let latest = expires_at.checked_sub(plan.margin).unwrap_or(now);
            let near_expiry = expires_at.checked_sub(plan.margin / 2).unwrap_or(now);
            match (unsaved, state.sessions.active(), plan.idle_policy) {
                (true, false, IdlePolicy::Lapse) => None,
                (true, _, _) => Some(near_expiry),
                (false, true, _) => Some((token.obtained_at + plan.interval).min(latest)),
                (false, false, IdlePolicy::Keepalive) => Some(latest),
                (false, false, IdlePolicy::Lapse) => None,
            }
        }
    };
    let rotate_at = rotate_at.map(|at| match state.retry_at {
        Some(retry_at) => at.max(retry_at),
        None => at,
    });
    if rotate_at.is_some_and(|at| at <= now) {
        return Action::Rotate;
    }
    let dead_at = token
        .expires_at
        .map(|at| at.checked_sub(plan.guard).unwrap_or(at));
    let until = [
        rotate_at,
        dead_at,
        live_revokes().map(|r| r.due).min(),
        state.persist_retry_at,
    ]
    .into_iter()
    .flatten()
    .min();
    match until {
        Some(until) => Action::Sleep { until },
        // Only reachable idle under lapse with a token that never expires: nothing to do
        // until something changes, which the caller notices when it wakes up anyway.
        None => Action::Sleep {
            until: now + plan.interval,
        },
    }
}

/// Revokes that still matter at `now`: those whose token has not expired by itself.
pub fn prune_revokes(now: SystemTime, revokes: &mut Vec<PendingRevoke>) {
    revokes.retain(|r| r.expires_at.is_none_or(|at| at > now));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn held(obtained: u64, expires: Option<u64>) -> Option<HeldToken> {
        Some(HeldToken {
            obtained_at: at(obtained),
            expires_at: expires.map(at),
            dead: false,
        })
    }

    fn state(token: Option<HeldToken>, sessions: Sessions) -> ScheduleState<'static> {
        ScheduleState {
            token,
            sessions,
            retry_at: None,
            revokes: &[],
            persist_retry_at: None,
        }
    }

    #[test]
    fn idle_policy_parses_as_its_variable_spells_it() {
        use clap::ValueEnum as _;
        assert_eq!(
            IdlePolicy::from_str("keepalive", false),
            Ok(IdlePolicy::Keepalive)
        );
        assert_eq!(IdlePolicy::from_str("lapse", false), Ok(IdlePolicy::Lapse));
        assert!(IdlePolicy::from_str("sometimes", false).is_err());
    }

    #[test]
    fn next_action_table() {
        let keep = RotationPlan::new(secs(900), secs(600), IdlePolicy::Keepalive);
        let lapse = RotationPlan::new(secs(900), secs(600), IdlePolicy::Lapse);
        use Sessions::{Active, Idle, Unknown};
        let cases: &[(&str, &RotationPlan, u64, ScheduleState<'_>, Action)] = &[
            ("no token", &keep, 0, state(None, Active), Action::Expired),
            (
                "dead token",
                &keep,
                10,
                state(
                    Some(HeldToken {
                        obtained_at: at(0),
                        expires_at: Some(at(900)),
                        dead: true,
                    }),
                    Active,
                ),
                Action::Expired,
            ),
            (
                "expired",
                &keep,
                900,
                state(held(0, Some(900)), Active),
                Action::Expired,
            ),
            (
                "inside the guard is as good as expired",
                &keep,
                899,
                state(held(0, Some(900)), Active),
                Action::Expired,
            ),
            (
                "unknown expiry: replace at once",
                &lapse,
                5,
                state(held(5, None), Idle),
                Action::Rotate,
            ),
            (
                "active, before the interval",
                &keep,
                100,
                state(held(0, Some(900)), Active),
                Action::Sleep { until: at(600) },
            ),
            (
                "active, at the interval",
                &keep,
                600,
                state(held(0, Some(900)), Active),
                Action::Rotate,
            ),
            (
                "unknown sessions count as active",
                &lapse,
                600,
                state(held(0, Some(900)), Unknown),
                Action::Rotate,
            ),
            (
                "active, short-lived token: expiry - margin comes first",
                &keep,
                100,
                state(held(0, Some(400)), Active),
                Action::Rotate,
            ),
            (
                "keepalive idle, long-lived token: wait for expiry - margin",
                &keep,
                600,
                state(held(0, Some(10_000)), Idle),
                Action::Sleep { until: at(9_700) },
            ),
            (
                "keepalive idle, at expiry - margin",
                &keep,
                600,
                state(held(0, Some(900)), Idle),
                Action::Rotate,
            ),
            (
                "lapse idle: sleep until the token is dead, then report",
                &lapse,
                600,
                state(held(0, Some(900)), Idle),
                Action::Sleep { until: at(898) },
            ),
            (
                "lapse idle, expired",
                &lapse,
                898,
                state(held(0, Some(900)), Idle),
                Action::Expired,
            ),
        ];
        for (name, plan, now, state, expected) in cases {
            assert_eq!(next_action(at(*now), *state, plan), *expected, "{name}");
        }
    }

    #[test]
    fn retry_at_defers_a_due_rotation() {
        let plan = RotationPlan::new(secs(900), secs(600), IdlePolicy::Keepalive);
        let state = ScheduleState {
            retry_at: Some(at(640)),
            ..state(held(0, Some(900)), Sessions::Active)
        };
        assert_eq!(
            next_action(at(610), state, &plan),
            Action::Sleep { until: at(640) }
        );
        assert_eq!(next_action(at(640), state, &plan), Action::Rotate);
        // A retry pushed past the token's life ends in Expired, never in a call with it.
        let late = ScheduleState {
            retry_at: Some(at(2_000)),
            ..state
        };
        assert_eq!(
            next_action(at(640), late, &plan),
            Action::Sleep { until: at(898) }
        );
        assert_eq!(next_action(at(898), late, &plan), Action::Expired);
    }

    #[test]
    fn revoke_grace() {
        let plan = RotationPlan::new(secs(900), secs(600), IdlePolicy::Keepalive);
        // Rotated at 600 with a 30 s grace: the old token is revoked at 630, not before.
        let revokes = [PendingRevoke {
            token_id: "old".to_owned(),
            due: at(630),
            expires_at: Some(at(900)),
        }];
        let state = ScheduleState {
            revokes: &revokes,
            ..state(held(600, Some(1_500)), Sessions::Active)
        };
        assert_eq!(
            next_action(at(601), state, &plan),
            Action::Sleep { until: at(630) }
        );
        assert_eq!(
            next_action(at(630), state, &plan),
            Action::Revoke {
                token_id: "old".to_owned()
            }
        );
        // A revoke whose token already expired is not worth a call.
        assert_eq!(
            next_action(at(950), state, &plan),
            Action::Sleep { until: at(1_200) }
        );
        let mut pending = revokes.to_vec();
        prune_revokes(at(950), &mut pending);
        assert!(pending.is_empty());
        // No revoke is ever made with a dead token.
        assert_eq!(next_action(at(1_499), state, &plan), Action::Expired);
    }

    #[test]
    fn an_unsaved_token_pauses_minting_until_it_nears_expiry() {
        // Lifetime 900 s, interval 300 s: margin 600 s, so "near expiry" is 300 s before it.
        let keep = RotationPlan::new(secs(900), secs(300), IdlePolicy::Keepalive);
        let lapse = RotationPlan::new(secs(900), secs(300), IdlePolicy::Lapse);
        let unsaved = |retry: u64, sessions| ScheduleState {
            persist_retry_at: Some(at(retry)),
            ..state(held(0, Some(900)), sessions)
        };
        use Sessions::{Active, Idle};
        let cases: &[(&str, &RotationPlan, u64, ScheduleState<'_>, Action)] = &[
            (
                "saved: the interval rotates as usual",
                &keep,
                300,
                state(held(0, Some(900)), Active),
                Action::Rotate,
            ),
            (
                "unsaved: the interval does not mint; wait for the next save attempt",
                &keep,
                300,
                unsaved(400, Active),
                Action::Sleep { until: at(400) },
            ),
            (
                "unsaved: the save attempt is due",
                &keep,
                400,
                unsaved(400, Active),
                Action::Persist,
            ),
            (
                "unsaved, next attempt later than the rotation: sleep until near expiry",
                &keep,
                450,
                unsaved(700, Active),
                Action::Sleep { until: at(600) },
            ),
            (
                "unsaved, near expiry: mint after all",
                &keep,
                600,
                unsaved(700, Active),
                Action::Rotate,
            ),
            (
                "unsaved and idle under keepalive: near expiry too",
                &keep,
                600,
                unsaved(700, Idle),
                Action::Rotate,
            ),
            (
                "unsaved and idle under lapse: never mints",
                &lapse,
                650,
                unsaved(700, Idle),
                Action::Sleep { until: at(700) },
            ),
            (
                "unsaved and dead: no call at all",
                &keep,
                899,
                unsaved(100, Active),
                Action::Expired,
            ),
        ];
        for (name, plan, now, state, expected) in cases {
            assert_eq!(next_action(at(*now), *state, plan), *expected, "{name}");
        }
    }

    /// Replays the timeline that deadlocked the earlier rotator: a 90 s token, a 60 s interval,
    /// sessions gone after the first rotation. Every call the rotator makes must carry a live
    /// token; under `lapse` no call at all follows the lapse.
    fn replay(policy: IdlePolicy) -> (Vec<u64>, Option<u64>) {
        let plan = RotationPlan::new(secs(90), secs(60), policy);
        let mut token = held(0, Some(90));
        let mut rotations = Vec::new();
        let mut expired_at = None;
        let mut now = 0;
        while now <= 600 {
            let sessions = if rotations.is_empty() {
                Sessions::Active
            } else {
                Sessions::Idle
            };
            match next_action(at(now), state(token, sessions), &plan) {
                Action::Rotate => {
                    let held_token = token.unwrap();
                    assert!(
                        held_token.expires_at.unwrap() > at(now),
                        "{policy:?}: minted at +{now}s with a dead token"
                    );
                    rotations.push(now);
                    token = held(now, Some(now + 90));
                }
                Action::Sleep { until } => {
                    assert!(until > at(now));
                    now = until.duration_since(at(0)).unwrap().as_secs();
                }
                Action::Expired => {
                    expired_at.get_or_insert(now);
                    now += 15; // the caller keeps watching the config file
                }
                Action::Revoke { .. } | Action::Persist => {
                    unreachable!("no revokes or saves in this replay")
                }
            }
        }
        (rotations, expired_at)
    }

    #[test]
    fn bug_one_timeline_keepalive_never_lets_the_token_die() {
        let (rotations, expired_at) = replay(IdlePolicy::Keepalive);
        assert_eq!(expired_at, None);
        assert_eq!(rotations, [60, 120, 180, 240, 300, 360, 420, 480, 540, 600]);
    }

    #[test]
    fn bug_one_timeline_lapse_reports_expiry_without_calls() {
        let (rotations, expired_at) = replay(IdlePolicy::Lapse);
        assert_eq!(rotations, [60]);
        // The token minted at +60 s lives until +150 s; inside the guard it counts as dead.
        assert_eq!(expired_at, Some(148));
    }

    #[test]
    fn plan_scales_with_the_lifetime() {
        let default = RotationPlan::new(secs(900), secs(600), IdlePolicy::Keepalive);
        assert_eq!(default.margin, secs(300));
        assert_eq!(default.guard, secs(2));
        assert_eq!(default.backoff.base, secs(1));
        assert_eq!(default.backoff.cap, secs(60));
        let compressed = RotationPlan::new(secs(4), secs(2), IdlePolicy::Keepalive);
        assert_eq!(compressed.margin, secs(2));
        assert_eq!(compressed.guard, Duration::from_millis(500));
        assert_eq!(compressed.backoff.cap, Duration::from_millis(500));
    }
}
