//! The rotator's background task: the I/O around [`next_action`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use fresh_token::databrickscfg::{self, ConfigFileError};
use fresh_token::{ConfigFileToken, SharedToken, Token, TokenSource};
use tokio_util::sync::CancellationToken;

use crate::health::metrics::{Metrics, RotationResult};
use crate::token::status::{Activity, SourceKind, StatusCell};

use super::RotatorConfig;
use super::lock::RotationLock;
use super::persistence::{self, MintedRef, Users};
use super::schedule::{
    Action, HeldToken, PendingRevoke, RotationPlan, ScheduleState, Sessions, next_action,
    prune_revokes,
};
use super::sessions::SessionProbe;
use super::sinks::{SinkOutcome, SinkPermissions};
use super::state::{self, SavedRevoke, SavedState, SavedToken, fingerprint, from_ms, to_ms};
use crate::databricks::ApiError;
use crate::databricks::error::ErrorKind;
use crate::databricks::token_api::{Deleted, MintedToken, TokenApi};

/// Where the held token came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// Minted by this proxy (now or before a restart): its id and expiry are known.
    Minted,
    /// `DATABRICKS_TOKEN`.
    Env,
    /// The config file.
    File,
}

#[derive(Clone, Debug)]
struct Held {
    token: Token,
    token_id: Option<String>,
    obtained_at: SystemTime,
    expires_at: Option<SystemTime>,
    origin: Origin,
    dead: bool,
}

/// What is known about the bootstrap token's id, for `PAT_REVOKE_BOOTSTRAP`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Bootstrap {
    NotChecked,
    Identified(String),
    Unidentifiable,
}

pub(super) struct Engine {
    pub(super) config: RotatorConfig,
    pub(super) shared: SharedToken,
    pub(super) file: ConfigFileToken,
    plan: RotationPlan,
    /// How often to look at the lock, the config file and the sessions between decisions.
    poll: Duration,
    api: TokenApi,
    probe: SessionProbe,
    status: StatusCell,
    metrics: Metrics,
    env_token: Option<Token>,
    state_path: PathBuf,
    lock_path: PathBuf,
    lock: Option<RotationLock>,
    held: Option<Held>,
    revokes: Vec<PendingRevoke>,
    revoke_attempts: HashMap<String, u32>,
    saved: SavedState,
    mint_attempts: u32,
    retry_at: Option<SystemTime>,
    bootstrap: Bootstrap,
    reported_expired: bool,
    /// While the held token is not saved: when to try again.
    persist_retry_at: Option<SystemTime>,
    persist_attempts: u32,
    /// While the held token is not saved: the token minted here that the files still hold.
    in_files: Option<SavedToken>,
    sink_permissions: SinkPermissions,
}

impl Engine {
    pub(super) fn new(
        config: RotatorConfig,
        client: reqwest::Client,
        env_token: Option<Token>,
        status: StatusCell,
        metrics: Metrics,
        activity: Activity,
    ) -> Result<Self, LockError> {
        let plan = RotationPlan::new(config.lifetime, config.interval, config.idle_policy);
        let probe = match &config.sessions_url {
            Some(url) => SessionProbe::Url {
                client: client.clone(),
                url: url.clone(),
            },
            None => SessionProbe::Traffic {
                activity,
                idle_after: config.idle_after,
            },
        };
        let mut engine = Self {
            shared: SharedToken::new(),
            file: ConfigFileToken::new(&config.config_file, &config.profile),
            poll: (config.interval / 20).clamp(Duration::from_millis(50), Duration::from_secs(5)),
            api: TokenApi::new(client, &config.host),
            probe,
            status,
            metrics,
            env_token,
            state_path: state::state_path(&config.config_file),
            lock_path: state::lock_path(&config.config_file),
            lock: None,
            held: None,
            revokes: Vec::new(),
            revoke_attempts: HashMap::new(),
            saved: SavedState::default(),
            mint_attempts: 0,
            retry_at: None,
            bootstrap: Bootstrap::NotChecked,
            reported_expired: false,
            persist_retry_at: None,
            persist_attempts: 0,
            in_files: None,
            sink_permissions: SinkPermissions::default(),
            plan,
            config,
        };
        let now = SystemTime::now();
        let locked = engine.try_lock().map_err(|source| LockError {
            path: engine.lock_path.clone(),
            source,
        })?;
        if !locked {
            engine.start_following(now);
        }
        Ok(engine)
    }

