//! The socket server: a private Unix socket, one task per connection, requests turned into engine
//! jobs and their events streamed back. Every frame is size-checked before parsing; every bad
//! frame gets an `error` event and the connection carries on.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use m31r_protocol::{
    DaemonStatus, ErrorCode, Event, FrameError, FrameReader, GenerationParams, ModelInfo,
    PROTOCOL_VERSION, Request, write_frame,
};
use tokio::io::BufReader;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::engine::{Engine, Job, JobKind};

/// Largest `max_tokens` a request may ask for.
pub const MAX_NEW_TOKENS: u32 = 4096;
/// Most stop strings per request, and their longest length in bytes.
pub const MAX_STOP_STRINGS: (usize, usize) = (8, 64);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another daemon answers on the socket.
    #[error("another m31rd is already serving {0}")]
    AlreadyRunning(PathBuf),
    /// Setting up the socket failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// What the server shares between connections.
pub struct Server {
    engine: Engine,
    model: ModelInfo,
    max_connections: usize,
    max_frame_bytes: usize,
    started: Instant,
    connections: AtomicU32,
    shutdown: watch::Sender<bool>,
}

/// The bound socket; dropping it removes the socket file.
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket at `path`: creates its directory with mode 0700, refuses to start if another
/// daemon answers there, removes a stale socket file, and restricts the socket to mode 0600.
pub async fn bind(path: &Path) -> Result<Listener, ServerError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServerError::Io { path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
        // An existing directory keeps its mode; make sure it is private.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::AlreadyRunning(path.to_path_buf()));
        }
        tracing::warn!(socket = %path.display(), "removing stale socket file");
        std::fs::remove_file(path).map_err(io(path))?;
    }
    let listener = UnixListener::bind(path).map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    Ok(Listener { listener, path: path.to_path_buf() })
}

