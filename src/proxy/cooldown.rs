//! When a rate-limited upstream endpoint may be asked again: the pure decisions behind
//! [`super::rate_limit`], with `now` passed in.
//!
//! After a 429 the endpoint *cools down* until the time its `Retry-After` names, or else for a
//! capped exponential backoff with jitter. Every request to that endpoint waits for the end of
//! the cooldown, whichever request saw the 429; the waiting ones are then let out one per
//! [`RateLimitPolicy::spacing`], in the order they claimed their turn, so that a cooldown
//! does not end in a stampede that earns the next one. A 429 that arrives meanwhile starts a new
//! cooldown, and every turn claimed in the old one is claimed again behind it.

use std::time::{Duration, Instant, SystemTime};

/// How long requests may wait, and how they are spread out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RateLimitPolicy {
    /// How long one request may wait in all, across cooldowns (`PROXY_RATE_LIMIT_WAIT`).
    pub(crate) max_wait: Duration,
    /// The first backoff when a 429 names no `Retry-After`.
    pub(crate) backoff_base: Duration,
    /// The longest backoff.
    pub(crate) backoff_cap: Duration,
    /// The gap between requests let out after a cooldown.
    pub(crate) spacing: Duration,
}

impl RateLimitPolicy {
    /// The policy for `PROXY_RATE_LIMIT_WAIT = max_wait`.
    pub(crate) fn new(max_wait: Duration) -> Self {
        Self {
            max_wait,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            spacing: Duration::from_millis(25),
        }
    }

    /// The backoff after `strikes` 429s in a row without `Retry-After` (the first is 1):
    /// doubling from the base, capped, and then drawn from its upper half by `jitter` in
    /// `[0, 1)`, so that processes that saw the same 429 do not come back together.
    pub(crate) fn backoff(&self, strikes: u32, jitter: f64) -> Duration {
        let doubled = self
            .backoff_base
            .saturating_mul(1u32 << strikes.saturating_sub(1).min(16));
        let full = doubled.min(self.backoff_cap);
        full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// What a request should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Send now.
    Go,
    /// Sleep until `at`, then ask again, holding `ticket`.
    Wait { at: Instant, ticket: Ticket },
    /// The endpoint will not take it before its deadline: answer 429 with `Retry-After`.
    GiveUp { retry_after: Duration },
}

/// A turn claimed during one cooldown. It stays good while no new cooldown starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    epoch: u64,
}

/// The cooldown of one upstream endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cooldown {
    /// Nothing goes out before this.
    until: Option<Instant>,
    /// The next free turn after `until`.
    next_turn: Option<Instant>,
    /// 429s in a row without `Retry-After`, counting one per cooldown.
    strikes: u32,
    /// Counts cooldowns, so that turns claimed in an earlier one are known to be stale.
    epoch: u64,
}

impl Cooldown {
    /// When a request may go out, asked at `now`. `deadline` is the latest it may leave;
    /// `ticket` is the turn it was told to wait for, if any.
    pub(crate) fn turn(
        &mut self,
        now: Instant,
        deadline: Instant,
        ticket: Option<Ticket>,
        policy: &RateLimitPolicy,
    ) -> Turn {
        let Some(until) = self.until else {
            return Turn::Go;
        };
        if ticket.is_some_and(|ticket| ticket.epoch == self.epoch) {
            return Turn::Go;
        }
        let at = self.next_turn.unwrap_or(until).max(until);
        if at <= now {
            // Cooled down and nobody queued: back to normal.
            self.until = None;
            self.next_turn = None;
            return Turn::Go;
        }
        if at > deadline {
            return Turn::GiveUp {
                retry_after: at - now,
            };
        }
        self.next_turn = Some(at + policy.spacing);
        Turn::Wait {
            at,
            ticket: Ticket { epoch: self.epoch },
        }
    }

