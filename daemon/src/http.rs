//! The optional localhost HTTP API (docs/http.md): the serving spec's `POST /generate`,
//! `/completion` and `/fim`, and an OpenAI-compatible surface (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`). Requests become the same engine jobs as socket requests,
//! pass the same admission checks ([`Server::admit`]) and are logged by the same engine code.
//!
//! Security, since any local process and any web page in a local browser can reach a TCP port:
//! loopback only unless explicitly allowed, `Host` checked against DNS rebinding, requests with a
//! foreign `Origin` refused and no CORS headers unless the origin is configured, a body limit
//! checked before reading, header and body timeouts, and a connection cap. A client that
//! disconnects cancels its generation.

mod openai;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use m31r_protocol::{
    ContextFile, ErrorCode, Event, FimInput, GenerationParams, StopReason, Timings, Usage,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};

use crate::config::HttpConfig;
use crate::engine::{Job, JobKind};
use crate::server::Server;

/// Response bodies: whole JSON documents or server-sent-event streams.
type HttpBody = UnsyncBoxBody<Bytes, Infallible>;

/// Most completions one request may ask for (prompts × `n`): each is a queued engine job.
pub const MAX_CHOICES: usize = 16;

/// Why the HTTP listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpStartError {
    /// A non-loopback address without the explicit permission.
    #[error(
        "http.bind = {0} is not a loopback address; the API has no authentication, so serving it \
         there needs http.allow_non_loopback = true (or --http-allow-non-loopback)"
    )]
    NotLoopback(SocketAddr),
    /// Binding failed.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The address file could not be written.
    #[error("cannot write the HTTP address to {path}: {source}")]
    AddrFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A bound HTTP listener.
pub struct HttpListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl HttpListener {
    /// The address actually bound (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Binds `config.bind` (refusing a non-loopback address unless allowed, with a warning when it
/// is) and writes the bound address to `config.addr_file`, if set.
pub async fn bind(config: &HttpConfig) -> Result<HttpListener, HttpStartError> {
    let wanted = config.bind;
    if !wanted.ip().is_loopback() {
        if !config.allow_non_loopback {
            return Err(HttpStartError::NotLoopback(wanted));
        }
        tracing::warn!(
            bind = %wanted,
            "HTTP API bound to a non-loopback address: anyone who can reach it can use the model"
        );
    }
    let listener = TcpListener::bind(wanted)
        .await
        .map_err(|source| HttpStartError::Bind { addr: wanted, source })?;
    let addr =
        listener.local_addr().map_err(|source| HttpStartError::Bind { addr: wanted, source })?;
    if let Some(path) = &config.addr_file {
        write_addr_file(path, addr)
            .map_err(|source| HttpStartError::AddrFile { path: path.clone(), source })?;
    }
    Ok(HttpListener { listener, addr })
}

/// Writes `addr` to `path` through a temporary file and a rename, so a reader never sees a
/// partial address.
fn write_addr_file(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Serves HTTP on `listener` until `server` shuts down, with at most `max_connections`
/// connections at a time.
pub async fn serve(
    server: Arc<Server>,
    listener: HttpListener,
    config: HttpConfig,
    max_connections: usize,
) {
    let addr = listener.addr;
    let api = Arc::new(Api::new(server.clone(), config, addr));
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut stop = server.shutdown_signal();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let mut stream = stream;
                let error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    format!("connection limit of {max_connections} reached; retry later"),
                );
                let body = error.json();
                let head = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let api = api.clone();
        let header_timeout = Duration::from_millis(api.config.header_timeout_ms.max(1));
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(request).await) }
            });
            // The header timeout also bounds how long an idle keep-alive connection is held.
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    tracing::info!(%addr, "HTTP listener stopped");
}

/// What every HTTP request handler shares.
struct Api {
    server: Arc<Server>,
    config: HttpConfig,
    /// The bound address: its IP is an accepted `Host` too.
    addr: SocketAddr,
    /// The model's name in OpenAI responses.
    model_id: String,
    /// Start time in Unix seconds, the model's `created`; also makes ids unique across restarts.
    started: u64,
    next_id: AtomicU64,
}

