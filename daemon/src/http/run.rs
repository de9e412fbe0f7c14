//! A [`Run`]: the admitted engine jobs of one HTTP request (one per choice) on one event channel,
//! cancelled when it is dropped, and waiting for all of them to finish. What the JSON and the
//! event-stream answers of every generating endpoint are built from.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use m31r_protocol::{Event, GenerationParams, StopReason, Timings, Usage};
use tokio::sync::mpsc;

use super::Api;
use super::errors::ApiError;
use crate::engine::{Job, JobKind};

impl Api {
    /// Admits and queues one job per choice; their events all arrive on the run's channel.
    pub(super) fn start(
        &self,
        choices: Vec<(String, JobKind, GenerationParams)>,
    ) -> Result<Run, ApiError> {
        let (events, receiver) = mpsc::unbounded_channel();
        let mut run = Run {
            events: receiver,
            ids: Vec::with_capacity(choices.len()),
            open: 0,
            cancels: CancelOnDrop(Vec::with_capacity(choices.len())),
        };
        for (id, kind, params) in choices {
            // On an error the run is dropped, which cancels the choices already queued.
            self.server
                .admit(&id, &params)
                .map_err(|(code, message)| ApiError::engine(code, message))?;
            let cancel = Arc::new(AtomicBool::new(false));
            let job = Job {
                id: id.clone(),
                kind,
                params,
                cancel: cancel.clone(),
                events: events.clone(),
                arrived: Instant::now(),
            };
            self.server
                .engine()
                .submit(job)
                .map_err(|e| ApiError::engine(e.code(), e.to_string()))?;
            run.cancels.0.push(cancel);
            run.ids.push(id);
            run.open += 1;
        }
        Ok(run)
    }
}

/// The jobs of one HTTP request (one per choice), sharing one event channel. Dropping it —
/// as the server does when the client goes away — cancels every job still running or queued.
pub(super) struct Run {
    pub(super) events: mpsc::UnboundedReceiver<Event>,
    /// Job ids by choice index.
    ids: Vec<String>,
    /// Choices not yet finished.
    pub(super) open: usize,
    cancels: CancelOnDrop,
}

/// Sets every flag when dropped.
struct CancelOnDrop(Vec<Arc<AtomicBool>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        for flag in &self.0 {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// One choice while it runs.
#[derive(Debug, Default)]
struct Finished {
    text: String,
    stop: Option<StopReason>,
    usage: Usage,
    timings: Timings,
}

/// A choice's complete answer.
#[derive(Debug)]
pub(super) struct FinishedChoice {
    pub(super) text: String,
    pub(super) stop: StopReason,
    pub(super) usage: Usage,
    pub(super) timings: Timings,
}

impl Run {
    /// The choice index of a job id.
    pub(super) fn index(&self, id: &str) -> Option<usize> {
        self.ids.iter().position(|i| i == id)
    }

    /// Waits for every choice; the first error fails the whole request.
    pub(super) async fn finish(mut self) -> Result<Vec<FinishedChoice>, ApiError> {
        let mut finished: Vec<Finished> =
            (0..self.ids.len()).map(|_| Finished::default()).collect();
        while self.open > 0 {
            let Some(event) = self.events.recv().await else {
                return Err(ApiError::engine_stopped());
            };
            match event {
                Event::Token { id, text, .. } => {
                    if let Some(i) = self.index(&id) {
                        finished[i].text.push_str(&text);
                    }
                }
                Event::Done { id, stop, usage, timings, .. } => {
                    if let Some(i) = self.index(&id) {
                        let f = &mut finished[i];
                        (f.stop, f.usage, f.timings) = (Some(stop), usage, timings);
                        self.open -= 1;
                    }
                }
                Event::Error { code, message, .. } => return Err(ApiError::engine(code, message)),
                _ => {}
            }
        }
        Ok(finished
            .into_iter()
            .map(|f| FinishedChoice {
                text: f.text,
                stop: f.stop.unwrap_or(StopReason::Cancelled),
                usage: f.usage,
                timings: f.timings,
            })
            .collect())
    }
}
