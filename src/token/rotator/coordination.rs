//! Who rotates, and how the others learn each new token: `PAT_COORDINATION`.
//!
//! Every proxy sharing one identity is a member of a group. Exactly one member (the leader) mints
//! and revokes; every other member serves the token the leader published. [`Coordination`] is
//! that seam, with two backends:
//!
//! * [`FileCoordination`] (`file`, the default): the members are processes on one host sharing a
//!   config file. Leadership is an advisory lock next to the file ([`RotationLock`]), and the
//!   config file itself is the published record: followers watch it.
//! * [`super::etcd::EtcdCoordination`] (`etcd`): the members are anywhere. Leadership is an etcd
//!   lease on a leader key, every publication is a transaction fenced by that key, and the
//!   record is a key every member watches. `docs/FLEET.md` describes it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fresh_token::{SharedToken, Token};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::lock::RotationLock;
use super::schedule::PendingRevoke;
use super::state::{SavedRevoke, from_ms, to_ms};

/// `PAT_COORDINATION`: which backend elects the rotator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// One host: an advisory lock next to the config file.
    File,
    /// A fleet: an etcd cluster (`PAT_ETCD_*`).
    Etcd,
}

impl Backend {
    /// The name `/health` gives it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Etcd => "etcd",
        }
    }
}

/// What the leader publishes after each rotation: the token every member serves, and the tokens
/// still waiting to be revoked, so that a successor finishes them when the leader dies.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The current token.
    pub token: Token,
    /// Its id in the token API.
    pub token_id: String,
    /// When it was minted.
    pub created_at: SystemTime,
    /// When it expires, if it does.
    pub expires_at: Option<SystemTime>,
    /// Tokens minted earlier that the leader revokes once they are due.
    pub revokes: Vec<PendingRevoke>,
    /// The member that published it, for people reading the record.
    pub leader: String,
}

impl fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("token", &self.token)
            .field("token_id", &self.token_id)
            .field("expires_at", &self.expires_at)
            .field("revokes", &self.revokes.len())
            .field("leader", &self.leader)
            .finish_non_exhaustive()
    }
}

/// The record as stored: JSON, times in milliseconds since the epoch.
#[derive(Serialize, Deserialize)]
struct Wire {
    token: String,
    token_id: String,
    created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    #[serde(default)]
    revoke: Vec<SavedRevoke>,
    #[serde(default)]
    leader: String,
}

impl TokenRecord {
    /// The stored form. It holds the token: whoever can read it can use the token.
    pub fn to_bytes(&self) -> Vec<u8> {
        let wire = Wire {
            token: self.token.expose_secret().to_owned(),
            token_id: self.token_id.clone(),
            created_at_ms: to_ms(self.created_at),
            expires_at_ms: self.expires_at.map(to_ms),
            revoke: self.revokes.iter().map(SavedRevoke::from_pending).collect(),
            leader: self.leader.clone(),
        };
        serde_json::to_vec(&wire).expect("a record serialises")
    }

    /// Read a stored record; `None` when it is not one (the error never quotes the value).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let wire: Wire = serde_json::from_slice(bytes).ok()?;
        let expires_at = wire.expires_at_ms.map(from_ms);
        let token = match expires_at {
            Some(at) => Token::with_expiry(&wire.token, at).ok()?,
            None => Token::new(&wire.token).ok()?,
        };
        Some(Self {
            token,
            token_id: wire.token_id,
            created_at: from_ms(wire.created_at_ms),
            expires_at,
            revokes: wire.revoke.iter().map(SavedRevoke::pending).collect(),
            leader: wire.leader,
        })
    }
}

/// Why a record was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Another member leads now (or no one does): this member must not mint, publish or
    /// revoke any more.
    #[error("this member no longer leads")]
    Deposed,
    /// The backend could not be asked, or did not answer in time; whether the write landed is
    /// unknown.
    #[error("{0}")]
    Unavailable(String),
}

/// The seam between the rotator and whatever elects it. See the module documentation.
pub trait Coordination: Send + Sync + fmt::Debug {
    /// Which backend this is.
    fn backend(&self) -> Backend;

    /// This member's name, as records and logs give it.
    fn member(&self) -> &str;

    /// Start any background work (keeping a lease alive, watching the record) until `cancel`.
    /// `current` is the token this member serves, for a backend that must ask who it belongs
    /// to.
    fn start(&mut self, _cancel: CancellationToken, _current: SharedToken) {}