impl Server {
    /// A server over a started engine.
    pub fn new(
        engine: Engine,
        model: ModelInfo,
        max_connections: usize,
        max_frame_bytes: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            engine,
            model,
            max_connections,
            max_frame_bytes,
            started: Instant::now(),
            connections: AtomicU32::new(0),
            shutdown: watch::Sender::new(false),
        })
    }

    /// Asks the server to stop (as a `shutdown` request or a signal does).
    pub fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves when shutdown is requested (the HTTP listener stops with the socket).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// The engine, for other front ends (HTTP) to submit admitted jobs to.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The loaded model.
    pub fn model(&self) -> &ModelInfo {
        &self.model
    }

    /// The checks every request passes before it may become a job, whichever front end it came
    /// through (socket or HTTP): the daemon is not shutting down and the parameters are in range.
    pub fn admit(&self, id: &str, params: &GenerationParams) -> Result<(), (ErrorCode, String)> {
        if self.shutting_down() {
            return Err((ErrorCode::ShuttingDown, "the daemon is shutting down".into()));
        }
        validate(params)
            .map_err(|message| (ErrorCode::InvalidParams, format!("request {id}: {message}")))
    }

    /// Serves until shutdown is requested; then cancels in-flight work, waits briefly for
    /// connections to drain and returns (the caller drops the listener, removing the socket).
    pub async fn serve(self: &Arc<Self>, listener: &Listener) {
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let uid = crate::config::current_uid();
        let mut stop = self.shutdown.subscribe();
        loop {
            let stream = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                accepted = listener.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                },
            };
            if self.shutting_down() {
                break;
            }
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == uid => {}
                Ok(cred) => {
                    tracing::warn!(peer_uid = cred.uid(), "refused a connection from another user");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read peer credentials; refused");
                    continue;
                }
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                let (_, mut write) = stream.into_split();
                let _ = write_frame(
                    &mut write,
                    &Event::Error {
                        id: None,
                        code: ErrorCode::Overloaded,
                        message: format!("connection limit of {} reached", self.max_connections),
                    },
                )
                .await;
                continue;
            };
            let server = self.clone();
            tokio::spawn(async move {
                server.connections.fetch_add(1, Ordering::Relaxed);
                server.handle(stream).await;
                server.connections.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
        self.engine.cancel_all();
        let drain_until = Instant::now() + Duration::from_secs(2);
        while self.connections.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn status(&self) -> DaemonStatus {
        self.engine.status(
            &self.model,
            self.started.elapsed(),
            self.connections.load(Ordering::Relaxed),
        )
    }

    /// One connection: a writer task drains the event channel; this loop reads frames.
    async fn handle(self: &Arc<Self>, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        // Immediate replies and the engine's job events travel on separate channels: only a job's
        // own terminal event unregisters its id, never a refusal of a later request that reused it.
        let (events, mut outbox) = mpsc::unbounded_channel::<Event>();
        let (job_events, mut job_outbox) = mpsc::unbounded_channel::<Event>();
        let inflight: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>> = Arc::default();
        let writer_inflight = inflight.clone();
        let writer = tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    Some(event) = outbox.recv() => event,
                    Some(event) = job_outbox.recv() => {
                        if let Event::Done { id, .. } | Event::Error { id: Some(id), .. } = &event
                            && let Ok(mut map) = writer_inflight.lock()
                        {
                            map.remove(id);
                        }
                        event
                    }
                    else => break,
                };
                if write_frame(&mut write, &event).await.is_err() {
                    break; // the client is gone; the reader notices too
                }
            }
        });
        let mut frames = FrameReader::new(BufReader::new(read), self.max_frame_bytes);
        let mut greeted = false;
        let mut stop = self.shutdown.subscribe();
        loop {
            let frame = tokio::select! {
                frame = frames.next_frame() => frame,
                _ = stop.wait_for(|s| *s) => break,
            };
            let reply = |code, message: String| Event::Error { id: None, code, message };
            let text = match frame {
                Ok(Some(text)) => text,
                Ok(None) | Err(FrameError::Io(_)) => break,
                Err(e @ FrameError::TooLarge { .. }) => {
                    let _ = events.send(reply(ErrorCode::FrameTooLarge, e.to_string()));
                    continue;
                }
                Err(e @ FrameError::InvalidUtf8 { .. }) => {
                    let _ = events.send(reply(ErrorCode::InvalidUtf8, e.to_string()));
                    continue;
                }
            };
            let request = match serde_json::from_str::<Request>(&text) {
                Ok(r) => r,
                Err(e) => {
                    let id = serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned));
                    let _ = events.send(Event::Error {
                        id,
                        code: ErrorCode::BadRequest,
                        message: format!("bad request: {e}"),
                    });
                    continue;
                }
            };
            if let Some(event) =
                self.dispatch(request, &mut greeted, &events, &job_events, &inflight)
            {
                let _ = events.send(event);
            }
        }
        // A closed connection cancels its requests.
        if let Ok(map) = inflight.lock() {
            for flag in map.values() {
                flag.store(true, Ordering::SeqCst);
            }
        }
        drop(events);
        drop(job_events);
        let _ = writer.await;
    }

    /// Handles one parsed request; returns an immediate reply, if any.
    fn dispatch(
        self: &Arc<Self>,
        request: Request,
        greeted: &mut bool,
        events: &mpsc::UnboundedSender<Event>,
        job_events: &mpsc::UnboundedSender<Event>,
        inflight: &Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
    ) -> Option<Event> {
        let error = |id: Option<&str>, code, message: String| {
            Some(Event::Error { id: id.map(str::to_owned), code, message })
        };
        if let Request::Hello { version, .. } = &request {
            if *version != PROTOCOL_VERSION {
                return error(
                    None,
                    ErrorCode::VersionMismatch,
                    format!("client speaks protocol {version}, daemon {PROTOCOL_VERSION}"),
                );
            }
            *greeted = true;
            return Some(Event::Hello {
                version: PROTOCOL_VERSION,
                daemon: format!("m31rd/{}", env!("CARGO_PKG_VERSION")),
                model: self.model.clone(),
            });
        }
        let id = request.id().unwrap_or_default().to_owned();
        if !*greeted {
            return error(
                Some(&id),
                ErrorCode::VersionMismatch,
                "the first message must be hello".into(),
            );
        }
        let (kind, params) = match request {
            Request::Hello { .. } => return None,
            Request::Status { id } => return Some(Event::Status { id, status: self.status() }),
            Request::Cancel { id } => {
                // Unknown ids are ignored: the request may just have finished.
                if let Some(flag) = inflight.lock().ok().and_then(|m| m.get(&id).cloned()) {
                    flag.store(true, Ordering::SeqCst);
                }
                return None;
            }
            Request::Shutdown { id } => {
                let _ = events.send(Event::ShuttingDown { id });
                self.request_shutdown();
                return None;
            }
            Request::Generate { prompt, params, .. } => (JobKind::Generate { prompt }, params),
            Request::Complete { prompt, params, .. } => (JobKind::Complete { prompt }, params),
            Request::Fim { input, params, .. } => (JobKind::Fim(input), params),
            Request::Warm { input, .. } => (JobKind::Warm(input), GenerationParams::default()),
        };
        if let Err((code, message)) = self.admit(&id, &params) {
            return error(Some(&id), code, message);
        }
        let cancel = Arc::new(AtomicBool::new(false));
        {
            let Ok(mut map) = inflight.lock() else {
                return error(Some(&id), ErrorCode::Internal, "connection state poisoned".into());
            };
            if map.contains_key(&id) {
                return error(
                    Some(&id),
                    ErrorCode::DuplicateId,
                    format!("request id {id:?} is already in flight on this connection"),
                );
            }
            map.insert(id.clone(), cancel.clone());
        }
        let job = Job {
            id: id.clone(),
            kind,
            params,
            cancel,
            events: job_events.clone(),
            arrived: Instant::now(),
        };
        match self.engine.submit(job) {
            Ok(()) => None,
            Err(e) => {
                if let Ok(mut map) = inflight.lock() {
                    map.remove(&id);
                }
                error(Some(&id), e.code(), e.to_string())
            }
        }
    }
}

/// Range checks that do not need the model.
pub fn validate(params: &GenerationParams) -> Result<(), String> {
    if params.max_tokens == 0 || params.max_tokens > MAX_NEW_TOKENS {
        return Err(format!("max_tokens = {} is outside 1..={MAX_NEW_TOKENS}", params.max_tokens));
    }
    if !(params.temperature.is_finite() && (0.0..=10.0).contains(&params.temperature)) {
        return Err(format!("temperature = {} is outside 0..=10", params.temperature));
    }
    if !(params.top_p > 0.0 && params.top_p <= 1.0) {
        return Err(format!("top_p = {} is outside (0, 1]", params.top_p));
    }
    let (max_count, max_len) = MAX_STOP_STRINGS;
    if params.stop.len() > max_count {
        return Err(format!("{} stop strings given; at most {max_count}", params.stop.len()));
    }
    if let Some(s) = params.stop.iter().find(|s| s.is_empty() || s.len() > max_len) {
        return Err(format!("stop string {s:?} must be 1..={max_len} bytes"));
    }
    Ok(())
}

/// Resident memory of this process, from `/proc/self/statm` (0 where unavailable).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}
