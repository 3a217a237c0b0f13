//! Configuration: environment variables (each with a `--kebab-case` flag) validated into a
//! [`Config`]. Secrets come from the environment or the config file only, never from flags.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use fresh_token::Token;
use reqwest::Url;

use crate::token::precedence::{
    self, AUTH_TYPE, CLI_PATH, CLIENT_ID, CLIENT_SECRET, ConfigFileView, DEFAULT_OIDC_TOKEN_ENV,
    Environment, HOST, Method, OIDC_TOKEN_ENV, OIDC_TOKEN_FILEPATH, Origin, PROFILE, Resolved,
    TOKEN,
};
use crate::token::rotator::IdlePolicy;
use crate::token::rotator::coordination::Backend;
use crate::token::rotator::etcd::EtcdSettings;

mod clients;
pub use clients::{CLIENT_KEY_VAR, ClientArgs, ClientSettings, client_key_from_env};

/// Command line and environment, as clap parses them. Field names are the variables' names, so
/// each flag is the kebab-case of its variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "fresh-proxy", version, about = "Local proxy for Databricks model serving that keeps coding agents on a fresh token", long_about = None)]
pub struct Cli {
    /// The INI file shared with the Databricks CLI and SDKs [default: ~/.databrickscfg]
    #[arg(long, env = "DATABRICKS_CONFIG_FILE", value_name = "PATH")]
    pub databricks_config_file: Option<PathBuf>,
    /// The profile (section) holding `host` and the credentials [default: `[__settings__] default_profile`, else DEFAULT]
    #[arg(long, env = "DATABRICKS_CONFIG_PROFILE", value_name = "NAME")]
    pub databricks_config_profile: Option<String>,
    /// Workspace URL [default: the profile's host]. http:// only for loopback hosts
    #[arg(long, env = "DATABRICKS_HOST", value_name = "URL")]
    pub databricks_host: Option<String>,
    /// OAuth M2M client id (the secret comes from DATABRICKS_CLIENT_SECRET or the profile); also the federation policy's client for env-oidc and file-oidc
    #[arg(long, env = "DATABRICKS_CLIENT_ID")]
    pub databricks_client_id: Option<String>,
    /// The auth method: pat, oauth-m2m, databricks-cli, env-oidc, file-oidc [default: the profile's auth_type, else the credentials that are set]
    #[arg(long, env = "DATABRICKS_AUTH_TYPE", value_name = "METHOD")]
    pub databricks_auth_type: Option<String>,
    /// The Databricks CLI that databricks-cli auth runs [default: databricks on PATH]
    #[arg(long, env = "DATABRICKS_CLI_PATH", value_name = "PATH")]
    pub databricks_cli_path: Option<String>,
    /// The environment variable holding the JWT for env-oidc [default: DATABRICKS_OIDC_TOKEN]
    #[arg(long, env = "DATABRICKS_OIDC_TOKEN_ENV", value_name = "NAME")]
    pub databricks_oidc_token_env: Option<String>,
    /// The file holding the JWT for file-oidc, read again at every exchange
    #[arg(long, env = "DATABRICKS_OIDC_TOKEN_FILEPATH", value_name = "PATH")]
    pub databricks_oidc_token_filepath: Option<String>,
    /// Listen address
    #[arg(long, env = "PROXY_HOST", default_value = "127.0.0.1")]
    pub proxy_host: IpAddr,
    /// Listen port
    #[arg(long, env = "PROXY_PORT", default_value_t = 4000)]
    pub proxy_port: u16,
    /// Upstream base URL; the request path and query are appended [default: {host}/serving-endpoints]
    #[arg(long, env = "PROXY_UPSTREAM_BASE", value_name = "URL")]
    pub proxy_upstream_base: Option<String>,
    /// Allow plain http:// to a non-loopback upstream
    #[arg(long, env = "PROXY_ALLOW_INSECURE_UPSTREAM", value_parser = parse_flag, action = clap::ArgAction::Set, default_value = "0", value_name = "0|1")]
    pub proxy_allow_insecure_upstream: bool,
    /// Largest request body in bytes; larger bodies get 413
    #[arg(long, env = "PROXY_MAX_BODY", default_value_t = 32 * 1024 * 1024, value_name = "BYTES")]
    pub proxy_max_body: usize,
    /// Seconds to wait for upstream response headers, and the longest silence within a streamed answer (streams may run longer)
    #[arg(
        long,
        env = "PROXY_UPSTREAM_TIMEOUT",
        default_value_t = 300,
        value_name = "SECONDS"
    )]
    pub proxy_upstream_timeout: u64,
    /// Bytes of request bodies buffered at once across requests, a JSON body counted at three times its size while filtered; past it, 503 with Retry-After
    #[arg(long, env = "PROXY_BODY_BUDGET", default_value_t = 256 * 1024 * 1024, value_name = "BYTES")]
    pub proxy_body_budget: usize,
    /// Seconds a replayable request may wait across upstream 429s; 0 passes them through
    #[arg(
        long,
        env = "PROXY_RATE_LIMIT_WAIT",
        default_value_t = 60,
        value_name = "SECONDS"
    )]
    pub proxy_rate_limit_wait: u64,
    /// Seconds in-flight requests may take to finish after SIGTERM or Ctrl-C
    #[arg(
        long,
        env = "PROXY_SHUTDOWN_GRACE",
        default_value_t = 30,
        value_name = "SECONDS"
    )]
    pub proxy_shutdown_grace: u64,
    /// `on` or `off` (follower: read the token from the config file) [default: on when a PAT is available]
    #[arg(long, env = "PAT_ROTATION", value_enum)]
    pub pat_rotation: Option<Switch>,
    /// Seconds: `lifetime_seconds` of each minted token
    #[arg(
        long,
        env = "PAT_TOKEN_LIFETIME",
        default_value_t = 900,
        value_name = "SECONDS"
    )]
    pub pat_token_lifetime: u64,
    /// Seconds between rotations while sessions are active; must be below the lifetime
    #[arg(
        long,
        env = "PAT_ROTATION_INTERVAL",
        default_value_t = 600,
        value_name = "SECONDS"
    )]
    pub pat_rotation_interval: u64,
    /// With no active sessions: `keepalive` rotates before expiry, `lapse` lets the token expire
    #[arg(long, env = "PAT_IDLE_POLICY", value_enum, default_value = "keepalive")]
    pub pat_idle_policy: IdlePolicy,
    /// URL of a JSON document with an integer `active_sessions` [default: proxied traffic counts]
    #[arg(long, env = "PAT_SESSIONS_URL", value_name = "URL")]
    pub pat_sessions_url: Option<String>,
    /// Seconds after the last proxied request that a session counts as active
    #[arg(
        long,
        env = "PAT_IDLE_AFTER",
        default_value_t = 3600,
        value_name = "SECONDS"
    )]
    pub pat_idle_after: u64,
    /// Seconds between publishing a new token and revoking the old one [default: 30, or the lifetime minus the interval where that is less]
    #[arg(long, env = "PAT_REVOKE_GRACE", value_name = "SECONDS")]
    pub pat_revoke_grace: Option<u64>,
    /// Comment on minted tokens
    #[arg(long, env = "PAT_COMMENT", default_value = "fresh-proxy-auto-rotated")]
    pub pat_comment: String,
    /// Other files that must hold the current token: `;`-separated KIND:PATH:KEY, KIND one of dotenv, json, yaml
    #[arg(long, env = "PAT_SINKS", value_name = "SPEC")]
    pub pat_sinks: Option<String>,
    /// Revoke the bootstrap PAT once a minted one replaces it, where it can be identified safely
    #[arg(long, env = "PAT_REVOKE_BOOTSTRAP", value_parser = parse_flag, action = clap::ArgAction::Set, default_value = "0", value_name = "0|1")]
    pub pat_revoke_bootstrap: bool,
    /// Fleet coordination (`PAT_COORDINATION`, `PAT_ETCD_*`).
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Log line format
    #[arg(long, env = "PROXY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, in tracing's `EnvFilter` syntax
    #[arg(long, env = "RUST_LOG", default_value = "info", value_name = "FILTER")]
    pub rust_log: String,
    /// Client connections and the trust boundary.
    #[command(flatten)]
    pub clients: ClientArgs,
    /// TOML file of extra routes: `[[route]]` with `prefix`, `upstream` and `mode` (chat, responses, anthropic, gemini, passthrough)
    #[arg(long, env = "PROXY_ROUTES_FILE", value_name = "PATH")]
    pub proxy_routes_file: Option<PathBuf>,
    /// JSON rules file replacing the built-in model rules (which fields go, for which models and APIs) [default: built in]
    #[arg(long, env = "PROXY_FILTER_RULES", value_name = "PATH")]
    pub proxy_filter_rules: Option<PathBuf>,
    /// `inject`: ask for usage on streamed chat requests that did not, where the model accepts it
    #[arg(long, env = "PROXY_STREAM_USAGE", value_enum, default_value = "keep")]
    pub proxy_stream_usage: StreamUsage,
}

