//! How many client connections the proxy holds at once (`PROXY_MAX_CONNECTIONS`), and the
//! headroom it keeps past that limit so that `/health`, `/ready` and the rotation still work
//! when clients take every slot.
//!
//! Past the limit a connection is still accepted, into a small reserve: there it may ask for
//! `/health`, `/ready` or `/metrics`, and anything else gets 503 with `Retry-After`; it is
//! closed after one answer and has a short head deadline, so idle connections cannot keep the
//! reserve. Past the reserve, a connection is closed as soon as it is accepted. Accepting
//! instead of leaving connections in the kernel's queue keeps the queue moving, so a health
//! check is never stuck behind thousands of waiting connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Connections accepted past `PROXY_MAX_CONNECTIONS` to answer health checks.
pub const RESERVE_CONNECTIONS: usize = 16;

/// How long a connection in the reserve may take to send its request head.
pub(crate) const RESERVE_HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// File descriptors kept free of client connections: the listening sockets, each runtime's
/// epoll and wake-up descriptors, the config, state and lock files, sinks and the rotation's
/// own connections to the workspace.
pub const FIXED_DESCRIPTORS: u64 = 64;

/// The number of client connections to allow when `open_files` descriptors may be open:
/// `configured`, or fewer if the limit would otherwise run out. Each client connection may
/// hold a second descriptor, its upstream connection, and the reserve and the fixed
/// descriptors come first. At least one.
pub fn connection_budget(configured: usize, open_files: u64) -> usize {
    let spare = open_files.saturating_sub(FIXED_DESCRIPTORS + RESERVE_CONNECTIONS as u64) / 2;
    let spare = usize::try_from(spare).unwrap_or(usize::MAX);
    configured.min(spare).max(1)
}

/// Counts open client connections against the limit.
#[derive(Clone, Debug)]
pub(crate) struct ConnectionLimit {
    open: Arc<AtomicUsize>,
    max: usize,
}

/// Where an accepted connection goes.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Within the limit: served fully.
    Served(Slot),
    /// Past the limit, within the reserve: health checks only, one answer.
    Reserve(Slot),
    /// Past the reserve: closed at once.
    Refused,
}

/// One open connection's place in the count, given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionLimit {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            open: Arc::default(),
            max,
        }
    }

    /// Counts a newly accepted connection.
    pub(crate) fn admit(&self) -> Admission {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = Slot(self.open.clone());
        if open <= self.max {
            Admission::Served(slot)
        } else if open <= self.max + RESERVE_CONNECTIONS {
            Admission::Reserve(slot)
        } else {
            Admission::Refused
        }
    }

    /// Connections open now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_leaves_room_for_upstream_connections_and_the_reserve() {
        let cases = [
            // (configured, RLIMIT_NOFILE, allowed)
            (4096, 1_048_576, 4096),
            (4096, 65_536, 4096),
            // systemd's default soft limit, had it not been raised.
            (4096, 1024, (1024 - 64 - 16) / 2),
            (10, 1024, 10),
            (4096, 256, 88),
            (4096, 64, 1),
            (4096, 0, 1),
        ];
        for (configured, open_files, allowed) in cases {
            assert_eq!(
                connection_budget(configured, open_files),
                allowed,
                "{configured} connections, {open_files} files"
            );
        }
    }

    #[test]
    fn connections_past_the_limit_go_to_the_reserve_then_are_refused() {
        let limit = ConnectionLimit::new(2);
        let mut held = Vec::new();
        for _ in 0..2 {
            match limit.admit() {
                Admission::Served(slot) => held.push(slot),
                other => panic!("within the limit: {other:?}"),
            }
        }
        for _ in 0..RESERVE_CONNECTIONS {
            match limit.admit() {
                Admission::Reserve(slot) => held.push(slot),
                other => panic!("within the reserve: {other:?}"),
            }
        }
        assert!(matches!(limit.admit(), Admission::Refused));
        assert_eq!(
            limit.open(),
            2 + RESERVE_CONNECTIONS,
            "a refusal holds no slot"
        );
        // One count covers both: while the reserve is taken, a freed slot goes to the reserve.
        held.remove(0);
        assert!(matches!(limit.admit(), Admission::Reserve(_)));
        held.truncate(1);
        assert!(matches!(limit.admit(), Admission::Served(_)));
        drop(held);
        assert_eq!(limit.open(), 0);
    }
}
