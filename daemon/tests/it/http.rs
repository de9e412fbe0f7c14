//! The HTTP API against a real daemon on 127.0.0.1:0: each endpoint's shape, SSE framing, greedy
//! output equal to the socket path's, FIM through `suffix`, refusals (body limit, foreign Host
//! and Origin, malformed JSON) as OpenAI-style errors, and cancellation on disconnect. Requests go
//! through hyper's HTTP/1.1 client; the cases a well-behaved client cannot produce use raw TCP.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request as HttpRequest, StatusCode};
use hyper_util::rt::TokioIo;
use m31r_protocol::{DaemonStatus, Event, GenerationParams, Request};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Daemon, generate, long_prompt, run, spawn};

const PREFIX: &str = "pub fn norm(&self) -> f64 {\n    ";
const SUFFIX: &str = "\n}\n";

/// A daemon with the HTTP API on a free loopback port.
struct HttpDaemon {
    daemon: Daemon,
    addr: SocketAddr,
    _aux: tempfile::TempDir,
}

impl HttpDaemon {
    fn start(extra_env: &[(&str, &str)]) -> Self {
        let aux = tempfile::tempdir().unwrap();
        let addr_file = aux.path().join("http.addr");
        let addr_file_text = addr_file.to_str().unwrap().to_owned();
        let mut env = vec![
            ("M31R_HTTP__ENABLED", "true"),
            ("M31R_HTTP__BIND", "127.0.0.1:0"),
            ("M31R_HTTP__ADDR_FILE", addr_file_text.as_str()),
        ];
        env.extend_from_slice(extra_env);
        let daemon = Daemon::start(&env);
        let until = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                break text.trim().parse::<SocketAddr>().unwrap();
            }
            assert!(Instant::now() < until, "no HTTP address file: {}", daemon.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
        Self { daemon, addr, _aux: aux }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    /// One request through hyper's client on a fresh connection; the whole body.
    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, hyper::HeaderMap, String) {
        let response = self.open(method, path, headers, body).await;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, String::from_utf8(bytes.to_vec()).unwrap())
    }

    async fn open(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> hyper::Response<hyper::body::Incoming> {
        let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        let mut request = HttpRequest::builder().method(method).uri(path);
        let host = self.host();
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            request = request.header("host", host.as_str());
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        sender.send_request(request).await.unwrap()
    }

    /// POSTs JSON and parses the JSON answer.
    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let (status, headers, text) = self.send("POST", path, &[], &body.to_string()).await;
        assert_eq!(headers["content-type"], "application/json", "{path}: {text}");
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}")))
    }

    /// POSTs JSON expecting 200 and an event stream; returns the `data:` payloads, checking the
    /// framing: every block is exactly one `data: …` line followed by a blank line.
    async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let (status, headers, text) = self.send("POST", path, &[], &body.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{path}: {text}");
        assert_eq!(headers["content-type"], "text/event-stream");
        assert!(text.ends_with("\n\n"), "{text:?}");
        text.strip_suffix("\n\n")
            .unwrap()
            .split("\n\n")
            .map(|block| {
                let payload = block.strip_prefix("data: ").unwrap_or_else(|| panic!("{block:?}"));
                assert!(!payload.contains('\n'), "{block:?}");
                payload.to_owned()
            })
            .collect()
    }

    async fn status(&self) -> DaemonStatus {
        match self.daemon.client().await.run(&Request::Status { id: "s".into() }, |_| {}).await {
            Ok(Event::Status { status, .. }) => status,
            other => panic!("{other:?}"),
        }
    }
}

