//! Follower mode (`PAT_ROTATION=off`): another process rotates the token and writes it to the
//! config file; this one publishes what it finds there.
//!
//! The file is read on a background task, never on the request path: a config file on a hung
//! network home directory, or a FIFO in its place, must not hold up every request and `/health`
//! with it. Requests read the published token, an atomic load; a request whose token the
//! upstream rejected wakes the task for an immediate re-read and waits for it, bounded.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fresh_token::{ConfigFileToken, RefreshFuture, SharedToken, Token, TokenSource};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// How long a rejected request waits for the re-read it asked for.
const REFRESH_WAIT: Duration = Duration::from_secs(2);

/// A read taking longer than this is reported (once per read).
const SLOW_READ: Duration = Duration::from_secs(5);

/// The background half: reads the config file and publishes its token.
pub struct FileFollower {
    file: ConfigFileToken,
    shared: SharedToken,
    wake: Arc<Notify>,
    /// Counts the reads done on request: each starts after the request that woke it.
    reads: watch::Sender<u64>,
    poll: Duration,
}

/// The request half: the published token, else `DATABRICKS_TOKEN`.
#[derive(Clone)]
pub struct FollowerSource {
    shared: SharedToken,
    fallback: Option<Token>,
    wake: Arc<Notify>,
    reads: watch::Receiver<u64>,
}

impl FileFollower {
    /// Follow `file`, looking at it every `poll`, with `fallback` served while it holds no
    /// token. The first read happens here, before the proxy serves; the returned source
    /// answers from memory from then on.
    pub fn new(
        file: ConfigFileToken,
        fallback: Option<Token>,
        poll: Duration,
    ) -> (Self, FollowerSource) {
        let shared = SharedToken::new();
        if let Some(token) = file.current() {
            shared.publish(token);
        }
        let wake = Arc::new(Notify::new());
        let (reads, read_seen) = watch::channel(0);
        let source = FollowerSource {
            shared: shared.clone(),
            fallback,
            wake: wake.clone(),
            reads: read_seen,
        };
        let follower = Self {
            file,
            shared,
            wake,
            reads,
            poll,
        };
        (follower, source)
    }

    /// Read the file every `poll`, or at once when a request asks, until `cancel` fires. A
    /// read that hangs holds up only this task.
    pub async fn run(self, cancel: CancellationToken) {
        let mut forced = false;
        loop {
            let file = self.file.clone();
            let mut read = tokio::task::spawn_blocking(move || {
                if forced {
                    file.read_now()
                } else {
                    file.current()
                }
            });
            let found = tokio::select! {
                found = tokio::time::timeout(SLOW_READ, &mut read) => match found {
                    Ok(found) => found,
                    Err(_) => {
                        tracing::warn!(
                            config_file = %self.file.path().display(),
                            waited_s = SLOW_READ.as_secs(),
                            "reading the config file is taking long; requests keep the token published last"
                        );
                        tokio::select! {
                            found = read => found,
                            () = cancel.cancelled() => return,
                        }
                    }
                },
                () = cancel.cancelled() => return,
            };
            if let Ok(Some(token)) = found
                && !self.shared.current().is_some_and(|t| t.same_secret(&token))
            {
                tracing::info!("following the config file: new token published");
                self.shared.publish(token);
            }
            if forced {
                self.reads.send_modify(|n| *n += 1);
            }
            forced = tokio::select! {
                () = tokio::time::sleep(self.poll) => false,
                () = self.wake.notified() => true,
                () = cancel.cancelled() => return,
            };
        }
    }
}

impl TokenSource for FollowerSource {
    fn current(&self) -> Option<Token> {
        self.shared.current().or_else(|| self.fallback.clone())
    }

