//! The connection to `m31rd`: connect and handshake on demand, start the daemon when its socket
//! does not answer (if allowed), back off between failed attempts, reconnect after the daemon
//! restarts, and run `fim`/`warm` requests whose drop cancels them at the daemon.
//!
//! One connection carries every request. A reader task routes events to their request by id; a
//! writer task owns the socket's write half, so a dropped request can queue its `cancel`
//! synchronously from `Drop`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use m31r_protocol::{
    Client, ErrorCode, Event, FimInput, GenerationParams, ModelInfo, Request, StopReason, Usage,
};
use tokio::sync::mpsc;

/// First wait after a failed connection; doubled after each failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between connection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a connection attempt (connect + handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a started daemon may take to answer on its socket (loading a bundle).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Socket path.
    pub socket: PathBuf,
    /// Start the daemon when the socket does not answer.
    pub auto_start: bool,
    /// Daemon executable.
    pub program: String,
    /// Arguments before `--socket PATH`.
    pub args: Vec<String>,
}

/// Why a daemon request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DaemonError {
    /// No connection could be made.
    #[error("cannot reach m31rd at {socket}: {cause}")]
    Unavailable {
        /// Socket path.
        socket: String,
        /// What went wrong (or when the next attempt is due).
        cause: String,
    },
    /// The connection dropped before the request finished.
    #[error("the connection to m31rd closed during request {0}")]
    Disconnected(String),
    /// The daemon refused or failed the request.
    #[error("m31rd failed request {id} ({code:?}): {message}")]
    Failed {
        /// Request id.
        id: String,
        /// The daemon's error code.
        code: ErrorCode,
        /// The daemon's message.
        message: String,
    },
}

/// A finished completion.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The generated text.
    pub text: String,
    /// Why it stopped.
    pub stop: StopReason,
    /// Token counts.
    pub usage: Usage,
    /// From sending the request to its `done`.
    pub latency: Duration,
}

/// What `m31r/status` reports about the daemon.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// A connection is open.
    pub connected: bool,
    /// The socket in use.
    pub socket: PathBuf,
    /// The model the daemon announced (last connection).
    pub model: Option<ModelInfo>,
    /// Latency of the last completion.
    pub last_latency: Option<Duration>,
    /// Prompt tokens served from the daemon's cache over all completions, as a fraction.
    pub cache_hit_rate: Option<f64>,
}

/// Handle to the daemon connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Daemon {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: Mutex<DaemonSettings>,
    conn: Mutex<Option<Conn>>,
    /// Serialises connection attempts, so concurrent requests start at most one daemon.
    connecting: tokio::sync::Mutex<()>,
    retry: Mutex<Retry>,
    /// Set once the editor was told the daemon is unreachable; cleared by a connection.
    notified: AtomicBool,
    next_id: AtomicU64,
    generation: AtomicU64,
    child: Mutex<Option<tokio::process::Child>>,
    stats: Mutex<Stats>,
}

#[derive(Debug)]
struct Retry {
    not_before: Option<Instant>,
    backoff: Duration,
}

#[derive(Debug, Default)]
struct Stats {
    model: Option<ModelInfo>,
    last_latency: Option<Duration>,
    prompt_tokens: u64,
    cached_tokens: u64,
}

type Pending = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Event>>>>;

/// One open connection.
#[derive(Debug, Clone)]
struct Conn {
    generation: u64,
    tx: mpsc::UnboundedSender<Request>,
    pending: Pending,
}

