//! `m31rd`: the completion daemon. Loads one release bundle once, then serves completion requests
//! on a private Unix socket, and optionally over localhost HTTP, until SIGTERM/SIGINT or a
//! `shutdown` request.

use std::net::SocketAddr;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use m31r_daemon::config::{DaemonConfig, check_memory_budget};
use m31r_daemon::engine::Engine;
use m31r_daemon::http;
use m31r_daemon::server::{self, Server};
use m31r_model::Bundle;
use m31r_protocol::ModelInfo;
use serde::Serialize;

/// The M31R completion daemon: owns the model and its caches, serves editors over a Unix socket.
///
/// Configuration layers (later wins): built-in defaults, the `[daemon]` table of
/// ~/.config/m31r/m31r.toml (or --config), M31R_* environment variables (M31R_BUNDLE,
/// M31R_SOCKET, M31R_THREADS, M31R_HTTP__ENABLED, ...), then these flags.
///
/// The optional HTTP API (docs/http.md) is off by default: enable it with --http or
/// `enabled = true` in [daemon.http].
#[derive(Debug, Parser, Serialize)]
#[command(version)]
struct Args {
    /// Release bundle directory to load [default: the model `m31r-train quickstart` wrote to
    /// M31R's data directory, ~/.local/share/m31r/bundle on Linux].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    bundle: Option<PathBuf>,
    /// Socket path [default: $XDG_RUNTIME_DIR/m31r/m31rd.sock].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<PathBuf>,
    /// Weight precision: f32, f16, q8_0, q4_0 or q4_k [default: the bundle's own].
    #[arg(long, value_parser = ["f32", "f16", "q8_0", "q4_0", "q4_k"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    precision: Option<String>,
    /// Device: cpu, cuda or cuda:N (needs a binary built with the `cuda` feature) [default: cpu].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// Compute threads (0 = all cores): a cap; fewer are used while other processes keep the
    /// cores busy (M31R_ADAPTIVE_THREADS=0: always this many).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    threads: Option<usize>,
    /// Recall mixed into the model's predictions: `off`, or ORDER,WEIGHT,HALF (docs/eval.md,
    /// "Recall") [default: 16,0.9,4].
    #[arg(long, value_name = "SPEC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    recall: Option<String>,
    /// Log file [default: stderr].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_file: Option<PathBuf>,
    /// Also serve the HTTP API, on ADDR if given [config default: 127.0.0.1:8731]; port 0 picks a
    /// free port (see --http-addr-file).
    #[arg(long, value_name = "ADDR", num_args = 0..=1)]
    #[serde(skip)]
    http: Option<Option<SocketAddr>>,
    /// Allow the HTTP API on a non-loopback address. It has no authentication: anyone who can
    /// reach the address can use the model.
    #[arg(long)]
    #[serde(skip)]
    http_allow_non_loopback: bool,
    /// Once the HTTP API listens, write its address (IP:PORT) to this file.
    #[arg(long, value_name = "PATH")]
    #[serde(skip)]
    http_addr_file: Option<PathBuf>,
    /// Config file [default: ~/.config/m31r/m31r.toml].
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    #[serde(skip)]
    print_config: bool,
}

fn main() {
    // SAFETY: the first statement of main: no other thread exists yet.
    unsafe { m31r_model::machine::park_idle_candle_threads() };
    if let Err(e) = run() {
        eprintln!("m31rd: {e:#}");
        std::process::exit(1);
    }
}

/// The command-line layer of the configuration: the flags that were given, `http` as a table.
#[derive(Serialize)]
struct Flags<'a> {
    #[serde(flatten)]
    args: &'a Args,
    #[serde(skip_serializing_if = "HttpFlags::is_empty")]
    http: HttpFlags,
}

#[derive(Default, Serialize)]
struct HttpFlags {
    #[serde(skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bind: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_non_loopback: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    addr_file: Option<PathBuf>,
}

