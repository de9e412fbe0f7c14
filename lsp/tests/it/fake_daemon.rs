//! A fake `m31rd` on a temporary socket: speaks the real protocol (NDJSON frames of
//! `m31r-protocol` types), records every request, answers `fim` as the test says, and holds
//! requests until they are cancelled when told to, or streams a first part and holds the rest
//! until the test releases it. `done` carries the per-line confidence the test chose
//! ([`Reply::Scored`]), or none.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use m31r_protocol::{
    DaemonStatus, Event, FimInput, FrameReader, LineConfidence, MAX_FRAME_BYTES, ModelInfo,
    PROTOCOL_VERSION, Request, StopReason, Timings, Usage, write_frame,
};
use tokio::io::BufReader;
use tokio::net::UnixListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// How the fake answers one `fim`.
pub enum Reply {
    /// Stream this text (in two pieces) and finish.
    Text(String),
    /// Stream `text` (in two pieces) and finish with these confidence lines in `done`.
    Scored { text: String, lines: Vec<LineConfidence> },
    /// Send nothing until the request is cancelled.
    Hold,
    /// Send nothing, not even after a `cancel`: a frozen daemon.
    Frozen,
    /// Stream this text and finish as if the request's deadline had passed.
    Deadline(String),
    /// Stream `first` at once (its `token` carrying `first_lines`), then `rest` and the `done`
    /// once `release` is notified (unless the request was cancelled before).
    Staged { first: String, first_lines: Vec<LineConfidence>, rest: String, release: Arc<Notify> },
}

type Behaviour = Arc<dyn Fn(&FimInput) -> Reply + Send + Sync>;

pub struct FakeDaemon {
    pub socket: PathBuf,
    pub log: Arc<Mutex<Vec<Request>>>,
    /// While set, `warm` requests are answered only once this is notified (one waiter each).
    pub warm_gate: Arc<Mutex<Option<Arc<Notify>>>>,
    notify: Arc<Notify>,
    accept: tokio::task::JoinHandle<()>,
}

impl FakeDaemon {
    pub fn start(
        socket: &Path,
        behaviour: impl Fn(&FimInput) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(Notify::new());
        let behaviour: Behaviour = Arc::new(behaviour);
        let warm_gate: Arc<Mutex<Option<Arc<Notify>>>> = Arc::default();
        let (l, n, g) = (log.clone(), notify.clone(), warm_gate.clone());
        let accept = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) closes every connection.
            let mut connections = JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (l, n, g) = (l.clone(), n.clone(), g.clone());
                connections.spawn(serve(stream, l, n, behaviour.clone(), g));
            }
        });
        Self { socket: socket.to_path_buf(), log, warm_gate, notify, accept }
    }

    /// Stops: the socket closes, open connections drop, the socket file goes.
    pub async fn stop(self) {
        self.accept.abort();
        let _ = self.accept.await;
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Waits until a received request satisfies `pred`; returns it.
    pub async fn wait_for(&self, pred: impl Fn(&Request) -> bool) -> Request {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let notified = self.notify.notified();
                if let Some(r) = self.log.lock().unwrap().iter().find(|r| pred(r)) {
                    return r.clone();
                }
                notified.await;
            }
        })
        .await
        .expect("the fake daemon got the expected request")
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    /// How many `fim` requests were received so far.
    pub fn fims(&self) -> usize {
        self.log.lock().unwrap().iter().filter(|r| matches!(r, Request::Fim { .. })).count()
    }
}

