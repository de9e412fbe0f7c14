//! Fixtures: a tiny seeded bundle and a daemon process on a private temporary socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use m31r_protocol::{
    Client, Event, FimInput, GenerationParams, LineConfidence, Request, StopReason, Usage,
};

pub use m31r_model::demo::CORPUS;

/// A long Rust-ish prompt, so prefill spans several chunks.
pub fn long_prompt() -> String {
    CORPUS.iter().cycle().take(12).cloned().collect()
}

/// The tiny seeded bundle shared by all tests of this binary (built once per process).
pub fn bundle() -> &'static Path {
    static BUNDLE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = BUNDLE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle");
        m31r_model::demo::write_demo_bundle(&path, "test-tiny").unwrap();
        (dir, path)
    });
    path
}

/// A running `m31rd`; killed on drop.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts a daemon on a fresh socket and waits until it accepts connections.
    pub fn start(extra_env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run").join("m31rd.sock");
        let child = spawn(bundle(), &socket, dir.path(), extra_env);
        let mut daemon = Daemon { child, socket, dir };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("m31rd exited early with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("m31rd did not start: {}", self.log());
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("m31rd.log")).unwrap_or_default()
    }

    /// A connected, greeted client.
    pub async fn client(&self) -> Client {
        Client::connect(&self.socket, "test").await.unwrap().0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `m31rd` with its stderr in `dir/m31rd.log`; the config file location is isolated.
pub fn spawn(bundle: &Path, socket: &Path, dir: &Path, extra_env: &[(&str, &str)]) -> Child {
    let log = std::fs::File::create(dir.join("m31rd.log")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_m31rd"));
    cmd.arg("--bundle")
        .arg(bundle)
        .arg("--socket")
        .arg(socket)
        .arg("--config")
        .arg(dir.join("no-such-config.toml"))
        .env("M31R_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// The outcome of one request.
#[derive(Debug)]
pub struct Outcome {
    pub text: String,
    pub tokens: usize,
    pub stop: StopReason,
    pub usage: Usage,
    pub lines: Vec<LineConfidence>,
}

/// Runs a request to completion; panics on an error event.
pub async fn run(client: &mut Client, request: Request) -> Outcome {
    let mut text = String::new();
    let mut tokens = 0;
    match client
        .run(&request, |t| {
            text.push_str(t);
            tokens += 1;
        })
        .await
        .unwrap()
    {
        Event::Done { stop, usage, timings, lines, .. } => {
            assert!(timings.total_ms >= timings.prefill_ms + timings.decode_ms - 1.0);
            Outcome { text, tokens, stop, usage, lines }
        }
        other => panic!("expected done, got {other:?}"),
    }
}

pub fn fim(id: &str, prefix: &str, suffix: &str, max_tokens: u32) -> Request {
    Request::Fim {
        id: id.into(),
        input: FimInput { prefix: prefix.into(), suffix: suffix.into(), context_files: vec![] },
        params: GenerationParams { max_tokens, ..Default::default() },
    }
}

pub fn generate(id: &str, prompt: &str, max_tokens: u32) -> Request {
    Request::Generate {
        id: id.into(),
        prompt: prompt.into(),
        params: GenerationParams { max_tokens, ..Default::default() },
    }
}
