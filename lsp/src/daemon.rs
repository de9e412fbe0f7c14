//! The connection to `m31rd`: connect and handshake on demand, start the daemon when its socket
//! does not answer (if allowed), back off between failed attempts while the socket stays as it
//! was, reconnect as soon as the daemon restarts, and run `fim`/`warm` requests under a timeout,
//! whose drop cancels them at the daemon.
//!
//! One connection carries every request. A reader task routes events to their request by id; a
//! writer task owns the socket's write half, so a dropped request can queue its `cancel`
//! synchronously from `Drop`.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use m31r_protocol::{
    Client, ErrorCode, Event, FimInput, GenerationParams, LineConfidence, ModelInfo, Request,
    StopReason, Usage,
};
use tokio::sync::{mpsc, watch};

/// First wait after a failed connection; doubled after each failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between connection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a started daemon may take to answer on its socket (loading a bundle).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `warm` may take: nobody waits for it, but a frozen daemon must not keep it forever.
const WARM_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// How long one connection attempt (connect + `hello`) may take.
    pub connect_timeout: Duration,
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
    /// The request did not finish in time; it was cancelled at the daemon.
    #[error("m31rd did not finish request {id} within {after:?}")]
    Timeout {
        /// Request id.
        id: String,
        /// The timeout that passed.
        after: Duration,
    },
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
    /// The model's confidence in each line of `text`, from `done` (see
    /// [`crate::gate`]); empty when the daemon sent none.
    pub lines: Vec<LineConfidence>,
    /// From sending the request to its `done`.
    pub latency: Duration,
}

/// A generation still running: its text so far and the confidence so far of each of its lines
/// (as many as the daemon reported; the last one may still grow).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// The text generated so far.
    pub text: String,
    /// The confidence of each line of `text`, first line first.
    pub lines: Vec<LineConfidence>,
}

impl Progress {
    /// Adds a `token` event's `piece` and the confidence of the lines it touched (from the line
    /// it starts in).
    pub fn push(&mut self, piece: &str, touched: Vec<LineConfidence>) {
        if !touched.is_empty() {
            let first = self.text.bytes().filter(|&b| b == b'\n').count();
            self.lines.truncate(first);
            if self.lines.len() == first {
                self.lines.extend(touched);
            }
        }
        self.text.push_str(piece);
    }
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
    /// The socket file as it was at the last failure (`None`: absent). A different one means
    /// the daemon bound its socket anew, which makes the backoff moot.
    socket_seen: Option<SocketId>,
}

impl Retry {
    fn reset() -> Self {
        Self { not_before: None, backoff: MIN_BACKOFF, socket_seen: None }
    }
}

/// What tells one socket file from its successor at the same path: a restarted daemon unlinks
/// and binds again, which gives a new inode (and a new change time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketId {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

