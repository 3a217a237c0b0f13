//! The route table: which upstream URL, and which handling mode, a request path goes to.
//!
//! Each [`Route`] maps a path prefix to an upstream base; the rest of the path and the query are
//! appended to that base. The longest matching prefix wins. Pure: no I/O, table-tested below.
//!
//! Defaults ([`RouteTable::defaults`]), needing no configuration:
//!
//! | request path                      | upstream                                 | mode        |
//! |-----------------------------------|------------------------------------------|-------------|
//! | anything else                     | `PROXY_UPSTREAM_BASE` + path             | `chat`      |
//! | `/anthropic/...`                  | `PROXY_UPSTREAM_BASE/anthropic/...`      | `anthropic` |
//! | `/gemini/...`                     | `PROXY_UPSTREAM_BASE/gemini/...`         | `gemini`    |
//! | `/responses`                      | `PROXY_UPSTREAM_BASE/responses`          | `responses` |
//! | `/serving-endpoints/...`          | `{host}/serving-endpoints/...`           | `chat`      |
//! | `/serving-endpoints/anthropic/..` | `{host}/serving-endpoints/anthropic/...` | `anthropic` |
//! | `/serving-endpoints/gemini/...`   | `{host}/serving-endpoints/gemini/...`    | `gemini`    |
//! | `/serving-endpoints/responses`    | `{host}/serving-endpoints/responses`     | `responses` |
//! | `/ai-gateway/...`                 | `{host}/ai-gateway/...`                  | `chat`      |
//! | `/ai-gateway/anthropic/...`       | `{host}/ai-gateway/anthropic/...`        | `anthropic` |
//! | `/ai-gateway/gemini/...`          | `{host}/ai-gateway/gemini/...`           | `gemini`    |
//! | `/ai-gateway/mlflow/v1/responses` | `{host}/ai-gateway/mlflow/v1/responses`  | `responses` |
//! | `/api/2.0/mcp/...`                | `{host}/api/2.0/mcp/...`                 | `passthrough` |
//!
//! Nothing else under `/api/` is reachable, and `/api/2.0/token*` never: a local process must
//! not be able to mint or revoke tokens with the proxy's credential.

use std::path::Path;

pub use fresh_filter::Mode;
use reqwest::Url;
use serde::Deserialize;

/// One entry of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Path prefix, starting with `/`, no trailing `/`; empty matches every path.
    pub prefix: String,
    /// The rest of the path is appended to this.
    pub upstream: Url,
    /// How requests on this route are handled.
    pub mode: Mode,
}

/// Why a request path goes nowhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The workspace's token API (`/api/2.0/token*`): never reachable.
    TokenApi,
    /// Under `/api/` but not a route (only managed MCP is).
    NotRoutable,
    /// The path climbs out of its route's upstream base (`..`), or is not a valid URL path.
    LeavesBase,
}

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The full upstream URL, query included.
    pub uri: http::Uri,
    /// The route's mode.
    pub mode: Mode,
}

/// The routes, longest prefix first, and the workspace they guard.
#[derive(Clone, Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    workspace: Url,
}

impl RouteTable {
    /// The default routes for `workspace` (`DATABRICKS_HOST`) with `base`
    /// (`PROXY_UPSTREAM_BASE`, normally `{host}/serving-endpoints`) for every other path.
    pub fn defaults(workspace: &Url, base: &Url) -> Self {
        Self::with_routes(workspace, base, Vec::new())
    }

    /// The defaults plus `extra` routes; an extra route with a default's prefix replaces it.
    pub fn with_routes(workspace: &Url, base: &Url, extra: Vec<Route>) -> Self {
        let at = |url: &Url, path: &str| join(url, path);
        let host_routes = [
            ("/serving-endpoints", Mode::Chat),
            ("/serving-endpoints/anthropic", Mode::Anthropic),
            ("/serving-endpoints/gemini", Mode::Gemini),
            ("/serving-endpoints/responses", Mode::Responses),
            ("/ai-gateway", Mode::Chat),
            ("/ai-gateway/anthropic", Mode::Anthropic),
            ("/ai-gateway/gemini", Mode::Gemini),
            ("/ai-gateway/mlflow/v1/responses", Mode::Responses),
            ("/api/2.0/mcp", Mode::Passthrough),
        ]
        .map(|(prefix, mode)| Route {
            prefix: prefix.to_owned(),
            upstream: at(workspace, prefix),
            mode,
        });
        let base_routes = [
            ("", Mode::Chat),
            ("/anthropic", Mode::Anthropic),
            ("/gemini", Mode::Gemini),
            ("/responses", Mode::Responses),
        ]
        .map(|(prefix, mode)| Route {
            prefix: prefix.to_owned(),
            upstream: at(base, prefix),
            mode,
        });
        let mut routes = extra;
        for route in host_routes.into_iter().chain(base_routes) {
            if !routes.iter().any(|r| r.prefix == route.prefix) {
                routes.push(route);
            }
        }
        // Stable: among equal lengths the order above stands.
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        Self {
            routes,
            workspace: workspace.clone(),
        }
    }

