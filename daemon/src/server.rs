//! The socket server: a private Unix socket, one task per connection, requests turned into engine
//! jobs and their events streamed back. Every frame is size-checked before parsing; every bad
//! frame gets an `error` event and the connection carries on. What a connection may hold is
//! bounded: its queue of unread answers (the daemon stops reading a client that does not read),
//! its requests in flight, and its idle time; a full house evicts the longest-idle connection.

mod connection;

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use m31r_protocol::{DaemonStatus, ErrorCode, Event, GenerationParams, ModelInfo, write_frame};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};

use crate::engine::Engine;
use connection::{ConnState, Handler, Lifeline};

/// Largest `max_tokens` a request may ask for.
pub const MAX_NEW_TOKENS: u32 = 4096;
/// Most stop strings per request, and their longest length in bytes.
pub const MAX_STOP_STRINGS: (usize, usize) = (8, 64);
/// Immediate answers (status, errors, hello) a connection may have queued for a client that is not
/// reading; once they are queued the daemon reads no more of that client's requests.
pub const OUTBOX_FRAMES: usize = 64;
/// Requests one connection may have in flight and not cancelled (until their last event is on
/// its way to the client); one more is refused with `overloaded`. Together with [`MAX_NEW_TOKENS`]
/// this bounds what the engine can queue for a client that does not read. Cancelled requests
/// no longer count: they produce nothing more, and the engine's queue bounds how many wait to be
/// dropped, so a client that cancels each keystroke's request is not refused while the engine
/// catches up.
pub const MAX_IN_FLIGHT: usize = 16;

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
    /// The socket's directory is shared or someone else's, and not ours to change.
    #[error(
        "socket directory {dir}: {problem}, so someone else could replace or intercept the \
         socket. m31rd changes the mode only of a directory it creates itself: choose a socket \
         path in a private directory (a directory that does not exist yet is created with mode \
         0700), or leave `socket` unset for the default"
    )]
    UnsafeDirectory {
        /// The directory refused.
        dir: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}

/// What each connection may hold, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Simultaneous connections; when all are taken, the longest-idle one is closed to admit a
    /// new one (and without an idle one the new one is refused).
    pub max_connections: usize,
    /// Largest request frame in bytes.
    pub max_frame_bytes: usize,
    /// A connection is closed once it has exchanged nothing for this long while it has no
    /// request in flight (or its client stopped reading); `None`: never.
    pub idle_timeout: Option<Duration>,
}

/// What the server shares between connections.
pub struct Server {
    engine: Engine,
    model: ModelInfo,
    limits: ConnectionLimits,
    started: Instant,
    /// Connection tasks still running (what `status` reports and shutdown waits for).
    connections: AtomicU32,
    /// Admitted connections, by a serial number; removing one tells it to close.
    slots: Mutex<Slots>,
    shutdown: watch::Sender<bool>,
}

#[derive(Default)]
struct Slots {
    next: u64,
    open: HashMap<u64, Slot>,
}

struct Slot {
    state: Arc<ConnState>,
    /// Dropped with the slot, which is the connection's signal to close.
    _close: oneshot::Sender<()>,
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

/// Binds the socket at `path`: makes sure its directory is private (see [`prepare_socket_dir`]),
/// refuses to start if another daemon answers there, removes a stale socket file, and restricts
/// the socket to mode 0600.
pub async fn bind(path: &Path) -> Result<Listener, ServerError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServerError::Io { path, source }
    };
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => prepare_socket_dir(dir)?,
        _ => prepare_socket_dir(Path::new("."))?,
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

/// Makes sure the socket's directory `dir` is private to this user. A directory that does not
/// exist is created with mode 0700. An existing one is never changed, as it may be shared (as
/// root, `--socket /tmp/x.sock` must not turn /tmp private): it is accepted if we own it and
/// nobody else may write to it, and refused otherwise. The one exception is the daemon's own
/// default directory (`$XDG_RUNTIME_DIR/m31r`), which is reset to 0700 if we own it.
pub fn prepare_socket_dir(dir: &Path) -> Result<(), ServerError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServerError::Io { path, source }
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io(parent))?;
    }
    // Creating the last component on its own tells us, without a race, whether it is ours.
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            // The umask may have narrowed the mode; make it exact.
            return std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(dir));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(dir)(e)),
    }
    let meta = std::fs::metadata(dir).map_err(io(dir))?;
    let refuse = |problem: String| ServerError::UnsafeDirectory { dir: dir.to_path_buf(), problem };
    if !meta.is_dir() {
        return Err(io(dir)(std::io::Error::other("exists and is not a directory")));
    }
    let (uid, mode) = (m31r_protocol::socket::current_uid(), meta.permissions().mode() & 0o7777);
    if meta.uid() != uid {
        return Err(refuse(format!(
            "it belongs to uid {}, not to this user (uid {uid})",
            meta.uid()
        )));
    }
    let own_default = m31r_protocol::socket::default_socket_path().parent() == Some(dir);
    if own_default && mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "making the socket directory private (0700)");
        return std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(dir));
    }
    if mode & 0o022 != 0 {
        return Err(refuse(format!("group or others may write to it (mode {mode:o})")));
    }
    Ok(())
}

