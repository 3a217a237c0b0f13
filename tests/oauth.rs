//! OAuth M2M tokens against the fake workspace.

mod common;

use std::time::Duration;

use common::fake_workspace::{Behaviour, FakeWorkspace};
use common::logs::{capture_logs, logs};
use common::{http_client, wait_until};
use fresh_proxy::health::metrics::Metrics;
use fresh_proxy::token::oauth::{OAuthConfig, OAuthSource};
use fresh_proxy::token::status::{SourceKind, StatusCell, TokenStatus};
use fresh_token::{Token, TokenSource};
use tokio_util::sync::CancellationToken;

const CLIENT_ID: &str = "sp-client-id";
const CLIENT_SECRET: &str = "dose-s3cr3t-client-secret";
const DEADLINE: Duration = Duration::from_secs(15);

fn assert_no_secret_in_logs(tokens: &[Token]) {
    let logs = logs();
    assert!(
        !logs.contains(CLIENT_SECRET),
        "the client secret shows in the logs"
    );
    for token in tokens {
        assert!(
            !logs.contains(token.expose_secret()),
            "a token value shows in the logs"
        );
    }
}

struct Setup {
    workspace: FakeWorkspace,
    source: OAuthSource,
    status: StatusCell,
    metrics: Metrics,
    cancel: CancellationToken,
}

impl Setup {
    async fn start(lifetime: Duration, secret: &str) -> Self {
        capture_logs();
        let workspace = FakeWorkspace::start().await;
        workspace.set_oauth_client(CLIENT_ID, CLIENT_SECRET, lifetime);
        let status = StatusCell::new(TokenStatus::new(SourceKind::Rotator));
        let metrics = Metrics::new();
        let config = OAuthConfig {
            host: workspace.url(),
            client_id: CLIENT_ID.to_owned(),
            client_secret: Token::new(secret).unwrap(),
        };
        let source = OAuthSource::new(config, http_client(), status.clone(), metrics.clone());
        assert!(!format!("{source:?}").contains(secret));
        Self {
            workspace,
            source,
            status,
            metrics,
            cancel: CancellationToken::new(),
        }
    }

    fn spawn(&self) {
        tokio::spawn(self.source.clone().run(self.cancel.clone()));
    }

    async fn first_token(&self) -> Token {
        wait_until(DEADLINE, "the first access token", || async {
            self.source.current().is_some()
        })
        .await;
        self.source.current().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_share_one_fetched_token() {
    let setup = Setup::start(Duration::from_secs(600), CLIENT_SECRET).await;
    setup.spawn();
    let first = setup.first_token().await;
    assert_eq!(setup.status.get().source, SourceKind::Oauth);
    assert!(setup.status.get().expires_at.is_some());

    let url = setup.workspace.endpoint_url(Behaviour::Echo);
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (source, url) = (setup.source.clone(), url.clone());
            tokio::spawn(async move {
                let client = http_client();
                let mut statuses = Vec::new();
                for _ in 0..25 {
                    let token = source.current().expect("a token");
                    let response = client
                        .post(&url)
                        .header(http::header::AUTHORIZATION, token.header_value().clone())
                        .body("ping")
                        .send()
                        .await
                        .unwrap();
                    statuses.push(response.status().as_u16());
                }
                statuses
            })
        })
        .collect();
    for call in calls {
        assert!(call.await.unwrap().iter().all(|s| *s == 200));
    }
    assert_eq!(setup.workspace.stats().serving_ok, 100);
    assert_eq!(setup.workspace.stats().oauth_issued, 1);