    /// A 429 arrived at `now`, with `Retry-After` of `retry_after` if it had a valid one.
    /// Returns when the cooldown now ends. `jitter` in `[0, 1)` spreads the backoff.
    pub(crate) fn rate_limited(
        &mut self,
        now: Instant,
        retry_after: Option<Duration>,
        jitter: f64,
        policy: &RateLimitPolicy,
    ) -> Instant {
        let cooling = self.until.is_some_and(|until| until > now);
        let pause = match retry_after {
            Some(pause) => pause,
            None => {
                // 429s of requests that were already under way when the cooldown began answer
                // the same overload: only the first of them backs off further.
                if !cooling {
                    self.strikes = self.strikes.saturating_add(1);
                }
                policy.backoff(self.strikes.max(1), jitter)
            }
        };
        if retry_after.is_some() {
            self.strikes = 0;
        }
        let end = now + pause;
        if self.until.is_none_or(|until| end > until) {
            self.until = Some(end);
            self.next_turn = None;
            self.epoch += 1;
        }
        self.until.unwrap_or(end)
    }

    /// An answer other than 429 arrived: the endpoint takes requests again.
    pub(crate) fn answered(&mut self) {
        self.strikes = 0;
    }

    /// Whether this cooldown is over and nobody holds a turn in it: it can be forgotten.
    pub(crate) fn is_idle(&self, now: Instant) -> bool {
        let last = self.next_turn.max(self.until);
        self.strikes == 0 && last.is_none_or(|last| last <= now)
    }

    /// Whether a cooldown is running at `now`.
    pub(crate) fn is_cooling(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| until > now)
    }
}

