//! [`ConfigFileToken`]: the token of one profile of a Databricks config file.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use crate::databrickscfg;
use crate::source::{RefreshFuture, TokenSource};
use crate::token::Token;

/// The `token` of one profile of a Databricks config file, kept current as the file changes.
///
/// A lookup costs at most one `stat`: lookups within [`stat_interval`](Self::stat_interval) of
/// each other (1 ms by default) share one, because a `stat` costs more than a microsecond on some
/// virtual machines. The file is re-read only when its identity changed (modification time with
/// nanoseconds, size, inode and device), or when the last read is older than the TTL, a backstop
/// for file systems with coarse timestamps. Concurrent callers that notice the same change share
/// one re-read. A request that still carries the previous token in that window is what
/// [`TokenSource::refresh`] is for: it re-reads the file at once.
///
/// A file that is empty, half-written, unparsable, or whose profile lost its token never takes
/// the token away: the last good token stays, and a warning is logged once per change of the
/// file.
///
/// ```
/// use std::time::Duration;
/// use fresh_token::{ConfigFileToken, TokenSource};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let path = dir.path().join(".databrickscfg");
/// std::fs::write(&path, "[DEFAULT]\ntoken = dapi-first\n")?;
/// // Every lookup checks the file here, so the example needs no pauses.
/// let source = ConfigFileToken::new(&path, "DEFAULT").stat_interval(Duration::ZERO);
/// assert_eq!(source.current().unwrap().expose_secret(), "dapi-first");
///
/// std::fs::write(&path, "[DEFAULT]\ntoken = dapi-second-and-longer\n")?;
/// assert_eq!(source.current().unwrap().expose_secret(), "dapi-second-and-longer");
///
/// std::fs::write(&path, "")?; // torn: the last good token stays
/// assert_eq!(source.current().unwrap().expose_secret(), "dapi-second-and-longer");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ConfigFileToken {
    inner: Arc<Inner>,
    ttl: Duration,
    stat_interval: Duration,
}

struct Inner {
    path: PathBuf,
    profile: String,
    /// Origin of `last_stat_nanos`.
    epoch: Instant,
    last_stat_nanos: AtomicU64,
    cache: ArcSwap<Cached>,
    reload: Mutex<()>,
    reads: AtomicU64,
}

struct Cached {
    identity: Option<FileIdentity>,
    read_at: Option<Instant>,
    token: Option<Token>,
}

/// What identifies one version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileIdentity {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    device: u64,
}

impl FileIdentity {
    fn of(path: &Path) -> Option<Self> {
        let meta = fs::metadata(path).ok()?;
        #[cfg(unix)]
        let (inode, device) = {
            use std::os::unix::fs::MetadataExt;
            (meta.ino(), meta.dev())
        };
        #[cfg(not(unix))]
        let (inode, device) = (0, 0);
        Some(Self {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode,
            device,
        })
    }
}

impl ConfigFileToken {
    /// The default time after which the file is re-read even when its identity looks unchanged.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

    /// The default window within which lookups share one `stat` of the file.
    pub const DEFAULT_STAT_INTERVAL: Duration = Duration::from_millis(1);