/// The OpenAI-shaped error of a refused request.
fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str, mentions: &str) {
    assert_eq!(status, want, "{body}");
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert!(error["type"].is_string() && error.get("param").is_some(), "{body}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(mentions), "{message:?} should mention {mentions:?}");
}

fn text_of(value: &Value) -> String {
    value.as_str().unwrap_or_else(|| panic!("not a string: {value}")).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_spec_endpoints_match_the_socket_path() {
    let http = HttpDaemon::start(&[]);
    let mut socket = http.daemon.client().await;
    let params = json!({"max_tokens": 12});

    // /generate and /completion: same request, same greedy text as the socket.
    for (path, kind) in [("/generate", "generate"), ("/completion", "complete")] {
        let (status, body) = http.post(path, &json!({"prompt": PREFIX, "params": params})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["id", "stop", "text", "timings", "usage"], "{body}");
        let params = GenerationParams { max_tokens: 12, ..Default::default() };
        let request = match kind {
            "generate" => Request::Generate { id: "s".into(), prompt: PREFIX.into(), params },
            _ => Request::Complete { id: "s".into(), prompt: PREFIX.into(), params },
        };
        let reference = run(&mut socket, request).await;
        assert_eq!(text_of(&body["text"]), reference.text, "{path}");
        assert_eq!(body["usage"]["completion_tokens"], reference.usage.completion_tokens);
        assert_eq!(body["usage"]["prompt_tokens"], reference.usage.prompt_tokens);
        assert_eq!(body["stop"], serde_json::to_value(reference.stop).unwrap());
    }

    // /fim, whole and streamed: the stream is the socket protocol's events, one `done` last.
    let fim = json!({"prefix": PREFIX, "suffix": SUFFIX, "params": params});
    let (status, whole) = http.post("/fim", &fim).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let reference = run(&mut socket, crate::common::fim("f", PREFIX, SUFFIX, 12)).await;
    assert_eq!(text_of(&whole["text"]), reference.text);
    let mut streamed = fim.clone();
    streamed["stream"] = json!(true);
    let events: Vec<Event> = http
        .stream("/fim", &streamed)
        .await
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    let (last, tokens) = events.split_last().unwrap();
    let mut text = String::new();
    for event in tokens {
        let Event::Token { text: piece, .. } = event else { panic!("{event:?} before done") };
        text.push_str(piece);
    }
    assert!(matches!(last, Event::Done { .. }), "{last:?}");
    assert_eq!(text, reference.text);

    // Unknown fields are refused like on the socket; parameters are checked by the same rules.
    let (status, body) = http.post("/generate", &json!({"prompt": "x", "max_tokens": 3})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request", "max_tokens");
    let (status, body) =
        http.post("/generate", &json!({"prompt": "x", "params": {"temperature": -1}})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_params", "temperature");
    let (status, body) =
        http.post("/generate", &json!({"prompt": "x", "params": {"max_tokens": 600}})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "context_overflow", "max_tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_endpoints_have_openai_shapes_and_the_socket_output() {
    let http = HttpDaemon::start(&[]);
    let mut socket = http.daemon.client().await;

    let (status, _, text) = http.send("GET", "/v1/models", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    let models: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "m31r-test-tiny");
    assert_eq!(models["data"][0]["object"], "model");
    let (status, _, _) = http.send("GET", "/v1/models/m31r-test-tiny", &[], "").await;
    assert_eq!(status, StatusCode::OK);

    // Plain completion: greedy by default, equal to the socket's `generate`.
    let reference = run(&mut socket, generate("g", PREFIX, 10)).await;
    let request = json!({"model": "anything", "prompt": PREFIX, "max_tokens": 10});
    let (status, body) = http.post("/v1/completions", &request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "m31r-test-tiny");
    assert!(text_of(&body["id"]).starts_with("cmpl-"));
    assert!(body["created"].as_u64().unwrap() > 0);
    let choice = &body["choices"][0];
    assert_eq!((choice["index"].clone(), choice["logprobs"].clone()), (json!(0), Value::Null));
    assert_eq!(text_of(&choice["text"]), reference.text);
    let want_finish = if reference.usage.completion_tokens == 10 { "length" } else { "stop" };
    assert_eq!(choice["finish_reason"], want_finish);
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], reference.usage.prompt_tokens);
    assert_eq!(usage["completion_tokens"], reference.usage.completion_tokens);
    assert_eq!(
        usage["total_tokens"],
        reference.usage.prompt_tokens + reference.usage.completion_tokens
    );

    // Streamed: text_completion chunks, a finish chunk, a usage chunk, then [DONE].
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let payloads = http.stream("/v1/completions", &streamed).await;
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        payloads[..payloads.len() - 1].iter().map(|p| serde_json::from_str(p).unwrap()).collect();
    let (usage_chunk, chunks) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], body["usage"]);
    let (finish, tokens) = chunks.split_last().unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], want_finish);
    let mut text = String::new();
    for chunk in tokens {
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
        text.push_str(&text_of(&chunk["choices"][0]["text"]));
    }
    assert_eq!(text, reference.text);

    // FIM through `suffix`: equal to the socket's `fim`.
    let reference = run(&mut socket, crate::common::fim("f", PREFIX, SUFFIX, 10)).await;
    let request = json!({"model": "m", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 10});
    let (status, body) = http.post("/v1/completions", &request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(text_of(&body["choices"][0]["text"]), reference.text);
    assert_eq!(body["usage"]["prompt_tokens"], reference.usage.prompt_tokens);

    // Several choices: one per index, each with its own seed.
    let request =
        json!({"prompt": ["fn a", "fn b"], "n": 2, "temperature": 0.9, "seed": 5, "max_tokens": 4});
    let (status, body) = http.post("/v1/completions", &request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let indexes: Vec<u64> =
        body["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, [0, 1, 2, 3]);
    let (again_status, again) = http.post("/v1/completions", &request).await;
    assert_eq!(again_status, StatusCode::OK);
    assert_eq!(again["choices"], body["choices"], "seeded sampling is reproducible");

    // Chat: one user message is the prompt itself, so the reply equals the socket's `generate`.
    let reference = run(&mut socket, generate("c", PREFIX, 8)).await;
    let request = json!({
        "model": "m",
        "messages": [{"role": "user", "content": PREFIX}],
        "max_tokens": 8,
    });
    let (status, body) = http.post("/v1/chat/completions", &request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(text_of(&body["id"]).starts_with("chatcmpl-"));
    let message = &body["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    assert_eq!(text_of(&message["content"]), reference.text);
    assert_eq!(body["usage"]["completion_tokens"], reference.usage.completion_tokens);

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let payloads = http.stream("/v1/chat/completions", &streamed).await;
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        payloads[..payloads.len() - 1].iter().map(|p| serde_json::from_str(p).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let (finish, deltas) = chunks.split_last().unwrap();
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert!(finish["choices"][0]["finish_reason"].is_string());
    let mut text = String::new();
    for chunk in deltas {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], finish["id"]);
        text.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    assert_eq!(text, reference.text);

    // Fields M31R cannot honour are refused, naming them.
    let (status, body) = http.post("/v1/completions", &json!({"prompt": "x", "logprobs": 2})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request", "logprobs");
    assert_eq!(body["error"]["param"], "logprobs");
    let (status, body) = http.post("/v1/completions", &json!({"prompt": "x", "n": 99})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request", "n = 99");
}

/// Sends raw bytes and reads the whole answer (the daemon closes after these refusals).
fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status code and JSON body of a raw HTTP/1.1 answer.
fn parse_raw(answer: &str) -> (u16, Value) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{answer:?}"));
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer:?}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_openai_errors() {
    let http = HttpDaemon::start(&[("M31R_HTTP__MAX_BODY_BYTES", "4096")]);

    // Oversized: refused from Content-Length before the body is read.
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100000\r\n\r\n",
        http.host()
    );
    let (code, body) = parse_raw(&raw_exchange(http.addr, head.as_bytes()));
    assert_error(
        StatusCode::from_u16(code).unwrap(),
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        "4096",
    );
    // Oversized without a length (chunked): refused once the limit is crossed.
    let big = json!({"prompt": "x".repeat(5000)}).to_string();
    let (status, _, text) =
        http.send("POST", "/v1/completions", &[("transfer-encoding", "chunked")], &big).await;
    assert_error(
        status,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        "4096",
    );

    // DNS rebinding: a foreign Host is refused, with and without a port; loopback names pass.
    for host in ["evil.example", "evil.example:80", "127.0.0.1.evil.example"] {
        let (status, _, text) = http.send("POST", "/v1/completions", &[("host", host)], "{}").await;
        let body = serde_json::from_str(&text).unwrap();
        assert_error(status, &body, StatusCode::FORBIDDEN, "host_not_allowed", host);
    }
    let port = http.addr.port();
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}"), "localhost".into()] {
        let (status, _, text) = http.send("GET", "/v1/models", &[("host", &host)], "").await;
        assert_eq!(status, StatusCode::OK, "{host}: {text}");
    }
    // Two Host fields (a loopback name, then a rebinding one) are malformed: 400, not served.
    for second in ["evil.example", "localhost"] {
        let hosts = [("host", "localhost"), ("host", second)];
        let (status, _, text) = http.send("GET", "/v1/models", &hosts, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "Host: localhost + {second}: {text}");
        assert!(text.contains("more than one Host header"), "{text}");
    }
    // A web page's request carries its Origin: refused, and no CORS header ever comes back.
    let (status, headers, text) =
        http.send("POST", "/v1/completions", &[("origin", "http://evil.example")], "{}").await;
    let body = serde_json::from_str(&text).unwrap();
    assert_error(status, &body, StatusCode::FORBIDDEN, "origin_not_allowed", "evil.example");
    assert!(!headers.contains_key("access-control-allow-origin"));
    let (_, headers, _) = http.send("GET", "/v1/models", &[], "").await;
    assert!(!headers.contains_key("access-control-allow-origin"));

    // Malformed JSON and schema errors: 400 with an OpenAI error object.
    for (path, body, mentions) in [
        ("/v1/completions", "{not json", "invalid JSON"),
        ("/v1/chat/completions", "[1, 2", "invalid JSON"),
        ("/v1/completions", r#"{"prompt":"x","bogus":1}"#, "bogus"),
        ("/v1/chat/completions", r#"{"messages":[{"role":"tool","content":"x"}]}"#, "tool"),
        ("/fim", r#"{"suffix":"}"}"#, "prefix"),
    ] {
        let (status, _, text) = http.send("POST", path, &[], body).await;
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_error(status, &value, StatusCode::BAD_REQUEST, "bad_request", mentions);
    }
    let (status, _, text) = http.send("GET", "/v1/completions", &[], "").await;
    let body = serde_json::from_str(&text).unwrap();
    assert_error(status, &body, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "POST");
    let (status, _, text) = http.send("POST", "/v2/teleport", &[], "{}").await;
    let body = serde_json::from_str(&text).unwrap();
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "/v2/teleport");

    // The daemon carries on.
    let (status, body) =
        http.post("/v1/completions", &json!({"prompt": "fn", "max_tokens": 2})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(http.status().await.errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_gets_cors_headers() {
    let http = HttpDaemon::start(&[
        ("M31R_HTTP__ALLOWED_ORIGINS", "[\"http://localhost:3000\"]"),
        ("M31R_HTTP__ALLOWED_HOSTS", "[\"m31r.test\"]"),
    ]);
    let origin = [("origin", "http://localhost:3000")];
    let (status, headers, _) = http.send("GET", "/v1/models", &origin, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["access-control-allow-origin"], "http://localhost:3000");
    let (status, headers, _) = http.send("OPTIONS", "/v1/completions", &origin, "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(headers["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    let (status, _, _) = http.send("GET", "/v1/models", &[("host", "m31r.test:8080")], "").await;
    assert_eq!(status, StatusCode::OK);
}

/// Polls the socket's status until a request was cancelled; returns that status.
async fn wait_cancelled(http: &HttpDaemon, at_least: u64) -> DaemonStatus {
    for _ in 0..500 {
        let status = http.status().await;
        if status.cancelled >= at_least && status.queued == 0 {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no cancellation seen: {:?}\n{}", http.status().await, http.daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_cancels_the_generation() {
    let http = HttpDaemon::start(&[]);
    let request = |stream: bool| {
        let body =
            json!({"model": "m", "prompt": long_prompt(), "max_tokens": 400, "stream": stream})
                .to_string();
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            http.host(),
            body.len()
        )
    };

    // Streaming: read until the first chunk arrives, then hang up.
    let mut stream = tokio::net::TcpStream::connect(http.addr).await.unwrap();
    stream.write_all(request(true).as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the first chunk: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    drop(stream);
    let status = wait_cancelled(&http, 1).await;
    assert_eq!(status.requests, 1);
    assert!(status.generated_tokens < 400, "{status:?}");

    // Waiting for a whole answer: hanging up cancels too.
    let mut stream = tokio::net::TcpStream::connect(http.addr).await.unwrap();
    stream.write_all(request(false).as_bytes()).await.unwrap();
    // The job is queued once the daemon has read the request; wait until it has started.
    for _ in 0..500 {
        let s = http.status().await;
        if s.prefilled_tokens > status.prefilled_tokens || s.cached_tokens > status.cached_tokens {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(stream);
    let after = wait_cancelled(&http, 2).await;
    assert_eq!(after.requests, 2, "{after:?}");
    assert!(after.generated_tokens < status.generated_tokens + 400, "{after:?}");
}

#[test]
fn a_non_loopback_bind_needs_the_explicit_flag() {
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("s.sock");
    let mut child = spawn(
        crate::common::bundle(),
        &socket,
        dir.path(),
        &[("M31R_HTTP__ENABLED", "true"), ("M31R_HTTP__BIND", "0.0.0.0:0")],
    );
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < until, "m31rd started on 0.0.0.0 without the flag");
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(dir.path().join("m31rd.log")).unwrap();
    assert!(!status.success());
    assert!(log.contains("0.0.0.0:0") && log.contains("allow_non_loopback"), "{log}");
    assert!(!socket.exists(), "the socket was left behind");
}

/// Reads from `stream` until the daemon closes it; returns what came and how long it took.
fn read_until_closed(stream: &mut std::net::TcpStream) -> (String, Duration) {
    let started = Instant::now();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
}

#[test]
fn silent_and_idle_connections_are_closed_after_the_header_timeout() {
    let http = HttpDaemon::start(&[("M31R_HTTP__HEADER_TIMEOUT_MS", "300")]);

    // Nothing sent: closed without an answer.
    let mut silent = std::net::TcpStream::connect(http.addr).unwrap();
    let (answer, waited) = read_until_closed(&mut silent);
    assert_eq!(answer, "");
    assert!(waited < Duration::from_secs(10), "{waited:?}");

    // Half a request head: the same.
    let mut partial = std::net::TcpStream::connect(http.addr).unwrap();
    partial.write_all(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    let (answer, _) = read_until_closed(&mut partial);
    assert_eq!(answer, "");

    // Kept alive after an answer: closed once idle for the timeout, the answer intact.
    let mut kept = std::net::TcpStream::connect(http.addr).unwrap();
    kept.write_all(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let (answer, waited) = read_until_closed(&mut kept);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("\"object\":\"list\""), "{answer:?}");
    assert!(waited >= Duration::from_millis(250), "{waited:?}");

    // A request being answered is not cut by it, even while its body is slow to come.
    let body = json!({"prompt": "fn", "max_tokens": 2}).to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut slow = std::net::TcpStream::connect(http.addr).unwrap();
    slow.write_all(head.as_bytes()).unwrap();
    slow.write_all(&body.as_bytes()[..4]).unwrap();
    std::thread::sleep(Duration::from_millis(900));
    slow.write_all(&body.as_bytes()[4..]).unwrap();
    let (answer, _) = read_until_closed(&mut slow);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserved_methods_and_paths_get_the_api_errors() {
    let http = HttpDaemon::start(&[]);
    // HEAD is not served, even on a GET endpoint.
    let (status, _, _) = http.send("HEAD", "/v1/models", &[], "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    // A path under /v1/models/ is a model id; other methods there are unknown endpoints.
    for path in ["/v1/models/", "/v1/models/other", "/v1/models/m31r-test-tiny/x"] {
        let (status, _, text) = http.send("GET", path, &[], "").await;
        let body = serde_json::from_str(&text).unwrap();
        assert_error(status, &body, StatusCode::NOT_FOUND, "model_not_found", "not served");
    }
    let (status, _, text) = http.send("POST", "/v1/models/m31r-test-tiny", &[], "{}").await;
    let body = serde_json::from_str(&text).unwrap();
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "/v1/models/m31r-test-tiny");
    // A preflight without Origin is answered, without CORS headers.
    let (status, headers, _) = http.send("OPTIONS", "/nowhere", &[], "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers["allow"], "GET, POST, OPTIONS");
    assert!(!headers.contains_key("access-control-allow-methods"));
    // Whole answers carry their length.
    let (_, headers, text) = http.send("GET", "/v1/models", &[], "").await;
    assert_eq!(headers["content-length"], text.len().to_string().as_str());
}

#[test]
fn connections_past_the_cap_are_answered_503() {
    let http = HttpDaemon::start(&[("M31R_MAX_CONNECTIONS", "1")]);
    let mut held = std::net::TcpStream::connect(http.addr).unwrap();
    held.write_all(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut first = [0u8; 12];
    held.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let request = format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\n\r\n", http.host());
    let (code, body) = parse_raw(&raw_exchange(http.addr, request.as_bytes()));
    assert_error(
        StatusCode::from_u16(code).unwrap(),
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "connection limit of 1",
    );
    drop(held);
}