async fn serve(
    stream: tokio::net::UnixStream,
    log: Arc<Mutex<Vec<Request>>>,
    notify: Arc<Notify>,
    behaviour: Behaviour,
    warm_gate: Arc<Mutex<Option<Arc<Notify>>>>,
) {
    let (read, mut write) = stream.into_split();
    let mut frames = FrameReader::new(BufReader::new(read), MAX_FRAME_BYTES);
    let held = Arc::new(Mutex::new(HashSet::new()));
    // One writer, so staged replies can send their rest from their own task.
    let (events, mut to_write) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let writer = tokio::spawn(async move {
        while let Some(event) = to_write.recv().await {
            if write_frame(&mut write, &event).await.is_err() {
                return;
            }
        }
    });
    while let Ok(Some(frame)) = frames.next_frame().await {
        let request: Request = serde_json::from_str(&frame).expect("the server sends valid frames");
        let mut out = Vec::new();
        match &request {
            Request::Hello { version, .. } => out.push(Event::Hello {
                version: *version.min(&PROTOCOL_VERSION),
                daemon: "fake-m31rd".into(),
                model: ModelInfo { version: "fake-model".into(), ..ModelInfo::default() },
            }),
            Request::Fim { id, input, .. } => match behaviour(input) {
                Reply::Text(text) => {
                    stream_text(&mut out, id, &text, StopReason::EndOfText, Vec::new())
                }
                Reply::Scored { text, lines } => {
                    stream_text(&mut out, id, &text, StopReason::EndOfText, lines)
                }
                Reply::Deadline(text) => {
                    stream_text(&mut out, id, &text, StopReason::Deadline, Vec::new())
                }
                Reply::Hold => {
                    held.lock().unwrap().insert(id.clone());
                }
                Reply::Staged { first, first_lines, rest, release } => {
                    out.push(Event::Token { id: id.clone(), text: first, lines: first_lines });
                    held.lock().unwrap().insert(id.clone());
                    let (id, held, events) = (id.clone(), held.clone(), events.clone());
                    tokio::spawn(async move {
                        release.notified().await;
                        if held.lock().unwrap().remove(&id) {
                            let _ = events.send(Event::Token {
                                id: id.clone(),
                                text: rest,
                                lines: Vec::new(),
                            });
                            let _ = events.send(done(&id, StopReason::EndOfText));
                        }
                    });
                }
                Reply::Frozen => {}
            },
            Request::Warm { id, .. } => match warm_gate.lock().unwrap().clone() {
                None => out.push(done(id, StopReason::Warmed)),
                Some(gate) => {
                    let (id, events) = (id.clone(), events.clone());
                    tokio::spawn(async move {
                        gate.notified().await;
                        let _ = events.send(done(&id, StopReason::Warmed));
                    });
                }
            },
            Request::Cancel { id } => {
                if held.lock().unwrap().remove(id) {
                    out.push(done(id, StopReason::Cancelled));
                }
            }
            Request::Status { id } => {
                out.push(Event::Status { id: id.clone(), status: DaemonStatus::default() })
            }
            other => panic!("the language server sent {other:?}"),
        }
        log.lock().unwrap().push(request);
        notify.notify_waiters();
        for event in out {
            if events.send(event).is_err() {
                return;
            }
        }
    }
    writer.abort();
}

/// Queues `text` in two pieces and the `done`, with `lines` as its confidence.
fn stream_text(
    out: &mut Vec<Event>,
    id: &str,
    text: &str,
    stop: StopReason,
    lines: Vec<LineConfidence>,
) {
    let half = text.char_indices().nth(text.chars().count() / 2).map_or(0, |(i, _)| i);
    let mut sent = 0;
    for piece in [&text[..half], &text[half..]] {
        if !piece.is_empty() {
            // As the daemon does: the lines this piece adds to, from the one it starts in.
            let newlines = |t: &str| t.bytes().filter(|&b| b == b'\n').count();
            let first = newlines(&text[..sent]);
            sent += piece.len();
            let last = newlines(&text[..sent]);
            let touched = lines.iter().skip(first).take(last + 1 - first).cloned().collect();
            out.push(Event::Token { id: id.into(), text: piece.into(), lines: touched });
        }
    }
    let mut done = done(id, stop);
    if let Event::Done { lines: l, .. } = &mut done {
        *l = lines;
    }
    out.push(done);
}

/// Confidence lines for `text` with every token of line `i` at log-prob `logprobs[i]` (lines past
/// the end of `logprobs` get its last value), two tokens per line (the gate does not judge a line
/// of one token).
pub fn confidence(text: &str, logprobs: &[f64]) -> Vec<LineConfidence> {
    let last = logprobs.last().copied().unwrap_or(0.0);
    (0..text.split('\n').count())
        .map(|i| {
            let lp = logprobs.get(i).copied().unwrap_or(last);
            LineConfidence { tokens: 2, logprob_sum: 2.0 * lp, logprob_min: lp }
        })
        .collect()
}

fn done(id: &str, stop: StopReason) -> Event {
    Event::Done {
        id: id.into(),
        stop,
        usage: Usage { prompt_tokens: 10, cached_tokens: 4, completion_tokens: 2 },
        timings: Timings::default(),
        lines: Vec::new(),
    }
}