    pub(super) fn is_rotating(&self) -> bool {
        self.lock.is_some()
    }

    pub(super) async fn run(mut self, cancel: CancellationToken) {
        if self.is_rotating() {
            tracing::info!(
                config_file = %self.config.config_file.display(),
                profile = %self.config.profile,
                "rotating the token: this process holds the rotation lock"
            );
        } else {
            tracing::info!(
                config_file = %self.config.config_file.display(),
                lock = %self.lock_path.display(),
                "following the config file: another process rotates the token"
            );
        }
        while !cancel.is_cancelled() {
            let now = SystemTime::now();
            if !self.is_rotating() {
                self.follow(now);
                if self.poll_lock() {
                    tracing::info!(
                        config_file = %self.config.config_file.display(),
                        "took over rotation: the previous holder of the lock is gone"
                    );
                    continue;
                }
                if !sleep(self.poll, &cancel).await {
                    break;
                }
                continue;
            }
            self.notice_new_tokens(now);
            prune_revokes(now, &mut self.revokes);
            let action = self.decide(now).await;
            match action {
                Action::Rotate => {
                    // Minting, writing and publishing run to completion on their own task: a
                    // cancelled or aborted run must not leave a minted token unrecorded. The
                    // lock travels with the engine, so no one takes over in between.
                    let task = tokio::spawn(async move {
                        self.rotate().await;
                        self
                    });
                    tokio::select! {
                        joined = task => match joined {
                            Ok(engine) => self = engine,
                            Err(err) => {
                                tracing::error!(error = %err, "the rotation task failed; the rotator stops");
                                return;
                            }
                        },
                        () = cancel.cancelled() => return,
                    }
                }
                Action::Persist => self.persist_again(now),
                Action::Revoke { token_id } => {
                    tokio::select! {
                        () = self.revoke(&token_id, now) => {}
                        () = cancel.cancelled() => break,
                    }
                }
                Action::Expired => {
                    self.report_expired();
                    if !sleep(self.poll, &cancel).await {
                        break;
                    }
                }
                Action::Sleep { until } => {
                    let wait = until.duration_since(now).unwrap_or_default().min(self.poll);
                    if !sleep(wait.max(Duration::from_millis(1)), &cancel).await {
                        break;
                    }
                }
            }
        }
        self.status.update(|s| s.rotating = false);
        tracing::info!("rotator stopped");
    }

