//! Which tokens minted here to revoke when the token in use or the token in the files changes:
//! a pure rule, so that tokens that never reached the files do not pile up while the files
//! cannot be written.
//!
//! A minted token is in use by this process (the held token), by the readers of the config
//! file and sinks (the token in the files), or by no one. One that falls out of both is
//! revoked after `PAT_REVOKE_GRACE`, so that requests still carrying it finish. While the files
//! cannot be written the two differ: the files keep the last token that reached them, which
//! stays alive for their readers, while each token minted meanwhile is revoked as soon as a
//! newer one replaces it.

use std::time::{Duration, SystemTime};

use super::schedule::PendingRevoke;

/// A token minted here, as far as revoking it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MintedRef {
    /// Token id.
    pub token_id: String,
    /// Its expiry, if known.
    pub expires_at: Option<SystemTime>,
}

/// Who uses which minted token.
#[derive(Clone, Copy, Debug, Default)]
pub struct Users<'a> {
    /// The token this process injects, if minted here.
    pub held: Option<&'a MintedRef>,
    /// The token the config file and sinks hold, if minted here.
    pub in_files: Option<&'a MintedRef>,
}

impl Users<'_> {
    fn uses(&self, token_id: &str) -> bool {
        [self.held, self.in_files]
            .into_iter()
            .flatten()
            .any(|t| t.token_id == token_id)
    }
}

/// The tokens that `before` used and `after` does not, each due for revoking at `now + grace`
/// (unless it will have expired by itself by then: nothing to revoke).
pub fn no_longer_used(
    now: SystemTime,
    grace: Duration,
    before: Users<'_>,
    after: Users<'_>,
) -> Vec<PendingRevoke> {
    let due = now + grace;
    let mut revokes: Vec<PendingRevoke> = Vec::new();
    for token in [before.held, before.in_files].into_iter().flatten() {
        let dropped = !after.uses(&token.token_id);
        let seen = revokes.iter().any(|r| r.token_id == token.token_id);
        let lives = token.expires_at.is_none_or(|at| at > due);
        if dropped && !seen && lives {
            revokes.push(PendingRevoke {
                token_id: token.token_id.clone(),
                due,
                expires_at: token.expires_at,
            });
        }
    }
    revokes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn minted(id: &str, expires: u64) -> MintedRef {
        MintedRef {
            token_id: id.to_owned(),
            expires_at: Some(at(expires)),
        }
    }

    #[test]
    fn no_longer_used_table() {
        let (a, b, c) = (minted("a", 900), minted("b", 1_500), minted("c", 2_100));
        let short = minted("short", 610);
        let users = |held, in_files| Users { held, in_files };
        let cases: &[(&str, Users<'_>, Users<'_>, &[&str])] = &[
            (
                "saved rotation: the previous token goes",
                users(Some(&a), Some(&a)),
                users(Some(&b), Some(&b)),
                &["a"],
            ),
            (
                "unsaved rotation: the files keep theirs, nothing goes",
                users(Some(&a), Some(&a)),
                users(Some(&b), Some(&a)),
                &[],
            ),
            (
                "unsaved again: the token that never reached the files goes",
                users(Some(&b), Some(&a)),
                users(Some(&c), Some(&a)),
                &["b"],
            ),
            (
                "saved at last: the files' old token goes",
                users(Some(&c), Some(&a)),
                users(Some(&c), Some(&c)),
                &["a"],
            ),
            (
                "saved rotation after an unsaved one: both old tokens go",
                users(Some(&b), Some(&a)),
                users(Some(&c), Some(&c)),
                &["b", "a"],
            ),
            (
                "from a bootstrap token: nothing minted before",
                users(None, None),
                users(Some(&a), None),
                &[],
            ),
            (
                "a token someone else put in the files replaces ours",
                users(Some(&b), Some(&a)),
                users(None, None),
                &["b", "a"],
            ),
            (
                "a token that expires within the grace is left to expire",
                users(Some(&short), Some(&short)),
                users(Some(&b), Some(&b)),
                &[],
            ),
        ];
        for (name, before, after, expected) in cases {
            let revokes = no_longer_used(at(600), Duration::from_secs(30), *before, *after);
            let ids: Vec<&str> = revokes.iter().map(|r| r.token_id.as_str()).collect();
            assert_eq!(ids, *expected, "{name}");
            assert!(revokes.iter().all(|r| r.due == at(630)), "{name}");
        }
    }
}