/// Paths this API serves, and the method each takes.
const ROUTES: &[(&str, Method)] = &[
    ("/generate", Method::POST),
    ("/completion", Method::POST),
    ("/fim", Method::POST),
    ("/v1/completions", Method::POST),
    ("/v1/chat/completions", Method::POST),
    ("/v1/models", Method::GET),
];

impl Api {
    fn new(server: Arc<Server>, config: HttpConfig, addr: SocketAddr) -> Self {
        let version = &server.model().version;
        let model_id =
            if version.is_empty() { "m31r".to_owned() } else { format!("m31r-{version}") };
        Self { server, config, addr, model_id, started: unix_now(), next_id: AtomicU64::new(1) }
    }

    /// A fresh response id such as `cmpl-67a1b2c3-12`.
    fn fresh_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}-{n}", self.started)
    }

    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<HttpBody> {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let origin = match self.check_origin_and_host(&request) {
            Ok(origin) => origin,
            Err(e) => {
                tracing::warn!(%method, %path, status = e.status.as_u16(), message = %e.message, "HTTP request refused");
                return e.response();
            }
        };
        let mut response = match self.route(request, &method, &path).await {
            Ok(response) => response,
            Err(e) => e.response(),
        };
        if let Some(origin) = origin {
            // Only origins the user listed get CORS headers; everything else gets none.
            let headers = response.headers_mut();
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
        tracing::debug!(
            %method,
            %path,
            status = response.status().as_u16(),
            ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
            "HTTP request"
        );
        response
    }

    async fn route(
        &self,
        request: Request<Incoming>,
        method: &Method,
        path: &str,
    ) -> Result<Response<HttpBody>, ApiError> {
        if method == Method::OPTIONS {
            return Ok(preflight(&request));
        }
        match (method, path) {
            (&Method::POST, "/generate") => {
                let body: PromptRequest = self.read_json(request).await?;
                self.spec(
                    JobKind::Generate { prompt: body.prompt },
                    body.params,
                    body.stream,
                    "gen",
                )
                .await
            }
            (&Method::POST, "/completion") => {
                let body: PromptRequest = self.read_json(request).await?;
                self.spec(
                    JobKind::Complete { prompt: body.prompt },
                    body.params,
                    body.stream,
                    "cmpl",
                )
                .await
            }
            (&Method::POST, "/fim") => {
                let body: FimRequest = self.read_json(request).await?;
                let input = FimInput {
                    prefix: body.prefix,
                    suffix: body.suffix,
                    context_files: body.context_files,
                };
                self.spec(JobKind::Fim(input), body.params, body.stream, "fim").await
            }
            (&Method::POST, "/v1/completions") => {
                let body = self.read_json(request).await?;
                openai::completions(self, body).await
            }
            (&Method::POST, "/v1/chat/completions") => {
                let body = self.read_json(request).await?;
                openai::chat(self, body).await
            }
            (&Method::GET, "/v1/models") => {
                Ok(json_response(StatusCode::OK, &openai::models(self)))
            }
            (&Method::GET, p) if p.starts_with("/v1/models/") => {
                openai::model(self, &p["/v1/models/".len()..])
            }
            (_, p) => match ROUTES.iter().find(|(route, _)| *route == p) {
                Some((_, allowed)) => Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{method} {p} is not served; use {allowed}"),
                )),
                None => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no endpoint {p}; see docs/http.md"),
                )),
            },
        }
    }

    /// DNS-rebinding and cross-site protection. A page on `evil.example` that makes its name
    /// resolve to 127.0.0.1 still sends `Host: evil.example`, so only loopback names, the bound
    /// address and configured names are served. Browsers send `Origin` with every cross-origin
    /// POST; any request carrying one not configured is refused. Returns the allowed origin, for
    /// CORS headers.
    fn check_origin_and_host(
        &self,
        request: &Request<Incoming>,
    ) -> Result<Option<HeaderValue>, ApiError> {
        let refused = |what: &str, value: &str, key: &str| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                if what == "Origin" { "origin_not_allowed" } else { "host_not_allowed" },
                format!(
                    "{what} {value:?} is not allowed: this API answers to localhost only \
                     (add it to http.{key} to allow it)"
                ),
            )
        };
        let mut hosts = Vec::new();
        if let Some(authority) = request.uri().authority() {
            hosts.push(authority.as_str().to_owned());
        }
        // RFC 9110 §7.2: a request with more than one Host field is malformed (and the two can
        // disagree about who is being asked, e.g. `localhost` and then a rebinding name).
        if request.headers().get_all(header::HOST).iter().nth(1).is_some() {
            return Err(ApiError::bad_request("more than one Host header"));
        }
        match request.headers().get(header::HOST).map(|h| h.to_str()) {
            Some(Ok(host)) => hosts.push(host.to_owned()),
            Some(Err(_)) => return Err(refused("Host", "<not text>", "allowed_hosts")),
            None if hosts.is_empty() => {
                return Err(ApiError::bad_request("the Host header is required"));
            }
            None => {}
        }
        for host in &hosts {
            if !self.host_allowed(host) {
                return Err(refused("Host", host, "allowed_hosts"));
            }
        }
        let Some(origin) = request.headers().get(header::ORIGIN) else {
            return Ok(None);
        };
        let text = origin.to_str().unwrap_or("<not text>");
        if self.config.allowed_origins.iter().any(|o| o.eq_ignore_ascii_case(text)) {
            Ok(Some(origin.clone()))
        } else {
            Err(refused("Origin", text, "allowed_origins"))
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = strip_port(host).to_ascii_lowercase();
        let bound = match self.addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        ["localhost", "127.0.0.1", "[::1]"].contains(&name.as_str())
            || name == bound
            || self.config.allowed_hosts.iter().any(|h| strip_port(h).eq_ignore_ascii_case(&name))
    }

    /// Reads a JSON body within the size limit and the body timeout.
    async fn read_json<T: DeserializeOwned>(
        &self,
        request: Request<Incoming>,
    ) -> Result<T, ApiError> {
        let limit = self.config.max_body_bytes;
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
        let timeout = Duration::from_millis(self.config.body_timeout_ms.max(1));
        let body = Limited::new(request.into_body(), limit).collect();
        let bytes = match tokio::time::timeout(timeout, body).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!("the request body did not arrive within {} ms", timeout.as_millis()),
                )
                .closing());
            }
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(too_large(format!("more than {limit}")));
            }
            Ok(Err(e)) => return Err(ApiError::bad_request(format!("cannot read the body: {e}"))),
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }

    /// Admits and queues one job per choice; their events all arrive on the run's channel.
    fn start(&self, choices: Vec<(String, JobKind, GenerationParams)>) -> Result<Run, ApiError> {
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
    ) -> Result<Response<HttpBody>, ApiError> {
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

/// Body of `POST /generate` and `POST /completion`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptRequest {
    prompt: String,
    #[serde(default)]
    params: GenerationParams,
    #[serde(default)]
    stream: bool,
}

