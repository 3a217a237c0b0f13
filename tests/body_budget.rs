//! `PROXY_BODY_BUDGET`: bodies buffered at once stay within the budget, a JSON body counted at
//! three times its size while it is read and filtered; one that does not fit gets 503 with
//! `Retry-After` and is not forwarded.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::fake_workspace::{Behaviour, FakeWorkspace};
use common::harness::{serve_with, settings};
use common::http_client;
use fresh_token::{SharedToken, Token, TokenSource};
use serde_json::Value;

const KIB: usize = 1024;

/// A JSON body of exactly `len` bytes.
fn json_of_len(len: usize) -> Vec<u8> {
    let mut body = br#"{"messages":[{"role":"user","content":""#.to_vec();
    let tail = br#""}]}"#;
    body.resize(len - tail.len(), b'x');
    body.extend_from_slice(tail);
    body
}

#[tokio::test]
async fn a_body_past_the_budget_gets_503_until_the_one_in_flight_is_done() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let source: Arc<dyn TokenSource> =
        Arc::new(SharedToken::with_token(Token::new(&pat.value).unwrap()));
    let mut settings = settings(&ws.serving_base());
    settings.max_body = 1024 * KIB;
    settings.body_budget = 3072 * KIB;
    let proxy = serve_with(settings, source).await;
    let url = format!("{}/{}/invocations", proxy.url(), Behaviour::Echo.name());

    // One agent's 800 KiB JSON body is on its way, its first half sent: 2400 KiB of the budget.
    let held = json_of_len(800 * KIB);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tx.send(Ok(Bytes::copy_from_slice(&held[..400 * KIB])))
        .await
        .unwrap();
    let first = tokio::spawn(
        http_client()
            .post(&url)
            .header("content-type", "application/json")
            .header("content-length", held.len())
            .body(reqwest::Body::wrap_stream(tokio_stream_from(rx)))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A second JSON body of 300 KiB (900 KiB) does not fit beside it, declared or not.
    for chunked in [false, true] {
        let body = json_of_len(300 * KIB);
        let request = http_client()
            .post(&url)
            .header("content-type", "application/json");
        let request = if chunked {
            let chunks = futures_util::stream::iter(
                body.chunks(64 * KIB)
                    .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
                    .collect::<Vec<_>>(),
            );
            request.body(reqwest::Body::wrap_stream(chunks))
        } else {
            request.body(body)
        };
        let res = request.send().await.unwrap();
        assert_eq!(res.status(), 503, "chunked: {chunked}");
        assert_eq!(res.headers()["retry-after"], "2");
        let error: Value = serde_json::from_slice(&res.bytes().await.unwrap()).unwrap();
        assert_eq!(error["error"]["type"], "overloaded");
    }
    assert!(ws.recorded_requests().is_empty(), "nothing was forwarded");
    // A body that is not filtered counts its size only: 600 KiB still fit.
    let res = http_client()
        .post(&url)
        .header("content-type", "application/octet-stream")
        .body(vec![b'x'; 600 * KIB])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(ws.recorded_requests().len(), 1);

    // The first finishes, and its share comes back.
    tx.send(Ok(Bytes::copy_from_slice(&held[400 * KIB..])))
        .await
        .unwrap();
    drop(tx);
    let res = first.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let echo: Value = serde_json::from_slice(&res.bytes().await.unwrap()).unwrap();
    assert_eq!(echo["body_len"], held.len());
    let res = http_client()
        .post(&url)
        .header("content-type", "application/json")
        .body(json_of_len(900 * KIB))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
