//! The [`TokenSource`] trait and the in-memory sources.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;

use crate::token::{Token, TokenInner};

/// The future returned by [`TokenSource::refresh`]: a different token worth one retry, or
/// `None`.
///
/// A named type rather than a boxed future in the signature, so that how it is built can change
/// without breaking implementors. [`RefreshFuture::ready`] costs no allocation.
///
/// ```
/// use fresh_token::{RefreshFuture, Token};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// assert!(RefreshFuture::ready(None).await.is_none());
/// let token = RefreshFuture::new(async { Token::new("dapi-next").ok() }).await;
/// assert_eq!(token.unwrap().expose_secret(), "dapi-next");
/// # }
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct RefreshFuture<'a> {
    inner: RefreshInner<'a>,
}

enum RefreshInner<'a> {
    Ready(Option<Option<Token>>),
    Boxed(Pin<Box<dyn Future<Output = Option<Token>> + Send + 'a>>),
}

impl<'a> RefreshFuture<'a> {
    /// Wraps the work of a refresh.
    pub fn new<F>(future: F) -> Self
    where
        F: Future<Output = Option<Token>> + Send + 'a,
    {
        Self {
            inner: RefreshInner::Boxed(Box::pin(future)),
        }
    }

    /// A refresh whose answer is already known.
    pub fn ready(token: Option<Token>) -> Self {
        Self {
            inner: RefreshInner::Ready(Some(token)),
        }
    }
}

impl Future for RefreshFuture<'_> {
    type Output = Option<Token>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.inner {
            RefreshInner::Ready(answer) => Poll::Ready(
                answer
                    .take()
                    .expect("RefreshFuture polled after it completed"),
            ),
            RefreshInner::Boxed(future) => future.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for RefreshFuture<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.inner {
            RefreshInner::Ready(Some(_)) => "ready",
            RefreshInner::Ready(None) => "done",
            RefreshInner::Boxed(_) => "pending",
        };
        f.debug_struct("RefreshFuture")
            .field("state", &state)
            .finish()
    }
}

/// Where the current bearer token comes from.
///
/// Two calls, for two moments:
///
/// * [`current`](TokenSource::current) runs on every request. It must be cheap and must not
///   block on I/O for long: an atomic load, or at most a `stat` of a file.
/// * [`refresh`](TokenSource::refresh) runs when the upstream rejected a request (401 or 403).
///   It receives the token that was rejected and resolves to a *different* token that is worth a
///   retry, or `None` when there is none. It may do I/O (re-read a file, call a token endpoint),
///   and concurrent callers should share that work.
///
/// Implementations are shared between requests, so they are `Send + Sync`, and `Debug` so that
/// a stack that holds one can be logged; a `Debug` implementation must never print the token.
pub trait TokenSource: Send + Sync + fmt::Debug + 'static {
    /// The token to put on a request now, or `None` when none is available.
    fn current(&self) -> Option<Token>;

    /// After `rejected` was refused upstream, find a different token that is worth a retry.
    ///
    /// The default looks at [`current`](TokenSource::current) again, which is right for
    /// sources that are updated from elsewhere.
    fn refresh<'a>(&'a self, rejected: &'a Token) -> RefreshFuture<'a> {
        RefreshFuture::ready(self.current().filter(|token| !token.same_secret(rejected)))
    }
}

impl<T: TokenSource + ?Sized> TokenSource for Arc<T> {
    fn current(&self) -> Option<Token> {
        (**self).current()
    }

    fn refresh<'a>(&'a self, rejected: &'a Token) -> RefreshFuture<'a> {
        (**self).refresh(rejected)
    }
}

impl<T: TokenSource + ?Sized> TokenSource for Box<T> {
    fn current(&self) -> Option<Token> {
        (**self).current()
    }

    fn refresh<'a>(&'a self, rejected: &'a Token) -> RefreshFuture<'a> {
        (**self).refresh(rejected)
    }
}

/// An in-memory cell that a writer publishes tokens into and any number of readers load from.
///
/// Readers never block and never see a torn value: the cell is an
/// [`ArcSwapOption`](arc_swap::ArcSwapOption), so a lookup is an atomic load and a
/// reference-count bump. Clones share the same cell.
///
/// ```
/// use fresh_token::{SharedToken, Token, TokenSource};
///
/// let shared = SharedToken::new();
/// assert!(shared.current().is_none());
/// shared.publish(Token::new("dapi-first").unwrap());
/// let reader = shared.clone();
/// assert_eq!(reader.current().unwrap().expose_secret(), "dapi-first");
/// ```
#[derive(Clone, Default)]
pub struct SharedToken {
    cell: Arc<ArcSwapOption<TokenInner>>,
}

impl SharedToken {
    /// An empty cell.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A cell that starts with `token`.
    pub fn with_token(token: Token) -> Self {
        let shared = Self::new();
        shared.publish(token);
        shared
    }

    /// Make `token` the one every later lookup sees.
    pub fn publish(&self, token: Token) {
        self.cell.store(Some(token.0));
    }

