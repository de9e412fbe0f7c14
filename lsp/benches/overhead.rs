//! Latency benchmark of the language server (prints numbers, asserts nothing):
//!
//! 1. LSP overhead: from an `inlineCompletion` request entering the server (after a one-character
//!    `didChange`) to its `fim` frame arriving at a fake daemon, and the full round trip with a
//!    daemon that answers at once. Both over real JSON-RPC framing on in-memory pipes.
//! 2. Keystroke to answer, end to end, against a real `m31rd`, when `M31R_BENCH_M31RD` (the
//!    binary) and `M31R_BENCH_BUNDLE` (a bundle directory) are set, e.g.
//!    `cargo run -p m31r-daemon --example tiny_bundle -- /tmp/tiny && cargo build -p m31r-daemon`
//!    then `M31R_BENCH_M31RD=target/debug/m31rd M31R_BENCH_BUNDLE=/tmp/tiny cargo bench -p m31r-lsp`.
//!
//! `M31R_BENCH_N` sets the number of keystrokes (default 1000 for 1, 100 for 2).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use m31r_lsp::server::{Options, serve};
use m31r_protocol::{
    Event, FrameReader, MAX_FRAME_BYTES, ModelInfo, Request, StopReason, Timings, Usage,
    write_frame,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

const URI: &str = "file:///bench/src/lib.rs";
const DOC: &str =
    "pub struct Point {\n    pub x: f64,\n    pub y: f64,\n}\n\nfn main() {\n    let v = \n}\n";
/// The line typed on, and where typing starts (UTF-16 column).
const LINE: u32 = 6;
const START_COL: u32 = 12;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let n = env_n(1000);
        overhead(n).await?;
        match (std::env::var_os("M31R_BENCH_M31RD"), std::env::var_os("M31R_BENCH_BUNDLE")) {
            (Some(daemon), Some(bundle)) => {
                end_to_end(Path::new(&daemon), Path::new(&bundle), env_n(100)).await
            }
            _ => {
                println!("end to end: skipped (set M31R_BENCH_M31RD and M31R_BENCH_BUNDLE)");
                Ok(())
            }
        }
    })
}

fn env_n(default: usize) -> usize {
    std::env::var("M31R_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A fake daemon answering every `fim` at once with `"x"`; reports when each `fim` arrived.
async fn fake_daemon(
    socket: &Path,
    arrivals: mpsc::UnboundedSender<Instant>,
) -> anyhow::Result<()> {
    let listener =
        UnixListener::bind(socket).with_context(|| format!("cannot bind {}", socket.display()))?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut frames = FrameReader::new(BufReader::new(read), MAX_FRAME_BYTES);
                while let Ok(Some(frame)) = frames.next_frame().await {
                    let Ok(request) = serde_json::from_str::<Request>(&frame) else { return };
                    let events = match request {
                        Request::Hello { version, .. } => vec![Event::Hello {
                            version,
                            daemon: "bench".into(),
                            model: ModelInfo::default(),
                        }],
                        Request::Fim { id, .. } => {
                            let _ = arrivals.send(Instant::now());
                            vec![
                                Event::Token {
                                    id: id.clone(),
                                    text: "x".into(),
                                    lines: Vec::new(),
                                },
                                done(id, StopReason::EndOfText),
                            ]
                        }
                        Request::Warm { id, .. } => vec![done(id, StopReason::Warmed)],
                        _ => vec![],
                    };
                    for event in events {
                        if write_frame(&mut write, &event).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(())
}

fn done(id: String, stop: StopReason) -> Event {
    Event::Done {
        id,
        stop,
        usage: Usage::default(),
        timings: Timings::default(),
        lines: Vec::new(),
    }
}

/// A client of an in-process server over pipes.
struct Lsp {
    to_server: tokio::io::DuplexStream,
    from_server: BufReader<tokio::io::DuplexStream>,
    next_id: i64,
}

impl Lsp {
    fn start(socket: &Path) -> Self {
        let (to_server, server_in) = tokio::io::duplex(1 << 20);
        let (server_out, from_server) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve(server_in, server_out, Options { socket: Some(socket.into()) }));
        Self { to_server, from_server: BufReader::new(from_server), next_id: 1 }
    }

    async fn send(&mut self, message: Value) -> anyhow::Result<()> {
        let body = serde_json::to_vec(&message)?;
        let mut bytes = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
        bytes.extend(body);
        self.to_server.write_all(&bytes).await?;
        Ok(())
    }

    async fn notify(&mut self, method: &str, params: Value) -> anyhow::Result<()> {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params})).await
    }

    async fn send_request(&mut self, method: &str, params: Value) -> anyhow::Result<i64> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})).await?;
        Ok(id)
    }

    async fn response(&mut self, id: i64) -> anyhow::Result<Value> {
        loop {
            let message = read_message(&mut self.from_server).await?;
            if message["id"] == id && message.get("method").is_none() {
                return Ok(message);
            }
        }
    }

    async fn request(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.send_request(method, params).await?;
        self.response(id).await
    }

    async fn open(&mut self, settings: Value) -> anyhow::Result<()> {
        self.request("initialize", json!({"capabilities": {}, "initializationOptions": settings}))
            .await?;
        self.notify("initialized", json!({})).await?;
        let item = json!({"uri": URI, "languageId": "rust", "version": 1, "text": DOC});
        self.notify("textDocument/didOpen", json!({"textDocument": item})).await
    }

    /// Types `c` at column `col` of the benchmark line and asks for a completion after it;
    /// returns the request id.
    async fn keystroke(&mut self, col: u32, c: char) -> anyhow::Result<i64> {
        let at = json!({"line": LINE, "character": col});
        let change = json!({"range": {"start": at, "end": at}, "text": c.to_string()});
        self.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": URI, "version": col}, "contentChanges": [change]}),
        )
        .await?;
        let params = json!({"textDocument": {"uri": URI},
            "position": {"line": LINE, "character": col + 1}, "context": {"triggerKind": 2}});
        self.send_request("textDocument/inlineCompletion", params).await
    }
}

