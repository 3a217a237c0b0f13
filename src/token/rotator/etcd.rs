//! `PAT_COORDINATION=etcd`: one rotator for a fleet of hosts.
//!
//! Keys, under `PAT_ETCD_PREFIX`:
//!
//! * `{prefix}/leader`: the leader's member name, attached to its lease. A member becomes leader
//!   with a transaction that creates the key only where it does not exist; the key's create
//!   revision is the leader's term.
//! * `{prefix}/token`: the [`TokenRecord`]. The leader writes it only in a transaction whose
//!   condition is that the leader key still has the create revision of its own term, so a
//!   deposed leader (paused, partitioned, its lease expired) can never publish.
//!
//! One background task per member keeps the lease alive, campaigns while no one leads, and
//! watches the record. Leadership is held locally until the lease could have expired: the
//! deadline is counted from when a keep-alive was *sent*, so it never outlives the lease in
//! etcd, where another member could only then take the key.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions,
};
use fresh_token::{SharedToken, Token, TokenSource};
use futures_util::future::BoxFuture;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::coordination::{Backend, Coordination, PublishError, TokenRecord};
use crate::databricks::token_api::TokenApi;

/// `PAT_ETCD_*`.
#[derive(Clone)]
pub struct EtcdSettings {
    /// `PAT_ETCD_ENDPOINTS`.
    pub endpoints: Vec<String>,
    /// `PAT_ETCD_PREFIX`; unset: `fresh-proxy/{host}/{user}`, the user found with the token.
    pub prefix: Option<String>,
    /// `PAT_ETCD_LEASE_TTL`.
    pub lease_ttl: Duration,
    /// `PAT_ETCD_CA`.
    pub ca: Option<PathBuf>,
    /// `PAT_ETCD_CERT` and `PAT_ETCD_KEY`.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// `PAT_ETCD_USER` and `PAT_ETCD_PASSWORD`.
    pub user: Option<(String, Token)>,
}

impl fmt::Debug for EtcdSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .field("ca", &self.ca)
            .field("identity", &self.identity.as_ref().map(|(cert, _)| cert))
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .finish()
    }
}

impl EtcdSettings {
    fn connect_options(&self) -> std::io::Result<ConnectOptions> {
        let wait = self.rpc_timeout();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(wait)
            .with_timeout(wait)
            .with_keep_alive(self.lease_ttl / 3, wait);
        if self.ca.is_some() || self.identity.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        if let Some((name, password)) = &self.user {
            options = options.with_user(name, password.expose_secret());
        }
        Ok(options)
    }

    /// How long one call to etcd may take: well inside the lease, so a leader learns it lost
    /// etcd while its lease still runs.
    fn rpc_timeout(&self) -> Duration {
        (self.lease_ttl / 3).clamp(Duration::from_millis(200), Duration::from_secs(5))
    }
}

fn read(path: &PathBuf) -> std::io::Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|err| std::io::Error::new(err.kind(), format!("{}: {err}", path.display())))
}

/// Where the group's keys live: `PAT_ETCD_PREFIX`, or found from the workspace and the user the
/// token belongs to, so that two identities never share a token by accident.
#[derive(Debug)]
pub enum Prefix {
    /// Given.
    Fixed(String),
    /// Ask the token API who the member's token belongs to.
    Lookup {
        /// The token API of the workspace.
        api: TokenApi,
        /// The workspace URL, without a trailing slash.
        host: String,
    },
}

/// Why a member without `PAT_ETCD_PREFIX` cannot join yet.
const NO_TOKEN: &str = "no PAT_ETCD_PREFIX and no token to find the user";

/// The default prefix for a workspace and user.
pub fn default_prefix(host: &str, user: &str) -> String {
    let host = host
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    format!("fresh-proxy/{host}/{user}")
}

/// The leader's term: its lease, and the create revision of the leader key it wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Term {
    lease: i64,
    revision: i64,
    /// Until when this member may act as leader: the lease cannot have expired before.
    until: Instant,
}

