//! The state file next to the config file: what this proxy minted, so that a restart resumes.
//!
//! It holds token ids, times and a short fingerprint of the current token (the first 64 bits of
//! its SHA-256, enough to tell whether the config file still holds that token), never a token
//! value.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fresh_token::Token;
use fresh_token::small_file::{self, Links};
use serde::{Deserialize, Serialize};

use super::schedule::PendingRevoke;

/// The state file of the config file at `config_file`: `<name>.fresh-proxy.json` beside it.
pub fn state_path(config_file: &Path) -> PathBuf {
    sibling(config_file, "fresh-proxy.json")
}

/// The lock file of the config file at `config_file`: `<name>.fresh-proxy.lock` beside it.
pub fn lock_path(config_file: &Path) -> PathBuf {
    sibling(config_file, "fresh-proxy.lock")
}

fn sibling(config_file: &Path, suffix: &str) -> PathBuf {
    let name = config_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| ".databrickscfg".to_owned());
    config_file.with_file_name(format!("{name}.{suffix}"))
}

/// A short, one-way fingerprint of a token: tells two tokens apart without revealing either.
pub fn fingerprint(token: &Token) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.expose_secret().as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The state file's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// Format version.
    #[serde(default = "version")]
    pub version: u32,
    /// The profile the tokens belong to.
    #[serde(default)]
    pub profile: String,
    /// The token minted last, normally the one in the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<SavedToken>,
    /// The token `current` replaced, while the new one is being written to the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<SavedToken>,
    /// Tokens minted here and not yet revoked.
    #[serde(default)]
    pub revoke: Vec<SavedRevoke>,
}

fn version() -> u32 {
    1
}

/// A minted token, without its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedToken {
    /// Token id.
    pub token_id: String,
    /// [`fingerprint`] of its value.
    pub fingerprint: String,
    /// Creation, milliseconds since the epoch.
    pub created_at_ms: u64,
    /// Expiry, milliseconds since the epoch (absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// A token waiting to be revoked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRevoke {
    /// Token id.
    pub token_id: String,
    /// When it is due, milliseconds since the epoch.
    pub due_at_ms: u64,
    /// Its expiry, milliseconds since the epoch (absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// Milliseconds since the epoch.
pub fn to_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The instant `ms` milliseconds after the epoch.
pub fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl SavedRevoke {
    /// As the scheduler sees it.
    pub fn pending(&self) -> PendingRevoke {
        PendingRevoke {
            token_id: self.token_id.clone(),
            due: from_ms(self.due_at_ms),
            expires_at: self.expires_at_ms.map(from_ms),
        }
    }

    /// From the scheduler's view.
    pub fn from_pending(revoke: &PendingRevoke) -> Self {
        Self {
            token_id: revoke.token_id.clone(),
            due_at_ms: to_ms(revoke.due),
            expires_at_ms: revoke.expires_at.map(to_ms),
        }
    }
}

/// Read the state file. A missing file is an empty state; an unreadable or unparsable one is an
/// error (the caller logs it and starts empty), and so is a link, a FIFO or anything but a
/// regular file of at most 1 MiB: only this program writes it, always as a regular file.
pub fn load(path: &Path) -> io::Result<Option<SavedState>> {
    match small_file::read(path, Links::Refuse) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Write the state file atomically, mode 0600.
pub fn save(path: &Path, state: &SavedState) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    bytes.push(b'\n');
    fresh_token::databrickscfg::write_atomic(path, &bytes, Some(0o600))
}

/// What a starting rotator takes over from the state file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// The config file's token is one this proxy minted and it is still live: its id and
    /// expiry.
    pub current: Option<SavedToken>,
    /// Tokens minted earlier that still need revoking (due times kept; the earlier current
    /// token, when the config file no longer holds it, is due now).
    pub revokes: Vec<PendingRevoke>,
}