impl Server {
    /// A server over a started engine.
    pub fn new(engine: Engine, model: ModelInfo, limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            engine,
            model,
            limits,
            started: Instant::now(),
            connections: AtomicU32::new(0),
            slots: Mutex::default(),
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
        let uid = m31r_protocol::socket::current_uid();
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
            match m31r_protocol::socket::peer_uid(&stream) {
                Ok(peer) if peer == uid => {}
                Ok(peer) => {
                    tracing::warn!(peer_uid = peer, "refused a connection from another user");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read peer credentials; refused");
                    continue;
                }
            }
            let Some((serial, lifeline)) = self.open_slot() else {
                let (_, mut write) = stream.into_split();
                let _ = write_frame(
                    &mut write,
                    &Event::Error {
                        id: None,
                        code: ErrorCode::Overloaded,
                        message: format!(
                            "connection limit of {} reached and every connection is busy",
                            self.limits.max_connections
                        ),
                    },
                )
                .await;
                continue;
            };
            self.connections.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(Handler::new(self.clone(), stream, serial, lifeline).run());
        }
        self.engine.cancel_all();
        let drain_until = Instant::now() + Duration::from_secs(2);
        while self.connections.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Admits a connection, evicting the longest-idle one (nothing in flight) if all are taken;
    /// `None` if all are taken and busy.
    fn open_slot(&self) -> Option<(u64, Lifeline)> {
        let mut slots = self.slots.lock().ok()?;
        if slots.open.len() >= self.limits.max_connections.max(1) {
            let oldest = slots
                .open
                .iter()
                .filter(|(_, slot)| slot.state.at_rest())
                .min_by_key(|(_, slot)| slot.state.last_active())
                .map(|(&serial, _)| serial)?;
            // Dropping the slot drops its close sender, which ends that connection.
            slots.open.remove(&oldest);
            tracing::info!(
                connection = oldest,
                "connection limit reached: closed the longest-idle connection"
            );
        }
        let serial = slots.next;
        slots.next += 1;
        let (close_tx, close) = oneshot::channel();
        let state = Arc::new(ConnState::new());
        slots.open.insert(serial, Slot { state: state.clone(), _close: close_tx });
        Some((serial, Lifeline { stop: self.shutdown.subscribe(), close, state }))
    }

    fn close_slot(&self, serial: u64) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.open.remove(&serial);
        }
    }

    fn status(&self) -> DaemonStatus {
        self.engine.status(
            &self.model,
            self.started.elapsed(),
            self.connections.load(Ordering::Relaxed),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[tokio::test]
    async fn a_shared_socket_directory_is_refused_and_left_as_it_was() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let Err(err) = bind(&shared.join("x.sock")).await else {
            panic!("a socket in a mode 1777 directory was accepted")
        };
        let message = err.to_string();
        assert!(matches!(err, ServerError::UnsafeDirectory { .. }), "{message}");
        assert!(message.contains(&shared.display().to_string()), "{message}");
        assert!(message.contains("mode 1777") && message.contains("private"), "{message}");
        assert_eq!(mode(&shared), 0o1777);
        assert!(!shared.join("x.sock").exists());

        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert!(bind(&shared.join("x.sock")).await.is_err(), "group-writable accepted");
        assert_eq!(mode(&shared), 0o770);
    }

    #[tokio::test]
    async fn a_new_socket_directory_is_created_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("new").join("run");
        let socket = dir.join("x.sock");
        let listener = bind(&socket).await.unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&socket) & 0o777, 0o600);
        drop(listener);
        assert!(!socket.exists());
    }

    #[tokio::test]
    async fn an_existing_directory_only_we_can_write_is_used_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mine");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.join("x.sock");
        let _listener = bind(&socket).await.unwrap();
        assert_eq!(mode(&dir), 0o755);
        assert!(socket.exists());
    }
}