    // Sixteen requests rejected with the same token share one new fetch.
    let refreshes: Vec<_> = (0..16)
        .map(|_| {
            let (source, rejected) = (setup.source.clone(), first.clone());
            tokio::spawn(async move { source.refresh(&rejected).await })
        })
        .collect();
    let mut fresh = Vec::new();
    for refresh in refreshes {
        fresh.push(refresh.await.unwrap().expect("a different token"));
    }
    assert!(fresh.iter().all(|t| t.same_secret(&fresh[0])));
    assert!(!fresh[0].same_secret(&first));
    assert_eq!(setup.workspace.stats().oauth_issued, 2);
    assert_eq!(setup.status.get().rotations, 2);
    let text = setup.metrics.render(None);
    assert!(
        text.lines()
            .any(|l| l == "fresh_proxy_rotations_total{result=\"oauth_ok\"} 2"),
        "{text}"
    );
    setup.cancel.cancel();
    assert_no_secret_in_logs(&[first, fresh[0].clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_a_new_token_does_not_cure_fetch_once_per_interval() {
    let setup = Setup::start(Duration::from_secs(600), CLIENT_SECRET).await;
    setup.spawn();
    let first = setup.first_token().await;
    // Rejected: one new token.
    let fresh = setup.source.refresh(&first).await.expect("a new token");
    assert!(!fresh.same_secret(&first));
    assert_eq!(setup.workspace.stats().oauth_issued, 2);
    // The new token is rejected too (a 403 for a permission, say): no fetch per request.
    for _ in 0..10 {
        assert!(setup.source.refresh(&fresh).await.is_none());
    }
    assert_eq!(setup.workspace.stats().oauth_issued, 2);
    assert!(setup.source.current().unwrap().same_secret(&fresh));
    setup.cancel.cancel();

    // The identity provider fails: requests rejected meanwhile do not each wait for a fetch.
    let setup = Setup::start(Duration::from_secs(600), CLIENT_SECRET).await;
    setup.workspace.fail_next_oauth(1_000, 503);
    let rejected = Token::new("eyJ-rejected").unwrap();
    assert!(setup.source.refresh(&rejected).await.is_none());
    let refreshes: Vec<_> = (0..8)
        .map(|_| {
            let (source, rejected) = (setup.source.clone(), rejected.clone());
            tokio::spawn(async move { source.refresh(&rejected).await })
        })
        .collect();
    for refresh in refreshes {
        assert!(refresh.await.unwrap().is_none());
    }
    assert_eq!(setup.workspace.stats().oauth_refused, 1);
    assert_no_secret_in_logs(&[first, fresh]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refresh_keeps_the_current_token() {
    // A 4 s token is refreshed once 2 s remain; three failures are retried within that time.
    let setup = Setup::start(Duration::from_secs(4), CLIENT_SECRET).await;
    setup.spawn();
    let first = setup.first_token().await;
    setup.workspace.fail_next_oauth(3, 503);
    wait_until(DEADLINE, "a refreshed token", || async {
        let current = setup.source.current().expect("never without a token");
        assert!(setup.workspace.is_live(current.expose_secret()));
        !current.same_secret(&first)
    })
    .await;
    assert_eq!(setup.workspace.stats().oauth_refused, 3);
    assert_eq!(setup.workspace.stats().oauth_issued, 2);
    let text = setup.metrics.render(None);
    assert!(
        text.lines()
            .any(|l| l == "fresh_proxy_rotations_total{result=\"oauth_failed\"} 3"),
        "{text}"
    );
    setup.cancel.cancel();
    assert!(logs().contains("keeping the current token until it expires"));
    assert_no_secret_in_logs(&[first, setup.source.current().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_cannot_be_refreshed_is_used_until_it_expires() {
    let setup = Setup::start(Duration::from_secs(2), CLIENT_SECRET).await;
    setup.spawn();
    let first = setup.first_token().await;
    let expires_at = first.expires_at().unwrap();
    setup.workspace.fail_next_oauth(1_000, 500);
    wait_until(DEADLINE, "the token to expire", || async {
        match setup.source.current() {
            Some(current) => {
                assert!(current.same_secret(&first));
                false
            }
            None => true,
        }
    })
    .await;
    assert!(std::time::SystemTime::now() >= expires_at);
    assert!(setup.workspace.stats().oauth_refused >= 1);
    setup.cancel.cancel();
    assert_no_secret_in_logs(&[first]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_give_no_token_and_no_secret_in_logs() {
    let setup = Setup::start(Duration::from_secs(60), "dose-wrong-secret").await;
    let rejected = Token::new("eyJ-rejected").unwrap();
    assert!(setup.source.refresh(&rejected).await.is_none());
    assert!(setup.source.current().is_none());
    assert_eq!(setup.workspace.stats().oauth_refused, 1);
    let logs = logs();
    assert!(logs.contains("invalid_client"), "the failure is logged");
    assert!(!logs.contains("dose-wrong-secret"));
}