#[derive(Default)]
struct Shared {
    term: Option<Term>,
    record: Option<TokenRecord>,
    error: Option<String>,
    client: Option<Client>,
    prefix: Option<String>,
}

/// The etcd backend of [`Coordination`].
pub struct EtcdCoordination {
    settings: EtcdSettings,
    member: String,
    shared: Arc<Mutex<Shared>>,
    prefix: Option<Prefix>,
}

impl fmt::Debug for EtcdCoordination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdCoordination")
            .field("endpoints", &self.settings.endpoints)
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl EtcdCoordination {
    /// A member named `member` (unique in the group: host name and process id).
    pub fn new(settings: EtcdSettings, member: String, prefix: Prefix) -> Self {
        Self {
            settings,
            member,
            shared: Arc::new(Mutex::new(Shared {
                error: Some("not connected to etcd yet".to_owned()),
                ..Shared::default()
            })),
            prefix: Some(prefix),
        }
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// This process's member name: host name and process id.
pub fn member_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

impl Coordination for EtcdCoordination {
    fn backend(&self) -> Backend {
        Backend::Etcd
    }

    fn member(&self) -> &str {
        &self.member
    }

    fn start(&mut self, cancel: CancellationToken, current: SharedToken) {
        let Some(prefix) = self.prefix.take() else {
            return;
        };
        let member = Member {
            settings: self.settings.clone(),
            name: self.member.clone(),
            shared: self.shared.clone(),
        };
        tokio::spawn(member.run(prefix, current, cancel));
    }

    fn poll_leadership(&mut self) -> std::io::Result<bool> {
        let now = Instant::now();
        Ok(self.shared().term.is_some_and(|term| now < term.until))
    }

    fn publish<'a>(
        &'a mut self,
        record: &'a TokenRecord,
    ) -> BoxFuture<'a, Result<(), PublishError>> {
        Box::pin(async move {
            let (term, mut client, prefix) = {
                let shared = self.shared();
                match (shared.term, shared.client.clone(), shared.prefix.clone()) {
                    (Some(term), Some(client), Some(prefix)) if Instant::now() < term.until => {
                        (term, client, prefix)
                    }
                    // Still the leader, but etcd cannot be asked right now.
                    (Some(term), None, _) if Instant::now() < term.until => {
                        return Err(PublishError::Unavailable(
                            shared
                                .error
                                .clone()
                                .unwrap_or_else(|| "etcd cannot be reached".into()),
                        ));
                    }
                    _ => return Err(PublishError::Deposed),
                }
            };
            let keys = Keys::new(&prefix);
            let txn = Txn::new()
                .when([Compare::create_revision(
                    keys.leader.clone(),
                    CompareOp::Equal,
                    term.revision,
                )])
                .and_then([TxnOp::put(keys.token.clone(), record.to_bytes(), None)]);
            let wait = self.settings.rpc_timeout();
            match timeout(wait, client.txn(txn)).await {
                Ok(Ok(response)) if response.succeeded() => Ok(()),
                Ok(Ok(_)) => {
                    self.shared().term = None;
                    Err(PublishError::Deposed)
                }
                outcome => {
                    // Whether the write landed is unknown: look.
                    let reason = match outcome {
                        Ok(Err(err)) => err.to_string(),
                        _ => "etcd did not answer in time".to_owned(),
                    };
                    match timeout(wait, client.get(keys.token.clone(), None)).await {
                        Ok(Ok(found))
                            if found
                                .kvs()
                                .first()
                                .and_then(|kv| TokenRecord::from_bytes(kv.value()))
                                .is_some_and(|r| r.token_id == record.token_id) =>
                        {
                            Ok(())
                        }
                        _ => Err(PublishError::Unavailable(reason)),
                    }
                }
            }
        })
    }

    fn published(&self) -> Option<TokenRecord> {
        self.shared().record.clone()
    }

    fn unreachable(&self) -> Option<String> {
        self.shared().error.clone()
    }

    fn resign(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (term, client) = {
                let mut shared = self.shared();
                (shared.term.take(), shared.client.clone())
            };
            if let (Some(term), Some(mut client)) = (term, client) {
                // Revoking the lease deletes the leader key: a successor need not wait for it
                // to expire.
                let _ = timeout(self.settings.rpc_timeout(), client.lease_revoke(term.lease)).await;
            }
        })
    }
}

