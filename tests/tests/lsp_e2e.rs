//! End to end (DESIGN §1): the `m31r-lsp` binary over stdio with real JSON-RPC framing against a
//! real `m31rd` serving a tiny seeded bundle. Gated by `M31R_SLOW_TESTS=1`.
//!
//! The binaries of other packages are not built for this package's tests, so the test builds
//! them with the `cargo` that runs it (a no-op when `cargo test --workspace` already did).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Hang guard for any one message (not a timing assertion).
const HANG: Duration = Duration::from_secs(120);

/// The document the editor opens, and the cursor (line, UTF-16 column) completions are asked at.
const DOC: &str = "pub struct Point {\n    pub x: f64,\n    pub y\n}\n";
const CURSOR: (u32, u32) = (2, 9);
const URI: &str = "file:///work/src/count.rs";

fn slow_tests() -> bool {
    std::env::var("M31R_SLOW_TESTS").is_ok_and(|v| v == "1")
}

/// Builds the workspace binaries `names` and returns their paths.
fn workspace_bins(packages: &[&str]) -> Vec<(String, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--bins", "--message-format=json-render-diagnostics"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit());
    for p in packages {
        cmd.args(["-p", p]);
    }
    let out = cmd.output().expect("cargo build runs");
    assert!(out.status.success(), "cargo build of {packages:?} failed");
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let message: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        if let (Some(exe), Some(name)) =
            (message["executable"].as_str(), message["target"]["name"].as_str())
        {
            bins.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    bins
}

fn bin(bins: &[(String, PathBuf)], name: &str) -> PathBuf {
    bins.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in {bins:?}"))
        .1
        .clone()
}

/// The tiny seeded bundle of the daemon's tests (`m31r_model::demo`).
fn bundle(dir: &Path) -> PathBuf {
    let path = dir.join("bundle");
    m31r_model::demo::write_demo_bundle(&path, "test-tiny").unwrap();
    path
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(socket: &Path, daemon: &mut Child) {
    let until = Instant::now() + HANG;
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < until, "m31rd did not open {}", socket.display());
        assert!(daemon.try_wait().unwrap().is_none(), "m31rd exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `hello` frame of this protocol version, with its newline.
fn hello() -> String {
    format!("{{\"type\":\"hello\",\"version\":{}}}\n", m31r_protocol::PROTOCOL_VERSION)
}

/// Asks the daemon at `socket` to shut down, over the protocol.
fn shutdown_daemon(socket: &Path) {
    let mut stream = UnixStream::connect(socket).unwrap();
    let frames = format!("{}{{\"type\":\"shutdown\",\"id\":\"s\"}}\n", hello());
    stream.write_all(frames.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.contains("shutting_down"), "{answer}");
}

/// The daemon's `status` report, asked over a connection of its own.
fn daemon_status(socket: &Path) -> Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(HANG)).unwrap();
    let frames = format!("{}{{\"type\":\"status\",\"id\":\"st\"}}\n", hello());
    stream.write_all(frames.as_bytes()).unwrap();
    let mut lines = BufReader::new(stream).lines();
    loop {
        let line = lines.next().expect("the daemon answers status").unwrap();
        let event: Value = serde_json::from_str(&line).unwrap();
        if event["type"] == "status" {
            return event;
        }
        assert_eq!(event["type"], "hello", "{line}");
    }
}

/// The `m31r-lsp` process and a reader thread of its stdout.
struct Lsp {
    proc: Proc,
    stdin: ChildStdin,
    messages: mpsc::Receiver<Value>,
    notifications: Vec<Value>,
    next_id: i64,
    log: PathBuf,
}

impl Lsp {
    fn start(exe: &Path, socket: &Path, log: &Path) -> Self {
        let mut child = Command::new(exe)
            .arg("--socket")
            .arg(socket)
            .arg("--log-file")
            .arg(log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Inherited by a daemon it starts: one engine thread on a shared CI machine.
            .env("M31R_THREADS", "1")
            .env("RUST_LOG", "m31r_lsp=debug,info")
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            loop {
                let mut length = None;
                loop {
                    let mut line = String::new();
                    if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some(v) = line.strip_prefix("Content-Length: ") {
                        length = Some(v.parse::<usize>().unwrap());
                    }
                }
                let mut body = vec![0; length.expect("Content-Length")];
                stdout.read_exact(&mut body).unwrap();
                if tx.send(serde_json::from_slice(&body).unwrap()).is_err() {
                    return;
                }
            }
        });
        Self {
            proc: Proc(child),
            stdin,
            messages,
            notifications: Vec::new(),
            next_id: 1,
            log: log.to_path_buf(),
        }
    }

    fn send(&mut self, message: Value) {
        let body = serde_json::to_vec(&message).unwrap();
        write!(self.stdin, "Content-Length: {}\r\n\r\n", body.len()).unwrap();
        self.stdin.write_all(&body).unwrap();
        self.stdin.flush().unwrap();
    }

    fn notify(&mut self, method: &str, params: Value) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        loop {
            let message = self.messages.recv_timeout(HANG).expect("m31r-lsp answers");
            if message["id"] == id && message.get("method").is_none() {
                assert!(message.get("error").is_none(), "{method} failed: {message}");
                return message["result"].clone();
            }
            self.notifications.push(message);
        }
    }

    fn inline(&mut self) -> Value {
        self.inline_at(CURSOR.1)
    }

    /// An inline completion on the cursor's line at UTF-16 column `character`.
    fn inline_at(&mut self, character: u32) -> Value {
        self.request(
            "textDocument/inlineCompletion",
            json!({"textDocument": {"uri": URI},
                "position": {"line": CURSOR.0, "character": character},
                "context": {"triggerKind": 1}}),
        )
    }

    fn count_show_messages(&self) -> usize {
        self.notifications.iter().filter(|n| n["method"] == "window/showMessage").count()
    }

    /// `shutdown` then `exit`; the process must end by itself with status 0.
    fn shut_down(mut self) {
        assert_eq!(self.request("shutdown", Value::Null), Value::Null);
        self.notify("exit", Value::Null);
        let until = Instant::now() + HANG;
        let status = loop {
            if let Some(status) = self.proc.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < until, "m31r-lsp did not exit after `exit`");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "m31r-lsp exited with {status}");
    }
}