    /// Follow the `token` of `profile` in the file at `path`. Nothing is read until the first
    /// lookup.
    pub fn new(path: impl Into<PathBuf>, profile: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                path: path.into(),
                profile: profile.into(),
                epoch: Instant::now(),
                last_stat_nanos: AtomicU64::new(0),
                cache: ArcSwap::from_pointee(Cached {
                    identity: None,
                    read_at: None,
                    token: None,
                }),
                reload: Mutex::new(()),
                reads: AtomicU64::new(0),
            }),
            ttl: Self::DEFAULT_TTL,
            stat_interval: Self::DEFAULT_STAT_INTERVAL,
        }
    }

    /// Re-read the file at least this often even when its identity looks unchanged.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Let lookups within `interval` of each other share one `stat` (default 1 ms; zero makes
    /// every lookup `stat` the file).
    #[must_use]
    pub fn stat_interval(mut self, interval: Duration) -> Self {
        self.stat_interval = interval;
        self
    }

    /// The file this source follows.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How many times the file has been read so far.
    pub fn reads(&self) -> u64 {
        self.inner.reads.load(Ordering::Relaxed)
    }

    /// The lookup behind [`TokenSource::current`], at a given instant.
    pub fn current_at(&self, now: Instant) -> Option<Token> {
        let since_epoch = now.saturating_duration_since(self.inner.epoch).as_nanos() as u64;
        let last_stat = self.inner.last_stat_nanos.load(Ordering::Relaxed);
        let cached = self.inner.cache.load();
        if since_epoch.saturating_sub(last_stat) < self.stat_interval.as_nanos() as u64
            && cached
                .read_at
                .is_some_and(|at| now.saturating_duration_since(at) < self.ttl)
        {
            return cached.token.clone();
        }
        self.inner
            .last_stat_nanos
            .fetch_max(since_epoch, Ordering::Relaxed);
        let identity = FileIdentity::of(&self.inner.path);
        if is_fresh(&cached, identity, now, self.ttl) {
            return cached.token.clone();
        }
        drop(cached);
        let _reload = self.inner.reload.lock().unwrap_or_else(|e| e.into_inner());
        // Another caller may have re-read while we waited for the lock.
        let cached = self.inner.cache.load();
        if is_fresh(&cached, identity, now, self.ttl) {
            return cached.token.clone();
        }
        drop(cached);
        self.inner.reload(identity, now)
    }
}

fn is_fresh(cached: &Cached, identity: Option<FileIdentity>, now: Instant, ttl: Duration) -> bool {
    cached.identity == identity
        && cached
            .read_at
            .is_some_and(|read_at| now.saturating_duration_since(read_at) < ttl)
}

impl Inner {
    /// Read the file and update the cache. Callers hold `self.reload`.
    fn reload(&self, identity: Option<FileIdentity>, now: Instant) -> Option<Token> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let previous = self.cache.load_full();
        let changed = previous.identity != identity || previous.read_at.is_none();
        let token = match databrickscfg::read_profile(&self.path, &self.profile) {
            Ok(profile) if profile.token.is_some() => profile.token,
            Ok(_) => {
                if changed {
                    tracing::warn!(
                        path = %self.path.display(),
                        profile = %self.profile,
                        "config file profile has no token; keeping the last good token"
                    );
                }
                previous.token.clone()
            }
            Err(err) => {
                if changed {
                    tracing::warn!(error = %err, "config file unreadable; keeping the last good token");
                }
                previous.token.clone()
            }
        };
        self.cache.store(Arc::new(Cached {
            identity,
            read_at: Some(now),
            token: token.clone(),
        }));
        token
    }
}

impl ConfigFileToken {
    /// Re-read the file now, whatever its identity: what [`TokenSource::refresh`] does, as a
    /// plain blocking call for a background task that keeps file reads off the request path.
    pub fn read_now(&self) -> Option<Token> {
        let _reload = self.inner.reload.lock().unwrap_or_else(|e| e.into_inner());
        let identity = FileIdentity::of(&self.inner.path);
        self.inner.reload(identity, Instant::now())
    }
}

impl TokenSource for ConfigFileToken {
    fn current(&self) -> Option<Token> {
        self.current_at(Instant::now())
    }

    /// Re-read the file now, whatever its identity, unless another caller already found a
    /// token other than `rejected`. The read is a small synchronous file read.
    fn refresh<'a>(&'a self, rejected: &'a Token) -> RefreshFuture<'a> {
        RefreshFuture::new(async move {
            let _reload = self.inner.reload.lock().unwrap_or_else(|e| e.into_inner());
            let cached = self.inner.cache.load_full();
            if let Some(token) = cached.token.as_ref().filter(|t| !t.same_secret(rejected)) {
                return Some(token.clone());
            }
            let identity = FileIdentity::of(&self.inner.path);
            self.inner
                .reload(identity, Instant::now())
                .filter(|token| !token.same_secret(rejected))
        })
    }
}

