//! The rotator's decisions besides the schedule, as pure functions of what it knows and `now`:
//! which token to start from, how to react to a failed mint, and when to adopt a token another
//! member published. The engine does the I/O around them.

use std::time::{Duration, SystemTime};

use crate::databricks::backoff::Backoff;
use crate::databricks::error::ErrorKind;
use crate::health::metrics::RotationResult;

/// What a member knows when it becomes the rotator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartInputs {
    /// The group's published record (etcd): its expiry, `Some(None)` for a token that never
    /// expires; `None` when there is no record.
    pub published: Option<Option<SystemTime>>,
    /// The state file says this proxy minted the config file's token and it is still live.
    pub saved_in_file: bool,
    /// The config file holds a token.
    pub file_token: bool,
    /// `DATABRICKS_TOKEN` is set.
    pub env_token: bool,
    /// The config file's token is one this proxy minted that has expired since.
    pub file_minted_expired: bool,
}

/// Which token the new rotator starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The group's published record: another member minted it; this one carries on.
    Published,
    /// The token this proxy minted, found in the config file (id and expiry from the state file).
    Saved,
    /// `DATABRICKS_TOKEN`.
    Env,
    /// The config file's token; `minted` when the state file still knows it (an expired token
    /// of ours, not a bootstrap token of unknown expiry).
    File {
        /// Known to the state file.
        minted: bool,
    },
    /// Nothing: wait for a token to appear.
    Nothing,
}

/// The starting token: the group's record while it has at least `alive_for` left (a fleet has
/// one current token, whoever minted it), then what the single-host rotator always preferred:
/// its own minted token, `DATABRICKS_TOKEN`, the config file.
pub fn start_token(now: SystemTime, inputs: StartInputs, alive_for: Duration) -> Start {
    let live = |expires_at: Option<SystemTime>| expires_at.is_none_or(|at| at > now + alive_for);
    match inputs {
        StartInputs {
            published: Some(expires_at),
            ..
        } if live(expires_at) => Start::Published,
        StartInputs {
            saved_in_file: true,
            file_token: true,
            ..
        } => Start::Saved,
        StartInputs {
            env_token: true, ..
        } => Start::Env,
        StartInputs {
            file_token: true,
            file_minted_expired,
            ..
        } => Start::File {
            minted: file_minted_expired,
        },
        _ => Start::Nothing,
    }
}

/// How a mint failed, as far as the decision is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MintFailure {
    /// The class of the token API's answer.
    pub kind: ErrorKind,
    /// The answer's `Retry-After`, if any.
    pub retry_after: Option<Duration>,
}

/// What SCIM `Me` said of the token after a refused mint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The token is accepted: this user may not create tokens.
    Accepted,
    /// The token is refused too: it is dead.
    Refused,
    /// No answer; retry, not before `retry_after`.
    Unknown {
        /// The probe's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
}

/// The reaction to a failed mint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reaction {
    /// Ask SCIM `Me` whether the token still works, then call [`after_probe`].
    Probe,
    /// Try again at `at`.
    Retry {
        /// When.
        at: SystemTime,
        /// What `/metrics` counts for this attempt.
        result: RotationResult,
    },
    /// The token is dead: make no more calls with it until a new one appears.
    Dead,
}

/// After a failed mint (attempt number `attempts`, 0 for the first): a transient failure backs
/// off, honouring `Retry-After`; a refusal needs a probe to tell "may not" from "dead"; a bad
/// request waits the longest delay, since only a change of settings or permissions helps.
pub fn after_failed_mint(
    now: SystemTime,
    failure: MintFailure,
    attempts: u32,
    backoff: Backoff,
    jitter: f64,
) -> Reaction {
    match failure.kind {
        ErrorKind::Transient => Reaction::Retry {
            at: now + backoff.delay(attempts, jitter, failure.retry_after),
            result: RotationResult::Failed,
        },
        ErrorKind::Auth | ErrorKind::Permission => Reaction::Probe,
        ErrorKind::BadRequest => Reaction::Retry {
            at: now + backoff.cap,
            result: RotationResult::Failed,
        },
    }
}

/// After the probe that followed a refused mint.
pub fn after_probe(
    now: SystemTime,
    probe: Probe,
    attempts: u32,
    backoff: Backoff,
    jitter: f64,
) -> Reaction {
    match probe {
        Probe::Accepted => Reaction::Retry {
            at: now + backoff.cap,
            result: RotationResult::Refused,
        },
        Probe::Refused => Reaction::Dead,
        Probe::Unknown { retry_after } => Reaction::Retry {
            at: now + backoff.delay(attempts, jitter, retry_after),
            result: RotationResult::Refused,
        },
    }
}

/// What a member holds, for [`adopt_published`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldView<'a> {
    /// Its token id, when known.
    pub token_id: Option<&'a str>,
    /// Whether its secret is the published one.
    pub same_secret: bool,
}