fn initialize(lsp: &mut Lsp, settings: Value) {
    let init = lsp.request(
        "initialize",
        json!({"processId": null, "rootUri": "file:///work", "capabilities": {},
            "initializationOptions": settings}),
    );
    assert_eq!(init["capabilities"]["inlineCompletionProvider"], json!({}));
    assert_eq!(init["capabilities"]["positionEncoding"], "utf-16");
    lsp.notify("initialized", json!({}));
    lsp.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": URI, "languageId": "rust", "version": 1, "text": DOC}}),
    );
}

fn assert_one_item(result: &Value, lsp: &Lsp) {
    let items = result["items"].as_array().unwrap_or_else(|| panic!("no items: {result}"));
    let log = std::fs::read_to_string(&lsp.log).unwrap_or_default();
    assert_eq!(items.len(), 1, "{result}; m31r-lsp log:\n{log}");
    assert!(!items[0]["insertText"].as_str().unwrap().trim().is_empty(), "{result}");
    assert_eq!(items[0]["range"]["start"], json!({"line": CURSOR.0, "character": CURSOR.1}));
}

/// `m31rd` serving the tiny seeded bundle on a socket under `dir`, with one compute thread.
fn start_daemon(bins: &[(String, PathBuf)], dir: &Path) -> (Proc, PathBuf) {
    let bundle = bundle(dir);
    let socket = dir.join("run").join("m31rd.sock");
    let mut daemon = Command::new(bin(bins, "m31rd"))
        .arg("--bundle")
        .arg(&bundle)
        .arg("--socket")
        .arg(&socket)
        .arg("--config")
        .arg(dir.join("no-such-config.toml"))
        .env("M31R_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&socket, &mut daemon);
    (Proc(daemon), socket)
}

#[test]
fn lsp_binary_completes_through_a_real_daemon() {
    if !slow_tests() {
        eprintln!("skipped: set M31R_SLOW_TESTS=1");
        return;
    }
    let bins = workspace_bins(&["m31r-lsp", "m31r-daemon"]);
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, socket) = start_daemon(&bins, dir.path());

    let mut lsp = Lsp::start(&bin(&bins, "m31r-lsp"), &socket, &dir.path().join("lsp.log"));
    // A short completion: the daemon reuses a cached sequence only when the prompt shares at
    // least half of its tokens, and this tiny prompt is ~20 tokens.
    // The seeded model's text is shown whatever it looks like (no gate, no filters).
    let settings = json!({"autoStart": false, "maxTokens": 8, "minConfidence": 0,
        "degenerateFilters": false});
    initialize(&mut lsp, settings);
    let first = lsp.inline();
    assert_one_item(&first, &lsp);
    // Greedy decoding: the same keystroke state gives the same completion, now from the cache.
    assert_eq!(lsp.inline(), first);
    let status = lsp.request("m31r/status", Value::Null);
    assert_eq!(status["connected"], true);
    assert_eq!(status["model"], "test-tiny");
    assert_eq!(status["suppressed"], 0);
    assert!(status["cacheHitRate"].as_f64().unwrap() > 0.0, "{status}");
    lsp.shut_down();
    let log = std::fs::read_to_string(dir.path().join("lsp.log")).unwrap();
    assert!(log.contains("connected to m31rd"), "{log}");
}