/// `PAT_REVOKE_GRACE` unless the lifetime leaves less.
const DEFAULT_REVOKE_GRACE: u64 = 30;

/// Who rotates: `PAT_COORDINATION` and the etcd settings. `PAT_ETCD_PASSWORD` is read from the
/// environment only.
#[derive(Clone, Debug, clap::Args)]
pub struct FleetArgs {
    /// `file`: one rotator per config file on this host; `etcd`: one rotator for a fleet of hosts
    #[arg(long, env = "PAT_COORDINATION", value_enum, default_value = "file")]
    pub pat_coordination: Backend,
    /// Comma-separated etcd URLs (`http://` or `https://`), for `PAT_COORDINATION=etcd`
    #[arg(long, env = "PAT_ETCD_ENDPOINTS", value_name = "URLS")]
    pub pat_etcd_endpoints: Option<String>,
    /// Key prefix of the fleet in etcd [default: fresh-proxy/{host}/{user}]
    #[arg(long, env = "PAT_ETCD_PREFIX", value_name = "PREFIX")]
    pub pat_etcd_prefix: Option<String>,
    /// Seconds of the rotator's etcd lease: a rotator that dies is replaced within this
    #[arg(
        long,
        env = "PAT_ETCD_LEASE_TTL",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    pub pat_etcd_lease_ttl: u64,
    /// CA certificate (PEM) that signed etcd's server certificates
    #[arg(long, env = "PAT_ETCD_CA", value_name = "PATH")]
    pub pat_etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd, with `PAT_ETCD_KEY`
    #[arg(long, env = "PAT_ETCD_CERT", value_name = "PATH")]
    pub pat_etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd, with `PAT_ETCD_CERT`
    #[arg(long, env = "PAT_ETCD_KEY", value_name = "PATH")]
    pub pat_etcd_key: Option<PathBuf>,
    /// etcd user, with the password in `PAT_ETCD_PASSWORD`
    #[arg(long, env = "PAT_ETCD_USER", value_name = "NAME")]
    pub pat_etcd_user: Option<String>,
}

impl FleetArgs {
    /// The etcd settings for `PAT_COORDINATION=etcd`, checked; `None` for `file`.
    fn settings(
        &self,
        env: &crate::token::precedence::Environment,
        home: Option<&std::path::Path>,
    ) -> Result<Option<EtcdSettings>, ConfigError> {
        if self.pat_coordination == Backend::File {
            return Ok(None);
        }
        let endpoints: Vec<String> = self
            .pat_etcd_endpoints
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(ConfigError::var(
                "PAT_ETCD_ENDPOINTS",
                "PAT_COORDINATION=etcd needs the etcd URLs, e.g. http://127.0.0.1:2379",
            ));
        }
        for endpoint in &endpoints {
            match Url::parse(endpoint) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                _ => {
                    return Err(ConfigError::var(
                        "PAT_ETCD_ENDPOINTS",
                        format!("{endpoint:?} is not an http:// or https:// URL"),
                    ));
                }
            }
        }
        if self.pat_etcd_lease_ttl < 2 {
            return Err(ConfigError::var(
                "PAT_ETCD_LEASE_TTL",
                "must be at least 2 seconds (the lease is renewed every third of it)",
            ));
        }
        let file = |var: &str, path: &Option<PathBuf>| -> Result<Option<PathBuf>, ConfigError> {
            let Some(path) = path else { return Ok(None) };
            let path = expand_home(path, home);
            std::fs::metadata(&path)
                .map_err(|err| ConfigError::var(var, format!("{}: {err}", path.display())))?;
            Ok(Some(path))
        };
        let ca = file("PAT_ETCD_CA", &self.pat_etcd_ca)?;
        let identity = match (
            file("PAT_ETCD_CERT", &self.pat_etcd_cert)?,
            file("PAT_ETCD_KEY", &self.pat_etcd_key)?,
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::var(
                    "PAT_ETCD_KEY",
                    "PAT_ETCD_CERT needs its key",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::var(
                    "PAT_ETCD_CERT",
                    "PAT_ETCD_KEY needs its certificate",
                ));
            }
        };
        if (ca.is_some() || identity.is_some())
            && endpoints.iter().any(|e| e.starts_with("http://"))
        {
            return Err(ConfigError::var(
                "PAT_ETCD_ENDPOINTS",
                "TLS settings need https:// URLs",
            ));
        }
        let user = match (&self.pat_etcd_user, env.get("PAT_ETCD_PASSWORD")) {
            (Some(user), Some(password)) => Some((
                user.clone(),
                Token::new(password).map_err(|err| ConfigError::var("PAT_ETCD_PASSWORD", err))?,
            )),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::var(
                    "PAT_ETCD_PASSWORD",
                    "PAT_ETCD_USER needs its password",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::var(
                    "PAT_ETCD_USER",
                    "PAT_ETCD_PASSWORD is set without a user",
                ));
            }
        };
        Ok(Some(EtcdSettings {
            endpoints,
            prefix: self
                .pat_etcd_prefix
                .as_deref()
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned),
            lease_ttl: Duration::from_secs(self.pat_etcd_lease_ttl),
            ca,
            identity,
            user,
        }))
    }
}

/// `PROXY_STREAM_USAGE` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StreamUsage {
    /// Forward `stream_options` as the client sent it (or as a model rule leaves it).
    Keep,
    /// Add `stream_options.include_usage` to streamed chat requests that lack it.
    Inject,
}

/// Routing settings: `PROXY_ROUTES_FILE`, `PROXY_FILTER_RULES`, `PROXY_STREAM_USAGE`.
#[derive(Clone, Debug)]
pub struct RoutingSettings {
    /// Routes from `PROXY_ROUTES_FILE`, ahead of the defaults.
    pub routes: Vec<crate::proxy::Route>,
    /// The model rules: built in, or `PROXY_FILTER_RULES`.
    pub rules: fresh_filter::ModelRules,
    /// `PROXY_STREAM_USAGE`.
    pub stream_usage: StreamUsage,
}

