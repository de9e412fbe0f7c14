//! `m31r-lsp`: the M31R language server over stdio. Logs go to `--log-file` or stderr, never to
//! stdout, which carries the protocol.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use m31r_lsp::server::{Options, serve};

/// Inline Rust completions from the local m31rd daemon, over LSP on stdin/stdout.
#[derive(Debug, Parser)]
#[command(name = "m31r-lsp", version, about)]
struct Args {
    /// Daemon socket; overrides the `socketPath` setting.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Append logs to this file instead of stderr (filter with RUST_LOG, default `info`).
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false);
    match &args.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            builder.with_writer(std::sync::Mutex::new(file)).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(serve(
        tokio::io::stdin(),
        tokio::io::stdout(),
        Options { socket: args.socket },
    ));
    tracing::info!("exit");
    Ok(())
}