/// Body of `POST /fim`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FimRequest {
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

/// The jobs of one HTTP request (one per choice), sharing one event channel. Dropping it —
/// as hyper does when the client goes away — cancels every job still running or queued.
struct Run {
    events: mpsc::UnboundedReceiver<Event>,
    /// Job ids by choice index.
    ids: Vec<String>,
    /// Choices not yet finished.
    open: usize,
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

/// One finished choice.
#[derive(Debug, Default)]
struct Finished {
    text: String,
    stop: Option<StopReason>,
    usage: Usage,
    timings: Timings,
}

impl Run {
    /// The choice index of a job id.
    fn index(&self, id: &str) -> Option<usize> {
        self.ids.iter().position(|i| i == id)
    }

    /// Waits for every choice; the first error fails the whole request.
    async fn finish(mut self) -> Result<Vec<FinishedChoice>, ApiError> {
        let mut finished: Vec<Finished> =
            (0..self.ids.len()).map(|_| Finished::default()).collect();
        while self.open > 0 {
            let Some(event) = self.events.recv().await else {
                return Err(ApiError::engine(ErrorCode::ShuttingDown, "the engine stopped".into()));
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

/// A choice's complete answer.
#[derive(Debug)]
struct FinishedChoice {
    text: String,
    stop: StopReason,
    usage: Usage,
    timings: Timings,
}

/// Turns a run's events into server-sent-event payloads (each becomes one `data:` line).
trait Chunks: Send + Unpin + 'static {
    /// Payloads for `event` of choice `index`.
    fn event(&mut self, index: usize, event: &Event) -> Vec<String>;
    /// Payloads after every choice finished.
    fn finish(&mut self) -> Vec<String>;
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

/// Starts a server-sent-event response. The first event is awaited first, so a request that
/// fails before producing anything (a prompt that cannot fit, a full queue) still gets an
/// HTTP error status rather than a 200 with an error inside.
async fn sse<C: Chunks>(mut run: Run, chunks: C) -> Result<Response<HttpBody>, ApiError> {
    let first = run.events.recv().await;
    if let Some(Event::Error { code, message, .. }) = first {
        return Err(ApiError::engine(code, message));
    }
    let mut body = SseBody { run, chunks, queue: VecDeque::new(), ended: false };
    match first {
        Some(event) => body.feed(event),
        None => body.fail(ApiError::engine(ErrorCode::ShuttingDown, "the engine stopped".into())),
    }
    let mut response = Response::new(body.boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// A streaming response body fed by a run's event channel. hyper drops it when the client
/// disconnects, which drops the run and so cancels its jobs.
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

impl<C: Chunks> Body for SseBody<C> {
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
                Poll::Ready(None) => self
                    .fail(ApiError::engine(ErrorCode::ShuttingDown, "the engine stopped".into())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// An error answered in OpenAI's shape:
/// `{"error":{"message":…,"type":…,"param":null,"code":…}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The request field at fault, when one is.
    param: Option<&'static str>,
    /// Close the connection after answering (the body was not read).
    close: bool,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: &'static str,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self { status, code, message, param: None, close: false }
    }

    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message.into())
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message.into())
    }

    fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// A refusal or failure from the admission checks or the engine, with its protocol code.
    fn engine(code: ErrorCode, message: String) -> Self {
        let (status, name) = match code {
            ErrorCode::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorCode::FrameTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "frame_too_large"),
            ErrorCode::InvalidUtf8 => (StatusCode::BAD_REQUEST, "invalid_utf8"),
            ErrorCode::VersionMismatch => (StatusCode::BAD_REQUEST, "version_mismatch"),
            ErrorCode::InvalidParams => (StatusCode::BAD_REQUEST, "invalid_params"),
            ErrorCode::DuplicateId => (StatusCode::BAD_REQUEST, "duplicate_id"),
            ErrorCode::ContextOverflow => (StatusCode::BAD_REQUEST, "context_overflow"),
            ErrorCode::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ErrorCode::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, name, message)
    }

    /// OpenAI's error `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::INTERNAL_SERVER_ERROR => "server_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            _ => "invalid_request_error",
        }
    }