async fn read_message<R: AsyncBufRead + Unpin>(reader: &mut R) -> anyhow::Result<Value> {
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            bail!("the server closed its output");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            length = Some(v.parse::<usize>()?);
        }
    }
    let mut body = vec![0; length.context("no Content-Length")?];
    reader.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// Typed text, cycled; long lines are started over so the prompt stays small.
const TYPED: &str = "point.x * point.x + point.y * point.y";

async fn overhead(n: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("fake.sock");
    let (tx, mut arrivals) = mpsc::unbounded_channel();
    fake_daemon(&socket, tx).await?;
    let mut lsp = Lsp::start(&socket);
    lsp.open(json!({"autoStart": false})).await?;
    let (mut to_daemon, mut round_trip) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let warmup = 50;
    for i in 0..n + warmup {
        let col = START_COL + (i % TYPED.len()) as u32;
        let c = TYPED.as_bytes()[i % TYPED.len()] as char;
        if i % TYPED.len() == 0 && i > 0 {
            reset_line(&mut lsp).await?;
        }
        let sent = Instant::now();
        let id = lsp.keystroke(col, c).await?;
        let arrived = arrivals.recv().await.context("the fake daemon got the fim")?;
        let response = lsp.response(id).await?;
        let answered = Instant::now();
        if response["result"]["items"].as_array().is_none_or(|items| items.is_empty()) {
            bail!("keystroke {i}: no completion: {response}");
        }
        if i >= warmup {
            to_daemon.push(arrived - sent);
            round_trip.push(answered - sent);
        }
    }
    report("LSP overhead, request in -> daemon request out (fake daemon)", &mut to_daemon);
    report("LSP round trip with an instant fake daemon (keystroke -> answer)", &mut round_trip);
    Ok(())
}

/// Deletes what was typed on the benchmark line.
async fn reset_line(lsp: &mut Lsp) -> anyhow::Result<()> {
    let change = json!({"range": {
        "start": {"line": LINE, "character": START_COL},
        "end": {"line": LINE, "character": START_COL + TYPED.len() as u32}}, "text": ""});
    lsp.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": URI, "version": 0}, "contentChanges": [change]}),
    )
    .await
}

async fn end_to_end(daemon: &Path, bundle: &Path, n: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("m31rd.sock");
    let mut child = Command::new(daemon)
        .arg("--bundle")
        .arg(bundle)
        .arg("--socket")
        .arg(&socket)
        .arg("--config")
        .arg(dir.path().join("none.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", daemon.display()))?;
    let result = async {
        let until = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > until {
                bail!("{} did not open its socket", daemon.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut lsp = Lsp::start(&socket);
        lsp.open(json!({"autoStart": false})).await?;
        let mut latencies = Vec::with_capacity(n);
        let (mut shown, warmup) = (0, 5);
        for i in 0..n + warmup {
            let col = START_COL + (i % TYPED.len()) as u32;
            if i % TYPED.len() == 0 && i > 0 {
                reset_line(&mut lsp).await?;
            }
            let sent = Instant::now();
            let id = lsp.keystroke(col, TYPED.as_bytes()[i % TYPED.len()] as char).await?;
            let response = lsp.response(id).await?;
            if i >= warmup {
                latencies.push(sent.elapsed());
                shown += usize::from(
                    response["result"]["items"].as_array().is_some_and(|a| !a.is_empty()),
                );
            }
        }
        let status = lsp.request("m31r/status", Value::Null).await?;
        report("keystroke -> answer, end to end (m31rd, this bundle)", &mut latencies);
        println!(
            "  {shown}/{n} answers had an item; daemon cache hit rate {}",
            status["result"]["cacheHitRate"]
        );
        Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{what}: n={} p50={:.3} ms p99={:.3} ms max={:.3} ms",
        samples.len(),
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3,
        pick(1.0).as_secs_f64() * 1e3
    );
}
