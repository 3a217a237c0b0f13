//! `loadtest`: the pieces of the fresh-proxy load harness that `run.sh` drives.
//!
//! * `upstream`: a fast fake model-serving endpoint answering a small `chat.completion` JSON,
//!   or a slow SSE stream when the request body asks for `"stream": true`;
//! * `passthrough`: a minimal reverse proxy, the reference when nginx is not installed;
//! * `sse`: opens many concurrent SSE streams and checks that each ends with `[DONE]`.
//!
//! Every server listens on 127.0.0.1 only and stops after `--max-seconds`.

mod passthrough;
mod sse_client;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(name = "loadtest", about = "Load harness pieces for fresh-proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fake upstream: JSON answers, SSE when the request body has `"stream": true`.
    Upstream {
        #[command(flatten)]
        server: ServerArgs,
        /// Data events per SSE stream (the last carries `finish_reason`), then `[DONE]`.
        #[arg(long, default_value_t = 10)]
        sse_events: u32,
        /// Milliseconds between SSE events.
        #[arg(long, default_value_t = 100)]
        sse_interval_ms: u64,
    },
    /// Reference reverse proxy: forwards to `--upstream` + path, setting `Authorization`.
    Passthrough {
        #[command(flatten)]
        server: ServerArgs,
        /// Base URL that request paths are appended to, `http://127.0.0.1:PORT/prefix`.
        #[arg(long)]
        upstream: String,
    },
    /// Open `--streams` concurrent SSE requests and check that each completes.
    Sse(sse_client::SseArgs),
    /// Print a loopback port that is free right now.
    FreePort,
}

#[derive(Debug, Args)]
struct ServerArgs {
    /// Listen address; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write the chosen port here once listening.
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Stop after this many seconds, whatever happens.
    #[arg(long, default_value_t = 1800)]
    max_seconds: u64,
}

impl ServerArgs {
    async fn bind(&self) -> std::io::Result<TcpListener> {
        if !self.listen.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the harness listens on loopback addresses only",
            ));
        }
        // The proxy's own listen, with its backlog of 1,024: the SSE run opens 1,000 connections
        // at once, and the usual 128 would drop SYNs that are then retried a second later.
        let listener = fresh_proxy::listen(self.listen)?;
        let port = listener.local_addr()?.port();
        if let Some(path) = &self.port_file {
            std::fs::write(path, format!("{port}\n"))?;
        }
        Ok(listener)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Upstream { server, .. } | Command::Passthrough { server, .. } => server.threads,
        Command::Sse(args) => args.threads,
        Command::FreePort => 1,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Upstream {
            server,
            sse_events,
            sse_interval_ms,
        } => {
            let sse = upstream::SseShape {
                events: sse_events.max(1),
                interval: Duration::from_millis(sse_interval_ms),
            };
            serve_for(&server, |listener| upstream::serve(listener, sse)).await
        }
        Command::Passthrough { server, upstream } => {
            let base = match passthrough::Base::parse(&upstream) {
                Ok(base) => base,
                Err(why) => {
                    eprintln!("loadtest passthrough: --upstream {upstream}: {why}");
                    return ExitCode::from(2);
                }
            };
            serve_for(&server, |listener| passthrough::serve(listener, base)).await
        }
        Command::Sse(args) => return sse_client::run(args).await,
        Command::FreePort => TcpListener::bind("127.0.0.1:0")
            .await
            .and_then(|listener| listener.local_addr())
            .map(|address| println!("{}", address.port())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loadtest: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Bind, then serve until the time limit.
async fn serve_for<F, Fut>(server: &ServerArgs, serve: F) -> std::io::Result<()>
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: Future<Output = std::io::Result<()>>,
{
    let listener = server.bind().await?;
    let limit = Duration::from_secs(server.max_seconds);
    match tokio::time::timeout(limit, serve(listener)).await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}
