//! `PROXY_BODY_BUDGET`: the bytes of request bodies held in memory at once, across requests.
//!
//! A JSON body is read whole so that the filter can rewrite it, and it stays in memory until it
//! has gone upstream (and while a rate-limited request waits to be sent again). Filtering needs
//! up to about twice the body's size on top (docs/DEPLOYMENT.md gives the measured peaks), so
//! without a bound across requests a handful of large bodies at once can take the process past
//! any memory limit. Each buffered body takes its size from the budget while it lives, and a
//! JSON body [`FILTER_PEAK`] times its size while it is read and filtered; a body that does not
//! fit gets 503 with `Retry-After` and is not forwarded.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What a JSON body is counted as, in multiples of its size, from the start of reading it until
/// the filter is done: the body and the filter's peak on top (measured at 2.0× to 3.1× of the
/// body for chat requests of 26 MB, see `tests/filter_peak_memory.rs`).
pub(crate) const FILTER_PEAK: usize = 3;

/// The shared budget. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct BodyBudget {
    total: usize,
    in_use: Arc<AtomicUsize>,
}

/// The budget would be exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Exhausted;

impl BodyBudget {
    /// A budget of `total` bytes.
    pub(crate) fn new(total: usize) -> Self {
        Self {
            total,
            in_use: Arc::default(),
        }
    }

    /// The budget in bytes.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Bytes taken now.
    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }

    /// An empty share of the budget, to grow as a body arrives.
    pub(crate) fn share(&self) -> BudgetShare {
        BudgetShare {
            budget: self.clone(),
            bytes: 0,
        }
    }

    fn take(&self, bytes: usize) -> Result<(), Exhausted> {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |in_use| {
                in_use
                    .checked_add(bytes)
                    .filter(|after| *after <= self.total)
            })
            .map(|_| ())
            .map_err(|_| Exhausted)
    }
}

/// Bytes of the budget held by one body; given back when dropped.
#[derive(Debug)]
pub(crate) struct BudgetShare {
    budget: BodyBudget,
    bytes: usize,
}

impl BudgetShare {
    /// Makes the share at least `bytes`.
    pub(crate) fn cover(&mut self, bytes: usize) -> Result<(), Exhausted> {
        let more = bytes.saturating_sub(self.bytes);
        if more > 0 {
            self.budget.take(more)?;
            self.bytes = bytes;
        }
        Ok(())
    }
}

impl BudgetShare {
    /// Gives back all of the share above `bytes`.
    pub(crate) fn shrink_to(&mut self, bytes: usize) {
        let less = self.bytes.saturating_sub(bytes);
        if less > 0 {
            self.budget.in_use.fetch_sub(less, Ordering::AcqRel);
            self.bytes = bytes;
        }
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        self.budget.in_use.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_fit_within_the_budget_and_come_back_when_dropped() {
        let budget = BodyBudget::new(100);
        let mut a = budget.share();
        a.cover(60).unwrap();
        a.cover(40).unwrap(); // already covered
        let mut b = budget.share();
        assert_eq!(b.cover(41), Err(Exhausted));
        assert_eq!(budget.in_use(), 60, "a refused share takes nothing");
        b.cover(40).unwrap();
        assert_eq!(budget.in_use(), 100);
        assert_eq!(a.cover(61), Err(Exhausted));
        drop(a);
        assert_eq!(budget.in_use(), 40);
        b.cover(100).unwrap();
        b.shrink_to(30);
        assert_eq!(budget.in_use(), 30);
        b.shrink_to(50);
        assert_eq!(budget.in_use(), 30, "shrinking never grows");
        drop(b);
        assert_eq!(budget.in_use(), 0);
        assert_eq!(budget.share().cover(usize::MAX), Err(Exhausted));
    }
}
