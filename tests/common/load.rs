//! Steady client load on running proxies, for tests that change tokens under it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fresh_test_support::{JsonBody, http_client};
use serde_json::json;

/// Client loops that keep sending chat requests through each URL until stopped (or for at most
/// three minutes); they return the statuses of the requests that failed, 0 for no answer.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<Vec<u16>>>,
}

impl Load {
    /// `per_url` clients for each of `urls`.
    pub fn start(urls: &[String], per_url: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let clients = urls
            .iter()
            .flat_map(|url| std::iter::repeat_n(url, per_url))
            .map(|url| {
                let (stop, ok, url) = (stop.clone(), ok.clone(), url.clone());
                tokio::spawn(async move {
                    let client = http_client();
                    let mut failures = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(180);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let res = client
                            .post(format!("{url}/chat/invocations"))
                            .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
                            .send()
                            .await;
                        match res.map(|r| r.status().as_u16()) {
                            Ok(200) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(status) => failures.push(status),
                            Err(_) => failures.push(0),
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    failures
                })
            })
            .collect();
        Self { stop, ok, clients }
    }

    /// Stop the clients and check that none of at least `min_served` requests failed; `what`
    /// names the phase in a failure. Returns the requests served.
    pub async fn finish_without_failures(self, what: &str, min_served: usize) -> usize {
        let (served, failures) = self.finish().await;
        assert!(
            failures.is_empty(),
            "{what}: {} of {} requests failed: {failures:?}",
            failures.len(),
            served + failures.len()
        );
        assert!(
            served > min_served,
            "{what}: only {served} requests were sent"
        );
        served
    }

    /// Stop the clients: `(requests served, statuses of those that failed)`.
    pub async fn finish(self) -> (usize, Vec<u16>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for client in self.clients {
            failures.extend(client.await.unwrap());
        }
        (self.ok.load(Ordering::Relaxed), failures)
    }
}