/// `Retry-After` as delay-seconds (`"120"`) or an HTTP date, as a pause from `now`. A date in
/// the past is no pause; anything else that does not parse is `None` (back off instead).
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A pause as whole seconds for `Retry-After`, rounded up and at least 1.
pub(crate) fn retry_after_secs(pause: Duration) -> u64 {
    let secs = pause.as_secs() + u64::from(pause.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RateLimitPolicy {
        RateLimitPolicy::new(Duration::from_secs(60))
    }

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let in_90s = httpdate::fmt_http_date(now + Duration::from_secs(90));
        let ago = httpdate::fmt_http_date(now - Duration::from_secs(5));
        let cases: [(&str, Option<Duration>); 8] = [
            ("1", Some(S)),
            (" 120 ", Some(120 * S)),
            ("0", Some(Duration::ZERO)),
            (&in_90s, Some(90 * S)),
            (&ago, Some(Duration::ZERO)),
            ("1.5", None),
            ("-3", None),
            ("soon", None),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_retry_after(value, now), expected, "{value:?}");
        }
    }

    #[test]
    fn retry_after_seconds_round_up() {
        for (pause, secs) in [
            (Duration::ZERO, 1),
            (300 * MS, 1),
            (S, 1),
            (S + MS, 2),
            (59 * S, 59),
        ] {
            assert_eq!(retry_after_secs(pause), secs, "{pause:?}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_within_its_upper_half() {
        let p = policy();
        for (strikes, low, high) in [
            (1, 500 * MS, S),
            (2, S, 2 * S),
            (3, 2 * S, 4 * S),
            (5, 8 * S, 16 * S),
            (6, 15 * S, 30 * S),
            (40, 15 * S, 30 * S),
        ] {
            assert_eq!(p.backoff(strikes, 0.0), low, "{strikes}");
            assert_eq!(p.backoff(strikes, 1.0), high, "{strikes}");
            let mid = p.backoff(strikes, 0.5);
            assert!(low < mid && mid < high, "{strikes}: {mid:?}");
        }
    }

    #[test]
    fn no_cooldown_lets_everything_go() {
        let now = Instant::now();
        let mut c = Cooldown::default();
        assert_eq!(c.turn(now, now, None, &policy()), Turn::Go);
        assert!(c.is_idle(now));
    }

    #[test]
    fn waiters_are_let_out_one_per_spacing_after_retry_after() {
        let p = policy();
        let t0 = Instant::now();
        let deadline = t0 + 60 * S;
        let mut c = Cooldown::default();
        assert_eq!(c.rate_limited(t0, Some(S), 0.3, &p), t0 + S);
        let mut turns = Vec::new();
        for i in 0..4 {
            match c.turn(t0 + i * MS, deadline, None, &p) {
                Turn::Wait { at, ticket } => turns.push((at, ticket)),
                other => panic!("{other:?}"),
            }
        }
        let times: Vec<_> = turns.iter().map(|(at, _)| *at - t0).collect();
        assert_eq!(times, [S, S + 25 * MS, S + 50 * MS, S + 75 * MS]);
        // Each goes at its turn, holding its ticket, even if the others have not gone yet.
        let (at, ticket) = turns[2];
        assert_eq!(c.turn(at, deadline, Some(ticket), &p), Turn::Go);
        // A newcomer queues behind them, and once the queue has passed, nobody waits.
        assert!(matches!(c.turn(t0 + S, deadline, None, &p),
            Turn::Wait { at, .. } if at == t0 + S + 100 * MS));
        assert_eq!(c.turn(t0 + 2 * S, deadline, None, &p), Turn::Go);
        assert!(c.is_idle(t0 + 2 * S));
    }

    #[test]
    fn a_new_429_sends_every_ticket_behind_the_new_cooldown() {
        let p = policy();
        let t0 = Instant::now();
        let deadline = t0 + 60 * S;
        let mut c = Cooldown::default();
        c.rate_limited(t0, Some(S), 0.0, &p);
        let Turn::Wait { ticket, .. } = c.turn(t0, deadline, None, &p) else {
            panic!("should wait");
        };
        // The first one out is refused again, for 2 s more.
        assert_eq!(c.rate_limited(t0 + S, Some(2 * S), 0.0, &p), t0 + 3 * S);
        assert!(matches!(c.turn(t0 + S, deadline, Some(ticket), &p),
            Turn::Wait { at, .. } if at == t0 + 3 * S));
    }

    #[test]
    fn a_shorter_retry_after_does_not_cut_a_cooldown_short() {
        let p = policy();
        let t0 = Instant::now();
        let mut c = Cooldown::default();
        c.rate_limited(t0, Some(10 * S), 0.0, &p);
        assert_eq!(c.rate_limited(t0 + S, Some(S), 0.0, &p), t0 + 10 * S);
        assert!(c.is_cooling(t0 + 9 * S));
    }

    #[test]
    fn past_the_deadline_gives_up_with_the_time_left() {
        let p = policy();
        let t0 = Instant::now();
        let mut c = Cooldown::default();
        c.rate_limited(t0, Some(30 * S), 0.0, &p);
        assert_eq!(
            c.turn(t0 + 10 * S, t0 + 15 * S, None, &p),
            Turn::GiveUp {
                retry_after: 20 * S
            }
        );
        // Giving up claims no turn.
        assert!(matches!(c.turn(t0 + 10 * S, t0 + 60 * S, None, &p),
            Turn::Wait { at, .. } if at == t0 + 30 * S));
    }

    #[test]
    fn backoff_grows_once_per_cooldown_and_resets_on_an_answer() {
        let p = policy();
        let t0 = Instant::now();
        let mut c = Cooldown::default();
        // A burst of 429s from requests already under way: one strike.
        let end = c.rate_limited(t0, None, 0.0, &p);
        assert_eq!(end, t0 + 500 * MS);
        for i in 1..20 {
            c.rate_limited(t0 + i * MS, None, 0.0, &p);
        }
        assert_eq!(c.strikes, 1);
        // The first request out after it is refused again: the second strike doubles.
        assert_eq!(c.rate_limited(t0 + S, None, 0.0, &p), t0 + 2 * S);
        assert_eq!(c.strikes, 2);
        c.answered();
        assert_eq!(
            c.rate_limited(t0 + 5 * S, None, 0.0, &p),
            t0 + 5 * S + 500 * MS
        );
        // A Retry-After is taken as it is and clears the strikes.
        assert_eq!(c.rate_limited(t0 + 6 * S, Some(3 * S), 0.9, &p), t0 + 9 * S);
        assert_eq!(c.strikes, 0);
    }
}