impl fmt::Debug for ConfigFileToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigFileToken")
            .field("path", &self.inner.path)
            .field("profile", &self.inner.profile)
            .field("ttl", &self.ttl)
            .field("stat_interval", &self.stat_interval)
            .field("reads", &self.reads())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Barrier;

    fn config(token: &str) -> String {
        format!("[other]\ntoken = dapi-other\n\n[DEFAULT]\nhost = https://h\ntoken = {token}\n")
    }

    fn setup(token: &str) -> (tempfile::TempDir, PathBuf, ConfigFileToken) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".databrickscfg");
        fs::write(&path, config(token)).unwrap();
        let source = ConfigFileToken::new(&path, "DEFAULT").stat_interval(Duration::ZERO);
        (dir, path, source)
    }

    fn secret(source: &ConfigFileToken) -> Option<String> {
        source.current().map(|t| t.expose_secret().to_owned())
    }

    /// Pin the modification time so that only the content (or size) tells the versions apart.
    fn set_mtime(path: &Path, secs: i64, nanos: u32) {
        filetime::set_file_mtime(path, filetime::FileTime::from_unix_time(secs, nanos)).unwrap();
    }

    #[test]
    fn lookups_do_not_reread_an_unchanged_file() {
        let (_dir, _path, source) = setup("dapi-aaaa");
        for _ in 0..100 {
            assert_eq!(secret(&source).as_deref(), Some("dapi-aaaa"));
        }
        assert_eq!(source.reads(), 1);
    }

    #[test]
    fn sees_an_in_place_rewrite() {
        let (_dir, path, source) = setup("dapi-aaaa");
        set_mtime(&path, 1_700_000_000, 0);
        assert_eq!(secret(&source).as_deref(), Some("dapi-aaaa"));
        // Same length, same inode, only the nanoseconds of the mtime differ.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all(config("dapi-bbbb").as_bytes()).unwrap();
        drop(file);
        set_mtime(&path, 1_700_000_000, 1);
        assert_eq!(secret(&source).as_deref(), Some("dapi-bbbb"));
    }

    #[test]
    fn sees_an_atomic_rename() {
        let (dir, path, source) = setup("dapi-aaaa");
        set_mtime(&path, 1_700_000_000, 0);
        assert_eq!(secret(&source).as_deref(), Some("dapi-aaaa"));
        let staged = dir.path().join("staged");
        fs::write(&staged, config("dapi-bbbb")).unwrap();
        set_mtime(&staged, 1_700_000_000, 0); // same mtime and size: only the inode differs
        fs::rename(&staged, &path).unwrap();
        assert_eq!(secret(&source).as_deref(), Some("dapi-bbbb"));
    }

    #[test]
    fn sees_two_rewrites_within_one_second() {
        let (_dir, path, source) = setup("dapi-aaaa");
        set_mtime(&path, 1_700_000_000, 0);
        assert_eq!(secret(&source).as_deref(), Some("dapi-aaaa"));
        for (nanos, token) in [(100, "dapi-bbbb"), (200, "dapi-cccc")] {
            fs::write(&path, config(token)).unwrap();
            set_mtime(&path, 1_700_000_000, nanos);
            assert_eq!(secret(&source).as_deref(), Some(token));
        }
        assert_eq!(source.reads(), 3);
    }

    #[test]
    fn a_torn_file_keeps_the_last_good_token() {
        let (_dir, path, source) = setup("dapi-good");
        assert_eq!(secret(&source).as_deref(), Some("dapi-good"));
        let torn = [
            String::new(),
            "[other]\ntoken = dapi-other\n\n[DEF".to_owned(),
            "[other]\ntoken = dapi-other\n\n[DEFAULT]\nhost = https://h\n".to_owned(),
            "[DEFAULT]\ntoken = dapi half\n".to_owned(),
            "\u{0}\u{1}binary".to_owned(),
        ];
        for (i, text) in torn.iter().enumerate() {
            fs::write(&path, text).unwrap();
            set_mtime(&path, 1_700_000_100 + i as i64, 0);
            assert_eq!(
                secret(&source).as_deref(),
                Some("dapi-good"),
                "torn case {i}"
            );
        }
        fs::remove_file(&path).unwrap();
        assert_eq!(
            secret(&source).as_deref(),
            Some("dapi-good"),
            "missing file"
        );
        fs::write(&path, config("dapi-next")).unwrap();
        assert_eq!(secret(&source).as_deref(), Some("dapi-next"));
    }

    #[test]
    fn ttl_backstop_rereads_a_file_whose_identity_did_not_change() {
        let (_dir, path, source) = setup("dapi-aaaa");
        let source = source.ttl(Duration::from_secs(10));
        set_mtime(&path, 1_700_000_000, 0);
        let t0 = Instant::now();
        assert_eq!(source.current_at(t0).unwrap().expose_secret(), "dapi-aaaa");
        // A rewrite that keeps inode, size and mtime: invisible to the identity check.
        let mut file = fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all(config("dapi-bbbb").as_bytes()).unwrap();
        drop(file);
        set_mtime(&path, 1_700_000_000, 0);
        let before_ttl = t0 + Duration::from_secs(9);
        assert_eq!(
            source.current_at(before_ttl).unwrap().expose_secret(),
            "dapi-aaaa"
        );
        let after_ttl = t0 + Duration::from_secs(10);
        assert_eq!(
            source.current_at(after_ttl).unwrap().expose_secret(),
            "dapi-bbbb"
        );
        assert_eq!(source.reads(), 2);
    }

    #[test]
    fn concurrent_lookups_after_a_change_share_one_reread() {
        let (_dir, path, source) = setup("dapi-aaaa");
        assert_eq!(secret(&source).as_deref(), Some("dapi-aaaa"));
        fs::write(&path, config("dapi-bbbbbbbb")).unwrap();
        let reads_before = source.reads();
        let barrier = Barrier::new(32);
        std::thread::scope(|scope| {
            for _ in 0..32 {
                scope.spawn(|| {
                    barrier.wait();
                    assert_eq!(secret(&source).as_deref(), Some("dapi-bbbbbbbb"));
                });
            }
        });
        assert_eq!(source.reads() - reads_before, 1);
    }

    #[tokio::test]
    async fn refresh_rereads_and_offers_only_a_different_token() {
        let (_dir, path, source) = setup("dapi-aaaa");
        set_mtime(&path, 1_700_000_000, 0);
        let rejected = source.current().unwrap();
        assert_eq!(source.refresh(&rejected).await, None);
        // Invisible to the identity check: only a forced refresh can see it.
        let mut file = fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all(config("dapi-bbbb").as_bytes()).unwrap();
        drop(file);
        set_mtime(&path, 1_700_000_000, 0);
        let fresh = source.refresh(&rejected).await.unwrap();
        assert_eq!(fresh.expose_secret(), "dapi-bbbb");
        assert_eq!(secret(&source).as_deref(), Some("dapi-bbbb"));
    }

    #[test]
    fn lookups_within_the_stat_interval_share_one_stat() {
        let (_dir, path, source) = setup("dapi-aaaa");
        let source = source.stat_interval(Duration::from_millis(5));
        let t0 = Instant::now();
        assert_eq!(source.current_at(t0).unwrap().expose_secret(), "dapi-aaaa");
        fs::write(&path, config("dapi-bbbbbbbb")).unwrap();
        let within = t0 + Duration::from_millis(4);
        assert_eq!(
            source.current_at(within).unwrap().expose_secret(),
            "dapi-aaaa"
        );
        let after = t0 + Duration::from_millis(5);
        assert_eq!(
            source.current_at(after).unwrap().expose_secret(),
            "dapi-bbbbbbbb"
        );
    }

    #[test]
    fn debug_shows_no_token() {
        let (_dir, _path, source) = setup("dapi-secret-value");
        source.current();
        assert!(!format!("{source:?}").contains("dapi-secret-value"));
    }
}