impl RoutingSettings {
    /// Reads and checks the routes and rules files. Their errors name the file and line.
    fn load(cli: &Cli, host: &Url, home: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let read = |var: &str, path: &std::path::Path| {
            let path = expand_home(path, home);
            std::fs::read_to_string(&path)
                .map(|text| (path.clone(), text))
                .map_err(|err| {
                    ConfigError::var(var, format!("cannot read {}: {err}", path.display()))
                })
        };
        let routes = match &cli.proxy_routes_file {
            Some(path) => {
                let (path, text) = read("PROXY_ROUTES_FILE", path)?;
                crate::proxy::routes::parse_routes_file(
                    &text,
                    &path,
                    host,
                    cli.proxy_allow_insecure_upstream,
                )
                .map_err(|err| ConfigError::var("PROXY_ROUTES_FILE", err))?
            }
            None => Vec::new(),
        };
        let rules = match &cli.proxy_filter_rules {
            Some(path) => {
                let (path, text) = read("PROXY_FILTER_RULES", path)?;
                fresh_filter::ModelRules::parse(&text).map_err(|err| {
                    ConfigError::var(
                        "PROXY_FILTER_RULES",
                        format!("{}:{}: {}", path.display(), err.line, err.message),
                    )
                })?
            }
            None => fresh_filter::ModelRules::builtin(),
        };
        Ok(Self {
            routes,
            rules,
            stream_usage: cli.proxy_stream_usage,
        })
    }
}

/// `on` / `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// Log line formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_flag(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err("expected 1 or 0".to_owned()),
    }
}

/// Secrets, read from the environment only.
#[derive(Clone, Default)]
pub struct Secrets {
    /// `DATABRICKS_TOKEN`.
    pub token: Option<String>,
    /// `DATABRICKS_CLIENT_SECRET`.
    pub client_secret: Option<String>,
    /// The rest of the environment, for the precedence rules (`DATABRICKS_*`) and the JWT of
    /// `env-oidc`, which lives in a variable named by a setting.
    pub env: Environment,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("token", &self.token.as_ref().map(|_| "****"))
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "****"),
            )
            .field("env", &self.env)
            .finish()
    }
}

impl Secrets {
    /// Read `DATABRICKS_TOKEN`, `DATABRICKS_CLIENT_SECRET` and the environment; empty values
    /// count as unset.
    pub fn from_env() -> Self {
        let get = |name| {
            std::env::var(name)
                .ok()
                .filter(|v: &String| !v.trim().is_empty())
        };
        Self {
            token: get("DATABRICKS_TOKEN"),
            client_secret: get("DATABRICKS_CLIENT_SECRET"),
            env: Environment(std::env::vars().collect()),
        }
    }
}

/// How the proxy gets its token.
#[derive(Clone, Debug)]
pub enum TokenMode {
    /// Rotate PATs in this process (one rotator per config file; others follow).
    Rotate {
        /// `DATABRICKS_TOKEN`, a bootstrap candidate after a live token minted earlier.
        env_token: Option<Token>,
    },
    /// Follow the config file; another process rotates. `env_token` serves when the file has
    /// none.
    Follow {
        /// `DATABRICKS_TOKEN`, used while the file's profile has no token.
        env_token: Option<Token>,
    },
    /// OAuth M2M client credentials.
    OAuth {
        /// Client id.
        client_id: String,
        /// Client secret.
        client_secret: Token,
    },
    /// U2M tokens from `databricks auth token`.
    DatabricksCli {
        /// `DATABRICKS_CLI_PATH`, or `databricks` on `PATH`.
        cli_path: String,
        /// The profile to pass as `--profile`; `None`: `--host`.
        profile: Option<String>,
    },
    /// Workload identity federation: a platform JWT exchanged for a Databricks token.
    Oidc {
        /// Where the JWT comes from.
        subject: SubjectToken,
        /// `DATABRICKS_CLIENT_ID`, the service principal of the federation policy, if set.
        client_id: Option<String>,
    },
}

impl TokenMode {
    /// The auth method, by its SDK name.
    pub fn method(&self) -> Method {
        match self {
            Self::Rotate { .. } | Self::Follow { .. } => Method::Pat,
            Self::OAuth { .. } => Method::OAuthM2m,
            Self::DatabricksCli { .. } => Method::DatabricksCli,
            Self::Oidc {
                subject: SubjectToken::Env { .. },
                ..
            } => Method::EnvOidc,
            Self::Oidc {
                subject: SubjectToken::File(_),
                ..
            } => Method::FileOidc,
        }
    }
}

/// The JWT of workload identity federation.
#[derive(Clone, Debug)]
pub enum SubjectToken {
    /// `env-oidc`: the value of an environment variable, read at start (a process's
    /// environment does not change).
    Env {
        /// The variable's name.
        var: String,
        /// Its value; prints as `****`.
        jwt: Token,
    },
    /// `file-oidc`: a file, read again at every exchange because the platform replaces it.
    File(PathBuf),
}

/// Rotation settings (`PAT_*`).
#[derive(Clone, Debug)]
pub struct RotationSettings {
    /// `PAT_TOKEN_LIFETIME`.
    pub lifetime: Duration,
    /// `PAT_ROTATION_INTERVAL`.
    pub interval: Duration,
    /// `PAT_IDLE_POLICY`.
    pub idle_policy: IdlePolicy,
    /// `PAT_SESSIONS_URL`.
    pub sessions_url: Option<Url>,
    /// `PAT_IDLE_AFTER`.
    pub idle_after: Duration,
    /// `PAT_REVOKE_GRACE`.
    pub revoke_grace: Duration,
    /// `PAT_COMMENT`.
    pub comment: String,
    /// `PAT_SINKS`, unparsed.
    pub sinks: Option<String>,
    /// `PAT_REVOKE_BOOTSTRAP`.
    pub revoke_bootstrap: bool,
    /// `PAT_COORDINATION=etcd` and its settings; `None`: the lock file.
    pub etcd: Option<EtcdSettings>,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The config file.
    pub config_file: PathBuf,
    /// The profile in it.
    pub profile: String,
    /// Workspace URL, without a trailing slash.
    pub host: Url,
    /// Upstream base URL, without a trailing slash.
    pub upstream_base: Url,
    /// Largest request body.
    pub max_body: usize,
    /// Time to wait for upstream response headers.
    pub upstream_timeout: Duration,
    /// Bytes of request bodies buffered at once.
    pub body_budget: usize,
    /// How long a replayable request may wait across upstream 429s.
    pub rate_limit_wait: Duration,
    /// Time in-flight requests get after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Where the token comes from.
    pub token_mode: TokenMode,
    /// Rotation settings.
    pub rotation: RotationSettings,
    /// Log line format.
    pub log_format: LogFormat,
    /// Client connections and the trust boundary.
    pub clients: ClientSettings,
    /// Problems that did not stop the start, to log once logging is set up.
    pub warnings: Vec<String>,
    /// Routes, model rules and stream usage.
    pub routing: RoutingSettings,
}

/// Invalid configuration: one message naming the variable or file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// A problem with the variable `name`.
    pub fn var(name: &str, problem: impl std::fmt::Display) -> Self {
        Self(format!("{name}: {problem}"))
    }

    /// A value clap refused (a number that is not one, an unknown choice), named by its
    /// environment variable as every other configuration error is: clap's own message names
    /// only the flag. `None` for help, version and other command-line errors, which clap
    /// reports itself.
    pub fn from_clap(err: &clap::Error) -> Option<Self> {
        use clap::CommandFactory;
        use clap::error::{ContextKind, ContextValue};

        let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
            return None;
        };
        // "--pat-token-lifetime <SECONDS>"
        let long = arg.split_whitespace().next()?.strip_prefix("--")?;
        let command = Cli::command();
        let variable = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long))?
            .get_env()?
            .to_string_lossy()
            .into_owned();
        // clap's message up to its "For more information" paragraph, on one line.
        let rendered = err.to_string();
        let problem = rendered
            .lines()
            .take_while(|line| !line.trim().is_empty())
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ");
        Some(Self::var(&variable, problem.trim_start_matches("error: ")))
    }
}