/// Locks `m`, ignoring poisoning: every critical section leaves its data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Daemon {
    /// A handle; nothing connects until the first request.
    pub fn new(settings: DaemonSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings: Mutex::new(settings),
                conn: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                retry: Mutex::new(Retry { not_before: None, backoff: MIN_BACKOFF }),
                notified: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                generation: AtomicU64::new(0),
                child: Mutex::new(None),
                stats: Mutex::new(Stats::default()),
            }),
        }
    }

    /// Changes how the daemon is reached; a new socket drops the connection and the backoff.
    pub fn configure(&self, settings: DaemonSettings) {
        let mut current = lock(&self.inner.settings);
        if current.socket != settings.socket {
            lock(&self.inner.conn).take();
            *lock(&self.inner.retry) = Retry { not_before: None, backoff: MIN_BACKOFF };
            self.inner.notified.store(false, Ordering::SeqCst);
        }
        *current = settings;
    }

    /// True exactly once per outage: the caller should tell the user the daemon is unreachable.
    pub fn take_unreachable_notice(&self) -> bool {
        !self.inner.notified.swap(true, Ordering::SeqCst)
    }

    /// The state `m31r/status` reports.
    pub fn snapshot(&self) -> Snapshot {
        let stats = lock(&self.inner.stats);
        Snapshot {
            connected: lock(&self.inner.conn).is_some(),
            socket: lock(&self.inner.settings).socket.clone(),
            model: stats.model.clone(),
            last_latency: stats.last_latency,
            cache_hit_rate: (stats.prompt_tokens > 0)
                .then(|| stats.cached_tokens as f64 / stats.prompt_tokens as f64),
        }
    }

    /// Runs a `fim` request to its end. Dropping the future cancels the request at the daemon.
    pub async fn fim(
        &self,
        input: FimInput,
        params: GenerationParams,
    ) -> Result<Completion, DaemonError> {
        let conn = self.connection().await?;
        let id = format!("c{}", self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let mut call = Call::start(&conn, id.clone());
        let sent = Instant::now();
        if conn.tx.send(Request::Fim { id: id.clone(), input, params }).is_err() {
            call.armed = false;
            return Err(DaemonError::Disconnected(id));
        }
        let mut text = String::new();
        loop {
            let event = call.events.recv().await;
            match event {
                Some(Event::Token { text: piece, .. }) => text.push_str(&piece),
                Some(Event::Done { stop, usage, .. }) => {
                    call.armed = false;
                    let latency = sent.elapsed();
                    let mut stats = lock(&self.inner.stats);
                    stats.last_latency = Some(latency);
                    stats.prompt_tokens += u64::from(usage.prompt_tokens);
                    stats.cached_tokens += u64::from(usage.cached_tokens);
                    return Ok(Completion { text, stop, usage, latency });
                }
                Some(Event::Error { code, message, .. }) => {
                    call.armed = false;
                    return Err(DaemonError::Failed { id, code, message });
                }
                Some(_) => {}
                None => {
                    call.armed = false;
                    return Err(DaemonError::Disconnected(id));
                }
            }
        }
    }

    /// Prefills `input` into the daemon's cache; returns when the daemon has done it.
    pub async fn warm(&self, input: FimInput) -> Result<(), DaemonError> {
        let conn = self.connection().await?;
        let id = format!("w{}", self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let mut call = Call::start(&conn, id.clone());
        // A warm-up is never worth cancelling: what it evaluates stays useful in the cache.
        call.armed = false;
        if conn.tx.send(Request::Warm { id: id.clone(), input }).is_err() {
            return Err(DaemonError::Disconnected(id));
        }
        loop {
            match call.events.recv().await {
                Some(Event::Done { .. }) => return Ok(()),
                Some(Event::Error { code, message, .. }) => {
                    return Err(DaemonError::Failed { id, code, message });
                }
                Some(_) => {}
                None => return Err(DaemonError::Disconnected(id)),
            }
        }
    }

    /// The open connection, or a new one (starting the daemon if allowed), unless a recent
    /// failure's backoff has not passed yet.
    async fn connection(&self) -> Result<Conn, DaemonError> {
        if let Some(conn) = lock(&self.inner.conn).clone() {
            return Ok(conn);
        }
        let settings = lock(&self.inner.settings).clone();
        let socket = settings.socket.display().to_string();
        self.check_backoff(&socket)?;
        let _attempt = self.inner.connecting.lock().await;
        // Another request may have connected, or failed, while this one waited.
        if let Some(conn) = lock(&self.inner.conn).clone() {
            return Ok(conn);
        }
        self.check_backoff(&socket)?;
        let result = match self.try_connect(&settings).await {
            Ok(conn) => Ok(conn),
            Err(first) if settings.auto_start => self.start_and_connect(&settings, first).await,
            Err(cause) => Err(cause),
        };
        match result {
            Ok(conn) => {
                *lock(&self.inner.retry) = Retry { not_before: None, backoff: MIN_BACKOFF };
                self.inner.notified.store(false, Ordering::SeqCst);
                Ok(conn)
            }
            Err(cause) => {
                let mut retry = lock(&self.inner.retry);
                retry.not_before = Some(Instant::now() + retry.backoff);
                retry.backoff = (retry.backoff * 2).min(MAX_BACKOFF);
                Err(DaemonError::Unavailable { socket, cause })
            }
        }
    }

    fn check_backoff(&self, socket: &str) -> Result<(), DaemonError> {
        let retry = lock(&self.inner.retry);
        match retry.not_before {
            Some(t) if Instant::now() < t => Err(DaemonError::Unavailable {
                socket: socket.to_string(),
                cause: format!(
                    "not answering; next attempt in {} ms",
                    (t - Instant::now()).as_millis()
                ),
            }),
            _ => Ok(()),
        }
    }

    async fn try_connect(&self, settings: &DaemonSettings) -> Result<Conn, String> {
        let connect =
            Client::connect(&settings.socket, concat!("m31r-lsp/", env!("CARGO_PKG_VERSION")));
        let (client, model) = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(ok)) => ok,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no handshake within {CONNECT_TIMEOUT:?}")),
        };
        tracing::info!(socket = %settings.socket.display(), model = %model.version, "connected to m31rd");
        lock(&self.inner.stats).model = Some(model);
        let generation = self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let (mut reader, mut writer) = client.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let pending: Pending = Arc::default();
        let conn = Conn { generation, tx, pending: pending.clone() };
        *lock(&self.inner.conn) = Some(conn.clone());

        tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                if let Err(e) = writer.send(&request).await {
                    tracing::warn!("writing to m31rd failed: {e}");
                    break;
                }
            }
        });
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                match reader.next_event().await {
                    Ok(Some(event)) => route(&pending, event),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("reading from m31rd failed: {e}");
                        break;
                    }
                }
            }
            tracing::info!("m31rd connection {generation} closed");
            let mut conn = lock(&inner.conn);
            if conn.as_ref().is_some_and(|c| c.generation == generation) {
                conn.take();
            }
            drop(conn);
            // Dropping the senders ends every waiting request with `Disconnected`.
            lock(&pending).clear();
            // A restarted daemon is worth trying at once.
            *lock(&inner.retry) = Retry { not_before: None, backoff: MIN_BACKOFF };
        });
        Ok(conn)
    }

    async fn start_and_connect(
        &self,
        settings: &DaemonSettings,
        first: String,
    ) -> Result<Conn, String> {
        {
            let mut child = lock(&self.inner.child);
            let running = match child.as_mut() {
                Some(c) => matches!(c.try_wait(), Ok(None)),
                None => false,
            };
            if !running {
                let mut command = tokio::process::Command::new(&settings.program);
                command
                    .args(&settings.args)
                    .arg("--socket")
                    .arg(&settings.socket)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    // Its own process group: the daemon is shared and outlives this server.
                    .process_group(0);
                let spawned = command
                    .spawn()
                    .map_err(|e| format!("{first}; starting `{}` failed: {e}", settings.program))?;
                tracing::info!(program = %settings.program, pid = ?spawned.id(), "started m31rd");
                *child = Some(spawned);
            }
        }
        let until = Instant::now() + START_TIMEOUT;
        loop {
            match self.try_connect(settings).await {
                Ok(conn) => return Ok(conn),
                Err(e) if Instant::now() >= until => {
                    return Err(format!(
                        "started `{}` but it did not answer: {e}",
                        settings.program
                    ));
                }
                Err(_) => {}
            }
            if let Some(c) = lock(&self.inner.child).as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(format!("started `{}` but it exited with {status}", settings.program));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Hands `event` to its request; terminal events end the request's registration.
fn route(pending: &Pending, event: Event) {
    let (id, terminal) = match &event {
        Event::Token { id, .. } => (Some(id), false),
        Event::Done { id, .. } | Event::Status { id, .. } | Event::ShuttingDown { id } => {
            (Some(id), true)
        }
        Event::Error { id, .. } => (id.as_ref(), true),
        Event::Hello { .. } => (None, false),
    };
    let Some(id) = id else {
        tracing::warn!("m31rd event for no request: {event:?}");
        return;
    };
    let mut pending = lock(pending);
    let tx = if terminal { pending.remove(id) } else { pending.get(id).cloned() };
    if let Some(tx) = tx {
        // The request may have been dropped (cancelled); its events are then of no use.
        let _ = tx.send(event);
    }
}

/// A request registered on a connection. Dropped while `armed` (its caller gave up: superseded,
/// `$/cancelRequest`, shutdown), it sends `cancel` so the daemon stops working on it.
struct Call {
    id: String,
    conn: Conn,
    events: mpsc::UnboundedReceiver<Event>,
    armed: bool,
}

impl Call {
    fn start(conn: &Conn, id: String) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        lock(&conn.pending).insert(id.clone(), tx);
        Self { id, conn: conn.clone(), events, armed: true }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.armed {
            tracing::debug!(id = %self.id, "cancelling at the daemon");
            // The registration stays until the daemon's terminal event for the id arrives.
            let _ = self.conn.tx.send(Request::Cancel { id: self.id.clone() });
        }
    }
}