    /// Take the rotation lock if it is free; on success, resume from the state file.
    fn try_lock(&mut self) -> std::io::Result<bool> {
        match RotationLock::try_acquire(&self.lock_path)? {
            Some(lock) => {
                self.lock = Some(lock);
                self.take_over(SystemTime::now());
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// [`Self::try_lock`] while following: a lock file that cannot be opened is reported once
    /// (log, `/health` degraded, `/ready` 503) until it can be opened again, since this process
    /// could not take over if the holder stopped.
    fn poll_lock(&mut self) -> bool {
        let result = self.try_lock();
        let failing = self.status.get().lock_error.is_some();
        match result {
            Ok(locked) => {
                if failing {
                    tracing::info!(
                        lock = %self.lock_path.display(),
                        "the rotation lock file can be opened again"
                    );
                    self.status.update(|s| s.lock_error = None);
                }
                locked
            }
            Err(err) => {
                if !failing {
                    tracing::error!(
                        lock = %self.lock_path.display(),
                        error = %err,
                        "cannot open the rotation lock file: this process cannot take over rotation; fix the file or its directory (owner, mode, a link in its place)"
                    );
                    let reason = format!("{}: {err}", self.lock_path.display());
                    self.status.update(|s| s.lock_error = Some(reason));
                }
                false
            }
        }
    }

    fn load_state(&self) -> Option<SavedState> {
        match state::load(&self.state_path) {
            Ok(saved) => saved,
            Err(err) => {
                tracing::warn!(
                    state_file = %self.state_path.display(),
                    error = %err,
                    "state file unreadable; starting without it"
                );
                None
            }
        }
    }

    fn file_token(&self) -> Option<Token> {
        databrickscfg::read_profile(&self.config.config_file, &self.config.profile)
            .ok()
            .and_then(|p| p.token)
            // A torn file is no reason to forget the token last seen there.
            .or_else(|| self.file.current())
    }

    /// Become the rotator: resume from the state file and pick the starting token.
    fn take_over(&mut self, now: SystemTime) {
        let saved = self.load_state();
        let file_token = self.file_token();
        let file_fp = file_token.as_ref().map(fingerprint);
        let resumed = state::resume(
            now,
            saved.as_ref(),
            &self.config.profile,
            file_fp.as_deref(),
            self.plan.guard,
        );
        self.revokes = resumed.revokes;
        self.saved = SavedState {
            version: 1,
            profile: self.config.profile.clone(),
            current: resumed.current.clone(),
            previous: None,
            revoke: Vec::new(),
        };
        // A token this proxy minted that is still in the file but past its expiry (the proxy
        // was stopped for longer than a lifetime): its expiry is known, so it is not mistaken
        // for a bootstrap token of unknown expiry and no API call is made with it.
        let expired_minted = saved.as_ref().and_then(|saved| {
            [&saved.current, &saved.previous]
                .into_iter()
                .flatten()
                .find(|t| file_fp.as_deref() == Some(t.fingerprint.as_str()))
                .cloned()
        });
        self.held = match (resumed.current, file_token, self.env_token.clone()) {
            (Some(saved), Some(token), _) => Some(minted_held(token, &saved)),
            (_, _, Some(env)) => Some(adopted_held(env, Origin::Env, now)),
            (_, Some(token), None) => Some(match &expired_minted {
                Some(saved) => minted_held(token, saved),
                None => adopted_held(token, Origin::File, now),
            }),
            (_, None, None) => None,
        };
        if let Some(held) = &self.held {
            self.shared.publish(held.token.clone());
            tracing::info!(
                origin = ?held.origin,
                token_id = held.token_id.as_deref().unwrap_or("unknown"),
                expires_in_s = expires_in_s(held.expires_at, now),
                pending_revokes = self.revokes.len(),
                "starting token chosen"
            );
        }
        self.retry_at = None;
        self.mint_attempts = 0;
        self.persist_retry_at = None;
        self.persist_attempts = 0;
        self.in_files = None;
        self.status.update(|s| s.persist_failed = false);
        self.save_state();
        self.update_status();
    }

    /// Follower start: the config file's token, else `DATABRICKS_TOKEN`.
    fn start_following(&mut self, now: SystemTime) {
        let token = self.file_token().map(|t| (t, Origin::File));
        let token = token.or_else(|| self.env_token.clone().map(|t| (t, Origin::Env)));
        if let Some((token, origin)) = token {
            self.held = Some(self.follower_held(token, origin, now));
            if let Some(held) = &self.held {
                self.shared.publish(held.token.clone());
            }
        }
        self.update_status();
    }

    /// A follower publishes every new token that appears in the config file.
    fn follow(&mut self, now: SystemTime) {
        let Some(token) = self.file.current() else {
            return;
        };
        if self
            .held
            .as_ref()
            .is_some_and(|h| h.token.same_secret(&token))
        {
            return;
        }
        let held = self.follower_held(token, Origin::File, now);
        tracing::info!(
            token_id = held.token_id.as_deref().unwrap_or("unknown"),
            "following the config file: new token published"
        );
        self.shared.publish(held.token.clone());
        self.held = Some(held);
        self.update_status();
    }

    /// A token of the config file, with id and expiry when the state file describes it.
    fn follower_held(&self, token: Token, origin: Origin, now: SystemTime) -> Held {
        let fp = fingerprint(&token);
        let saved = self.load_state().and_then(|s| {
            (s.profile == self.config.profile)
                .then_some(s.current)
                .flatten()
                .filter(|c| c.fingerprint == fp)
        });
        match saved {
            Some(saved) => Held {
                origin,
                ..minted_held(token, &saved)
            },
            None => adopted_held(token, origin, now),
        }
    }

    /// While rotating: adopt a token published by [`super::RotatorSource::refresh`] after an
    /// upstream rejection, or one that appeared in the config file while ours is unusable.
    fn notice_new_tokens(&mut self, now: SystemTime) {
        let held_secret = |token: &Token, held: &Option<Held>| {
            held.as_ref().is_some_and(|h| h.token.same_secret(token))
        };
        if let Some(published) = self.shared.current()
            && !held_secret(&published, &self.held)
        {
            self.adopt(
                published,
                now,
                "a token re-read from the config file after a rejection",
            );
            return;
        }
        let unusable = self
            .held
            .as_ref()
            .is_none_or(|h| h.dead || self.plan.is_dead_at(h.expires_at, now));
        if unusable
            && let Some(token) = self.file.current()
            && !held_secret(&token, &self.held)
        {
            self.adopt(token, now, "a new token in the config file");
        }
    }

    fn adopt(&mut self, token: Token, now: SystemTime, what: &str) {
        if let Some(previous) = self.held.take()
            && previous.origin == Origin::Minted
            && !previous.dead
            && let Some(token_id) = previous.token_id
        {
            // Ours and no longer used: revoke it once in-flight requests are done.
            self.revokes.push(PendingRevoke {
                token_id,
                due: now + self.config.revoke_grace,
                expires_at: previous.expires_at,
            });
        }
        // The files hold the adopted token now, not the one of ours they held while ours
        // could not be saved.
        if let Some(files) = self
            .in_files
            .take()
            .filter(|files| files.fingerprint != fingerprint(&token))
        {
            let files = minted_ref(&files);
            let before = Users {
                held: None,
                in_files: Some(&files),
            };
            for revoke in
                persistence::no_longer_used(now, self.config.revoke_grace, before, Users::default())
            {
                self.revokes.retain(|r| r.token_id != revoke.token_id);
                self.revokes.push(revoke);
            }
        }
        if self.persist_retry_at.take().is_some() {
            self.persist_attempts = 0;
            self.status.update(|s| s.persist_failed = false);
        }
        let held = match &self.saved.current {
            Some(saved) if saved.fingerprint == fingerprint(&token) => minted_held(token, saved),
            _ => adopted_held(token, Origin::File, now),
        };
        tracing::info!(
            token_id = held.token_id.as_deref().unwrap_or("unknown"),
            "adopted {what}"
        );
        self.shared.publish(held.token.clone());
        self.held = Some(held);
        self.retry_at = None;
        self.mint_attempts = 0;
        self.reported_expired = false;
        self.save_state();
        self.update_status();
    }

    async fn decide(&self, now: SystemTime) -> Action {
        let token = self.held.as_ref().map(|h| HeldToken {
            obtained_at: h.obtained_at,
            expires_at: h.expires_at,
            dead: h.dead,
        });
        let state = |sessions| ScheduleState {
            token,
            sessions,
            retry_at: self.retry_at,
            revokes: &self.revokes,
            persist_retry_at: self.persist_retry_at,
        };
        let active = next_action(now, state(Sessions::Active), &self.plan);
        let idle = next_action(now, state(Sessions::Idle), &self.plan);
        match (active, idle) {
            (a, b) if a == b => a,
            // Nothing to do yet either way: no need to ask about sessions.
            (Action::Sleep { until: a }, Action::Sleep { until: b }) => {
                Action::Sleep { until: a.min(b) }
            }
            _ => {
                let sessions = self.probe.probe(now).await;
                next_action(now, state(sessions), &self.plan)
            }
        }
    }

    /// Mint, persist, publish, and schedule the revoke of the previous token.
    async fn rotate(&mut self) {
        let Some(held) = self.held.clone() else {
            return;
        };
        if self.config.revoke_bootstrap
            && held.origin != Origin::Minted
            && self.bootstrap == Bootstrap::NotChecked
        {
            self.identify_bootstrap(&held.token).await;
        }
        match self
            .api
            .create(&held.token, self.config.lifetime, &self.config.comment)
            .await
        {
            Ok(minted) => self.install(minted, held),
            Err(err) => self.mint_failed(err, &held.token).await,
        }
    }

    fn install(&mut self, minted: MintedToken, previous: Held) {
        let now = SystemTime::now();
        let new_saved = SavedToken {
            token_id: minted.token_id.clone(),
            fingerprint: fingerprint(&minted.token),
            created_at_ms: to_ms(minted.created_at),
            expires_at_ms: minted.expires_at.map(to_ms),
        };
        let held_before = self.saved.current.take().filter(|p| {
            previous.origin == Origin::Minted && p.fingerprint == fingerprint(&previous.token)
        });
        let files_before = match self.persist_retry_at {
            None => held_before.clone(),
            Some(_) => self.in_files.clone(),
        };
        // 1. The state file first: from here on a crash leaks nothing (a restart revokes
        //    whichever of the two tokens the config file does not hold).
        self.saved.previous = files_before.clone();
        self.saved.current = Some(new_saved.clone());
        // 2. The state file, the config file and the sinks.
        let persisted = self.persist(&minted.token, true);
        // 3. Publish.
        self.shared.publish(minted.token.clone());
        let previous_id = match previous.origin {
            Origin::Minted => previous.token_id.clone(),
            Origin::Env | Origin::File => match &self.bootstrap {
                Bootstrap::Identified(id) => Some(id.clone()),
                _ => None,
            },
        };
        self.held = Some(Held {
            token: minted.token,
            token_id: Some(minted.token_id.clone()),
            obtained_at: minted.created_at,
            expires_at: minted.expires_at,
            origin: Origin::Minted,
            dead: false,
        });
        self.retry_at = None;
        self.mint_attempts = 0;
        self.reported_expired = false;
        self.metrics.rotation(RotationResult::Ok);
        self.status.update(|s| {
            s.last_rotation = Some(now);
            s.rotations += 1;
        });
        self.update_status();
        // 4. Tokens no one uses any more go after the grace period: the previous one once the
        //    new one is saved, or else only if it never reached the files either.
        let files_after = if persisted {
            Some(new_saved.clone())
        } else {
            files_before.clone()
        };
        let revokes = persistence::no_longer_used(
            now,
            self.config.revoke_grace,
            Users {
                held: held_before.as_ref().map(minted_ref).as_ref(),
                in_files: files_before.as_ref().map(minted_ref).as_ref(),
            },
            Users {
                held: Some(&minted_ref(&new_saved)),
                in_files: files_after.as_ref().map(minted_ref).as_ref(),
            },
        );
        // A bootstrap token identified for PAT_REVOKE_BOOTSTRAP goes once the new one is saved.
        let bootstrap = match (&previous.origin, &previous_id) {
            (Origin::Env | Origin::File, Some(id)) if persisted => Some(PendingRevoke {
                token_id: id.clone(),
                due: now + self.config.revoke_grace,
                expires_at: previous.expires_at,
            }),
            _ => None,
        };
        for revoke in revokes.into_iter().chain(bootstrap) {
            self.revokes.retain(|r| r.token_id != revoke.token_id);
            self.revokes.push(revoke);
        }
        self.after_persist(persisted, files_after, now);
        tracing::info!(
            token_id = %minted.token_id,
            previous_token_id = previous_id.as_deref().unwrap_or("none"),
            expires_in_s = expires_in_s(minted.expires_at, now),
            "rotated the token"
        );
    }

    /// Write `token` to the state file, the config file and the sinks; false if any failed.
    /// `report`: log each failure as an error (the first attempt) or only at debug level
    /// (retries, which [`Self::after_persist`] sums up).
    fn persist(&mut self, token: &Token, report: bool) -> bool {
        let mut persisted = self.save_state();
        if let Err(err) = self.write_config(token) {
            persisted = false;
            if report {
                tracing::error!(
                    config_file = %self.config.config_file.display(),
                    error = %err,
                    "cannot write the new token to the config file"
                );
            } else {
                tracing::debug!(error = %err, "the config file still cannot be written");
            }
        }
        for sink in &self.config.sinks {
            self.sink_permissions.check(sink);
            match sink.write(token) {
                Ok(SinkOutcome::Written) => {}
                Ok(SinkOutcome::Rewritten) => tracing::warn!(
                    sink = %sink,
                    "sink rewritten whole (its layout does not allow an in-place edit): comments were not kept"
                ),
                Ok(SinkOutcome::Missing) => {
                    tracing::warn!(sink = %sink, "sink file missing; skipped")
                }
                Err(err) => {
                    persisted = false;
                    if report {
                        tracing::error!(sink = %sink, error = %err, "cannot write the new token to a sink");
                    } else {
                        tracing::debug!(sink = %sink, error = %err, "the sink still cannot be written");
                    }
                }
            }
        }
        persisted
    }

    /// Record the outcome of saving the held token: on failure, count it, schedule another
    /// attempt and report the change once; on success, clear the failure.
    fn after_persist(&mut self, persisted: bool, in_files: Option<SavedToken>, now: SystemTime) {
        if persisted {
            if self.persist_retry_at.take().is_some() {
                tracing::info!("the token is saved again: minting resumes its usual schedule");
            }
            self.persist_attempts = 0;
            self.in_files = None;
            self.saved.previous = None;
            self.status.update(|s| s.persist_failed = false);
        } else {
            self.metrics.persist_failure();
            let delay = self
                .plan
                .backoff
                .delay(self.persist_attempts, fastrand::f64(), None);
            self.persist_attempts += 1;
            if self.persist_retry_at.is_none() {
                tracing::error!(
                    config_file = %self.config.config_file.display(),
                    retry_in_ms = delay.as_millis() as u64,
                    "the new token cannot be saved: the token in the config file stays alive for its readers, no new token is minted until this one nears expiry, and tokens that never reached the file are revoked"
                );
            }
            self.persist_retry_at = Some(now + delay);
            self.saved.previous = in_files.clone();
            self.in_files = in_files;
            self.status.update(|s| s.persist_failed = true);
        }
        self.save_state();
    }

    /// [`Action::Persist`]: try again to save the held token.
    fn persist_again(&mut self, now: SystemTime) {
        let Some(held) = self.held.clone() else {
            return;
        };
        let persisted = self.persist(&held.token, false);
        if persisted {
            let held_ref = self.saved.current.as_ref().map(minted_ref);
            let files_ref = self.in_files.as_ref().map(minted_ref);
            let revokes = persistence::no_longer_used(
                now,
                self.config.revoke_grace,
                Users {
                    held: held_ref.as_ref(),
                    in_files: files_ref.as_ref(),
                },
                Users {
                    held: held_ref.as_ref(),
                    in_files: held_ref.as_ref(),
                },
            );
            for revoke in revokes {
                self.revokes.retain(|r| r.token_id != revoke.token_id);
                self.revokes.push(revoke);
            }
        }
        let in_files = self.in_files.clone();
        self.after_persist(persisted, in_files, now);
    }

    fn write_config(&self, token: &Token) -> std::io::Result<()> {
        let path = &self.config.config_file;
        let host_missing = match databrickscfg::read_profile(path, &self.config.profile) {
            Ok(profile) => profile.host.is_none(),
            Err(ConfigFileError::MissingProfile { .. }) => true,
            Err(ConfigFileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                true
            }
            // Torn, not text, not a regular file: editing it could only make it worse. The
            // write is retried, and succeeds once someone repairs the file.
            Err(err @ (ConfigFileError::Parse { .. } | ConfigFileError::Io { .. })) => {
                return Err(std::io::Error::other(format!("{err}; left as it is")));
            }
            Err(_) => false,
        };
        let mut updates = vec![("token", token.expose_secret())];
        if host_missing {
            updates.push(("host", self.config.host.as_str()));
        }
        databrickscfg::update_profile(path, &self.config.profile, &updates)?;
        // Readers must find the new token; a file left torn by another writer may hide it.
        match databrickscfg::read_profile(path, &self.config.profile) {
            Ok(profile) if profile.token.as_ref().is_some_and(|t| t.same_secret(token)) => Ok(()),
            Ok(_) => Err(std::io::Error::other(
                "the profile does not hold the new token after the update",
            )),
            Err(err) => Err(std::io::Error::other(format!(
                "the file cannot be read back after the update: {err}"
            ))),
        }
    }

    async fn mint_failed(&mut self, err: ApiError, auth: &Token) {
        let now = SystemTime::now();
        let backoff = self.plan.backoff;
        match err.kind() {
            ErrorKind::Transient => {
                let delay = backoff.delay(self.mint_attempts, fastrand::f64(), err.retry_after());
                self.mint_attempts += 1;
                self.retry_at = Some(now + delay);
                self.metrics.rotation(RotationResult::Failed);
                tracing::warn!(
                    attempt = self.mint_attempts,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %err,
                    "minting a new token failed; retrying"
                );
            }
            ErrorKind::Auth | ErrorKind::Permission => {
                self.metrics.rotation(RotationResult::Refused);
                match self.api.me(auth).await {
                    Ok(_) => {
                        self.mint_attempts += 1;
                        self.retry_at = Some(now + backoff.cap);
                        tracing::error!(
                            error = %err,
                            retry_in_ms = backoff.cap.as_millis() as u64,
                            "token/create refused although the token is accepted: this user may not create tokens"
                        );
                    }
                    Err(probe) if probe.is_refused() => {
                        if let Some(held) = &mut self.held {
                            held.dead = true;
                        }
                        tracing::error!(
                            error = %err,
                            config_file = %self.config.config_file.display(),
                            "the token is no longer accepted; no API call will be made with it until a new token appears in the config file"
                        );
                        self.update_status();
                    }
                    Err(probe) => {
                        let delay =
                            backoff.delay(self.mint_attempts, fastrand::f64(), probe.retry_after());
                        self.mint_attempts += 1;
                        self.retry_at = Some(now + delay);
                        tracing::warn!(
                            error = %err,
                            check = %probe,
                            retry_in_ms = delay.as_millis() as u64,
                            "token/create refused and the token cannot be checked; retrying"
                        );
                    }
                }
            }
            ErrorKind::BadRequest => {
                self.mint_attempts += 1;
                self.retry_at = Some(now + backoff.cap);
                self.metrics.rotation(RotationResult::Failed);
                tracing::error!(
                    error = %err,
                    retry_in_ms = backoff.cap.as_millis() as u64,
                    "token/create rejected the request"
                );
            }
        }
    }

    /// `PAT_REVOKE_BOOTSTRAP`: find the bootstrap token's id. The API never says which token
    /// authenticated a call, so the id is taken only when nothing else can match: the token
    /// looks like a PAT and `token/list` shows exactly one token besides those minted here.
    async fn identify_bootstrap(&mut self, bootstrap: &Token) {
        if !bootstrap.expose_secret().starts_with("dapi") {
            self.bootstrap = Bootstrap::Unidentifiable;
            tracing::warn!(
                "PAT_REVOKE_BOOTSTRAP: the bootstrap token is not a personal access token; it is not revoked"
            );
            return;
        }
        let known: Vec<&str> = self
            .revokes
            .iter()
            .map(|r| r.token_id.as_str())
            .chain(self.saved.current.iter().map(|c| c.token_id.as_str()))
            .collect();
        match self.api.list(bootstrap).await {
            Ok(listed) => {
                let candidates: Vec<_> = listed
                    .iter()
                    .filter(|t| !known.contains(&t.token_id.as_str()))
                    .collect();
                if let [only] = candidates[..] {
                    tracing::info!(
                        token_id = %only.token_id,
                        "PAT_REVOKE_BOOTSTRAP: bootstrap token identified; it is revoked after the first rotation"
                    );
                    self.bootstrap = Bootstrap::Identified(only.token_id.clone());
                } else {
                    tracing::warn!(
                        listed = candidates.len(),
                        "PAT_REVOKE_BOOTSTRAP: token/list shows more than one token that could be the bootstrap token and nothing tells them apart; it is not revoked"
                    );
                    self.bootstrap = Bootstrap::Unidentifiable;
                }
            }
            Err(err) => {
                tracing::warn!(
                    error = %err,
                    "PAT_REVOKE_BOOTSTRAP: cannot list tokens to identify the bootstrap token; it is not revoked"
                );
                self.bootstrap = Bootstrap::Unidentifiable;
            }
        }
    }

    async fn revoke(&mut self, token_id: &str, now: SystemTime) {
        let Some(auth) = self.held.as_ref().map(|h| h.token.clone()) else {
            return;
        };
        let result = self.api.delete(&auth, token_id).await;
        let retry = match &result {
            Ok(Deleted::Revoked) => {
                tracing::info!(token_id, "revoked the previous token");
                None
            }
            Ok(Deleted::AlreadyGone) => {
                tracing::info!(token_id, "previous token already gone");
                None
            }
            Err(err) => {
                let attempts = self.revoke_attempts.entry(token_id.to_owned()).or_insert(0);
                let delay = if err.is_transient() {
                    self.plan
                        .backoff
                        .delay(*attempts, fastrand::f64(), err.retry_after())
                } else {
                    self.plan.backoff.cap
                };
                *attempts += 1;
                tracing::warn!(token_id, error = %err, retry_in_ms = delay.as_millis() as u64, "revoking the previous token failed; retrying");
                Some(now + delay)
            }
        };
        match retry {
            None => {
                self.revokes.retain(|r| r.token_id != token_id);
                self.revoke_attempts.remove(token_id);
            }
            Some(due) => {
                for revoke in self.revokes.iter_mut().filter(|r| r.token_id == token_id) {
                    revoke.due = due;
                }
            }
        }
        self.save_state();
    }

    fn report_expired(&mut self) {
        if self.reported_expired {
            return;
        }
        self.reported_expired = true;
        self.metrics.rotation(RotationResult::SkippedExpired);
        let reason = match &self.held {
            None => "no token",
            Some(h) if h.dead => "the token is no longer accepted",
            Some(_) => "the token expired",
        };
        tracing::warn!(
            config_file = %self.config.config_file.display(),
            idle_policy = ?self.config.idle_policy,
            "{reason}: no API call is made with it; waiting for a new token in the config file"
        );
        self.update_status();
    }

    /// Write the state file; false (and a warning) when that fails.
    fn save_state(&mut self) -> bool {
        self.saved.revoke = self.revokes.iter().map(SavedRevoke::from_pending).collect();
        match state::save(&self.state_path, &self.saved) {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(
                    state_file = %self.state_path.display(),
                    error = %err,
                    "cannot write the state file; a restart will not know the tokens minted here"
                );
                false
            }
        }
    }

    fn update_status(&self) {
        let rotating = self.is_rotating();
        let held = self.held.as_ref();
        self.status.update(|s| {
            s.source = match held.map(|h| h.origin) {
                Some(Origin::Env) => SourceKind::Env,
                Some(Origin::File) => SourceKind::File,
                Some(Origin::Minted) | None if rotating => SourceKind::Rotator,
                Some(Origin::Minted) | None => SourceKind::File,
            };
            s.present = held.is_some();
            s.expires_at = held.and_then(|h| h.expires_at);
            s.dead = held.is_some_and(|h| h.dead);
            s.rotating = rotating;
        });
    }
}

/// The rotation lock file exists or must be created, and cannot be opened: at start, this is a
/// configuration error rather than a reason to follow silently.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot open the rotation lock file {}: {source}; fix its owner or mode, or its directory's (a link in its place is refused)",
    path.display()
)]
pub struct LockError {
    /// The lock file.
    pub path: PathBuf,
    /// Why it cannot be opened.
    pub source: std::io::Error,
}