impl Config {
    /// Validate `cli` and `secrets`, reading the config file. `home` is where `~` points.
    pub fn load(cli: &Cli, secrets: &Secrets, home: Option<PathBuf>) -> Result<Self, ConfigError> {
        let config_file = match &cli.databricks_config_file {
            Some(path) => expand_home(path, home.as_deref()),
            None => home
                .clone()
                .map(|home| home.join(".databrickscfg"))
                .ok_or_else(|| {
                    ConfigError::var("DATABRICKS_CONFIG_FILE", "not set and HOME is unknown")
                })?,
        };
        let mut warnings = Vec::new();
        // Why the file could not be read, when the environment alone was enough to start.
        let mut unreadable = None;
        let file = match read_config_file(&config_file) {
            Ok(file) => file,
            // The environment alone names the workspace and a credential: a torn or
            // unreadable file is no reason to stay down.
            Err(err) if environment_suffices(cli, secrets) => {
                warnings.push(format!(
                    "{err}; starting from DATABRICKS_HOST and the credential in the environment"
                ));
                unreadable = Some(err.to_string());
                None
            }
            Err(err) => return Err(err),
        };
        let explicit = explicit_settings(cli);
        let mut env = secrets.env.clone();
        for (var, value) in [
            (TOKEN.env, &secrets.token),
            (CLIENT_SECRET.env, &secrets.client_secret),
        ] {
            match value {
                Some(value) => env.0.insert(var.to_owned(), value.clone()),
                None => env.0.remove(var),
            };
        }
        let resolved = precedence::resolve(precedence::Inputs {
            explicit: &explicit,
            env: &env,
            file: file.as_ref(),
        })
        .map_err(|err| ConfigError(err.0))?;
        let named = resolved.get(PROFILE).map(str::to_owned);
        let profile_name = resolved
            .profile
            .clone()
            .or_else(|| named.clone())
            .unwrap_or_else(|| "DEFAULT".to_owned());
        // Why the file gave nothing, for the messages that need a value from it.
        let absent = match &file {
            None => Some(
                unreadable.unwrap_or_else(|| format!("{} does not exist", config_file.display())),
            ),
            Some(_) if resolved.profile.is_some() => None,
            Some(_) if named.is_none() && !resolved.set_before_file().is_empty() => Some(format!(
                "{} is not read: no profile is named and {} set (set DATABRICKS_CONFIG_PROFILE to read it)",
                config_file.display(),
                resolved.set_before_file().join(", ")
            )),
            Some(_) => Some(format!(
                "{} has no profile [{profile_name}]",
                config_file.display()
            )),
        };
        let lacks = |what: &str| {
            absent.clone().unwrap_or_else(|| {
                format!(
                    "profile [{profile_name}] in {} has no {what}",
                    config_file.display()
                )
            })
        };

        let token_mode = token_mode(cli, &resolved, file.as_ref(), &env, &lacks("token"))?;

        let host_text = resolved.get(HOST).map(str::to_owned).ok_or_else(|| {
            ConfigError::var("DATABRICKS_HOST", format!("not set, and {}", lacks("host")))
        })?;
        let host_var = match resolved.origin(HOST) {
            Some(Origin::Profile(_)) => resolved.name_of(HOST, file.as_ref()),
            _ => "DATABRICKS_HOST".to_owned(),
        };
        let host = parse_base_url(&host_var, &host_text, false)?;
        let upstream_base = match &cli.proxy_upstream_base {
            Some(base) => parse_base_url(
                "PROXY_UPSTREAM_BASE",
                base,
                cli.proxy_allow_insecure_upstream,
            )?,
            None => parse_base_url(
                "DATABRICKS_HOST",
                &format!("{}/serving-endpoints", host.as_str().trim_end_matches('/')),
                false,
            )?,
        };

        let lifetime = Duration::from_secs(cli.pat_token_lifetime);
        let interval = Duration::from_secs(cli.pat_rotation_interval);
        if matches!(token_mode, TokenMode::Rotate { .. }) {
            if cli.pat_token_lifetime == 0 {
                return Err(ConfigError::var("PAT_TOKEN_LIFETIME", "must be above 0"));
            }
            if cli.pat_rotation_interval == 0 || interval >= lifetime {
                return Err(ConfigError::var(
                    "PAT_ROTATION_INTERVAL",
                    format!(
                        "{} s must be above 0 and below PAT_TOKEN_LIFETIME ({} s)",
                        cli.pat_rotation_interval, cli.pat_token_lifetime
                    ),
                ));
            }
            if let Some(grace) = cli.pat_revoke_grace
                && grace >= cli.pat_token_lifetime
            {
                return Err(ConfigError::var(
                    "PAT_REVOKE_GRACE",
                    format!(
                        "{grace} s must be below PAT_TOKEN_LIFETIME ({} s)",
                        cli.pat_token_lifetime
                    ),
                ));
            }
        }
        let sessions_url = cli
            .pat_sessions_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .map(|u| Url::parse(u.trim()).map_err(|err| ConfigError::var("PAT_SESSIONS_URL", err)))
            .transpose()?;
        if cli.proxy_max_body == 0 {
            return Err(ConfigError::var("PROXY_MAX_BODY", "must be above 0"));
        }
        // A JSON body counts three times its size while it is filtered.
        if cli.proxy_body_budget / 3 < cli.proxy_max_body {
            return Err(ConfigError::var(
                "PROXY_BODY_BUDGET",
                format!(
                    "must be at least three times PROXY_MAX_BODY ({} bytes), or the largest JSON bodies could never be filtered",
                    cli.proxy_max_body
                ),
            ));
        }
        if cli.proxy_upstream_timeout == 0 {
            return Err(ConfigError::var(
                "PROXY_UPSTREAM_TIMEOUT",
                "must be above 0",
            ));
        }

        let routing = RoutingSettings::load(cli, &host, home.as_deref())?;
        let etcd = cli.fleet.settings(&secrets.env, home.as_deref())?;
        if etcd.is_some() && !matches!(token_mode, TokenMode::Rotate { .. }) {
            return Err(ConfigError::var(
                "PAT_COORDINATION",
                "etcd elects the PAT rotator of a fleet; this configuration does not rotate PATs (check DATABRICKS_AUTH_TYPE and PAT_ROTATION)",
            ));
        }

        Ok(Self {
            routing,
            listen: SocketAddr::new(cli.proxy_host, cli.proxy_port),
            config_file,
            profile: profile_name,
            host,
            upstream_base,
            max_body: cli.proxy_max_body,
            upstream_timeout: Duration::from_secs(cli.proxy_upstream_timeout),
            body_budget: cli.proxy_body_budget,
            rate_limit_wait: Duration::from_secs(cli.proxy_rate_limit_wait),
            shutdown_grace: Duration::from_secs(cli.proxy_shutdown_grace),
            token_mode,
            rotation: RotationSettings {
                lifetime,
                interval,
                idle_policy: cli.pat_idle_policy,
                sessions_url,
                idle_after: Duration::from_secs(cli.pat_idle_after),
                revoke_grace: Duration::from_secs(cli.pat_revoke_grace.unwrap_or_else(|| {
                    // The replaced token expires by itself that long after its successor: a
                    // longer grace could not be used, and would fail the check above.
                    DEFAULT_REVOKE_GRACE.min(
                        cli.pat_token_lifetime
                            .saturating_sub(cli.pat_rotation_interval)
                            .max(1),
                    )
                })),
                comment: cli.pat_comment.clone(),
                sinks: cli.pat_sinks.clone().filter(|s| !s.trim().is_empty()),
                revoke_bootstrap: cli.pat_revoke_bootstrap,
                etcd,
            },
            log_format: cli.log_format,
            clients: ClientSettings::from_args(&cli.clients)?,
            warnings,
        })
    }
}