impl HttpFlags {
    fn is_empty(&self) -> bool {
        self.enabled.is_none()
            && self.bind.is_none()
            && self.allow_non_loopback.is_none()
            && self.addr_file.is_none()
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let flags = Flags {
        args: &args,
        http: HttpFlags {
            enabled: args.http.map(|_| true),
            bind: args.http.flatten(),
            allow_non_loopback: args.http_allow_non_loopback.then_some(true),
            addr_file: args.http_addr_file.clone(),
        },
    };
    let config =
        DaemonConfig::resolve(args.config.as_deref(), &flags).context("invalid configuration")?;
    if args.print_config {
        print!("{}", toml::to_string(&config).context("cannot print the configuration")?);
        return Ok(());
    }
    init_logging(&config)?;
    if config.threads > 0 {
        // SAFETY: no other thread exists yet; the kernels' thread pool (which adapts below this
        // cap while other processes hold the cores) and candle's read it on first use.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", config.threads.to_string()) };
    }
    let default_bundle = m31r_model::bundle::default_bundle_dir();
    let Some(bundle_dir) = config.bundle.clone().or_else(|| {
        default_bundle.clone().filter(|d| d.join(m31r_model::bundle::CHECKSUM_FILE).is_file())
    }) else {
        bail!(
            "no bundle to serve: pass --bundle DIR, set M31R_BUNDLE or `bundle` in [daemon], or \
             train one into the default model directory{} with `m31r-train quickstart`",
            default_bundle.map(|d| format!(" ({})", d.display())).unwrap_or_default()
        );
    };

    let device = config.device.open()?;
    let started = Instant::now();
    let bundle = Bundle::open(&bundle_dir)
        .with_context(|| format!("cannot load bundle {}", bundle_dir.display()))?;
    let precision = config.precision.unwrap_or(bundle.precision());
    check_memory_budget(
        bundle.config(),
        precision,
        config.cache_budget_mb,
        config.memory_budget_mb,
    )
    .map_err(anyhow::Error::msg)
    .with_context(|| format!("refusing to serve {}", bundle_dir.display()))?;
    let model = bundle
        .model_at(precision, &device)
        .with_context(|| format!("cannot build the model from {}", bundle_dir.display()))?;
    let info = ModelInfo {
        version: bundle.metadata().model_version.clone(),
        parameters: bundle.config().param_count(),
        context_length: bundle.config().context_length() as u32,
        precision: precision.to_string(),
    };
    let tokenizer = bundle.tokenizer().clone();
    // The verified weights now live in the model; unmapping the file keeps its pages (all touched
    // by hashing) out of resident memory.
    drop(bundle);
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(bundle = %bundle_dir.display(), parameters = info.parameters, load_ms, "model loaded");
    let engine = Engine::start(model, tokenizer, config.engine());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let socket = config.socket_path();
        let listener = server::bind(&socket).await?;
        let server = Server::new(engine, info, config.connection_limits());
        tracing::info!(socket = %socket.display(), "listening");
        if config.http.enabled {
            // Same engine, queue, admission checks and logs as the socket; stops with it.
            let http = http::bind(&config.http).await.context("cannot start the HTTP API")?;
            tracing::info!(addr = %http.local_addr(), "HTTP API listening");
            tokio::spawn(http::serve(
                server.clone(),
                http,
                config.http.clone(),
                config.max_connections,
            ));
        }
        let signals = server.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) =
                (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
            else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
            signals.request_shutdown();
        });
        server.serve(&listener).await;
        drop(listener); // removes the socket file
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

fn init_logging(config: &DaemonConfig) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&config.log)
        .with_context(|| format!("invalid log filter {:?}", config.log))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    match &config.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            builder.with_ansi(false).with_writer(std::sync::Mutex::new(file)).init();
        }
        None => {
            use std::io::IsTerminal;
            builder.with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).init()
        }
    }
    Ok(())
}
