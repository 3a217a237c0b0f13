//! The `fresh-proxy` binary: parse configuration, start the token machinery, serve until
//! SIGTERM or Ctrl-C, then let in-flight requests finish up to a deadline.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use fresh_proxy::config::{Cli, Config, ConfigError, LogFormat, Secrets, client_key_from_env};
use fresh_proxy::proxy::guard::ClientKey;
use fresh_proxy::server::{ConnectionSettings, Listeners};
use fresh_proxy::token::TokenSetup;
use fresh_proxy::{AppState, ProxySettings, app, server};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// The proxy makes many small, short-lived allocations per request (headers, JSON parts);
/// mimalloc serves those with about a fifth less CPU than glibc's allocator (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => match ConfigError::from_clap(&err) {
            Some(err) => {
                eprintln!("fresh-proxy: invalid configuration: {err}");
                return ExitCode::from(2);
            }
            None => err.exit(),
        },
    };
    let config = match Config::load(&cli, &Secrets::from_env(), std::env::home_dir()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("fresh-proxy: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    let client_key = match client_key_from_env() {
        Ok(key) => key,
        Err(err) => {
            eprintln!("fresh-proxy: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    let filter = match EnvFilter::try_new(&cli.rust_log) {
        Ok(filter) => filter,
        Err(err) => {
            eprintln!("fresh-proxy: invalid configuration: RUST_LOG: {err}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.log_format, filter);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let connections = connection_limits(&config);
    // This runtime accepts connections; requests are served by the worker threads of
    // `fresh_proxy::server`, and the token machinery runs on a thread of its own, each with a
    // runtime of its own.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fresh-proxy: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config, connections, client_key))
}

/// Raises the soft limit on open files to the hard limit (systemd starts services at 1,024),
/// and caps the connection limit to what the file limit allows, so that running out of
/// descriptors never stops health checks, the rotation's file writes or its API calls.
fn connection_limits(config: &Config) -> ConnectionSettings {
    let mut settings = config.clients.connections;
    let open_files = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(err) => {
            tracing::warn!(error = %err, "cannot raise the limit on open files");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _)| soft)
        }
    };
    let allowed = fresh_proxy::server::connection_budget(settings.max_connections, open_files);
    if allowed < settings.max_connections {
        tracing::warn!(
            open_files,
            configured = settings.max_connections,
            allowed,
            "the limit on open files allows fewer client connections than PROXY_MAX_CONNECTIONS; raise LimitNOFILE (ulimit -n)"
        );
        settings.max_connections = allowed;
    }
    settings
}

fn init_tracing(format: LogFormat, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn serve(
    config: Config,
    connections: ConnectionSettings,
    client_key: Option<ClientKey>,
) -> ExitCode {
    let client = fresh_proxy::upstream_client(&config.upstream_base);
    let setup = match TokenSetup::new(&config, client.clone()) {
        Ok(setup) => setup,
        Err(err) => {
            eprintln!("fresh-proxy: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    let listener = match fresh_proxy::listen(config.listen) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(address = %config.listen, error = %err, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let unix = match &config.clients.unix_socket {
        Some(path) => match server::listen_unix(path) {
            Ok(listener) => Some(listener),
            Err(err) => {
                tracing::error!(path = %path.display(), error = %err, "cannot listen on PROXY_UNIX_SOCKET");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let policy = config.clients.policy(config.listen.ip(), client_key);
    let settings = ProxySettings {
        upstream_base: config.upstream_base.clone(),
        max_body: config.max_body,
        upstream_timeout: config.upstream_timeout,
        body_budget: config.body_budget,
        rate_limit_wait: config.rate_limit_wait,
        routes: fresh_proxy::proxy::RouteTable::with_routes(
            &config.host,
            &config.upstream_base,
            config.routing.routes.clone(),
        ),
        rules: config.routing.rules.clone(),
        inject_stream_usage: config.routing.stream_usage
            == fresh_proxy::config::StreamUsage::Inject,
    };
    let state = AppState::with_parts(
        settings,
        setup.source.clone(),
        client,
        setup.status.clone(),
        setup.metrics.clone(),
        setup.activity.clone(),
    )
    .with_client_policy(policy.clone());
    let background = CancellationToken::new();
    let token_machinery = match spawn_token_machinery(setup, background.clone()) {
        Ok(done) => done,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the token thread");
            return ExitCode::FAILURE;
        }
    };

    let address = listener
        .local_addr()
        .map_or_else(|_| config.listen.to_string(), |a| a.to_string());
    tracing::info!(
        %address,
        upstream = config.upstream_base.as_str(),
        source = ?state_source(&config),
        "listening"
    );
    if let Some(path) = &config.clients.unix_socket {
        tracing::info!(path = %path.display(), "also listening on a Unix socket, mode 0600");
    }
    if !config.listen.ip().is_loopback() {
        tracing::warn!(
            %address,
            client_key = policy.requires_key(),
            "listening beyond loopback: whoever reaches this address may spend the workspace token; see docs/SECURITY.md"
        );
    }

    let shutdown = CancellationToken::new();
    let workers = server::default_workers();
    tracing::debug!(workers, "serving");
    let listeners = Listeners {
        tcp: listener,
        unix,
    };
    let server = server::serve(
        listeners,
        workers,
        connections,
        shutdown.clone(),
        move || app(state.for_runtime()),
    );
    let signal = {
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            tracing::info!(grace_s = config.shutdown_grace.as_secs(), "shutting down");
            shutdown.cancel();
            // A second signal (Ctrl-C twice) does not wait out the grace period.
            tokio::select! {
                () = tokio::time::sleep(config.shutdown_grace) => {
                    tracing::warn!("in-flight requests did not finish before the deadline");
                }
                () = shutdown_signal() => {
                    tracing::warn!("a second signal: stopping without waiting for in-flight requests");
                }
            }
        }
    };
    let code = tokio::select! {
        result = server => match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = %err, "server failed");
                ExitCode::FAILURE
            }
        },
        () = signal => ExitCode::SUCCESS,
    };
    background.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), token_machinery).await;
    if let Some(path) = &config.clients.unix_socket {
        let _ = std::fs::remove_file(path);
    }
    code
}

/// Runs the token machinery (rotation, OAuth refresh) on a thread and runtime of its own, so
/// that its file writes, each ending in an `fsync`, never hold up accepting connections. New
/// tokens reach the workers through the shared source, not through this runtime. The receiver
/// resolves once the machinery has stopped.
fn spawn_token_machinery(
    setup: TokenSetup,
    cancel: CancellationToken,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done, stopped) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fresh-proxy-tokens".to_owned())
        .spawn(move || {
            runtime.block_on(setup.run(cancel));
            let _ = done.send(());
        })?;
    Ok(stopped)
}

fn state_source(config: &Config) -> &'static str {
    match config.token_mode {
        fresh_proxy::config::TokenMode::Rotate { .. } => "pat-rotating",
        fresh_proxy::config::TokenMode::Follow { .. } => "pat-file",
        ref other => other.method().name(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
