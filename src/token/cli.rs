//! `databricks-cli` auth: U2M tokens from `databricks auth token`, which `databricks auth login`
//! set up.
//!
//! The CLI refreshes its tokens with single-use refresh tokens: two refreshes that overlap
//! break the whole token family and log every user of the profile out. So every refresh, in
//! this process and across processes, holds a lock file beside the config file, one per
//! (host, profile). Under the lock the CLI is first asked without `--force-refresh`: when
//! another process refreshed while this one waited, the CLI's cache hands out that new token
//! and nothing is refreshed twice. Only when the cached token is the one held (or rejected)
//! does a `--force-refresh` follow, on CLI versions that have it.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fresh_token::Token;
use tokio::sync::OnceCell;

use crate::databricks::cli::{self, CLI_TIMEOUT, CliTarget, CliVersion};
use crate::databricks::{ApiError, ErrorKind};
use crate::token::refreshing::{Fetch, Fetched};

/// How long a refresh waits for another process's refresh before it gives up (and retries).
pub const LOCK_WAIT: Duration = Duration::from_secs(120);

/// A cached token with less life than this is not taken without asking for a new one.
const MIN_USEFUL: Duration = Duration::from_secs(5);

/// Tokens from the Databricks CLI.
#[derive(Debug)]
pub struct CliFetcher {
    target: CliTarget,
    lock_path: PathBuf,
    version: OnceCell<Option<CliVersion>>,
}

impl CliFetcher {
    /// Tokens for `target`, refreshed under a lock file beside `config_file`.
    pub fn new(target: CliTarget, config_file: &Path) -> Self {
        let lock_path = lock_path(config_file, &target);
        Self {
            target,
            lock_path,
            version: OnceCell::new(),
        }
    }

    /// The cross-process lock file.
    pub fn lock_path(&self) -> &Path {
        &self.lock_path
    }

    /// `databricks version`, once; `None` when it cannot be told (then no version-gated flag
    /// is used, as the SDKs do).
    async fn version(&self) -> Option<CliVersion> {
        *self
            .version
            .get_or_init(|| async {
                let cmd = [self.target.cli_path.clone(), "version".to_owned()];
                match cli::run("databricks version", &cmd, CLI_TIMEOUT).await {
                    Ok(out) => {
                        let version = cli::parse_version(&String::from_utf8_lossy(&out));
                        if version.is_none() {
                            tracing::warn!("cannot tell the Databricks CLI's version; using neither --profile nor --force-refresh");
                        }
                        version
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot tell the Databricks CLI's version; using neither --profile nor --force-refresh");
                        None
                    }
                }
            })
            .await
    }

    async fn token(&self, version: Option<CliVersion>, force: bool) -> Result<Fetched, ApiError> {
        let cmd = self.target.token_command(version, force);
        let out = cli::run("databricks auth token", &cmd, CLI_TIMEOUT).await?;
        let parsed = cli::parse_token_output(&out)
            .map_err(|err| ApiError::new(ErrorKind::Transient, "databricks auth token", err))?;
        Ok(Fetched {
            token: parsed.token,
            expiry: parsed.expiry,
        })
    }
}

impl Fetch for CliFetcher {
    async fn fetch(&self, current: Option<Token>) -> Result<Fetched, ApiError> {
        let version = self.version().await;
        let _lock = CliLock::acquire(&self.lock_path, LOCK_WAIT).await?;
        let cached = self.token(version, false).await?;
        let left = cached
            .expiry
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let new = current
            .as_ref()
            .is_none_or(|held| !held.same_secret(&cached.token));
        if new && left > MIN_USEFUL {
            return Ok(cached);
        }
        if version >= Some(cli::VERSION_FOR_FORCE_REFRESH) {
            return self.token(version, true).await;
        }
        // An older CLI refreshes only near expiry, by itself: take what it has.
        if left.is_zero() {
            return Err(ApiError::new(
                ErrorKind::Transient,
                "databricks auth token",
                "the CLI handed out an expired token and is too old for --force-refresh",
            ));
        }
        Ok(cached)
    }

    fn action(&self) -> String {
        format!("run: {}", self.target.login_command())
    }
}

/// The lock file for `target`'s refreshes: beside the config file, one per (host, profile).
pub fn lock_path(config_file: &Path, target: &CliTarget) -> PathBuf {
    let key = format!(
        "{}\n{}",
        target.host.trim_end_matches('/'),
        target.profile.as_deref().unwrap_or("")
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let short: String = digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = config_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| ".databrickscfg".to_owned());
    config_file.with_file_name(format!("{name}.fresh-proxy-cli-{short}.lock"))
}

/// The held refresh lock; released on drop (or when the process dies).
#[derive(Debug)]
struct CliLock {
    _file: File,
}

impl CliLock {
    /// Wait up to `wait` for the lock at `path`.
    async fn acquire(path: &Path, wait: Duration) -> Result<Self, ApiError> {
        const CALL: &str = "refresh lock";
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|err| {
                ApiError::new(
                    ErrorKind::BadRequest,
                    CALL,
                    format!("cannot open {}: {err}", path.display()),
                )
            })?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { _file: file }),
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(err)) => {
                    return Err(ApiError::new(
                        ErrorKind::Transient,
                        CALL,
                        format!("{}: {err}", path.display()),
                    ));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::new(
                    ErrorKind::Transient,
                    CALL,
                    format!(
                        "another process has held {} for {} s",
                        path.display(),
                        wait.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lock_per_host_and_profile() {
        let cfg = Path::new("/home/me/.databrickscfg");
        let target = |profile: Option<&str>, host: &str| CliTarget {
            cli_path: "databricks".to_owned(),
            profile: profile.map(str::to_owned),
            host: host.to_owned(),
        };
        let a = lock_path(cfg, &target(Some("dev"), "https://h"));
        assert_eq!(a.parent(), Some(Path::new("/home/me")));
        assert!(
            a.to_string_lossy()
                .contains(".databrickscfg.fresh-proxy-cli-")
        );
        assert_eq!(a, lock_path(cfg, &target(Some("dev"), "https://h/")));
        assert_ne!(a, lock_path(cfg, &target(Some("prod"), "https://h")));
        assert_ne!(a, lock_path(cfg, &target(None, "https://h")));
    }

    #[tokio::test]
    async fn the_lock_waits_for_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = CliLock::acquire(&path, Duration::from_secs(1))
            .await
            .unwrap();
        let err = CliLock::acquire(&path, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
        let waiter = tokio::spawn({
            let path = path.clone();
            async move { CliLock::acquire(&path, Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        waiter.await.unwrap().expect("taken once released");
    }
}