#[derive(Clone, Debug)]
struct Keys {
    leader: String,
    token: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        Self {
            leader: format!("{prefix}/leader"),
            token: format!("{prefix}/token"),
        }
    }
}

/// The background task of one member.
struct Member {
    settings: EtcdSettings,
    name: String,
    shared: Arc<Mutex<Shared>>,
}

type Outcome<T> = Result<T, String>;

impl Member {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn run(self, prefix: Prefix, current: SharedToken, cancel: CancellationToken) {
        let Some(prefix) = self.resolve(prefix, &current, &cancel).await else {
            return;
        };
        tracing::info!(prefix = %prefix, member = %self.name, "joining the fleet on etcd");
        self.shared().prefix = Some(prefix.clone());
        let keys = Keys::new(&prefix);
        let mut delay = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            let outcome = self.session(&keys, &cancel).await;
            if cancel.is_cancelled() {
                break;
            }
            if let Err(reason) = outcome {
                let first = {
                    let mut shared = self.shared();
                    shared.client = None;
                    shared.error.replace(reason.clone()).is_none()
                };
                if first {
                    tracing::warn!(
                        error = %reason,
                        "etcd cannot be reached: serving the current token; no token is minted until etcd answers"
                    );
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => break,
            }
            delay = (delay * 2).min(self.settings.lease_ttl / 2);
        }
    }