fn minted_ref(saved: &SavedToken) -> MintedRef {
    MintedRef {
        token_id: saved.token_id.clone(),
        expires_at: saved.expires_at_ms.map(from_ms),
    }
}

fn minted_held(token: Token, saved: &SavedToken) -> Held {
    let expires_at = saved.expires_at_ms.map(from_ms);
    let token = match expires_at {
        Some(at) => Token::with_expiry(token.expose_secret(), at).unwrap_or(token),
        None => token,
    };
    Held {
        token,
        token_id: Some(saved.token_id.clone()),
        obtained_at: from_ms(saved.created_at_ms),
        expires_at,
        origin: Origin::Minted,
        dead: false,
    }
}

fn adopted_held(token: Token, origin: Origin, now: SystemTime) -> Held {
    Held {
        expires_at: token.expires_at(),
        token,
        token_id: None,
        obtained_at: now,
        origin,
        dead: false,
    }
}

fn expires_in_s(expires_at: Option<SystemTime>, now: SystemTime) -> i64 {
    expires_at.map_or(-1, |at| match at.duration_since(now) {
        Ok(left) => left.as_secs() as i64,
        Err(_) => 0,
    })
}

/// Sleep for `duration`; false when `cancel` fired first.
async fn sleep(duration: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => true,
        () = cancel.cancelled() => false,
    }
}
