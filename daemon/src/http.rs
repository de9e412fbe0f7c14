//! The optional localhost HTTP API (docs/http.md): the serving spec's `POST /generate`,
//! `/completion` and `/fim`, and an OpenAI-compatible surface (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`). Requests become the same engine jobs as socket requests,
//! pass the same admission checks ([`Server::admit`]) and are logged by the same engine code.
//!
//! Security, since any local process and any web page in a local browser can reach a TCP port:
//! loopback only unless explicitly allowed, `Host` checked against DNS rebinding, requests with a
//! foreign `Origin` refused and no CORS headers unless the origin is configured, a body limit
//! checked before reading, header and body timeouts, and a connection cap. A client that
//! disconnects cancels its generation.
//!
//! Built on axum: routing and the body limit are axum's; ours are the guard (`guard.rs`), the
//! connection cap and header timeout (`conn.rs`), the handlers (`serving.rs`, `openai.rs`), the
//! error shape (`errors.rs`) and the event streams (`sse.rs`).

mod conn;
mod errors;
mod guard;
mod openai;
mod run;
mod serving;
mod sse;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::middleware;
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::config::HttpConfig;
use crate::server::Server;

/// Most completions one request may ask for (prompts × `n`): each is a queued engine job.
pub const MAX_CHOICES: usize = 16;

/// Why the HTTP listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpStartError {
    /// A non-loopback address without the explicit permission.
    #[error(
        "http.bind = {0} is not a loopback address; the API has no authentication, so serving it \
         there needs http.allow_non_loopback = true (or --http-allow-non-loopback)"
    )]
    NotLoopback(SocketAddr),
    /// Binding failed.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The address file could not be written.
    #[error("cannot write the HTTP address to {path}: {source}")]
    AddrFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A bound HTTP listener.
pub struct HttpListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl HttpListener {
    /// The address actually bound (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Binds `config.bind` (refusing a non-loopback address unless allowed, with a warning when it
/// is) and writes the bound address to `config.addr_file`, if set.
pub async fn bind(config: &HttpConfig) -> Result<HttpListener, HttpStartError> {
    let wanted = config.bind;
    if !wanted.ip().is_loopback() {
        if !config.allow_non_loopback {
            return Err(HttpStartError::NotLoopback(wanted));
        }
        tracing::warn!(
            bind = %wanted,
            "HTTP API bound to a non-loopback address: anyone who can reach it can use the model"
        );
    }
    let listener = TcpListener::bind(wanted)
        .await
        .map_err(|source| HttpStartError::Bind { addr: wanted, source })?;
    let addr =
        listener.local_addr().map_err(|source| HttpStartError::Bind { addr: wanted, source })?;
    if let Some(path) = &config.addr_file {
        write_addr_file(path, addr)
            .map_err(|source| HttpStartError::AddrFile { path: path.clone(), source })?;
    }
    Ok(HttpListener { listener, addr })
}

/// Writes `addr` to `path` through a temporary file and a rename, so a reader never sees a
/// partial address.
fn write_addr_file(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Serves HTTP on `listener` until `server` shuts down, with at most `max_connections`
/// connections at a time.
pub async fn serve(
    server: Arc<Server>,
    listener: HttpListener,
    config: HttpConfig,
    max_connections: usize,
) {
    let addr = listener.addr;
    // The header timeout also bounds how long an idle keep-alive connection is held.
    let header_timeout = Duration::from_millis(config.header_timeout_ms.max(1));
    let acceptor = conn::Acceptor::new(listener.listener, max_connections, header_timeout);
    let api = Arc::new(Api::new(server.clone(), config, addr));
    let app = router(api).into_make_service_with_connect_info::<conn::ConnActivity>();
    let mut stop = server.shutdown_signal();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
        tracing::info!(%addr, "HTTP listener stopped");
    };
    // Serving itself cannot fail: accept errors are logged and retried by the acceptor.
    let _ = axum::serve(acceptor, app).with_graceful_shutdown(stopped).await;
}

/// The routes, the body limit and the guard around them all.
fn router(api: Arc<Api>) -> Router {
    let unrouted = |method: Method, uri: Uri| async move { errors::unrouted(&method, uri.path()) };
    Router::new()
        .route("/generate", post(serving::generate))
        .route("/completion", post(serving::completion))
        .route("/fim", post(serving::fim))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/", get(openai::model))
        .route("/v1/models/{*id}", get(openai::model))
        .fallback(unrouted)
        .method_not_allowed_fallback(unrouted)
        .layer(DefaultBodyLimit::max(api.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(api.clone(), guard::guard))
        .with_state(api)
}

/// What every HTTP request handler shares.
struct Api {
    server: Arc<Server>,
    config: HttpConfig,
    /// The bound address: its IP is an accepted `Host` too.
    addr: SocketAddr,
    /// The model's name in OpenAI responses.
    model_id: String,
    /// Start time in Unix seconds, the model's `created`; also makes ids unique across restarts.
    started: u64,
    next_id: AtomicU64,
}

impl Api {
    fn new(server: Arc<Server>, config: HttpConfig, addr: SocketAddr) -> Self {
        let version = &server.model().version;
        let model_id =
            if version.is_empty() { "m31r".to_owned() } else { format!("m31r-{version}") };
        Self { server, config, addr, model_id, started: unix_now(), next_id: AtomicU64::new(1) }
    }

    /// A fresh response id such as `cmpl-67a1b2c3-12`.
    fn fresh_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}-{n}", self.started)
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