    /// The key prefix: given, or found from the user of the token this member serves.
    async fn resolve(
        &self,
        prefix: Prefix,
        current: &SharedToken,
        cancel: &CancellationToken,
    ) -> Option<String> {
        let (api, host) = match prefix {
            Prefix::Fixed(prefix) => return Some(prefix),
            Prefix::Lookup { api, host } => (api, host),
        };
        let mut delay = Duration::from_secs(1);
        loop {
            let Some(token) = current.current() else {
                if self.shared().error.replace(NO_TOKEN.to_owned()).as_deref() != Some(NO_TOKEN) {
                    tracing::error!(
                        "PAT_COORDINATION=etcd: no token to find the user with; set PAT_ETCD_PREFIX"
                    );
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return None,
                }
                continue;
            };
            match api.me(&token).await {
                Ok(user) => return Some(default_prefix(&host, &user)),
                Err(err) => {
                    tracing::warn!(error = %err, "PAT_COORDINATION=etcd: cannot find the token's user for the key prefix; retrying (or set PAT_ETCD_PREFIX)");
                    self.shared().error = Some(format!("cannot find the token's user: {err}"));
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => return None,
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// One connection: read and watch the record, keep or seek leadership. Returns on cancel
    /// (`Ok`) or on the first failure.
    async fn session(&self, keys: &Keys, cancel: &CancellationToken) -> Outcome<()> {
        let wait = self.settings.rpc_timeout();
        let options = self.settings.connect_options().map_err(|e| e.to_string())?;
        let mut client = timeout(
            wait,
            Client::connect(&self.settings.endpoints, Some(options)),
        )
        .await
        .map_err(|_| "connecting to etcd timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        let found = call(wait, client.get(keys.token.clone(), None)).await?;
        let revision = found.header().map_or(0, |h| h.revision());
        if let Some(kv) = found.kvs().first() {
            self.adopt(kv.value());
        }
        let mut watch = call(
            wait,
            client.watch(
                keys.token.clone(),
                Some(WatchOptions::new().with_start_revision(revision + 1)),
            ),
        )
        .await?;
        {
            let mut shared = self.shared();
            shared.client = Some(client.clone());
            if shared.error.take().is_some() {
                tracing::info!("etcd answers again");
            }
        }
        let mut tick =
            tokio::time::interval((self.settings.lease_ttl / 3).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                message = watch.message() => match message.map_err(|e| e.to_string())? {
                    Some(response) => {
                        for event in response.events() {
                            if event.event_type() == EventType::Put
                                && let Some(kv) = event.kv()
                            {
                                self.adopt(kv.value());
                            }
                        }
                    }
                    None => return Err("the etcd watch ended".to_owned()),
                },
                _ = tick.tick() => self.lead(&mut client, keys).await?,
            }
        }
    }

    fn adopt(&self, value: &[u8]) {
        match TokenRecord::from_bytes(value) {
            Some(record) => self.shared().record = Some(record),
            None => {
                tracing::warn!("the token record in etcd is not one this proxy can read; ignored")
            }
        }
    }

    /// Renew this member's lease while it leads; campaign while no one does.
    async fn lead(&self, client: &mut Client, keys: &Keys) -> Outcome<()> {
        let wait = self.settings.rpc_timeout();
        let term = self.shared().term;
        if let Some(term) = term {
            let sent = Instant::now();
            let (mut keeper, mut stream) = call(wait, client.lease_keep_alive(term.lease)).await?;
            call(wait, keeper.keep_alive()).await?;
            let answer = call(wait, stream.message()).await?;
            let ttl = answer.map_or(0, |a| a.ttl());
            let mut shared = self.shared();
            if ttl > 0 {
                shared.term = Some(Term {
                    until: sent + Duration::from_secs(ttl as u64),
                    ..term
                });
            } else {
                shared.term = None;
                drop(shared);
                tracing::warn!("the rotation lease expired: another member may rotate now");
            }
            return Ok(());
        }
        let leader = call(wait, client.get(keys.leader.clone(), None)).await?;
        if !leader.kvs().is_empty() {
            return Ok(());
        }
        let ttl = self.settings.lease_ttl.as_secs().max(1) as i64;
        let sent = Instant::now();
        let lease = call(wait, client.lease_grant(ttl, None)).await?.id();
        let txn = Txn::new()
            .when([Compare::create_revision(
                keys.leader.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                keys.leader.clone(),
                self.name.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let won = call(wait, client.txn(txn)).await?;
        if won.succeeded() {
            let revision = won.header().map_or(0, |h| h.revision());
            self.shared().term = Some(Term {
                lease,
                revision,
                until: sent + Duration::from_secs(ttl as u64),
            });
            tracing::info!(member = %self.name, "elected rotator of the fleet");
        } else {
            let _ = call(wait, client.lease_revoke(lease)).await;
        }
        Ok(())
    }
}

async fn call<T>(
    wait: Duration,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Outcome<T> {
    match timeout(wait, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("etcd did not answer in time".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prefix_names_workspace_and_user() {
        assert_eq!(
            default_prefix("https://adb-1.azuredatabricks.net/", "me@example.com"),
            "fresh-proxy/adb-1.azuredatabricks.net/me@example.com"
        );
        let keys = Keys::new("fresh-proxy/team/");
        assert_eq!(keys.leader, "fresh-proxy/team/leader");
        assert_eq!(keys.token, "fresh-proxy/team/token");
    }

    #[test]
    fn settings_never_print_the_password() {
        let settings = EtcdSettings {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            prefix: None,
            lease_ttl: Duration::from_secs(10),
            ca: None,
            identity: None,
            user: Some((
                "root".to_owned(),
                Token::new("etcd-password-value").unwrap(),
            )),
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("etcd-password-value"), "{shown}");
        assert!(shown.contains("root"), "{shown}");
    }
}