    /// A token other than `rejected` if one is published; else ask the background task to read
    /// the file at once and wait for that read, up to 2 s.
    fn refresh<'a>(&'a self, rejected: &'a Token) -> RefreshFuture<'a> {
        if let Some(token) = self.current().filter(|t| !t.same_secret(rejected)) {
            return RefreshFuture::ready(Some(token));
        }
        let mut reads = self.reads.clone();
        RefreshFuture::new(async move {
            reads.mark_unchanged();
            self.wake.notify_one();
            let _ = tokio::time::timeout(REFRESH_WAIT, reads.changed()).await;
            self.current().filter(|t| !t.same_secret(rejected))
        })
    }
}

impl fmt::Debug for FileFollower {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileFollower")
            .field("file", &self.file.path())
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for FollowerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FollowerSource")
            .field("shared", &self.shared)
            .field("fallback", &self.fallback.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Instant;

    fn write(path: &Path, token: &str) {
        std::fs::write(
            path,
            format!("[DEFAULT]\nhost = https://h\ntoken = {token}\n"),
        )
        .unwrap();
    }

    fn secret(source: &FollowerSource) -> Option<String> {
        source.current().map(|t| t.expose_secret().to_owned())
    }

    #[tokio::test]
    async fn publishes_new_tokens_and_answers_lookups_from_memory_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".databrickscfg");
        write(&path, "dapi-first");
        let file = ConfigFileToken::new(&path, "DEFAULT").stat_interval(Duration::ZERO);
        let reader = file.clone();
        let (follower, source) = FileFollower::new(file, None, Duration::from_millis(20));
        assert_eq!(secret(&source).as_deref(), Some("dapi-first"));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(follower.run(cancel.clone()));

        write(&path, "dapi-second-longer");
        let deadline = Instant::now() + Duration::from_secs(10);
        while secret(&source).as_deref() != Some("dapi-second-longer") {
            assert!(
                Instant::now() < deadline,
                "the new token was never published"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // A FIFO with no writer in place of the file: a plain read would block until someone
        // writes to it. Lookups keep answering at once with the token published last.
        std::fs::remove_file(&path).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        for _ in 0..100 {
            assert_eq!(secret(&source).as_deref(), Some("dapi-second-longer"));
        }
        assert!(started.elapsed() < Duration::from_millis(500));
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops promptly")
            .unwrap();

        // Lookups never touch the file: with the task stopped, a new token there stays unseen.
        std::fs::remove_file(&path).unwrap();
        write(&path, "dapi-third");
        let reads = reader.reads();
        for _ in 0..10 {
            assert_eq!(secret(&source).as_deref(), Some("dapi-second-longer"));
        }
        assert_eq!(reader.reads(), reads);
    }

    #[tokio::test]
    async fn a_rejected_token_wakes_an_immediate_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".databrickscfg");
        write(&path, "dapi-aaaa");
        let file = ConfigFileToken::new(&path, "DEFAULT");
        let env = Token::new("dapi-env").unwrap();
        // A poll far longer than the test: only the wake-up can find the new token.
        let (follower, source) = FileFollower::new(file, Some(env), Duration::from_secs(3600));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(follower.run(cancel.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rejected = source.current().unwrap();
        assert_eq!(source.refresh(&rejected).await, None);

        // Same length and, likely, the same mtime second: the cached identity may not see it.
        write(&path, "dapi-bbbb");
        let fresh = source.refresh(&rejected).await.expect("re-read on request");
        assert_eq!(fresh.expose_secret(), "dapi-bbbb");
        assert_eq!(secret(&source).as_deref(), Some("dapi-bbbb"));
        cancel.cancel();
        task.await.unwrap();
    }

    #[test]
    fn the_environment_serves_while_the_file_has_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".databrickscfg");
        std::fs::write(&path, "[DEFAULT]\nhost = https://h\n").unwrap();
        let env = Token::new("dapi-env").unwrap();
        let file = ConfigFileToken::new(&path, "DEFAULT");
        let (_follower, source) = FileFollower::new(file, Some(env), Duration::from_secs(1));
        assert_eq!(secret(&source).as_deref(), Some("dapi-env"));
        assert!(!format!("{source:?}").contains("dapi-env"));
    }
}