fn socket_id(path: &Path) -> Option<SocketId> {
    let meta = std::fs::metadata(path).ok()?;
    Some(SocketId { dev: meta.dev(), ino: meta.ino(), ctime: (meta.ctime(), meta.ctime_nsec()) })
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
                retry: Mutex::new(Retry::reset()),
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
            *lock(&self.inner.retry) = Retry::reset();
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

    /// Runs a `fim` request to its end, connecting first if need be, and gives up on the daemon's
    /// answer after `timeout`. Giving up, or dropping the future, cancels the request at the
    /// daemon. Connecting has its own limits (`connect_timeout`, and a started daemon's start-up)
    /// so that the first completion after an auto-start waits for the daemon instead of failing.
    pub async fn fim(
        &self,
        input: FimInput,
        params: GenerationParams,
        timeout: Duration,
    ) -> Result<Completion, DaemonError> {
        self.fim_streaming(input, params, timeout, None).await
    }

    /// [`Daemon::fim`], publishing the text generated so far and its lines' confidence to
    /// `progress` after every token, so that a caller can show a first line before the
    /// generation ends.
    pub async fn fim_streaming(
        &self,
        input: FimInput,
        params: GenerationParams,
        timeout: Duration,
        progress: Option<&watch::Sender<Progress>>,
    ) -> Result<Completion, DaemonError> {
        let conn = self.connection().await?;
        let id = format!("c{}", self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let run = self.run_fim(&conn, id.clone(), input, params, progress);
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result,
            // The dropped `run_fim` has sent the `cancel` (see `Call`).
            Err(_) => Err(DaemonError::Timeout { id, after: timeout }),
        }
    }

    async fn run_fim(
        &self,
        conn: &Conn,
        id: String,
        input: FimInput,
        params: GenerationParams,
        progress: Option<&watch::Sender<Progress>>,
    ) -> Result<Completion, DaemonError> {
        let mut call = Call::start(conn, id.clone());
        let sent = Instant::now();
        if conn.tx.send(Request::Fim { id: id.clone(), input, params }).is_err() {
            call.armed = false;
            return Err(DaemonError::Disconnected(id));
        }
        let mut so_far = Progress::default();
        loop {
            let event = call.events.recv().await;
            match event {
                Some(Event::Token { text: piece, lines, .. }) => {
                    so_far.push(&piece, lines);
                    if let Some(progress) = progress {
                        progress.send_replace(so_far.clone());
                    }
                }
                Some(Event::Done { stop, usage, lines, .. }) => {
                    call.armed = false;
                    let latency = sent.elapsed();
                    let mut stats = lock(&self.inner.stats);
                    stats.last_latency = Some(latency);
                    stats.prompt_tokens += u64::from(usage.prompt_tokens);
                    stats.cached_tokens += u64::from(usage.cached_tokens);
                    return Ok(Completion { text: so_far.text, stop, usage, lines, latency });
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

    /// Prefills `input` into the daemon's cache; returns when the daemon has done it (or gives
    /// up after a minute: nobody waits for it, but a frozen daemon must not keep it).
    pub async fn warm(&self, input: FimInput, max_tokens: u32) -> Result<(), DaemonError> {
        let conn = self.connection().await?;
        let id = format!("w{}", self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let run = run_warm(&conn, id.clone(), input, max_tokens);
        match tokio::time::timeout(WARM_TIMEOUT, run).await {
            Ok(result) => result,
            Err(_) => Err(DaemonError::Timeout { id, after: WARM_TIMEOUT }),
        }
    }

    /// The open connection, or a new one (starting the daemon if allowed), unless a recent
    /// failure's backoff has not passed yet.
    async fn connection(&self) -> Result<Conn, DaemonError> {
        if let Some(conn) = lock(&self.inner.conn).clone() {
            return Ok(conn);
        }
        let settings = lock(&self.inner.settings).clone();
        self.check_backoff(&settings.socket)?;
        let _attempt = self.inner.connecting.lock().await;
        // Another request may have connected, or failed, while this one waited.
        if let Some(conn) = lock(&self.inner.conn).clone() {
            return Ok(conn);
        }
        self.check_backoff(&settings.socket)?;
        let result = match self.try_connect(&settings).await {
            Ok(conn) => Ok(conn),
            Err(first) if settings.auto_start => self.start_and_connect(&settings, first).await,
            Err(cause) => Err(cause),
        };
        match result {
            Ok(conn) => {
                *lock(&self.inner.retry) = Retry::reset();
                self.inner.notified.store(false, Ordering::SeqCst);
                Ok(conn)
            }
            Err(cause) => {
                let mut retry = lock(&self.inner.retry);
                retry.not_before = Some(Instant::now() + retry.backoff);
                retry.backoff = (retry.backoff * 2).min(MAX_BACKOFF);
                retry.socket_seen = socket_id(&settings.socket);
                let socket = settings.socket.display().to_string();
                Err(DaemonError::Unavailable { socket, cause })
            }
        }
    }

    /// Refuses an attempt while the last failure's backoff runs, unless the socket file changed
    /// since that failure: a daemon that bound its socket anew is tried at once.
    fn check_backoff(&self, socket: &Path) -> Result<(), DaemonError> {
        let retry = lock(&self.inner.retry);
        let Some(t) = retry.not_before.filter(|t| Instant::now() < *t) else {
            return Ok(());
        };
        let now = socket_id(socket);
        if now.is_some() && now != retry.socket_seen {
            tracing::debug!(socket = %socket.display(), "socket bound anew; connecting now");
            return Ok(());
        }
        Err(DaemonError::Unavailable {
            socket: socket.display().to_string(),
            cause: format!(
                "not answering; next attempt in {} ms",
                (t - Instant::now()).as_millis()
            ),
        })
    }

    async fn try_connect(&self, settings: &DaemonSettings) -> Result<Conn, String> {
        let connect =
            Client::connect(&settings.socket, concat!("m31r-lsp/", env!("CARGO_PKG_VERSION")));
        let (client, model) = match tokio::time::timeout(settings.connect_timeout, connect).await {
            Ok(Ok(ok)) => ok,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no handshake within {:?}", settings.connect_timeout)),
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
            *lock(&inner.retry) = Retry::reset();
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

/// Sends `warm` on `conn` and waits for its end.
async fn run_warm(
    conn: &Conn,
    id: String,
    input: FimInput,
    max_tokens: u32,
) -> Result<(), DaemonError> {
    let mut call = Call::start(conn, id.clone());
    // A warm-up is never worth cancelling: what it evaluates stays useful in the cache.
    call.armed = false;
    let warm = Request::Warm { id: id.clone(), input, max_tokens: Some(max_tokens) };
    if conn.tx.send(warm).is_err() {
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
        // Late events for the id are of no use; and a daemon that never answers (frozen) must not
        // make the registrations pile up.
        lock(&self.conn.pending).remove(&self.id);
        if self.armed {
            tracing::debug!(id = %self.id, "cancelling at the daemon");
            let _ = self.conn.tx.send(Request::Cancel { id: self.id.clone() });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    #[test]
    fn progress_keeps_each_lines_latest_confidence() {
        use super::Progress;
        use m31r_protocol::LineConfidence;
        let c = |tokens, sum| LineConfidence { tokens, logprob_sum: sum, logprob_min: sum };
        let mut p = Progress::default();
        p.push("let", vec![c(1, -0.5)]);
        p.push(" x;\n  y", vec![c(3, -1.0), c(1, -2.0)]);
        assert_eq!(p.text, "let x;\n  y");
        assert_eq!(p.lines, vec![c(3, -1.0), c(1, -2.0)]);
        p.push("z", vec![c(2, -2.5)]);
        assert_eq!(p.lines, vec![c(3, -1.0), c(2, -2.5)]);
        // A piece without numbers changes none.
        p.push("\n", Vec::new());
        assert_eq!(p.lines.len(), 2);
    }

    use m31r_protocol::{FrameReader, MAX_FRAME_BYTES, PROTOCOL_VERSION, write_frame};
    use tokio::io::BufReader;
    use tokio::net::UnixListener;

    use super::*;

    /// Answers the `hello` of every connection to `listener`, then reads and ignores the rest:
    /// a daemon that froze after the handshake.
    fn answer_hellos(listener: UnixListener) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut frames = FrameReader::new(BufReader::new(read), MAX_FRAME_BYTES);
                    let hello = Event::Hello {
                        version: PROTOCOL_VERSION,
                        daemon: "test".into(),
                        model: ModelInfo::default(),
                    };
                    if let Ok(Some(_)) = frames.next_frame().await
                        && write_frame(&mut write, &hello).await.is_ok()
                    {
                        while let Ok(Some(_)) = frames.next_frame().await {}
                    }
                });
            }
        })
    }

    fn daemon(socket: &Path) -> Daemon {
        Daemon::new(DaemonSettings {
            socket: socket.to_path_buf(),
            auto_start: false,
            program: "m31rd".into(),
            args: Vec::new(),
            connect_timeout: Duration::from_secs(30),
        })
    }

    /// Stretches the current backoff as if many attempts had failed.
    fn long_backoff(daemon: &Daemon) {
        lock(&daemon.inner.retry).not_before = Some(Instant::now() + MAX_BACKOFF);
    }

    #[tokio::test]
    async fn a_socket_bound_anew_is_tried_despite_the_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let daemon = daemon(&socket);
        assert!(matches!(daemon.connection().await, Err(DaemonError::Unavailable { .. })));
        long_backoff(&daemon);
        // A socket file that refuses (a crashed daemon's leftover) keeps the backoff.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(matches!(daemon.connection().await, Err(DaemonError::Unavailable { .. })));
        long_backoff(&daemon);
        let err = daemon.connection().await.unwrap_err().to_string();
        assert!(err.contains("next attempt in"), "{err}");
        // The daemon comes back on the same path: the next request connects.
        std::fs::remove_file(&socket).unwrap();
        let server = answer_hellos(UnixListener::bind(&socket).unwrap());
        assert!(daemon.connection().await.is_ok());
        assert!(daemon.snapshot().connected);
        server.abort();
    }

    #[tokio::test]
    async fn a_completion_carries_the_confidence_of_its_lines() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let lines = vec![
            LineConfidence { tokens: 2, logprob_sum: -0.5, logprob_min: -0.4 },
            LineConfidence { tokens: 3, logprob_sum: -6.0, logprob_min: -5.0 },
        ];
        let sent = lines.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut frames = FrameReader::new(BufReader::new(read), MAX_FRAME_BYTES);
            while let Ok(Some(frame)) = frames.next_frame().await {
                let events = match serde_json::from_str::<Request>(&frame).unwrap() {
                    Request::Hello { .. } => vec![Event::Hello {
                        version: PROTOCOL_VERSION,
                        daemon: "test".into(),
                        model: ModelInfo::default(),
                    }],
                    Request::Fim { id, .. } => vec![
                        Event::Token { id: id.clone(), text: "a\nb".into(), lines: Vec::new() },
                        Event::Done {
                            id,
                            stop: StopReason::EndOfText,
                            usage: Usage::default(),
                            timings: m31r_protocol::Timings::default(),
                            lines: sent.clone(),
                        },
                    ],
                    _ => Vec::new(),
                };
                for event in events {
                    write_frame(&mut write, &event).await.unwrap();
                }
            }
        });
        let daemon = daemon(&socket);
        let completion = daemon
            .fim(FimInput::default(), GenerationParams::default(), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(completion.text, "a\nb");
        assert_eq!(completion.lines, lines);
        server.abort();
    }

    #[tokio::test]
    async fn a_fim_past_its_timeout_is_cancelled_and_unregistered() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("d.sock");
        let server = answer_hellos(UnixListener::bind(&socket).unwrap());
        let daemon = daemon(&socket);
        daemon.connection().await.unwrap();
        let input =
            FimInput { prefix: "fn f() {".into(), suffix: "}".into(), context_files: Vec::new() };
        let result =
            daemon.fim(input, GenerationParams::default(), Duration::from_millis(50)).await;
        assert!(
            matches!(&result, Err(DaemonError::Timeout { id, .. }) if id == "c1"),
            "{result:?}"
        );
        let conn = lock(&daemon.inner.conn).clone().unwrap();
        assert!(lock(&conn.pending).is_empty());
        server.abort();
    }
}
