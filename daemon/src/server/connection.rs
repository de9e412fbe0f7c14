//! One client connection of the socket server: [`Handler`] owns everything the connection holds
//! (its framed reader, its bounded answer queue and writer task, its requests in flight, its idle
//! bookkeeping and its slot) and serves the client until it leaves or must be closed.

use std::collections::HashMap;
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use m31r_protocol::{
    ErrorCode, Event, FrameError, FrameReader, GenerationParams, PROTOCOL_VERSION, Request,
    write_frame,
};
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::{MAX_IN_FLIGHT, OUTBOX_FRAMES, Server};
use crate::engine::{Job, JobKind};

/// How long a closing connection may take to hand its client what is still queued for it; a
/// client that does not read is cut off after this.
const FLUSH_GRACE: Duration = Duration::from_secs(2);

/// In-flight request ids of one connection, each with its cancel flag.
type InFlight = Mutex<HashMap<String, Arc<AtomicBool>>>;

/// What the accept loop, the reader and the writer of one connection share.
pub(super) struct ConnState {
    in_flight: InFlight,
    opened: Instant,
    /// Milliseconds after `opened` when a frame was last read or written.
    last_active_ms: AtomicU64,
    /// A write to the client is under way; if that lasts, the client has stopped reading.
    writing: AtomicBool,
}

impl ConnState {
    pub(super) fn new() -> Self {
        Self {
            in_flight: Mutex::default(),
            opened: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            writing: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    pub(super) fn last_active(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed))
    }

    /// Nothing in flight: closing it loses no answer. A poisoned map counts as busy.
    pub(super) fn at_rest(&self) -> bool {
        self.in_flight.lock().is_ok_and(|m| m.is_empty())
    }

    /// `Ok` if the connection has been idle for `timeout` (nothing exchanged, and either nothing
    /// in flight or a write stuck on a client that does not read); else when to look again.
    fn idle(&self, timeout: Duration) -> Result<(), Instant> {
        let now = Instant::now();
        let quiet_until = self.last_active() + timeout;
        if quiet_until > now {
            return Err(quiet_until);
        }
        if self.at_rest() || self.writing.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Waiting for the engine is not idleness; look again after another full timeout.
        Err(now + timeout)
    }