    fn json(&self) -> String {
        let body = ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind(),
                param: self.param,
                code: self.code,
            },
        };
        serde_json::to_string(&body).unwrap_or_default()
    }

    fn response(&self) -> Response<HttpBody> {
        let mut response = Response::new(Full::new(Bytes::from(self.json())).boxed_unsync());
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// A JSON response.
fn json_response(status: StatusCode, value: &impl Serialize) -> Response<HttpBody> {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut response = Response::new(Full::new(Bytes::from(bytes)).boxed_unsync());
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => ApiError::internal(format!("cannot serialise the response: {e}")).response(),
    }
}

/// Answers a CORS preflight. It only gets here when its `Origin` is allowed (or it has none).
fn preflight(request: &Request<Incoming>) -> Response<HttpBody> {
    let mut response = Response::new(Full::new(Bytes::new()).boxed_unsync());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ALLOW, HeaderValue::from_static("GET, POST, OPTIONS"));
    if request.headers().contains_key(header::ORIGIN) {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        let asked = request.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            asked.unwrap_or(HeaderValue::from_static("authorization, content-type")),
        );
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
    response
}

/// `host` without its `:port` (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("localhost:8731"), "localhost");
        assert_eq!(strip_port("localhost"), "localhost");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("127.0.0.1:1"), "127.0.0.1");
    }

    #[test]
    fn engine_errors_keep_their_protocol_code() {
        let e = ApiError::engine(ErrorCode::ContextOverflow, "too long".into());
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let v: serde_json::Value = serde_json::from_str(&e.json()).unwrap();
        assert_eq!(v["error"]["code"], "context_overflow");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "too long");
        assert!(v["error"]["param"].is_null());
    }
}
