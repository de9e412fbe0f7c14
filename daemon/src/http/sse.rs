//! Server-sent-event answers: a run's engine events become `data: <payload>` blocks as they
//! arrive. The body owns the run, so when the client goes away and the server drops the body,
//! the run's jobs are cancelled.
//!
//! The body is ours rather than `axum::response::sse::Sse`: that one takes a `futures` stream,
//! and the daemon depends on no `futures` crate to name one with.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::http::header::{self, HeaderValue};
use axum::response::Response;
use hyper::body::Frame;
use m31r_protocol::Event;

use super::errors::ApiError;
use super::run::Run;

/// Turns a run's events into server-sent-event payloads (each becomes one `data:` line).
pub(super) trait Chunks: Send + Unpin + 'static {
    /// Payloads for `event` of choice `index`.
    fn event(&mut self, index: usize, event: &Event) -> Vec<String>;
    /// Payloads after every choice finished.
    fn finish(&mut self) -> Vec<String>;
}

/// Starts a server-sent-event response. The first event is awaited first, so a request that
/// fails before producing anything (a prompt that cannot fit, a full queue) still gets an
/// HTTP error status rather than a 200 with an error inside.
pub(super) async fn sse<C: Chunks>(mut run: Run, chunks: C) -> Result<Response, ApiError> {
    let first = run.events.recv().await;
    if let Some(Event::Error { code, message, .. }) = first {
        return Err(ApiError::engine(code, message));
    }
    let mut body = SseBody { run, chunks, queue: VecDeque::new(), ended: false };
    match first {
        Some(event) => body.feed(event),
        None => body.fail(ApiError::engine_stopped()),
    }
    let mut response = Response::new(Body::new(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// A streaming response body fed by a run's event channel.
struct SseBody<C> {
    run: Run,
    chunks: C,
    queue: VecDeque<Bytes>,
    ended: bool,
}

impl<C: Chunks> SseBody<C> {
    fn push(&mut self, payloads: Vec<String>) {
        for p in payloads {
            self.queue.push_back(Bytes::from(format!("data: {p}\n\n")));
        }
    }

    fn feed(&mut self, event: Event) {
        let id = match &event {
            Event::Token { id, .. }
            | Event::Done { id, .. }
            | Event::Error { id: Some(id), .. } => id.clone(),
            Event::Error { code, message, .. } => {
                return self.fail(ApiError::engine(*code, message.clone()));
            }
            _ => return,
        };
        let Some(index) = self.run.index(&id) else { return };
        let payloads = self.chunks.event(index, &event);
        self.push(payloads);
        match event {
            Event::Error { .. } => self.ended = true,
            Event::Done { .. } => {
                self.run.open -= 1;
                if self.run.open == 0 {
                    let rest = self.chunks.finish();
                    self.push(rest);
                    self.ended = true;
                }
            }
            _ => {}
        }
    }

    /// Ends the stream with an OpenAI-style error object.
    fn fail(&mut self, error: ApiError) {
        self.push(vec![error.json()]);
        self.ended = true;
    }
}

impl<C: Chunks> HttpBody for SseBody<C> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        loop {
            if let Some(bytes) = self.queue.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            match self.run.events.poll_recv(cx) {
                Poll::Ready(Some(event)) => self.feed(event),
                Poll::Ready(None) => self.fail(ApiError::engine_stopped()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
