//! The serving spec's endpoints (`POST /generate`, `/completion`, `/fim`), and what every
//! generating endpoint shares: reading a JSON body within the limits, and a [`Run`] of admitted
//! engine jobs that is cancelled when it is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use m31r_protocol::{ContextFile, Event, FimInput, GenerationParams, StopReason, Timings, Usage};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Api;
use super::errors::{ApiError, json_response};
use super::sse::{Chunks, sse};
use crate::engine::{Job, JobKind};

/// A JSON request body, read within `http.max_body_bytes` and `http.body_timeout_ms`; any
/// failure is answered as an [`ApiError`].
pub(super) struct ApiJson<T>(pub(super) T);

impl<T: DeserializeOwned> FromRequest<Arc<Api>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, api: &Arc<Api>) -> Result<Self, ApiError> {
        let limit = api.config.max_body_bytes;
        let too_large = |size: String| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body of {size} bytes exceeds http.max_body_bytes = {limit}"),
            )
            .closing()
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(length) = declared
            && length > limit as u64
        {
            // Refused before reading a byte of it.
            return Err(too_large(length.to_string()));
        }
        let timeout = Duration::from_millis(api.config.body_timeout_ms.max(1));
        // The router's `DefaultBodyLimit` bounds what this reads.
        let bytes = match tokio::time::timeout(timeout, Bytes::from_request(request, api)).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!("the request body did not arrive within {} ms", timeout.as_millis()),
                )
                .closing());
            }
            Ok(Err(BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(
                _,
            )))) => {
                return Err(too_large(format!("more than {limit}")));
            }
            Ok(Err(e)) => return Err(ApiError::bad_request(format!("cannot read the body: {e}"))),
            Ok(Ok(bytes)) => bytes,
        };
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// Body of `POST /generate` and `POST /completion`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PromptRequest {
    prompt: String,
    #[serde(default)]
    params: GenerationParams,
    #[serde(default)]
    stream: bool,
}

/// Body of `POST /fim`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FimRequest {
    prefix: String,
    #[serde(default)]
    suffix: String,
    #[serde(default)]
    context_files: Vec<ContextFile>,
    #[serde(default)]
    params: GenerationParams,
    #[serde(default)]
    stream: bool,
}

/// Answer of the serving-spec endpoints without `stream`.
#[derive(Debug, Serialize)]
struct SpecResponse {
    id: String,
    text: String,
    stop: StopReason,
    usage: Usage,
    timings: Timings,
}

/// `POST /generate`: raw continuation.
pub(super) async fn generate(
    State(api): State<Arc<Api>>,
    ApiJson(body): ApiJson<PromptRequest>,
) -> Result<Response, ApiError> {
    let kind = JobKind::Generate { prompt: body.prompt };
    api.spec(kind, body.params, body.stream, "gen").await
}

/// `POST /completion`: code continuation with the Rust-aware stop rules.
pub(super) async fn completion(
    State(api): State<Arc<Api>>,
    ApiJson(body): ApiJson<PromptRequest>,
) -> Result<Response, ApiError> {
    let kind = JobKind::Complete { prompt: body.prompt };
    api.spec(kind, body.params, body.stream, "cmpl").await
}

/// `POST /fim`: fill-in-the-middle.
pub(super) async fn fim(
    State(api): State<Arc<Api>>,
    ApiJson(body): ApiJson<FimRequest>,
) -> Result<Response, ApiError> {
    let input =
        FimInput { prefix: body.prefix, suffix: body.suffix, context_files: body.context_files };
    api.spec(JobKind::Fim(input), body.params, body.stream, "fim").await
}

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

    /// A serving-spec endpoint: one job, answered as one JSON document or as a stream of the
    /// socket protocol's own events.
    async fn spec(
        &self,
        kind: JobKind,
        params: GenerationParams,
        stream: bool,
        prefix: &str,
    ) -> Result<Response, ApiError> {
        let id = self.fresh_id(prefix);
        let run = self.start(vec![(id.clone(), kind, params)])?;
        if stream {
            return sse(run, SpecChunks).await;
        }
        let mut finished = run.finish().await?;
        let Some(one) = finished.pop() else {
            return Err(ApiError::internal("the job ended without an answer"));
        };
        Ok(json_response(
            StatusCode::OK,
            &SpecResponse {
                id,
                text: one.text,
                stop: one.stop,
                usage: one.usage,
                timings: one.timings,
            },
        ))
    }
}

/// The serving-spec stream: the socket protocol's events, verbatim.
struct SpecChunks;

impl Chunks for SpecChunks {
    fn event(&mut self, _: usize, event: &Event) -> Vec<String> {
        serde_json::to_string(event).into_iter().collect()
    }

    fn finish(&mut self) -> Vec<String> {
        Vec::new()
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
                Event::Token { id, text } => {
                    if let Some(i) = self.index(&id) {
                        finished[i].text.push_str(&text);
                    }
                }
                Event::Done { id, stop, usage, timings } => {
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