/// Take over `saved` at `now`, given the fingerprint of the config file's token. Pure.
///
/// `alive_for` is how long a token must still live to be worth resuming with (the scheduler's
/// guard).
pub fn resume(
    now: SystemTime,
    saved: Option<&SavedState>,
    profile: &str,
    file_fingerprint: Option<&str>,
    alive_for: Duration,
) -> Resumed {
    let Some(saved) = saved.filter(|s| s.profile == profile) else {
        return Resumed {
            current: None,
            revokes: Vec::new(),
        };
    };
    let live =
        |expires_at_ms: Option<u64>| expires_at_ms.is_none_or(|ms| from_ms(ms) > now + alive_for);
    let mut revokes: Vec<PendingRevoke> = saved
        .revoke
        .iter()
        .filter(|r| live(r.expires_at_ms))
        .map(SavedRevoke::pending)
        .collect();
    // The config file holds `current` normally, or `previous` after a crash between minting
    // and writing the file. The other one is of no use to anyone: it is revoked now.
    let candidates = [&saved.current, &saved.previous];
    let current = candidates
        .iter()
        .filter_map(|t| t.as_ref())
        .find(|t| file_fingerprint == Some(t.fingerprint.as_str()) && live(t.expires_at_ms))
        .cloned();
    for orphan in candidates.into_iter().flatten() {
        let in_use = current
            .as_ref()
            .is_some_and(|c| c.token_id == orphan.token_id);
        if !in_use
            && live(orphan.expires_at_ms)
            && !revokes.iter().any(|r| r.token_id == orphan.token_id)
        {
            revokes.push(PendingRevoke {
                token_id: orphan.token_id.clone(),
                due: now,
                expires_at: orphan.expires_at_ms.map(from_ms),
            });
        }
    }
    Resumed { current, revokes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(secs: u64) -> u64 {
        (1_000_000 + secs) * 1000
    }

    fn at(secs: u64) -> SystemTime {
        from_ms(ms(secs))
    }

    fn saved(current_expiry: u64, revokes: &[(&str, u64, u64)]) -> SavedState {
        SavedState {
            version: 1,
            profile: "DEFAULT".to_owned(),
            current: Some(SavedToken {
                token_id: "cur".to_owned(),
                fingerprint: "f00d".to_owned(),
                created_at_ms: ms(0),
                expires_at_ms: Some(ms(current_expiry)),
            }),
            previous: None,
            revoke: revokes
                .iter()
                .map(|(id, due, expires)| SavedRevoke {
                    token_id: (*id).to_owned(),
                    due_at_ms: ms(*due),
                    expires_at_ms: Some(ms(*expires)),
                })
                .collect(),
        }
    }

    fn ids(revokes: &[PendingRevoke]) -> Vec<&str> {
        revokes.iter().map(|r| r.token_id.as_str()).collect()
    }

    #[test]
    fn resume_table() {
        let guard = Duration::from_secs(2);
        let state = saved(900, &[("old", 630, 700), ("older", 30, 100)]);
        struct Case<'a> {
            name: &'a str,
            now: u64,
            saved: Option<&'a SavedState>,
            profile: &'a str,
            file: Option<&'a str>,
            current: bool,
            revokes: &'a [&'a str],
        }
        let cases = [
            Case {
                name: "no state file",
                now: 10,
                saved: None,
                profile: "DEFAULT",
                file: Some("f00d"),
                current: false,
                revokes: &[],
            },
            Case {
                name: "file holds our live token: resume, keep the pending revoke",
                now: 620,
                saved: Some(&state),
                profile: "DEFAULT",
                file: Some("f00d"),
                current: true,
                revokes: &["old"],
            },
            Case {
                name: "file holds another token: ours is revoked now",
                now: 620,
                saved: Some(&state),
                profile: "DEFAULT",
                file: Some("beef"),
                current: false,
                revokes: &["old", "cur"],
            },
            Case {
                name: "our token expired: nothing to resume or revoke",
                now: 899,
                saved: Some(&state),
                profile: "DEFAULT",
                file: Some("f00d"),
                current: false,
                revokes: &[],
            },
            Case {
                name: "another profile's state is not ours",
                now: 620,
                saved: Some(&state),
                profile: "staging",
                file: Some("f00d"),
                current: false,
                revokes: &[],
            },
        ];
        for case in cases {
            let resumed = resume(at(case.now), case.saved, case.profile, case.file, guard);
            assert_eq!(resumed.current.is_some(), case.current, "{}", case.name);
            assert_eq!(ids(&resumed.revokes), case.revokes, "{}", case.name);
        }
        // A crash after minting, before the config file was written: the file still holds the
        // previous token, which is resumed; the new one is revoked now.
        let mut crashed = state.clone();
        crashed.previous = Some(SavedToken {
            token_id: "prev".to_owned(),
            fingerprint: "beef".to_owned(),
            created_at_ms: ms(0),
            expires_at_ms: Some(ms(800)),
        });
        let resumed = resume(at(620), Some(&crashed), "DEFAULT", Some("beef"), guard);
        assert_eq!(resumed.current.unwrap().token_id, "prev");
        assert_eq!(ids(&resumed.revokes), ["old", "cur"]);
        let resumed = resume(at(620), Some(&crashed), "DEFAULT", Some("f00d"), guard);
        assert_eq!(resumed.current.unwrap().token_id, "cur");
        assert_eq!(ids(&resumed.revokes), ["old", "prev"]);

        let resumed = resume(at(620), Some(&state), "DEFAULT", Some("beef"), guard);
        assert_eq!(resumed.revokes[0].due, at(630), "due time kept");
        assert_eq!(resumed.revokes[1].due, at(620), "orphan due now");
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        let a = Token::new("dapi-aaaa").unwrap();
        let fp = fingerprint(&a);
        assert_eq!(fp.len(), 16);
        assert_eq!(fp, fingerprint(&Token::new("dapi-aaaa").unwrap()));
        assert_ne!(fp, fingerprint(&Token::new("dapi-aaab").unwrap()));
        assert!(!fp.contains("aaaa"));
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(&dir.path().join(".databrickscfg"));
        assert!(path.ends_with(".databrickscfg.fresh-proxy.json"));
        assert_eq!(load(&path).unwrap(), None);
        let state = saved(900, &[("old", 630, 700)]);
        save(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), Some(state));
        std::fs::write(&path, "{not json").unwrap();
        assert!(load(&path).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn a_link_in_place_of_the_state_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(&dir.path().join(".databrickscfg"));
        let elsewhere = dir.path().join("elsewhere.json");
        save(&elsewhere, &saved(900, &[])).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.to_string().contains("symbolic links"), "{err}");
    }
}
