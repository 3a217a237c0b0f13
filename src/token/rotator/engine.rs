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
use super::coordination::{Backend, Coordination, PublishError, TokenRecord};
use super::decisions::{self, HeldView, MintFailure, Probe, Reaction, Start, StartInputs};
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
    /// Who rotates: the lock next to the config file, or etcd.
    coordination: Box<dyn Coordination>,
    /// Whether this member leads (holds the lock, or the etcd lease).
    leading: bool,
    /// The clock every decision reads; tests set their own.
    clock: Clock,
    /// This member's name in the group's records.
    member: String,
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
        coordination: Option<Box<dyn Coordination>>,
    ) -> Result<Self, LockError> {
        let lock_path = state::lock_path(&config.config_file);
        let coordination = coordination
            .unwrap_or_else(|| Box::new(super::coordination::FileCoordination::new(&lock_path)));
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
            lock_path,
            member: coordination.member().to_owned(),
            coordination,
            leading: false,
            clock: system_clock(),
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
        let now = engine.now();
        engine
            .status
            .update(|s| s.coordination = engine.coordination.backend());
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
        self.leading
    }

    fn now(&self) -> SystemTime {
        (self.clock)()
    }

    pub(super) async fn run(mut self, cancel: CancellationToken) {
        self.coordination
            .start(cancel.child_token(), self.shared.clone());
        if self.is_rotating() {
            tracing::info!(
                config_file = %self.config.config_file.display(),
                profile = %self.config.profile,
                "rotating the token: this process holds the rotation lock"
            );
        } else if self.coordination.backend() == Backend::File {
            tracing::info!(
                config_file = %self.config.config_file.display(),
                lock = %self.lock_path.display(),
                "following the config file: another process rotates the token"
            );
        }
        while !cancel.is_cancelled() {
            let now = self.now();
            self.report_coordination();
            if self.is_rotating() && !self.still_leads() {
                tracing::warn!(
                    coordination = self.coordination.backend().name(),
                    "no longer the rotator: another member may rotate now; serving the current token"
                );
                self.leading = false;
                self.update_status();
            }
            if !self.is_rotating() {
                self.follow(now);
                if self.poll_lock() {
                    tracing::info!(
                        config_file = %self.config.config_file.display(),
                        coordination = self.coordination.backend().name(),
                        "took over rotation: no one else rotates the token"
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
        if self.leading {
            self.coordination.resign().await;
        }
        self.status.update(|s| s.rotating = false);
        tracing::info!("rotator stopped");
    }

    /// Become the rotator if no one else is; on success, resume from the state file (and the
    /// group's record).
    fn try_lock(&mut self) -> std::io::Result<bool> {
        if self.coordination.poll_leadership()? {
            self.leading = true;
            let now = self.now();
            self.take_over(now);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Whether this member still leads: always with the lock file, until the lease could have
    /// expired with etcd.
    fn still_leads(&mut self) -> bool {
        self.coordination.poll_leadership().unwrap_or(false)
    }

    /// An unreachable coordination backend is reported on `/health` (degraded), once per
    /// change in the log (the backend logs it).
    fn report_coordination(&self) {
        let unreachable = self.coordination.unreachable();
        if self.status.get().coordination_error != unreachable {
            self.status.update(|s| s.coordination_error = unreachable);
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
        let published = self.coordination.published();
        let start = decisions::start_token(
            now,
            StartInputs {
                published: published.as_ref().map(|record| record.expires_at),
                saved_in_file: resumed.current.is_some() && file_token.is_some(),
                file_token: file_token.is_some(),
                env_token: self.env_token.is_some(),
                file_minted_expired: expired_minted.is_some(),
            },
            self.plan.guard,
        );
        self.held = match (start, published, resumed.current, file_token) {
            (Start::Published, Some(record), _, file_token) => {
                for revoke in &record.revokes {
                    if !self.revokes.iter().any(|r| r.token_id == revoke.token_id) {
                        self.revokes.push(revoke.clone());
                    }
                }
                let saved = saved_from_record(&record);
                self.saved.current = Some(saved.clone());
                let held = minted_held(record.token, &saved);
                if !file_token.is_some_and(|t| t.same_secret(&held.token)) {
                    self.write_files(&held.token, true);
                }
                Some(held)
            }
            (Start::Saved, _, Some(saved), Some(token)) => Some(minted_held(token, &saved)),
            (Start::Env, ..) => self
                .env_token
                .clone()
                .map(|env| adopted_held(env, Origin::Env, now)),
            (Start::File { .. }, _, _, Some(token)) => Some(match &expired_minted {
                Some(saved) => minted_held(token, saved),
                None => adopted_held(token, Origin::File, now),
            }),
            _ => None,
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

    /// A follower publishes every new token that appears in the config file, or in the
    /// group's record (etcd), where it also writes it to its own config file and sinks.
    fn follow(&mut self, now: SystemTime) {
        if self.coordination.backend() != Backend::File {
            self.follow_published(now);
            return;
        }
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

    fn follow_published(&mut self, now: SystemTime) {
        let Some(record) = self.coordination.published() else {
            return;
        };
        let held = self.held.as_ref().map(|h| HeldView {
            token_id: h.token_id.as_deref(),
            same_secret: h.token.same_secret(&record.token),
        });
        if !decisions::adopt_published(now, held, &record.token_id, record.expires_at) {
            return;
        }
        let saved = saved_from_record(&record);
        let held = minted_held(record.token, &saved);
        tracing::info!(
            token_id = %record.token_id,
            leader = %record.leader,
            "following the fleet: new token published"
        );
        self.shared.publish(held.token.clone());
        let written = self.write_files(&held.token, true);
        self.status.update(|s| s.persist_failed = !written);
        self.held = Some(held);
        self.update_status();
    }

    /// The group's record for the held token, if this member minted it.
    fn record(&self) -> Option<TokenRecord> {
        let held = self.held.as_ref().filter(|h| h.origin == Origin::Minted)?;
        Some(TokenRecord {
            token: held.token.clone(),
            token_id: held.token_id.clone()?,
            created_at: held.obtained_at,
            expires_at: held.expires_at,
            revokes: self.revokes.clone(),
            leader: self.member.clone(),
        })
    }

    /// Publish the held token's record again (its revokes changed); a deposed member stops
    /// rotating.
    async fn publish_record(&mut self) {
        if self.coordination.backend() == Backend::File {
            return;
        }
        let Some(record) = self.record() else {
            return;
        };
        match self.coordination.publish(&record).await {
            Ok(()) => {}
            Err(PublishError::Deposed) => self.deposed(),
            Err(PublishError::Unavailable(reason)) => {
                tracing::warn!(error = %reason, "cannot publish the token record; a successor may revoke late");
            }
        }
    }

    fn deposed(&mut self) {
        tracing::warn!("another member rotates now: this one stops minting and follows");
        self.leading = false;
        self.update_status();
    }

    /// A token minted here becomes the group's only after its fenced publication. One that
    /// cannot be published is revoked at once, with itself: no member will ever use it.
    async fn publish_minted(&mut self, minted: &MintedToken, previous: &Held) -> bool {
        if self.coordination.backend() == Backend::File {
            return true;
        }
        let now = self.now();
        let mut revokes = self.revokes.clone();
        if previous.origin == Origin::Minted
            && !previous.dead
            && let Some(token_id) = &previous.token_id
        {
            revokes.push(PendingRevoke {
                token_id: token_id.clone(),
                due: now + self.config.revoke_grace,
                expires_at: previous.expires_at,
            });
        }
        let record = TokenRecord {
            token: minted.token.clone(),
            token_id: minted.token_id.clone(),
            created_at: minted.created_at,
            expires_at: minted.expires_at,
            revokes,
            leader: self.member.clone(),
        };
        let outcome = self.coordination.publish(&record).await;
        let Err(err) = outcome else {
            return true;
        };
        self.metrics.rotation(RotationResult::Failed);
        tracing::warn!(
            token_id = %minted.token_id,
            error = %err,
            "the new token cannot be published to the fleet; it is revoked"
        );
        match self.api.delete(&minted.token, &minted.token_id).await {
            Ok(_) => {}
            Err(revoke) => tracing::error!(
                token_id = %minted.token_id,
                error = %revoke,
                "cannot revoke a token no member uses; run: databricks tokens delete {}",
                minted.token_id
            ),
        }
        match err {
            PublishError::Deposed => self.deposed(),
            PublishError::Unavailable(_) => {
                let delay = self
                    .plan
                    .backoff
                    .delay(self.mint_attempts, fastrand::f64(), None);
                self.mint_attempts += 1;
                self.retry_at = Some(now + delay);
            }
        }
        false
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
        // A token that could not be published would only be revoked again: mint once the
        // coordination backend answers.
        if self.coordination.unreachable().is_some() {
            self.retry_at = Some(self.now() + self.poll);
            return;
        }
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
            Ok(minted) => {
                if self.publish_minted(&minted, &held).await {
                    self.install(minted, held);
                    self.publish_record().await;
                }
            }
            Err(err) => self.mint_failed(err, &held.token).await,
        }
    }

    fn install(&mut self, minted: MintedToken, previous: Held) {
        let now = self.now();
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
        let saved = self.save_state();
        self.write_files(token, report) && saved
    }

    /// Write `token` to the config file and the sinks; false if any failed.
    fn write_files(&mut self, token: &Token, report: bool) -> bool {
        let mut persisted = true;
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
        let now = self.now();
        let backoff = self.plan.backoff;
        let failure = MintFailure {
            kind: err.kind(),
            retry_after: err.retry_after(),
        };
        let mut reaction = decisions::after_failed_mint(
            now,
            failure,
            self.mint_attempts,
            backoff,
            fastrand::f64(),
        );
        let mut probe = None;
        if reaction == Reaction::Probe {
            self.metrics.rotation(RotationResult::Refused);
            let (outcome, error) = match self.api.me(auth).await {
                Ok(_) => (Probe::Accepted, None),
                Err(check) if check.is_refused() => (Probe::Refused, None),
                Err(check) => (
                    Probe::Unknown {
                        retry_after: check.retry_after(),
                    },
                    Some(check),
                ),
            };
            probe = Some((outcome, error));
            reaction =
                decisions::after_probe(now, outcome, self.mint_attempts, backoff, fastrand::f64());
        }
        match reaction {
            Reaction::Retry { at, result } => {
                let retry_in_ms = at.duration_since(now).unwrap_or_default().as_millis() as u64;
                self.mint_attempts += 1;
                self.retry_at = Some(at);
                match probe {
                    None => self.metrics.rotation(result),
                    Some((Probe::Accepted, _)) => tracing::error!(
                        error = %err,
                        retry_in_ms,
                        "token/create refused although the token is accepted: this user may not create tokens"
                    ),
                    Some((_, check)) => tracing::warn!(
                        error = %err,
                        check = %check.map(|c| c.to_string()).unwrap_or_default(),
                        retry_in_ms,
                        "token/create refused and the token cannot be checked; retrying"
                    ),
                }
                match err.kind() {
                    ErrorKind::Transient => tracing::warn!(
                        attempt = self.mint_attempts,
                        retry_in_ms,
                        error = %err,
                        "minting a new token failed; retrying"
                    ),
                    ErrorKind::BadRequest => tracing::error!(
                        error = %err,
                        retry_in_ms,
                        "token/create rejected the request"
                    ),
                    ErrorKind::Auth | ErrorKind::Permission => {}
                }
            }
            Reaction::Dead => {
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
            Reaction::Probe => unreachable!("a probe's answer decides"),
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
                self.publish_record().await;
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

/// What the engine reads the time from.
pub(super) type Clock = std::sync::Arc<dyn Fn() -> SystemTime + Send + Sync>;

fn system_clock() -> Clock {
    std::sync::Arc::new(SystemTime::now)
}

fn saved_from_record(record: &TokenRecord) -> SavedToken {
    SavedToken {
        token_id: record.token_id.clone(),
        fingerprint: fingerprint(&record.token),
        created_at_ms: to_ms(record.created_at),
        expires_at_ms: record.expires_at.map(to_ms),
    }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use fresh_test_support::fake_workspace::FakeWorkspace;
    use futures_util::future::BoxFuture;

    use super::*;
    use crate::token::status::TokenStatus;

    /// A coordination backend whose leadership and record are what the test says.
    #[derive(Clone, Debug, Default)]
    struct Scripted(Arc<Mutex<Script>>);

    #[derive(Debug, Default)]
    struct Script {
        leads: bool,
        refuse: bool,
        unreachable: Option<String>,
        record: Option<TokenRecord>,
        published: Vec<String>,
    }

    impl Scripted {
        fn with(change: impl FnOnce(&mut Script)) -> Self {
            let scripted = Self::default();
            scripted.set(change);
            scripted
        }

        fn set(&self, change: impl FnOnce(&mut Script)) {
            change(&mut self.0.lock().unwrap());
        }
    }

    impl Coordination for Scripted {
        fn backend(&self) -> Backend {
            Backend::Etcd
        }

        fn member(&self) -> &str {
            "member-under-test"
        }

        fn poll_leadership(&mut self) -> std::io::Result<bool> {
            Ok(self.0.lock().unwrap().leads)
        }

        fn publish<'a>(
            &'a mut self,
            record: &'a TokenRecord,
        ) -> BoxFuture<'a, Result<(), PublishError>> {
            let mut script = self.0.lock().unwrap();
            let outcome = if script.leads && !script.refuse {
                script.published.push(record.token_id.clone());
                script.record = Some(record.clone());
                Ok(())
            } else {
                Err(PublishError::Deposed)
            };
            Box::pin(async move { outcome })
        }

        fn published(&self) -> Option<TokenRecord> {
            self.0.lock().unwrap().record.clone()
        }

        fn unreachable(&self) -> Option<String> {
            self.0.lock().unwrap().unreachable.clone()
        }

        fn resign(&mut self) -> BoxFuture<'_, ()> {
            self.0.lock().unwrap().leads = false;
            Box::pin(async {})
        }
    }

    fn engine(home: &std::path::Path, ws: &FakeWorkspace, coordination: &Scripted) -> Engine {
        let config = RotatorConfig {
            config_file: home.join(".databrickscfg"),
            profile: "DEFAULT".to_owned(),
            host: ws.url(),
            lifetime: Duration::from_secs(60),
            interval: Duration::from_secs(20),
            idle_policy: super::super::IdlePolicy::Keepalive,
            sessions_url: None,
            idle_after: Duration::from_secs(3600),
            revoke_grace: Duration::from_secs(5),
            comment: "fresh-proxy-auto-rotated".to_owned(),
            sinks: Vec::new(),
            revoke_bootstrap: false,
        };
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        Engine::new(
            config,
            reqwest::Client::new(),
            None,
            StatusCell::new(TokenStatus::new(SourceKind::Rotator)),
            Metrics::new(),
            Activity::default(),
            Some(Box::new(coordination.clone())),
        )
        .unwrap()
    }

    fn home_with(ws: &FakeWorkspace, token: &str) -> tempfile::TempDir {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(
            home.path().join(".databrickscfg"),
            format!("[DEFAULT]\nhost = {}\ntoken = {token}\n", ws.url()),
        )
        .unwrap();
        home
    }

    fn file_token(home: &std::path::Path) -> String {
        databrickscfg::read_profile(&home.join(".databrickscfg"), "DEFAULT")
            .unwrap()
            .token
            .unwrap()
            .expose_secret()
            .to_owned()
    }

    fn record_of(issued: &fresh_test_support::fake_workspace::IssuedToken) -> TokenRecord {
        let expires_at = issued.expiry.unwrap();
        TokenRecord {
            token: Token::with_expiry(&issued.value, expires_at).unwrap(),
            token_id: issued.id.clone(),
            created_at: expires_at - Duration::from_secs(600),
            expires_at: Some(expires_at),
            revokes: Vec::new(),
            leader: "another-member".to_owned(),
        }
    }

    #[tokio::test]
    async fn a_follower_serves_and_saves_the_published_record_until_it_expires() {
        let ws = FakeWorkspace::start().await;
        let bootstrap = ws.mint(Duration::from_secs(600));
        let home = home_with(&ws, &bootstrap.value);
        let coordination = Scripted::default();
        let mut engine = engine(home.path(), &ws, &coordination);
        assert!(!engine.is_rotating());
        assert!(
            engine
                .shared
                .current()
                .unwrap()
                .same_secret(&Token::new(&bootstrap.value).unwrap())
        );

        let published = ws.mint(Duration::from_secs(600));
        coordination.set(|s| s.record = Some(record_of(&published)));
        // On a clock past the record's expiry, it is not adopted: the member keeps its token.
        let expiry = published.expiry.unwrap();
        engine.clock = Arc::new(move || expiry + Duration::from_secs(1));
        engine.follow(engine.now());
        assert_eq!(file_token(home.path()), bootstrap.value);

        engine.clock = Arc::new(SystemTime::now);
        engine.follow(engine.now());
        let served = engine.shared.current().unwrap();
        assert_eq!(served.expose_secret(), published.value);
        assert_eq!(
            served.expires_at(),
            published.expiry.map(|e| from_ms(to_ms(e)))
        );
        assert_eq!(
            file_token(home.path()),
            published.value,
            "written to its own file"
        );
        let status = engine.status.get();
        assert_eq!(status.role(), "follower");
        assert!(!status.persist_failed);
    }

    #[tokio::test]
    async fn a_new_leader_carries_on_from_the_record_and_its_pending_revokes() {
        let ws = FakeWorkspace::start().await;
        let bootstrap = ws.mint(Duration::from_secs(600));
        let home = home_with(&ws, &bootstrap.value);
        let current = ws.mint(Duration::from_secs(600));
        let previous = ws.mint(Duration::from_secs(600));
        let mut record = record_of(&current);
        record.revokes.push(PendingRevoke {
            token_id: previous.id.clone(),
            due: SystemTime::now(),
            expires_at: previous.expiry,
        });
        let coordination = Scripted::with(|s| {
            s.leads = true;
            s.record = Some(record);
        });
        let mut engine = engine(home.path(), &ws, &coordination);
        assert!(engine.is_rotating());
        let held = engine.held.clone().unwrap();
        assert_eq!(held.token.expose_secret(), current.value);
        assert_eq!(held.token_id.as_deref(), Some(current.id.as_str()));
        assert_eq!(held.origin, Origin::Minted);
        assert_eq!(file_token(home.path()), current.value);
        // The dead leader's pending revoke is now this member's.
        assert!(engine.revokes.iter().any(|r| r.token_id == previous.id));
        engine.revoke(&previous.id, SystemTime::now()).await;
        assert!(!ws.is_live_id(&previous.id), "revoked by the successor");
        assert!(ws.is_live_id(&current.id));
        let republished = coordination.published().unwrap();
        assert!(republished.revokes.is_empty(), "the record says it is done");
        assert_eq!(republished.leader, "member-under-test");
    }

    #[tokio::test]
    async fn a_token_minted_by_a_deposed_leader_is_revoked_and_never_served() {
        let ws = FakeWorkspace::start().await;
        let bootstrap = ws.mint(Duration::from_secs(600));
        let home = home_with(&ws, &bootstrap.value);
        let coordination = Scripted::with(|s| s.leads = true);
        let mut engine = engine(home.path(), &ws, &coordination);
        assert!(engine.is_rotating());

        // While the backend cannot be reached, nothing is minted: it could not be published.
        coordination.set(|s| s.unreachable = Some("etcd cannot be reached".to_owned()));
        engine.rotate().await;
        assert_eq!(
            ws.stats().creates,
            0,
            "minted without a backend to publish to"
        );
        assert!(engine.retry_at.is_some());
        coordination.set(|s| s.unreachable = None);

        // Deposed while the mint was on its way.
        coordination.set(|s| s.refuse = true);
        engine.rotate().await;
        assert_eq!(ws.stats().creates, 1, "the mint happened");
        let minted: Vec<_> = ws
            .live_tokens()
            .into_iter()
            .filter(|t| t.comment == "fresh-proxy-auto-rotated")
            .collect();
        assert!(
            minted.is_empty(),
            "the unpublished token was revoked: {minted:?}"
        );
        assert_eq!(ws.stats().deletes, 1);
        assert!(!engine.is_rotating(), "it stops rotating");
        assert_eq!(
            engine.shared.current().unwrap().expose_secret(),
            bootstrap.value
        );
        assert_eq!(file_token(home.path()), bootstrap.value);

        // A leader whose publication lands serves the new token.
        coordination.set(|s| s.refuse = false);
        engine.leading = true;
        engine.rotate().await;
        let record = coordination.published().expect("published");
        assert!(ws.is_live_id(&record.token_id));
        assert_eq!(
            engine.shared.current().unwrap().expose_secret(),
            record.token.expose_secret()
        );
        assert_eq!(file_token(home.path()), record.token.expose_secret());
    }
}