    /// Asks request `id` to stop; unknown ids are ignored, as the request may just have ended.
    fn cancel(&self, id: &str) {
        if let Some(flag) = self.in_flight.lock().ok().and_then(|m| m.get(id).cloned()) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// Asks every request in flight to stop.
    fn cancel_all(&self) {
        if let Ok(map) = self.in_flight.lock() {
            for flag in map.values() {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Forgets request `id`, whose last event is on its way (or which never started).
    fn finish(&self, id: &str) {
        if let Ok(mut map) = self.in_flight.lock() {
            map.remove(id);
        }
    }
}

/// Why a connection stopped serving its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    Shutdown,
    Evicted,
    Idle,
}

/// A connection's reasons to stop, watched while it waits for its client.
pub(super) struct Lifeline {
    pub(super) stop: watch::Receiver<bool>,
    pub(super) close: oneshot::Receiver<()>,
    pub(super) state: Arc<ConnState>,
}

impl Lifeline {
    /// Awaits `work` unless the connection must close first: the daemon shuts down, the accept
    /// loop evicted it, or it stayed idle past `idle_timeout`. `work` is kept across idle checks
    /// rather than restarted, as reading a frame is not cancellation-safe.
    async fn unless_closed<F: Future>(
        &mut self,
        idle_timeout: Option<Duration>,
        work: F,
    ) -> Result<F::Output, Closed> {
        tokio::pin!(work);
        loop {
            let look_again = match idle_timeout.map(|t| self.state.idle(t)) {
                Some(Ok(())) => return Err(Closed::Idle),
                Some(Err(at)) => Some(at),
                None => None,
            };
            let wake = tokio::time::Instant::from_std(look_again.unwrap_or_else(Instant::now));
            tokio::select! {
                out = &mut work => return Ok(out),
                _ = self.stop.wait_for(|s| *s) => return Err(Closed::Shutdown),
                _ = &mut self.close => return Err(Closed::Evicted),
                _ = tokio::time::sleep_until(wake), if look_again.is_some() => {}
            }
        }
    }
}

/// One admitted connection, from its first frame to its slot given back.
pub(super) struct Handler {
    server: Arc<Server>,
    /// The connection's serial number, which names its slot.
    serial: u64,
    frames: FrameReader<BufReader<OwnedReadHalf>>,
    /// Immediate answers (hello, status, errors), bounded: a frame is read only once its answer
    /// has room here, so a client that does not read stops being read.
    replies: mpsc::Sender<Event>,
    /// The engine's events for this connection's jobs.
    job_events: mpsc::UnboundedSender<Event>,
    /// Drains both channels to the client.
    writer: JoinHandle<()>,
    life: Lifeline,
    greeted: bool,
}

impl Handler {
    /// Takes over the admitted connection `serial` on `stream` and starts its writer task.
    pub(super) fn new(
        server: Arc<Server>,
        stream: UnixStream,
        serial: u64,
        life: Lifeline,
    ) -> Self {
        let (read, write) = stream.into_split();
        // Immediate replies and the engine's job events travel on separate channels: only a job's
        // own terminal event unregisters its id, never a refusal of a later request that reused it.
        // The engine's channel is unbounded so a slow client never stalls the model; what it can
        // hold is bounded by MAX_IN_FLIGHT jobs of at most MAX_NEW_TOKENS tokens.
        let (replies, outbox) = mpsc::channel::<Event>(OUTBOX_FRAMES);
        let (job_events, job_outbox) = mpsc::unbounded_channel::<Event>();
        let writer = tokio::spawn(write_events(write, outbox, job_outbox, life.state.clone()));
        let frames = FrameReader::new(BufReader::new(read), server.limits.max_frame_bytes);
        Self { server, serial, frames, replies, job_events, writer, life, greeted: false }
    }

    /// Serves the client until it leaves or the connection must close, then cancels what it
    /// left in flight, lets the writer hand over what is queued, and gives back the slot.
    pub(super) async fn run(mut self) {
        let closed = self.read_requests().await;
        if let Some(why @ (Closed::Idle | Closed::Evicted)) = closed {
            tracing::info!(reason = ?why, "closing an idle connection");
        }
        // A closed connection cancels its requests.
        self.life.state.cancel_all();
        drop(self.replies);
        drop(self.job_events);
        if tokio::time::timeout(FLUSH_GRACE, &mut self.writer).await.is_err() {
            // The client is not reading what is left; drop it rather than hold the connection.
            self.writer.abort();
        }
        self.server.close_slot(self.serial);
        self.server.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Reads and answers frames until the client leaves (`None`) or the connection must close.
    async fn read_requests(&mut self) -> Option<Closed> {
        let idle_timeout = self.server.limits.idle_timeout;
        loop {
            // An owned permit, so that answering the frame may use the rest of the handler.
            let reserve = self.replies.clone().reserve_owned();
            let room = match self.life.unless_closed(idle_timeout, reserve).await {
                Ok(Ok(room)) => room,
                Ok(Err(_)) => return None, // the writer is gone: so is the client
                Err(why) => return Some(why),
            };
            let frame = match self.life.unless_closed(idle_timeout, self.frames.next_frame()).await
            {
                Ok(frame) => frame,
                Err(why) => return Some(why),
            };
            self.life.state.touch();
            match self.answer(frame) {
                ControlFlow::Break(()) => return None,
                ControlFlow::Continue(Some(event)) => {
                    room.send(event);
                }
                ControlFlow::Continue(None) => {}
            }
        }
    }

    /// Turns one frame into a request and handles it; the immediate reply, if any, or `Break`
    /// when the client has gone.
    fn answer(
        &mut self,
        frame: Result<Option<String>, FrameError>,
    ) -> ControlFlow<(), Option<Event>> {
        let reply = |code, message: String| Some(Event::Error { id: None, code, message });
        let text = match frame {
            Ok(Some(text)) => text,
            Ok(None) | Err(FrameError::Io(_)) => return ControlFlow::Break(()),
            Err(e @ FrameError::TooLarge { .. }) => {
                return ControlFlow::Continue(reply(ErrorCode::FrameTooLarge, e.to_string()));
            }
            Err(e @ FrameError::InvalidUtf8 { .. }) => {
                return ControlFlow::Continue(reply(ErrorCode::InvalidUtf8, e.to_string()));
            }
        };
        match serde_json::from_str::<Request>(&text) {
            Ok(request) => ControlFlow::Continue(self.dispatch(request)),
            Err(e) => {
                // Echo the id if the frame has one, so the client can tell which request failed.
                let id = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned));
                ControlFlow::Continue(Some(Event::Error {
                    id,
                    code: ErrorCode::BadRequest,
                    message: format!("bad request: {e}"),
                }))
            }
        }
    }

    /// Handles one parsed request; returns an immediate reply, if any.
    fn dispatch(&mut self, request: Request) -> Option<Event> {
        if let Request::Hello { version, .. } = &request {
            if *version != PROTOCOL_VERSION {
                return error(
                    None,
                    ErrorCode::VersionMismatch,
                    format!("client speaks protocol {version}, daemon {PROTOCOL_VERSION}"),
                );
            }
            self.greeted = true;
            return Some(Event::Hello {
                version: PROTOCOL_VERSION,
                daemon: format!("m31rd/{}", env!("CARGO_PKG_VERSION")),
                model: self.server.model.clone(),
            });
        }
        let id = request.id().unwrap_or_default().to_owned();
        if !self.greeted {
            return error(
                Some(&id),
                ErrorCode::VersionMismatch,
                "the first message must be hello".into(),
            );
        }
        let (kind, params) = match request {
            Request::Hello { .. } => return None,
            Request::Status { id } => {
                return Some(Event::Status { id, status: self.server.status() });
            }
            Request::Cancel { id } => {
                self.life.state.cancel(&id);
                return None;
            }
            Request::Shutdown { id } => {
                self.server.request_shutdown();
                return Some(Event::ShuttingDown { id });
            }
            Request::Generate { prompt, params, .. } => (JobKind::Generate { prompt }, params),
            Request::Complete { prompt, params, .. } => (JobKind::Complete { prompt }, params),
            Request::Fim { input, params, .. } => (JobKind::Fim(input), params),
            Request::Warm { input, max_tokens, .. } => {
                let defaults = GenerationParams::default();
                let max_tokens = max_tokens.unwrap_or(defaults.max_tokens);
                (JobKind::Warm(input), GenerationParams { max_tokens, ..defaults })
            }
        };
        self.start_job(id, kind, params)
    }

    /// Admits request `id`, registers it in flight and hands it to the engine; an error event if
    /// any of that is refused.
    fn start_job(&self, id: String, kind: JobKind, params: GenerationParams) -> Option<Event> {
        if let Err((code, message)) = self.server.admit(&id, &params) {
            return error(Some(&id), code, message);
        }
        let cancel = Arc::new(AtomicBool::new(false));
        {
            let Ok(mut map) = self.life.state.in_flight.lock() else {
                return error(Some(&id), ErrorCode::Internal, "connection state poisoned".into());
            };
            if map.contains_key(&id) {
                return error(
                    Some(&id),
                    ErrorCode::DuplicateId,
                    format!("request id {id:?} is already in flight on this connection"),
                );
            }
            // Cancelled requests only wait for the engine to drop them (the engine queue bounds
            // how many): they must not hold the places of live ones, or a client that cancels
            // each keystroke's request would be refused while the engine catches up.
            let live = map.values().filter(|c| !c.load(Ordering::Relaxed)).count();
            if live >= MAX_IN_FLIGHT {
                return error(
                    Some(&id),
                    ErrorCode::Overloaded,
                    format!(
                        "request {id}: {MAX_IN_FLIGHT} requests are already in flight on this \
                         connection; retry once one has ended"
                    ),
                );
            }
            map.insert(id.clone(), cancel.clone());
        }
        let job = Job {
            id: id.clone(),
            kind,
            params,
            cancel,
            events: self.job_events.clone(),
            arrived: Instant::now(),
        };
        match self.server.engine.submit(job) {
            Ok(()) => None,
            Err(e) => {
                self.life.state.finish(&id);
                error(Some(&id), e.code(), e.to_string())
            }
        }
    }
}

/// An `error` event for request `id` (or for the connection, without one).
fn error(id: Option<&str>, code: ErrorCode, message: String) -> Option<Event> {
    Some(Event::Error { id: id.map(str::to_owned), code, message })
}

/// A connection's writer: hands queued events to the client, one frame at a time, until both
/// channels close or the client is gone.
async fn write_events(
    mut write: OwnedWriteHalf,
    mut replies: mpsc::Receiver<Event>,
    mut job_events: mpsc::UnboundedReceiver<Event>,
    state: Arc<ConnState>,
) {
    loop {
        let event = tokio::select! {
            Some(event) = replies.recv() => event,
            Some(event) = job_events.recv() => {
                if let Event::Done { id, .. } | Event::Error { id: Some(id), .. } = &event {
                    state.finish(id);
                }
                event
            }
            else => break,
        };
        state.writing.store(true, Ordering::Relaxed);
        let written = write_frame(&mut write, &event).await;
        state.writing.store(false, Ordering::Relaxed);
        if written.is_err() {
            break; // the client is gone; the reader notices too
        }
        state.touch();
    }
}