/// Whether a member that does not lead adopts the group's record: when it is a different token
/// and not expired. An expired record is never adopted (the member keeps whatever it has, which
/// is no worse); one with the same secret is already held.
pub fn adopt_published(
    now: SystemTime,
    held: Option<HeldView<'_>>,
    published_id: &str,
    published_expires_at: Option<SystemTime>,
) -> bool {
    if published_expires_at.is_some_and(|at| at <= now) {
        return false;
    }
    match held {
        None => true,
        Some(held) => !held.same_secret || held.token_id != Some(published_id),
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    const BACKOFF: Backoff = Backoff {
        base: Duration::from_secs(2),
        cap: Duration::from_secs(300),
    };

    #[test]
    fn start_token_table() {
        let now = at(1_000);
        let guard = Duration::from_secs(60);
        let none = StartInputs::default();
        let cases = [
            ("nothing at all", none, Start::Nothing),
            (
                "a live record wins over everything local",
                StartInputs {
                    published: Some(Some(at(2_000))),
                    saved_in_file: true,
                    file_token: true,
                    env_token: true,
                    ..none
                },
                Start::Published,
            ),
            (
                "a record that never expires",
                StartInputs {
                    published: Some(None),
                    ..none
                },
                Start::Published,
            ),
            (
                "a record inside the guard is passed over",
                StartInputs {
                    published: Some(Some(at(1_059))),
                    file_token: true,
                    ..none
                },
                Start::File { minted: false },
            ),
            (
                "an expired record falls back to DATABRICKS_TOKEN",
                StartInputs {
                    published: Some(Some(at(900))),
                    env_token: true,
                    ..none
                },
                Start::Env,
            ),
            (
                "our minted token in the file beats DATABRICKS_TOKEN",
                StartInputs {
                    saved_in_file: true,
                    file_token: true,
                    env_token: true,
                    ..none
                },
                Start::Saved,
            ),
            (
                "a state file without the token in the config file",
                StartInputs {
                    saved_in_file: true,
                    env_token: true,
                    ..none
                },
                Start::Env,
            ),
            (
                "DATABRICKS_TOKEN beats a bootstrap token in the file",
                StartInputs {
                    file_token: true,
                    env_token: true,
                    ..none
                },
                Start::Env,
            ),
            (
                "an expired token of ours keeps its known expiry",
                StartInputs {
                    file_token: true,
                    file_minted_expired: true,
                    ..none
                },
                Start::File { minted: true },
            ),
        ];
        for (name, inputs, expected) in cases {
            assert_eq!(start_token(now, inputs, guard), expected, "{name}");
        }
    }

    #[test]
    fn failed_mint_table() {
        let now = at(1_000);
        let failure = |kind, retry_after| MintFailure { kind, retry_after };
        let cases = [
            (
                "transient: backoff, jitter 0 gives half the step",
                failure(ErrorKind::Transient, None),
                0,
                Reaction::Retry {
                    at: at(1_001),
                    result: RotationResult::Failed,
                },
            ),
            (
                "transient, third attempt",
                failure(ErrorKind::Transient, None),
                2,
                Reaction::Retry {
                    at: at(1_004),
                    result: RotationResult::Failed,
                },
            ),
            (
                "Retry-After raises the delay",
                failure(ErrorKind::Transient, Some(Duration::from_secs(30))),
                0,
                Reaction::Retry {
                    at: at(1_030),
                    result: RotationResult::Failed,
                },
            ),
            (
                "401 needs a probe",
                failure(ErrorKind::Auth, None),
                0,
                Reaction::Probe,
            ),
            (
                "403 needs a probe",
                failure(ErrorKind::Permission, None),
                3,
                Reaction::Probe,
            ),
            (
                "a bad request waits the cap",
                failure(ErrorKind::BadRequest, None),
                0,
                Reaction::Retry {
                    at: at(1_300),
                    result: RotationResult::Failed,
                },
            ),
        ];
        for (name, failure, attempts, expected) in cases {
            assert_eq!(
                after_failed_mint(now, failure, attempts, BACKOFF, 0.0),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn probe_table() {
        let now = at(1_000);
        let cases = [
            (
                "accepted: may not create tokens, retry at the cap",
                Probe::Accepted,
                Reaction::Retry {
                    at: at(1_300),
                    result: RotationResult::Refused,
                },
            ),
            ("refused too: dead", Probe::Refused, Reaction::Dead),
            (
                "no answer: backoff",
                Probe::Unknown { retry_after: None },
                Reaction::Retry {
                    at: at(1_001),
                    result: RotationResult::Refused,
                },
            ),
            (
                "no answer with Retry-After",
                Probe::Unknown {
                    retry_after: Some(Duration::from_secs(9)),
                },
                Reaction::Retry {
                    at: at(1_009),
                    result: RotationResult::Refused,
                },
            ),
        ];
        for (name, probe, expected) in cases {
            assert_eq!(after_probe(now, probe, 0, BACKOFF, 0.0), expected, "{name}");
        }
    }

    #[test]
    fn adopt_published_table() {
        let now = at(1_000);
        let held = |token_id, same_secret| {
            Some(HeldView {
                token_id,
                same_secret,
            })
        };
        let cases = [
            ("nothing held", None, Some(at(2_000)), true),
            (
                "a different token",
                held(Some("a"), false),
                Some(at(2_000)),
                true,
            ),
            (
                "the same token",
                held(Some("b"), true),
                Some(at(2_000)),
                false,
            ),
            (
                "the same secret without its id yet: learn the id",
                held(None, true),
                Some(at(2_000)),
                true,
            ),
            (
                "an expired record",
                held(Some("a"), false),
                Some(at(1_000)),
                false,
            ),
            ("expired, nothing held", None, Some(at(999)), false),
            (
                "a record that never expires",
                held(Some("a"), false),
                None,
                true,
            ),
        ];
        for (name, held, expires_at, expected) in cases {
            assert_eq!(
                adopt_published(now, held, "b", expires_at),
                expected,
                "{name}"
            );
        }
    }
}