    /// Become or stay the leader, without waiting: `Ok(true)` while this member leads, so it
    /// may mint, publish and revoke. An error is a local fault a person must fix (a lock file
    /// that cannot be opened); an unreachable backend is no error, it is [`Self::unreachable`].
    fn poll_leadership(&mut self) -> std::io::Result<bool>;

    /// Publish `record` as the group's current token, only while this member leads.
    fn publish<'a>(
        &'a mut self,
        record: &'a TokenRecord,
    ) -> BoxFuture<'a, Result<(), PublishError>>;

    /// The newest record the group has, if this backend carries records (etcd); the file
    /// backend's record is the config file, which the rotator reads itself.
    fn published(&self) -> Option<TokenRecord>;

    /// Why the backend cannot be reached now, while it cannot.
    fn unreachable(&self) -> Option<String>;

    /// Hand leadership over at shutdown, so another member takes over at once.
    fn resign(&mut self) -> BoxFuture<'_, ()>;
}

/// `PAT_COORDINATION=file`: one rotator per config file on this host.
#[derive(Debug)]
pub struct FileCoordination {
    path: PathBuf,
    lock: Option<RotationLock>,
    member: String,
}

impl FileCoordination {
    /// Coordinate through the lock file at `path`.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            lock: None,
            member: format!("pid-{}", std::process::id()),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Coordination for FileCoordination {
    fn backend(&self) -> Backend {
        Backend::File
    }

    fn member(&self) -> &str {
        &self.member
    }

    fn poll_leadership(&mut self) -> std::io::Result<bool> {
        if self.lock.is_none() {
            self.lock = RotationLock::try_acquire(&self.path)?;
        }
        Ok(self.lock.is_some())
    }

    fn publish<'a>(
        &'a mut self,
        _record: &'a TokenRecord,
    ) -> BoxFuture<'a, Result<(), PublishError>> {
        // The config file is the record, written by the rotator; the lock is never lost while
        // this process lives.
        Box::pin(async move {
            match self.lock {
                Some(_) => Ok(()),
                None => Err(PublishError::Deposed),
            }
        })
    }

    fn published(&self) -> Option<TokenRecord> {
        None
    }

    fn unreachable(&self) -> Option<String> {
        None
    }

    fn resign(&mut self) -> BoxFuture<'_, ()> {
        self.lock = None;
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn a_record_survives_its_stored_form_and_never_prints_its_token() {
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        let record = TokenRecord {
            token: Token::with_expiry("dapi-secret-value", at(2_000)).unwrap(),
            token_id: "tok-7".to_owned(),
            created_at: at(1_000),
            expires_at: Some(at(2_000)),
            revokes: vec![PendingRevoke {
                token_id: "tok-6".to_owned(),
                due: at(1_030),
                expires_at: Some(at(1_900)),
            }],
            leader: "host-a-1".to_owned(),
        };
        let back = TokenRecord::from_bytes(&record.to_bytes()).expect("a record");
        assert_eq!(back, record);
        assert_eq!(back.token.expires_at(), Some(at(2_000)));
        let shown = format!("{record:?}");
        assert!(!shown.contains("dapi-secret-value"), "{shown}");
        assert!(shown.contains("tok-7"), "{shown}");

        assert!(TokenRecord::from_bytes(b"not json").is_none());
        assert!(
            TokenRecord::from_bytes(br#"{"token":"","token_id":"x","created_at_ms":1}"#).is_none()
        );
    }

    #[test]
    fn the_file_backend_leads_while_it_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cfg.lock");
        let mut first = FileCoordination::new(&path);
        let mut second = FileCoordination::new(&path);
        assert!(first.poll_leadership().unwrap());
        assert!(!second.poll_leadership().unwrap());
        assert!(first.poll_leadership().unwrap(), "a held lock stays held");
        let record =
            TokenRecord::from_bytes(br#"{"token":"dapi-x","token_id":"t","created_at_ms":1}"#)
                .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(rt.block_on(first.publish(&record)).is_ok());
        assert!(matches!(
            rt.block_on(second.publish(&record)),
            Err(PublishError::Deposed)
        ));
        rt.block_on(first.resign());
        assert!(
            second.poll_leadership().unwrap(),
            "resigning frees the lock"
        );
    }
}