    /// The workspace (`DATABRICKS_HOST`).
    pub fn workspace(&self) -> &Url {
        &self.workspace
    }

    /// Every route, longest prefix first.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Where `path_and_query` (the request target's path and query) goes.
    pub fn resolve(&self, path_and_query: &str) -> Result<Target, Refusal> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        let path = if path.is_empty() { "/" } else { path };
        if !path.starts_with('/') {
            return Err(Refusal::LeavesBase);
        }
        if is_token_api(path) {
            return Err(Refusal::TokenApi);
        }
        let route = self
            .routes
            .iter()
            .find(|route| matches_prefix(path, &route.prefix))
            .ok_or(Refusal::NotRoutable)?;
        if route.prefix.is_empty() && is_api(path) {
            return Err(Refusal::NotRoutable);
        }
        let rest = &path[route.prefix.len()..];
        let base = route.upstream.as_str().trim_end_matches('/');
        let mut text =
            String::with_capacity(base.len() + rest.len() + query.map_or(0, |q| q.len() + 1));
        text.push_str(base);
        text.push_str(rest);
        if let Some(query) = query {
            text.push('?');
            text.push_str(query);
        }
        if !is_plain(rest, query) {
            let url = Url::parse(&text).map_err(|_| Refusal::LeavesBase)?;
            // `..` and its encoded forms are resolved by the parser: the result must still be
            // inside the route's base, on its host.
            let base_path = route.upstream.path().trim_end_matches('/');
            let inside =
                url.path() == base_path || url.path().starts_with(&format!("{base_path}/"));
            if !same_origin(&url, &route.upstream) || !inside {
                return Err(Refusal::LeavesBase);
            }
            text = url.into();
        }
        let uri = http::Uri::try_from(text).map_err(|_| Refusal::LeavesBase)?;
        // Whatever a route says, the workspace's own API stays out of reach but for MCP.
        if same_origin(&route.upstream, &self.workspace) {
            if is_token_api(uri.path()) {
                return Err(Refusal::TokenApi);
            }
            if is_api(uri.path()) && !matches_prefix(uri.path(), MCP_PREFIX) {
                return Err(Refusal::NotRoutable);
            }
        }
        Ok(Target {
            uri,
            mode: route.mode,
        })
    }
}

/// Whether the URL parser would keep `rest` (a path from `/`) and `query` as they are, so that
/// a base URL followed by them needs no parsing: no dot segments, no percent-escapes in the path
/// (`%2e` is a dot), and only characters that it neither escapes nor rewrites.
fn is_plain(rest: &str, query: Option<&str>) -> bool {
    let kept = |b: u8| b.is_ascii_alphanumeric() || b"-._~/:@!$&()*+,;=".contains(&b);
    rest.bytes().all(kept)
        && !rest
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        && query.is_none_or(|query| query.bytes().all(|b| kept(b) || b == b'?' || b == b'%'))
}

const MCP_PREFIX: &str = "/api/2.0/mcp";

/// The model a Gemini URL names: `.../models/{model}:generateContent`.
pub fn gemini_model(path: &str) -> Option<String> {
    let (_, rest) = path.rsplit_once("/models/")?;
    let model = rest.split([':', '/']).next()?;
    (!model.is_empty()).then(|| model.to_owned())
}

fn join(url: &Url, path: &str) -> Url {
    let text = format!("{}{path}", url.as_str().trim_end_matches('/'));
    Url::parse(&text).unwrap_or_else(|_| url.clone())
}