/// The settings given as flags (or read by clap from their variables), by profile key.
fn explicit_settings(cli: &Cli) -> BTreeMap<String, String> {
    [
        (HOST.key, cli.databricks_host.clone()),
        (PROFILE.key, cli.databricks_config_profile.clone()),
        (CLIENT_ID.key, cli.databricks_client_id.clone()),
        (AUTH_TYPE.key, cli.databricks_auth_type.clone()),
        (CLI_PATH.key, cli.databricks_cli_path.clone()),
        (OIDC_TOKEN_ENV.key, cli.databricks_oidc_token_env.clone()),
        (
            OIDC_TOKEN_FILEPATH.key,
            cli.databricks_oidc_token_filepath.clone(),
        ),
    ]
    .into_iter()
    .filter_map(|(key, value)| Some((key.to_owned(), value.filter(|v| !v.trim().is_empty())?)))
    .collect()
}

/// The config file, parsed the way the CLI and SDKs read it; `None` when it does not exist.
fn read_config_file(path: &Path) -> Result<Option<ConfigFileView>, ConfigError> {
    // Bounded, and without blocking on a FIFO or following the file into a device.
    let text =
        match fresh_token::small_file::read_to_string(path, fresh_token::small_file::Links::Follow)
        {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(ConfigError(format!(
                    "cannot read {}: {err}",
                    path.display()
                )));
            }
        };
    let options = ini::ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        enabled_indented_mutiline_value: true,
        ..ini::ParseOption::default()
    };
    let parsed = ini::Ini::load_from_str_opt(&text, options).map_err(|err| {
        ConfigError(format!(
            "{} is not a valid config file: line {}, column {}",
            path.display(),
            err.line,
            err.col
        ))
    })?;
    let sections = parsed
        .iter()
        .filter_map(|(name, props)| {
            let keys = props
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            Some((name?.trim().to_owned(), keys))
        })
        .collect();
    Ok(Some(ConfigFileView {
        path: path.to_owned(),
        sections,
    }))
}

fn secret(
    resolved: &Resolved,
    attr: precedence::Attr,
    file: Option<&ConfigFileView>,
) -> Result<Option<Token>, ConfigError> {
    resolved
        .get(attr)
        .map(Token::new)
        .transpose()
        .map_err(|err| ConfigError::var(&resolved.name_of(attr, file), err))
}

fn token_mode(
    cli: &Cli,
    resolved: &Resolved,
    file: Option<&ConfigFileView>,
    env: &Environment,
    lacks_token: &str,
) -> Result<TokenMode, ConfigError> {
    let method = resolved.method;
    if method != Method::Pat && cli.pat_rotation == Some(Switch::On) {
        return Err(ConfigError::var(
            "PAT_ROTATION",
            format!(
                "on, but the auth method is {}: PATs are rotated only with pat",
                method.name()
            ),
        ));
    }
    let client_id = resolved.get(CLIENT_ID).map(str::to_owned);
    match method {
        Method::Pat => {
            let token = secret(resolved, TOKEN, file)?;
            // A token from the profile is followed in the file; one from the environment is a
            // bootstrap candidate after a token minted earlier.
            let (env_token, pat_available) = match resolved.origin(TOKEN) {
                Some(Origin::Profile(_)) => (None, true),
                Some(_) => (token, true),
                None => (None, false),
            };
            match (cli.pat_rotation, pat_available) {
                (Some(Switch::Off), true) => Ok(TokenMode::Follow { env_token }),
                (_, true) => Ok(TokenMode::Rotate { env_token }),
                (Some(Switch::On), false) => Err(ConfigError::var(
                    "PAT_ROTATION",
                    format!(
                        "on, but no PAT to start from ({lacks_token}): set DATABRICKS_TOKEN or put a token in the profile"
                    ),
                )),
                (_, false) => Err(ConfigError(format!(
                    "no token: {lacks_token}, and neither DATABRICKS_TOKEN nor DATABRICKS_CLIENT_ID/DATABRICKS_CLIENT_SECRET is set (for `databricks auth login` tokens set DATABRICKS_AUTH_TYPE=databricks-cli)"
                ))),
            }
        }
        Method::OAuthM2m => {
            let client_id = client_id.ok_or_else(|| {
                ConfigError::var(CLIENT_ID.env, "not set, but the auth type is oauth-m2m")
            })?;
            let client_secret = secret(resolved, CLIENT_SECRET, file)?.ok_or_else(|| {
                ConfigError::var(CLIENT_SECRET.env, "not set, but DATABRICKS_CLIENT_ID is")
            })?;
            Ok(TokenMode::OAuth {
                client_id,
                client_secret,
            })
        }
        Method::DatabricksCli => Ok(TokenMode::DatabricksCli {
            cli_path: resolved.get(CLI_PATH).unwrap_or("databricks").to_owned(),
            profile: resolved.profile.clone(),
        }),
        Method::EnvOidc => {
            let var = resolved
                .get(OIDC_TOKEN_ENV)
                .unwrap_or(DEFAULT_OIDC_TOKEN_ENV)
                .to_owned();
            let jwt = env.get(&var).ok_or_else(|| {
                ConfigError::var(
                    &var,
                    "not set, but the auth type is env-oidc and the JWT is read from it",
                )
            })?;
            let jwt = Token::new(jwt).map_err(|err| ConfigError::var(&var, err))?;
            Ok(TokenMode::Oidc {
                subject: SubjectToken::Env { var, jwt },
                client_id,
            })
        }
        Method::FileOidc => {
            let name = resolved.name_of(OIDC_TOKEN_FILEPATH, file);
            let path = resolved.get(OIDC_TOKEN_FILEPATH).ok_or_else(|| {
                ConfigError::var(
                    OIDC_TOKEN_FILEPATH.env,
                    "not set, but the auth type is file-oidc",
                )
            })?;
            let path = PathBuf::from(path);
            if let Err(err) = std::fs::metadata(&path) {
                return Err(ConfigError::var(
                    &name,
                    format!("cannot read {}: {err}", path.display()),
                ));
            }
            Ok(TokenMode::Oidc {
                subject: SubjectToken::File(path),
                client_id,
            })
        }
    }
}

/// Whether `DATABRICKS_HOST` and a credential (`DATABRICKS_TOKEN`, or a client id and
/// secret) are all set outside the config file.
fn environment_suffices(cli: &Cli, secrets: &Secrets) -> bool {
    let set = |value: &Option<String>| value.as_deref().is_some_and(|v| !v.trim().is_empty());
    set(&cli.databricks_host)
        && (set(&secrets.token) || (set(&cli.databricks_client_id) && set(&secrets.client_secret)))
}

fn expand_home(path: &std::path::Path, home: Option<&std::path::Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_owned(),
    }
}

/// Parse a base URL: `https://`, or `http://` for loopback hosts (or anywhere when
/// `allow_insecure`). A bare host name gets `https://`, as the Databricks SDKs do.
fn parse_base_url(var: &str, text: &str, allow_insecure: bool) -> Result<Url, ConfigError> {
    let text = text.trim();
    let with_scheme = if text.contains("://") {
        text.to_owned()
    } else {
        format!("https://{text}")
    };
    let url = Url::parse(&with_scheme)
        .map_err(|err| ConfigError::var(var, format!("not a URL ({err})")))?;
    if url.host().is_none() {
        return Err(ConfigError::var(var, "URL has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::var(var, "URL must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::var(
            var,
            "URL must not have a query or fragment",
        ));
    }
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure || is_loopback(&url) => {}
        "http" => {
            let hint = if var == "PROXY_UPSTREAM_BASE" {
                " (set PROXY_ALLOW_INSECURE_UPSTREAM=1 to allow it)"
            } else {
                ""
            };
            return Err(ConfigError::var(
                var,
                format!("plain http:// is only allowed for loopback hosts{hint}"),
            ));
        }
        other => {
            return Err(ConfigError::var(
                var,
                format!("unsupported scheme {other}://"),
            ));
        }
    }
    // Paths are appended to the base, so keep it without a trailing slash.
    let trimmed = url.as_str().trim_end_matches('/').to_owned();
    Url::parse(&trimmed).map_err(|err| ConfigError::var(var, err))
}