#[test]
fn lsp_binary_starts_the_daemon_when_allowed() {
    if !slow_tests() {
        eprintln!("skipped: set M31R_SLOW_TESTS=1");
        return;
    }
    let bins = workspace_bins(&["m31r-lsp", "m31r-daemon"]);
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle(dir.path());
    let socket = dir.path().join("auto").join("m31rd.sock");
    let mut lsp = Lsp::start(&bin(&bins, "m31r-lsp"), &socket, &dir.path().join("lsp.log"));
    let args = ["--bundle", bundle.to_str().unwrap(), "--config", "/nonexistent/m31r.toml"];
    initialize(
        &mut lsp,
        json!({"autoStart": true, "daemonPath": bin(&bins, "m31rd"), "daemonArgs": args,
            "minConfidence": 0, "degenerateFilters": false}),
    );
    let result = lsp.inline();
    // The daemon outlives the language server by design: stop it over the protocol.
    let started = UnixStream::connect(&socket).is_ok();
    if started {
        shutdown_daemon(&socket);
    }
    assert!(started, "m31r-lsp did not start m31rd at {}", socket.display());
    assert_one_item(&result, &lsp);
    assert_eq!(lsp.count_show_messages(), 0);
    lsp.shut_down();
}

#[test]
fn typing_along_a_shown_suggestion_generates_no_tokens() {
    if !slow_tests() {
        eprintln!("skipped: set M31R_SLOW_TESTS=1");
        return;
    }
    let bins = workspace_bins(&["m31r-lsp", "m31r-daemon"]);
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, socket) = start_daemon(&bins, dir.path());
    let mut lsp = Lsp::start(&bin(&bins, "m31r-lsp"), &socket, &dir.path().join("lsp.log"));
    // The whole completion before the answer (no background generation), no speculative next
    // request, and the seeded model's text shown whatever it looks like.
    let settings = json!({"autoStart": false, "maxTokens": 16, "speculativeNext": false,
        "firstLineBudgetMs": 60000, "inlineTimeoutMs": 60000, "minConfidence": 0,
        "degenerateFilters": false});
    initialize(&mut lsp, settings);
    let first = lsp.inline();
    assert_one_item(&first, &lsp);
    let shown = first["items"][0]["insertText"].as_str().unwrap().to_string();
    let typed: Vec<char> = shown.chars().take(2).collect();
    assert!(shown.chars().count() > typed.len(), "too short to type along: {shown:?}");
    let generated = |status: &Value| status["generated_tokens"].as_u64().unwrap();
    let before = generated(&daemon_status(&socket));

    let (mut column, mut rest) = (CURSOR.1, shown.as_str());
    for (version, c) in (2..).zip(typed) {
        let at = json!({"line": CURSOR.0, "character": column});
        lsp.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": URI, "version": version},
                "contentChanges": [{"range": {"start": at, "end": at}, "text": c.to_string()}]}),
        );
        column += u32::try_from(c.len_utf16()).unwrap();
        rest = &rest[c.len_utf8()..];
        let answer = lsp.inline_at(column);
        assert_eq!(answer["items"][0]["insertText"], rest, "{answer}");
    }
    let status = lsp.request("m31r/status", Value::Null);
    assert_eq!(status["servedLocally"], 2, "{status}");
    // The server warms the daemon's cache while the user types along: prompt work, no tokens.
    let after = daemon_status(&socket);
    assert_eq!(generated(&after), before, "tokens were generated while typing along: {after}");
    lsp.shut_down();
}