    /// Forget the token: later lookups see none.
    pub fn clear(&self) {
        self.cell.store(None);
    }
}

impl TokenSource for SharedToken {
    fn current(&self) -> Option<Token> {
        self.cell.load_full().map(Token)
    }
}

impl fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedToken")
            .field("token", &self.current())
            .finish()
    }
}

/// A token that never changes, for tests and for services that are handed a token once.
#[derive(Clone, Debug)]
pub struct StaticToken(Token);

impl StaticToken {
    /// Serve `token` forever.
    pub fn new(token: Token) -> Self {
        Self(token)
    }
}

impl TokenSource for StaticToken {
    fn current(&self) -> Option<Token> {
        Some(self.0.clone())
    }

    fn refresh<'a>(&'a self, _rejected: &'a Token) -> RefreshFuture<'a> {
        RefreshFuture::ready(None)
    }
}

/// Tries its sources in order: the first that has a token wins.
///
/// A refresh asks each source in turn for a replacement and takes the first one offered.
///
/// ```
/// use std::sync::Arc;
/// use fresh_token::{FirstAvailable, SharedToken, StaticToken, Token, TokenSource};
///
/// let minted = SharedToken::new();
/// let bootstrap = StaticToken::new(Token::new("dapi-bootstrap").unwrap());
/// let source = FirstAvailable::new(vec![Arc::new(minted.clone()), Arc::new(bootstrap)]);
/// assert_eq!(source.current().unwrap().expose_secret(), "dapi-bootstrap");
/// minted.publish(Token::new("dapi-minted").unwrap());
/// assert_eq!(source.current().unwrap().expose_secret(), "dapi-minted");
/// ```
#[derive(Clone)]
pub struct FirstAvailable {
    sources: Arc<[Arc<dyn TokenSource>]>,
}

impl FirstAvailable {
    /// Try `sources` in this order.
    pub fn new(sources: Vec<Arc<dyn TokenSource>>) -> Self {
        Self {
            sources: sources.into(),
        }
    }
}

impl TokenSource for FirstAvailable {
    fn current(&self) -> Option<Token> {
        self.sources.iter().find_map(|source| source.current())
    }

    fn refresh<'a>(&'a self, rejected: &'a Token) -> RefreshFuture<'a> {
        RefreshFuture::new(async move {
            for source in self.sources.iter() {
                if let Some(token) = source.refresh(rejected).await {
                    return Some(token);
                }
            }
            None
        })
    }
}

impl fmt::Debug for FirstAvailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FirstAvailable")
            .field("sources", &self.sources.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(value: &str) -> Token {
        Token::new(value).unwrap()
    }

    #[tokio::test]
    async fn shared_token_refresh_offers_only_a_different_token() {
        let shared = SharedToken::with_token(token("dapi-a"));
        let a = shared.current().unwrap();
        assert_eq!(shared.refresh(&a).await, None);
        shared.publish(token("dapi-b"));
        assert_eq!(shared.refresh(&a).await.unwrap().expose_secret(), "dapi-b");
        shared.clear();
        assert!(shared.current().is_none());
    }

    #[test]
    fn readers_never_see_a_torn_value() {
        let shared = SharedToken::new();
        let values: Vec<String> = (0..64)
            .map(|i| format!("dapi-{i:04}-{}", "x".repeat(i)))
            .collect();
        std::thread::scope(|scope| {
            let writer = shared.clone();
            let written = values.clone();
            scope.spawn(move || {
                for _ in 0..200 {
                    for value in &written {
                        writer.publish(token(value));
                    }
                }
            });
            for _ in 0..2 {
                let reader = shared.clone();
                let values = &values;
                scope.spawn(move || {
                    for _ in 0..20_000 {
                        if let Some(seen) = reader.current() {
                            assert!(values.iter().any(|v| v == seen.expose_secret()));
                            assert_eq!(
                                seen.header_value(),
                                &format!("Bearer {}", seen.expose_secret())[..]
                            );
                        }
                    }
                });
            }
        });
    }

    #[tokio::test]
    async fn first_available_falls_through_in_order() {
        let first = SharedToken::new();
        let second = SharedToken::with_token(token("dapi-second"));
        let source = FirstAvailable::new(vec![Arc::new(first.clone()), Arc::new(second.clone())]);
        assert_eq!(source.current().unwrap().expose_secret(), "dapi-second");
        let rejected = source.current().unwrap();
        assert_eq!(source.refresh(&rejected).await, None);
        first.publish(token("dapi-first"));
        assert_eq!(
            source.refresh(&rejected).await.unwrap().expose_secret(),
            "dapi-first"
        );
        assert!(format!("{source:?}").contains("sources: 2"));
    }

    #[tokio::test]
    async fn static_token_never_offers_a_replacement() {
        let source = StaticToken::new(token("dapi-static"));
        let current = source.current().unwrap();
        assert_eq!(source.refresh(&current).await, None);
    }
}