fn matches_prefix(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn is_api(path: &str) -> bool {
    path.eq_ignore_ascii_case("/api") || starts_with_ignoring_case(path, "/api/")
}

fn is_token_api(path: &str) -> bool {
    // Both spellings the workspace answers: `/api/2.0/token/...` and `/api/2.0/token-management/...`.
    starts_with_ignoring_case(path, "/api/2.0/token")
}

fn starts_with_ignoring_case(text: &str, prefix: &str) -> bool {
    text.as_bytes()
        .get(..prefix.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(prefix.as_bytes()))
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host() == b.host()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// `PROXY_ROUTES_FILE` as written:
///
/// ```toml
/// [[route]]
/// prefix = "/gateway"
/// upstream = "https://gateway.example.com/mlflow/v1"
/// mode = "chat"
/// ```
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    route: Vec<RouteEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    prefix: toml::Spanned<String>,
    upstream: toml::Spanned<String>,
    mode: Mode,
}

/// Parses the routes file `text` (read from `file`). Every error names the file and line:
/// `routes.toml:3: upstream: ...`. An upstream on the `workspace` host may only be its managed
/// MCP servers, model serving or AI Gateway; plain `http://` needs a loopback host unless
/// `allow_insecure`.
pub fn parse_routes_file(
    text: &str,
    file: &Path,
    workspace: &Url,
    allow_insecure: bool,
) -> Result<Vec<Route>, String> {
    let at = |offset: usize| format!("{}:{}", file.display(), line_of(text, offset));
    let parsed: RoutesFile = toml::from_str(text).map_err(|err| {
        let line = err.span().map_or(1, |span| line_of(text, span.start));
        format!(
            "{}:{line}: {}",
            file.display(),
            err.message().trim_end_matches('\n')
        )
    })?;
    let mut routes = Vec::with_capacity(parsed.route.len());
    for entry in parsed.route {
        let prefix_at = at(entry.prefix.span().start);
        let upstream_at = at(entry.upstream.span().start);
        let prefix = entry.prefix.into_inner();
        let prefix = prefix.trim_end_matches('/');
        if !prefix.starts_with('/')
            || prefix.contains(['?', '#', '\\'])
            || prefix.split('/').any(|segment| segment == "..")
        {
            return Err(format!(
                "{prefix_at}: prefix {prefix:?} must be a path starting with / (no query, no ..)"
            ));
        }
        if routes.iter().any(|r: &Route| r.prefix == prefix) {
            return Err(format!("{prefix_at}: prefix {prefix:?} is given twice"));
        }
        let text = entry.upstream.into_inner();
        let upstream = Url::parse(text.trim())
            .map_err(|err| format!("{upstream_at}: upstream {text:?} is not a URL: {err}"))?;
        match upstream.scheme() {
            "https" => {}
            "http" if allow_insecure || crate::config::is_loopback(&upstream) => {}
            "http" => {
                return Err(format!(
                    "{upstream_at}: upstream {text:?} is plain http:// to a non-loopback host; \
                     use https:// (or PROXY_ALLOW_INSECURE_UPSTREAM=1)"
                ));
            }
            other => {
                return Err(format!(
                    "{upstream_at}: upstream {text:?} has scheme {other}; use https://"
                ));
            }
        }
        if upstream.query().is_some() || upstream.fragment().is_some() {
            return Err(format!(
                "{upstream_at}: upstream {text:?} must have no query or fragment"
            ));
        }
        if same_origin(&upstream, workspace) && is_api(upstream.path()) {
            let path = upstream.path().trim_end_matches('/');
            if !matches_prefix(path, MCP_PREFIX) {
                return Err(format!(
                    "{upstream_at}: upstream {text:?} is the workspace's own API; only {MCP_PREFIX} is reachable through the proxy"
                ));
            }
        }
        routes.push(Route {
            prefix: prefix.to_owned(),
            upstream,
            mode: entry.mode,
        });
    }
    Ok(routes)
}

/// The 1-based line of byte `offset` in `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    fn table() -> RouteTable {
        let host = url("https://ws.example.com");
        RouteTable::defaults(&host, &url("https://ws.example.com/serving-endpoints"))
    }

    #[test]
    fn default_routes_resolve() {
        let table = table();
        let cases: &[(&str, &str, Mode)] = &[
            (
                "/chat/completions",
                "https://ws.example.com/serving-endpoints/chat/completions",
                Mode::Chat,
            ),
            (
                "/my-endpoint/invocations?x=1",
                "https://ws.example.com/serving-endpoints/my-endpoint/invocations?x=1",
                Mode::Chat,
            ),
            (
                "/serving-endpoints/chat/completions",
                "https://ws.example.com/serving-endpoints/chat/completions",
                Mode::Chat,
            ),
            (
                "/serving-endpoints/responses",
                "https://ws.example.com/serving-endpoints/responses",
                Mode::Responses,
            ),
            (
                "/responses",
                "https://ws.example.com/serving-endpoints/responses",
                Mode::Responses,
            ),
            (
                "/serving-endpoints/anthropic/v1/messages",
                "https://ws.example.com/serving-endpoints/anthropic/v1/messages",
                Mode::Anthropic,
            ),
            (
                "/anthropic/v1/messages?beta=true",
                "https://ws.example.com/serving-endpoints/anthropic/v1/messages?beta=true",
                Mode::Anthropic,
            ),
            (
                "/serving-endpoints/gemini/v1beta/models/databricks-gemini-2-5-pro:streamGenerateContent?alt=sse",
                "https://ws.example.com/serving-endpoints/gemini/v1beta/models/databricks-gemini-2-5-pro:streamGenerateContent?alt=sse",
                Mode::Gemini,
            ),
            (
                "/gemini/v1beta/models/m:generateContent",
                "https://ws.example.com/serving-endpoints/gemini/v1beta/models/m:generateContent",
                Mode::Gemini,
            ),
            (
                "/ai-gateway/anthropic/v1/messages",
                "https://ws.example.com/ai-gateway/anthropic/v1/messages",
                Mode::Anthropic,
            ),
            (
                "/ai-gateway/gemini/v1beta/models/m:generateContent",
                "https://ws.example.com/ai-gateway/gemini/v1beta/models/m:generateContent",
                Mode::Gemini,
            ),
            (
                "/ai-gateway/mlflow/v1/chat/completions",
                "https://ws.example.com/ai-gateway/mlflow/v1/chat/completions",
                Mode::Chat,
            ),
            (
                "/ai-gateway/mlflow/v1/responses",
                "https://ws.example.com/ai-gateway/mlflow/v1/responses",
                Mode::Responses,
            ),
            (
                "/api/2.0/mcp/functions/main/default",
                "https://ws.example.com/api/2.0/mcp/functions/main/default",
                Mode::Passthrough,
            ),
            (
                "/api/2.0/mcp/genie/01ef",
                "https://ws.example.com/api/2.0/mcp/genie/01ef",
                Mode::Passthrough,
            ),
            // A prefix matches whole segments only.
            (
                "/responses-old",
                "https://ws.example.com/serving-endpoints/responses-old",
                Mode::Chat,
            ),
            (
                "/serving-endpointsx/a",
                "https://ws.example.com/serving-endpoints/serving-endpointsx/a",
                Mode::Chat,
            ),
            ("/", "https://ws.example.com/serving-endpoints/", Mode::Chat),
        ];
        for (path, expected, mode) in cases {
            let target = table
                .resolve(path)
                .unwrap_or_else(|r| panic!("{path}: {r:?}"));
            assert_eq!(target.uri.to_string(), *expected, "{path}");
            assert_eq!(target.mode, *mode, "{path}");
        }
    }

    #[test]
    fn paths_the_parser_would_keep_are_not_parsed_and_come_out_the_same() {
        // (path and query, whether it needs no parsing)
        let cases: &[(&str, bool)] = &[
            ("/databricks-claude-3.7-sonnet/invocations", true),
            ("/chat/completions", true),
            (
                "/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
                true,
            ),
            ("/my-endpoint/invocations?x=1&y=%20z", true),
            ("/a/./b", false),
            ("/a/../b", false),
            ("/a/%2e%2e/b", false),
            ("/a%20b", false),
            ("/a/b?q='x'", false),
            ("/a/b?q=\"x\"", false),
            ("/a\\b", false),
        ];
        let table = table();
        for (path_and_query, plain) in cases {
            let (path, query) = match path_and_query.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (*path_and_query, None),
            };
            assert_eq!(is_plain(path, query), *plain, "{path_and_query}");
            // Whichever way it went, the target is what the URL parser makes of it.
            let parsed = Url::parse(&format!(
                "https://ws.example.com/serving-endpoints{path_and_query}"
            ));
            match (table.resolve(path_and_query), parsed) {
                (Ok(target), Ok(url)) => {
                    assert_eq!(target.uri.to_string(), url.as_str(), "{path_and_query}")
                }
                (Err(Refusal::LeavesBase), _) => assert!(!plain, "{path_and_query}"),
                (other, _) => panic!("{path_and_query}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_workspace_api_is_out_of_reach() {
        let table = table();
        let cases: &[(&str, Refusal)] = &[
            ("/api/2.0/token/create", Refusal::TokenApi),
            ("/API/2.0/Token/create", Refusal::TokenApi),
            ("/api/2.0/token/delete", Refusal::TokenApi),
            ("/api/2.0/token-management/tokens", Refusal::TokenApi),
            ("/api/2.0/clusters/list", Refusal::NotRoutable),
            ("/api/2.0/serving-endpoints", Refusal::NotRoutable),
            ("/api", Refusal::NotRoutable),
            // Climbing out of a route's base, plainly or encoded.
            ("/api/2.0/mcp/../token/create", Refusal::LeavesBase),
            ("/api/2.0/mcp/%2e%2e/token/create", Refusal::LeavesBase),
            (
                "/serving-endpoints/../api/2.0/token/create",
                Refusal::LeavesBase,
            ),
            (
                "/serving-endpoints/%2E%2E/api/2.0/token/create",
                Refusal::LeavesBase,
            ),
            ("/../api/2.0/token/create", Refusal::LeavesBase),
            ("/a/../../api/2.0/clusters/list", Refusal::LeavesBase),
            ("api/2.0/token/create", Refusal::LeavesBase),
        ];
        for (path, refusal) in cases {
            assert_eq!(table.resolve(path), Err(*refusal), "{path}");
        }
    }

    #[test]
    fn the_mcp_prefix_matches_whole_segments() {
        // `/api/2.0/mcpx` is not the MCP route, so it is under /api/ and refused.
        assert_eq!(
            table().resolve("/api/2.0/mcpx/a"),
            Err(Refusal::NotRoutable)
        );
    }

    #[test]
    fn a_custom_upstream_base_keeps_the_old_behaviour() {
        let host = url("https://ws.example.com");
        let table = RouteTable::defaults(&host, &url("http://127.0.0.1:9000/base"));
        let target = table.resolve("/chat/completions?x=1").unwrap();
        assert_eq!(
            target.uri.to_string(),
            "http://127.0.0.1:9000/base/chat/completions?x=1"
        );
        assert_eq!(table.resolve("/../etc"), Err(Refusal::LeavesBase));
        // Host routes still go to the workspace.
        let target = table
            .resolve("/serving-endpoints/chat/completions")
            .unwrap();
        assert_eq!(
            target.uri.to_string(),
            "https://ws.example.com/serving-endpoints/chat/completions"
        );
    }

    #[test]
    fn extra_routes_win_over_defaults_and_longest_prefix_wins() {
        let host = url("https://ws.example.com");
        let extra = vec![
            Route {
                prefix: "/gateway".to_owned(),
                upstream: url("https://gw.example.com/mlflow/v1"),
                mode: Mode::Chat,
            },
            Route {
                prefix: "/gateway/responses".to_owned(),
                upstream: url("https://gw.example.com/mlflow/v1/responses"),
                mode: Mode::Responses,
            },
            Route {
                prefix: "/anthropic".to_owned(),
                upstream: url("https://gw.example.com/anthropic"),
                mode: Mode::Anthropic,
            },
        ];
        let table = RouteTable::with_routes(
            &host,
            &url("https://ws.example.com/serving-endpoints"),
            extra,
        );
        let cases: &[(&str, &str, Mode)] = &[
            (
                "/gateway/chat/completions",
                "https://gw.example.com/mlflow/v1/chat/completions",
                Mode::Chat,
            ),
            (
                "/gateway/responses",
                "https://gw.example.com/mlflow/v1/responses",
                Mode::Responses,
            ),
            (
                "/anthropic/v1/messages",
                "https://gw.example.com/anthropic/v1/messages",
                Mode::Anthropic,
            ),
        ];
        for (path, expected, mode) in cases {
            let target = table.resolve(path).unwrap();
            assert_eq!(target.uri.to_string(), *expected, "{path}");
            assert_eq!(target.mode, *mode, "{path}");
        }
        assert_eq!(
            table.resolve("/gateway/../x"),
            Err(Refusal::LeavesBase),
            "a custom route keeps its base too"
        );
    }

    #[test]
    fn routes_file_parses() {
        let text = r#"
# An AI Gateway host.
[[route]]
prefix = "/gateway/"
upstream = "https://gw.example.com/mlflow/v1"
mode = "chat"

[[route]]
prefix = "/mcp"
upstream = "https://ws.example.com/api/2.0/mcp"
mode = "passthrough"
"#;
        let routes = parse_routes_file(
            text,
            Path::new("routes.toml"),
            &url("https://ws.example.com"),
            false,
        )
        .unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].prefix, "/gateway");
        assert_eq!(
            routes[0].upstream.as_str(),
            "https://gw.example.com/mlflow/v1"
        );
        assert_eq!(routes[1].mode, Mode::Passthrough);
    }

    #[test]
    fn bad_routes_files_name_the_file_and_line() {
        let cases: &[(&str, &str)] = &[
            (
                "[[route]]\nprefix = \"/a\"\nupstream = \"https://x\"\nmode = \"bogus\"\n",
                "routes.toml:4: ",
            ),
            (
                "[[route]]\nprefix = \"/a\"\nupstream = \n",
                "routes.toml:3: ",
            ),
            (
                "[[route]]\nprefix = \"/a\"\nmode = \"chat\"\n",
                "routes.toml:1: ",
            ),
            (
                "[[route]]\nprefix = \"a\"\nupstream = \"https://x\"\nmode = \"chat\"\n",
                "routes.toml:2: prefix",
            ),
            (
                "[[route]]\nprefix = \"/a/../b\"\nupstream = \"https://x\"\nmode = \"chat\"\n",
                "routes.toml:2: prefix",
            ),
            (
                "\n[[route]]\nprefix = \"/a\"\nupstream = \"not a url\"\nmode = \"chat\"\n",
                "routes.toml:4: upstream",
            ),
            (
                "[[route]]\nprefix = \"/a\"\nupstream = \"http://gw.example.com\"\nmode = \"chat\"\n",
                "routes.toml:3: upstream",
            ),
            (
                "[[route]]\nprefix = \"/t\"\nupstream = \"https://ws.example.com/api/2.0/token\"\nmode = \"passthrough\"\n",
                "routes.toml:3: upstream",
            ),
            (
                "[[route]]\nprefix = \"/c\"\nupstream = \"https://ws.example.com/api/2.0/clusters\"\nmode = \"passthrough\"\n",
                "routes.toml:3: upstream",
            ),
            (
                "[[route]]\nprefix = \"/a\"\nupstream = \"https://x\"\nmode = \"chat\"\n[[route]]\nprefix = \"/a/\"\nupstream = \"https://y\"\nmode = \"chat\"\n",
                "routes.toml:6: prefix",
            ),
            (
                "[[route]]\nprefix = \"/a\"\nupstream = \"https://x\"\nmode = \"chat\"\nextra = 1\n",
                "routes.toml:5: ",
            ),
        ];
        for (text, start) in cases {
            let err = parse_routes_file(
                text,
                Path::new("routes.toml"),
                &url("https://ws.example.com"),
                false,
            )
            .unwrap_err();
            assert!(err.starts_with(start), "{text:?}: {err}");
        }
    }

    #[test]
    fn gemini_urls_name_their_model() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "/serving-endpoints/gemini/v1beta/models/databricks-gemini-2-5-pro:streamGenerateContent",
                Some("databricks-gemini-2-5-pro"),
            ),
            (
                "/ai-gateway/gemini/v1beta/models/m:generateContent",
                Some("m"),
            ),
            (
                "/serving-endpoints/gemini/v1beta/models/:generateContent",
                None,
            ),
            ("/serving-endpoints/gemini/v1beta/files", None),
        ];
        for (path, model) in cases {
            assert_eq!(gemini_model(path).as_deref(), *model, "{path}");
        }
    }

    #[test]
    fn line_of_counts_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 99), 3);
    }
}