/// Whether `url` points at this machine.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        name: &'static str,
        file: Option<&'static str>,
        args: &'static [&'static str],
        token: Option<&'static str>,
        client_secret: Option<&'static str>,
        expect: Result<fn(&Config), &'static [&'static str]>,
    }

    const GOOD: &str =
        "[DEFAULT]\nhost = https://adb-1.azuredatabricks.net/\ntoken = dapi-profile\n";

    fn run(case: &Case) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".databrickscfg");
        if let Some(text) = case.file {
            std::fs::write(&path, text).unwrap();
        }
        let mut args = vec!["fresh-proxy".to_owned()];
        args.extend(case.args.iter().map(|a| a.to_string()));
        let cli = Cli::try_parse_from(args).unwrap();
        let secrets = Secrets {
            token: case.token.map(str::to_owned),
            client_secret: case.client_secret.map(str::to_owned),
            env: Environment::default(),
        };
        Config::load(&cli, &secrets, Some(dir.path().to_owned()))
    }

    #[test]
    fn load_table() {
        let cases = [
            Case {
                name: "defaults from the profile",
                file: Some(GOOD),
                args: &[],
                token: None,
                client_secret: None,
                expect: Ok(|c| {
                    assert_eq!(c.listen, "127.0.0.1:4000".parse().unwrap());
                    assert_eq!(c.host.as_str(), "https://adb-1.azuredatabricks.net/");
                    assert_eq!(
                        c.upstream_base.as_str(),
                        "https://adb-1.azuredatabricks.net/serving-endpoints"
                    );
                    assert!(matches!(
                        c.token_mode,
                        TokenMode::Rotate { env_token: None }
                    ));
                    assert_eq!(c.rotation.lifetime, Duration::from_secs(900));
                    assert_eq!(c.rotation.interval, Duration::from_secs(600));
                    assert_eq!(c.max_body, 33_554_432);
                    assert_eq!(c.body_budget, 268_435_456);
                    assert_eq!(c.rate_limit_wait, Duration::from_secs(60));
                }),
            },
            Case {
                name: "rate limit wait off, larger body budget",
                file: Some(GOOD),
                args: &[
                    "--proxy-rate-limit-wait",
                    "0",
                    "--proxy-body-budget",
                    "1073741824",
                ],
                token: None,
                client_secret: None,
                expect: Ok(|c| {
                    assert_eq!(c.rate_limit_wait, Duration::ZERO);
                    assert_eq!(c.body_budget, 1 << 30);
                }),
            },
            Case {
                name: "body budget below the largest body",
                file: Some(GOOD),
                args: &["--proxy-body-budget", "1048576"],
                token: None,
                client_secret: None,
                expect: Err(&["PROXY_BODY_BUDGET", "PROXY_MAX_BODY"]),
            },
            Case {
                name: "bare host gets https",
                file: None,
                args: &["--databricks-host", "example.cloud.databricks.com"],
                token: Some("dapi-env"),
                client_secret: None,
                expect: Ok(|c| {
                    assert_eq!(c.host.as_str(), "https://example.cloud.databricks.com/")
                }),
            },
            Case {
                name: "interval not below lifetime",
                file: Some(GOOD),
                args: &["--pat-rotation-interval", "900"],
                token: None,
                client_secret: None,
                expect: Err(&["PAT_ROTATION_INTERVAL", "PAT_TOKEN_LIFETIME"]),
            },
            Case {
                name: "profile missing and no other source",
                file: Some(GOOD),
                args: &[
                    "--databricks-config-profile",
                    "prod",
                    "--databricks-host",
                    "https://h",
                ],
                token: None,
                client_secret: None,
                expect: Err(&["[prod]", ".databrickscfg"]),
            },
            Case {
                name: "no file, no host",
                file: None,
                args: &[],
                token: Some("dapi-env"),
                client_secret: None,
                expect: Err(&["DATABRICKS_HOST"]),
            },
            Case {
                name: "plain http to a remote host",
                file: None,
                args: &["--databricks-host", "http://example.com"],
                token: Some("dapi-env"),
                client_secret: None,
                expect: Err(&["DATABRICKS_HOST", "loopback"]),
            },
            Case {
                name: "plain http to loopback is fine",
                file: None,
                args: &["--databricks-host", "http://127.0.0.1:8080"],
                token: Some("dapi-env"),
                client_secret: None,
                expect: Ok(|c| {
                    assert_eq!(
                        c.upstream_base.as_str(),
                        "http://127.0.0.1:8080/serving-endpoints"
                    )
                }),
            },
            Case {
                name: "insecure upstream refused",
                file: Some(GOOD),
                args: &["--proxy-upstream-base", "http://10.0.0.5/x"],
                token: None,
                client_secret: None,
                expect: Err(&["PROXY_UPSTREAM_BASE", "PROXY_ALLOW_INSECURE_UPSTREAM"]),
            },
            Case {
                name: "insecure upstream allowed",
                file: Some(GOOD),
                args: &[
                    "--proxy-upstream-base",
                    "http://10.0.0.5/x/",
                    "--proxy-allow-insecure-upstream",
                    "1",
                ],
                token: None,
                client_secret: None,
                expect: Ok(|c| assert_eq!(c.upstream_base.as_str(), "http://10.0.0.5/x")),
            },
            Case {
                name: "unparsable upstream",
                file: Some(GOOD),
                args: &["--proxy-upstream-base", "https://exa mple.com"],
                token: None,
                client_secret: None,
                expect: Err(&["PROXY_UPSTREAM_BASE", "not a URL"]),
            },
            Case {
                name: "follower mode",
                file: Some(GOOD),
                args: &["--pat-rotation", "off"],
                token: None,
                client_secret: None,
                expect: Ok(|c| assert!(matches!(c.token_mode, TokenMode::Follow { .. }))),
            },
            Case {
                name: "follower mode without a token to follow",
                file: Some("[DEFAULT]\nhost = https://h\n"),
                args: &["--pat-rotation", "off"],
                token: None,
                client_secret: None,
                expect: Err(&["no token", ".databrickscfg", "DATABRICKS_TOKEN"]),
            },
            Case {
                // The profile is named: without it, the SDKs skip the file once a token is set.
                name: "follower mode with only the environment's token",
                file: Some("[DEFAULT]\nhost = https://h\n"),
                args: &[
                    "--pat-rotation",
                    "off",
                    "--databricks-config-profile",
                    "DEFAULT",
                ],
                token: Some("dapi-env"),
                client_secret: None,
                expect: Ok(|c| {
                    assert!(matches!(
                        &c.token_mode,
                        TokenMode::Follow { env_token: Some(_) }
                    ))
                }),
            },
            Case {
                name: "follower mode without a PAT takes OAuth",
                file: Some("[DEFAULT]\nhost = https://h\n"),
                args: &[
                    "--pat-rotation",
                    "off",
                    "--databricks-client-id",
                    "sp-1",
                    "--databricks-config-profile",
                    "DEFAULT",
                ],
                token: None,
                client_secret: Some("secret-1"),
                expect: Ok(|c| assert!(matches!(&c.token_mode, TokenMode::OAuth { .. }))),
            },
            Case {
                name: "oauth when no PAT",
                file: Some("[DEFAULT]\nhost = https://h\n"),
                args: &[
                    "--databricks-client-id",
                    "sp-1",
                    "--databricks-host",
                    "https://h",
                ],
                token: None,
                client_secret: Some("secret-1"),
                expect: Ok(|c| {
                    assert!(
                        matches!(&c.token_mode, TokenMode::OAuth { client_id, .. } if client_id == "sp-1")
                    )
                }),
            },
            Case {
                name: "client id without secret",
                file: Some("[DEFAULT]\nhost = https://h\n"),
                args: &[
                    "--databricks-client-id",
                    "sp-1",
                    "--databricks-host",
                    "https://h",
                ],
                token: None,
                client_secret: None,
                expect: Err(&["DATABRICKS_CLIENT_SECRET"]),
            },
            Case {
                name: "token with a line break",
                file: Some(GOOD),
                args: &[],
                token: Some("dapi-leak\nX-Evil: 1"),
                client_secret: None,
                expect: Err(&["DATABRICKS_TOKEN"]),
            },
            Case {
                name: "torn config file, host only in the file",
                file: Some("[DEFAULT\nhost = https://h\n"),
                args: &[],
                token: Some("dapi-env"),
                client_secret: None,
                expect: Err(&[".databrickscfg", "not a valid config file", "line "]),
            },
            Case {
                name: "torn config file, token only in the file",
                file: Some("[DEFAULT\nhost = https://h\n"),
                args: &["--databricks-host", "https://h"],
                token: None,
                client_secret: None,
                expect: Err(&[".databrickscfg", "not a valid config file"]),
            },
            Case {
                name: "torn config file, host and token in the environment",
                file: Some("[DEFAULT\nhost = https://h\n"),
                args: &["--databricks-host", "https://env-host"],
                token: Some("dapi-env"),
                client_secret: None,
                expect: Ok(|c| {
                    assert_eq!(c.host.as_str(), "https://env-host/");
                    assert!(matches!(
                        c.token_mode,
                        TokenMode::Rotate { env_token: Some(_) }
                    ));
                    assert_eq!(c.warnings.len(), 1);
                    assert!(c.warnings[0].contains("not a valid config file"));
                    assert!(c.warnings[0].contains("DATABRICKS_HOST"));
                }),
            },
            Case {
                // The SDKs do not mix: a host set outside the file skips the file's token.
                name: "host from the flags, token from the file",
                file: Some(GOOD),
                args: &["--databricks-host", "https://other.example.com"],
                token: None,
                client_secret: None,
                expect: Err(&[
                    "no token",
                    "is not read",
                    "DATABRICKS_HOST",
                    "DATABRICKS_CONFIG_PROFILE",
                ]),
            },
            Case {
                name: "databricks-cli from the profile",
                file: Some("[dev]\nhost = https://h\nauth_type = databricks-cli\n"),
                args: &["--databricks-config-profile", "dev"],
                token: None,
                client_secret: None,
                expect: Ok(|c| {
                    assert!(matches!(
                        &c.token_mode,
                        TokenMode::DatabricksCli { cli_path, profile: Some(p) }
                            if cli_path == "databricks" && p == "dev"
                    ));
                    assert_eq!(c.profile, "dev");
                }),
            },
            Case {
                name: "databricks-cli without a profile runs --host",
                file: None,
                args: &[
                    "--databricks-auth-type",
                    "databricks-cli",
                    "--databricks-host",
                    "https://h",
                    "--databricks-cli-path",
                    "/opt/databricks",
                ],
                token: None,
                client_secret: None,
                expect: Ok(|c| {
                    assert!(matches!(
                        &c.token_mode,
                        TokenMode::DatabricksCli { cli_path, profile: None } if cli_path == "/opt/databricks"
                    ))
                }),
            },
            Case {
                name: "two methods in one profile",
                file: Some(
                    "[DEFAULT]\nhost = https://h\ntoken = dapi-1\nclient_id = sp\nclient_secret = dose-2\n",
                ),
                args: &[],
                token: None,
                client_secret: None,
                expect: Err(&["more than one authorization method configured: oauth and pat"]),
            },
            Case {
                name: "an auth type the proxy lacks",
                file: Some("[DEFAULT]\nhost = https://h\nauth_type = azure-cli\n"),
                args: &[],
                token: None,
                client_secret: None,
                expect: Err(&[
                    "`auth_type` in profile [DEFAULT]",
                    "azure-cli",
                    "not supported",
                ]),
            },
            Case {
                name: "rotation forced on with another method",
                file: Some("[DEFAULT]\nhost = https://h\nauth_type = databricks-cli\n"),
                args: &["--pat-rotation", "on"],
                token: None,
                client_secret: None,
                expect: Err(&["PAT_ROTATION", "databricks-cli"]),
            },
            Case {
                name: "env-oidc without its variable",
                file: None,
                args: &[
                    "--databricks-auth-type",
                    "env-oidc",
                    "--databricks-host",
                    "https://h",
                    "--databricks-oidc-token-env",
                    "MY_JWT",
                ],
                token: None,
                client_secret: None,
                expect: Err(&["MY_JWT: not set"]),
            },
            Case {
                name: "file-oidc with a missing file",
                file: None,
                args: &[
                    "--databricks-auth-type",
                    "file-oidc",
                    "--databricks-host",
                    "https://h",
                    "--databricks-oidc-token-filepath",
                    "/nonexistent/jwt",
                ],
                token: None,
                client_secret: None,
                expect: Err(&["DATABRICKS_OIDC_TOKEN_FILEPATH", "/nonexistent/jwt"]),
            },
            Case {
                name: "rotation forced on without a PAT",
                file: Some("[DEFAULT]\nhost = https://h\n"),
                args: &["--pat-rotation", "on"],
                token: None,
                client_secret: None,
                expect: Err(&["PAT_ROTATION"]),
            },
        ];
        for case in &cases {
            match (run(case), &case.expect) {
                (Ok(config), Ok(check)) => check(&config),
                (Err(err), Err(needles)) => {
                    let message = err.to_string();
                    for needle in *needles {
                        assert!(
                            message.contains(needle),
                            "{}: {message:?} lacks {needle:?}",
                            case.name
                        );
                    }
                    assert!(
                        !message.contains("dapi-"),
                        "{}: a token leaked: {message}",
                        case.name
                    );
                }
                (Ok(_), Err(_)) => panic!("{}: expected an error", case.name),
                (Err(err), Ok(_)) => panic!("{}: unexpected error {err}", case.name),
            }
        }
    }

    #[test]
    fn the_default_revoke_grace_fits_the_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".databrickscfg"), GOOD).unwrap();
        let grace = |args: &[&str]| {
            let argv = std::iter::once("fresh-proxy").chain(args.iter().copied());
            Config::load(
                &Cli::try_parse_from(argv).unwrap(),
                &Secrets::default(),
                Some(dir.path().to_owned()),
            )
            .map(|c| c.rotation.revoke_grace.as_secs())
            .map_err(|e| e.to_string())
        };
        let lifetime = |l: &'static str, i: &'static str| {
            ["--pat-token-lifetime", l, "--pat-rotation-interval", i]
        };
        assert_eq!(grace(&[]), Ok(30), "the usual default");
        assert_eq!(
            grace(&lifetime("30", "10")),
            Ok(20),
            "what the old token has left"
        );
        assert_eq!(grace(&lifetime("60", "10")), Ok(30));
        let mut explicit = lifetime("30", "10").to_vec();
        explicit.extend(["--pat-revoke-grace", "25"]);
        assert_eq!(grace(&explicit), Ok(25), "an explicit grace is kept");
        let mut too_long = lifetime("30", "10").to_vec();
        too_long.extend(["--pat-revoke-grace", "30"]);
        let err = grace(&too_long).unwrap_err();
        assert!(err.contains("PAT_REVOKE_GRACE"), "{err}");
    }

    #[test]
    fn fleet_settings_table() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".databrickscfg"), GOOD).unwrap();
        std::fs::write(dir.path().join("ca.pem"), "pem").unwrap();
        let load = |args: &[&str], password: Option<&str>| {
            let argv = std::iter::once("fresh-proxy").chain(args.iter().copied());
            let mut env = std::collections::BTreeMap::new();
            if let Some(password) = password {
                env.insert("PAT_ETCD_PASSWORD".to_owned(), password.to_owned());
            }
            let secrets = Secrets {
                token: None,
                client_secret: None,
                env: Environment(env),
            };
            Config::load(
                &Cli::try_parse_from(argv).unwrap(),
                &secrets,
                Some(dir.path().to_owned()),
            )
        };
        let ca = dir.path().join("ca.pem");
        let ca = ca.to_str().unwrap();
        let missing = dir.path().join("missing.pem");
        let missing = missing.to_str().unwrap();
        let etcd = ["--pat-coordination", "etcd"];
        let with = |more: &[&'static str]| -> Vec<String> {
            etcd.iter().chain(more).map(|s| (*s).to_owned()).collect()
        };
        // Name, arguments, PAT_ETCD_PASSWORD, what the message must name.
        type ErrorCase = (
            &'static str,
            Vec<String>,
            Option<&'static str>,
            &'static [&'static str],
        );
        let errors: Vec<ErrorCase> = vec![
            (
                "no endpoints",
                with(&[]),
                None,
                &["PAT_ETCD_ENDPOINTS", "http://"],
            ),
            (
                "not a URL",
                with(&["--pat-etcd-endpoints", "etcd1:2379"]),
                None,
                &["PAT_ETCD_ENDPOINTS", "etcd1:2379"],
            ),
            (
                "a lease too short to renew",
                with(&[
                    "--pat-etcd-endpoints",
                    "http://e:2379",
                    "--pat-etcd-lease-ttl",
                    "1",
                ]),
                None,
                &["PAT_ETCD_LEASE_TTL"],
            ),
            (
                "a certificate without its key",
                with(&["--pat-etcd-endpoints", "https://e:2379", "--pat-etcd-cert"])
                    .into_iter()
                    .chain([ca.to_owned()])
                    .collect(),
                None,
                &["PAT_ETCD_KEY"],
            ),
            (
                "a CA file that is not there",
                with(&["--pat-etcd-endpoints", "https://e:2379", "--pat-etcd-ca"])
                    .into_iter()
                    .chain([missing.to_owned()])
                    .collect(),
                None,
                &["PAT_ETCD_CA", "missing.pem"],
            ),
            (
                "TLS with a plain URL",
                with(&["--pat-etcd-endpoints", "http://e:2379", "--pat-etcd-ca"])
                    .into_iter()
                    .chain([ca.to_owned()])
                    .collect(),
                None,
                &["PAT_ETCD_ENDPOINTS", "https://"],
            ),
            (
                "a user without a password",
                with(&[
                    "--pat-etcd-endpoints",
                    "http://e:2379",
                    "--pat-etcd-user",
                    "fleet",
                ]),
                None,
                &["PAT_ETCD_PASSWORD"],
            ),
            (
                "a password without a user",
                with(&["--pat-etcd-endpoints", "http://e:2379"]),
                Some("etcd-secret-value"),
                &["PAT_ETCD_USER"],
            ),
            (
                "etcd without PAT rotation",
                with(&[
                    "--pat-etcd-endpoints",
                    "http://e:2379",
                    "--pat-rotation",
                    "off",
                ]),
                None,
                &["PAT_COORDINATION", "PAT_ROTATION"],
            ),
        ];
        for (name, args, password, needles) in errors {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let message = load(&args, password).expect_err(name).to_string();
            for needle in needles {
                assert!(
                    message.contains(needle),
                    "{name}: {message:?} lacks {needle:?}"
                );
            }
            assert!(!message.contains("etcd-secret-value"), "{name}: {message}");
        }

        let config = load(
            &[
                "--pat-coordination",
                "etcd",
                "--pat-etcd-endpoints",
                " https://e1:2379, https://e2:2379 ,",
                "--pat-etcd-prefix",
                "fresh-proxy/team",
                "--pat-etcd-ca",
                ca,
                "--pat-etcd-user",
                "fleet",
            ],
            Some("etcd-secret-value"),
        )
        .unwrap();
        let settings = config.rotation.etcd.expect("etcd settings");
        assert_eq!(settings.endpoints, ["https://e1:2379", "https://e2:2379"]);
        assert_eq!(settings.prefix.as_deref(), Some("fresh-proxy/team"));
        assert_eq!(settings.lease_ttl, Duration::from_secs(10));
        assert_eq!(
            settings.user.as_ref().map(|(u, _)| u.as_str()),
            Some("fleet")
        );
        assert!(!format!("{settings:?}").contains("etcd-secret-value"));
        let file = load(&[], None).unwrap();
        assert!(file.rotation.etcd.is_none(), "file coordination by default");
    }

    #[test]
    fn a_non_utf8_config_file_gives_way_to_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(".databrickscfg"),
            b"[DEFAULT]\nhost = caf\xe9\n",
        )
        .unwrap();
        let load = |args: &[&str], client_secret: Option<&str>| {
            let argv = std::iter::once("fresh-proxy").chain(args.iter().copied());
            let secrets = Secrets {
                token: None,
                client_secret: client_secret.map(str::to_owned),
                env: Environment::default(),
            };
            Config::load(
                &Cli::try_parse_from(argv).unwrap(),
                &secrets,
                Some(dir.path().to_owned()),
            )
        };
        let with_env = [
            "--databricks-host",
            "https://env-host",
            "--databricks-client-id",
            "sp-1",
        ];
        let config = load(&with_env, Some("secret-1")).unwrap();
        assert!(matches!(&config.token_mode, TokenMode::OAuth { .. }));
        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        assert!(
            config.warnings[0].contains("not UTF-8"),
            "{:?}",
            config.warnings
        );
        // Without the secret the environment is not enough: the file's problem is the answer.
        let err = load(&with_env, None).unwrap_err().to_string();
        assert!(
            err.contains(".databrickscfg") && err.contains("UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn values_clap_refuses_name_their_variable() {
        let cases: &[(&[&str], Option<&[&str]>)] = &[
            (
                &["--pat-token-lifetime", "abc"],
                Some(&["PAT_TOKEN_LIFETIME: ", "'abc'"]),
            ),
            (
                &["--proxy-upstream-timeout", "soon"],
                Some(&["PROXY_UPSTREAM_TIMEOUT: "]),
            ),
            (&["--proxy-max-body=-1"], Some(&["PROXY_MAX_BODY: "])),
            (
                &["--pat-idle-policy", "sometimes"],
                Some(&["PAT_IDLE_POLICY: ", "keepalive, lapse"]),
            ),
            (
                &["--pat-revoke-bootstrap", "maybe"],
                Some(&["PAT_REVOKE_BOOTSTRAP: ", "expected 1 or 0"]),
            ),
            // Not a value: clap's own report.
            (&["--no-such-flag"], None),
            (&["--help"], None),
        ];
        for (args, want) in cases {
            let argv = std::iter::once("fresh-proxy").chain(args.iter().copied());
            let err = Cli::try_parse_from(argv).expect_err("refused");
            let got = ConfigError::from_clap(&err).map(|e| e.to_string());
            match (got, want) {
                (Some(message), Some(needles)) => {
                    assert!(!message.contains('\n'), "one line: {message:?}");
                    for needle in *needles {
                        assert!(message.contains(needle), "{args:?}: {message:?}");
                    }
                }
                (None, None) => {}
                (got, _) => panic!("{args:?}: {got:?}"),
            }
        }
    }

    #[test]
    fn secrets_debug_hides_values() {
        let secrets = Secrets {
            token: Some("dapi-secret".to_owned()),
            client_secret: Some("oauth-secret".to_owned()),
            env: Environment([("DATABRICKS_OIDC_TOKEN".to_owned(), "eyJ-jwt".to_owned())].into()),
        };
        let shown = format!("{secrets:?}");
        assert!(
            !shown.contains("dapi-secret")
                && !shown.contains("oauth-secret")
                && !shown.contains("eyJ-jwt"),
            "{shown}"
        );
    }
}
