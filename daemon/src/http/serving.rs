//! The serving spec's endpoints (`POST /generate`, `/completion`, `/fim`), and what every
//! generating endpoint shares: reading a JSON body within the limits.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use m31r_protocol::{ContextFile, Event, FimInput, GenerationParams, StopReason, Timings, Usage};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::Api;
use super::errors::{ApiError, json_response};
use super::sse::{Chunks, sse};
use crate::engine::JobKind;

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
