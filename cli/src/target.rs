//! Where a request runs: `m31rd` over its socket, or an engine started in this process from a
//! bundle. Both answer with the same events, so every command streams a request one way.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use m31r_daemon::engine::{Engine, EngineConfig, Job, JobKind};
use m31r_model::recall::RecallParams;
use m31r_model::{Bundle, DeviceSpec, ModelConfig, Tokenizer};
use m31r_protocol::{
    Client, DaemonStatus, ErrorCode, Event, GenerationParams, ModelInfo, PROTOCOL_VERSION, Request,
};

/// How long to wait for the daemon's `hello` before giving up: a daemon that accepts but never
/// answers should not hang the shell.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected daemon or a loaded in-process engine.
pub enum Target {
    /// `m31rd` over its Unix socket.
    Daemon(Box<Daemon>),
    /// An engine running in this process.
    Local(Box<Local>),
}

/// A connection to `m31rd`, driven from synchronous code through a small runtime.
pub struct Daemon {
    runtime: tokio::runtime::Runtime,
    client: Client,
    model: ModelInfo,
    socket: PathBuf,
    handshake: Duration,
}

/// An engine loaded from a bundle in this process.
pub struct Local {
    engine: Engine,
    model: ModelInfo,
    config: ModelConfig,
    tokenizer: Tokenizer,
    bundle: PathBuf,
    load: Duration,
    started: Instant,
}

impl Target {
    /// Connects to the daemon at `socket` and performs the handshake.
    pub fn connect(socket: &Path) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let started = Instant::now();
        // The timer must be created inside the runtime, hence the async block.
        let connected = runtime.block_on(async {
            let name = concat!("m31r/", env!("CARGO_PKG_VERSION"));
            tokio::time::timeout(HANDSHAKE_TIMEOUT, Client::connect(socket, name)).await
        });
        let (client, model) = match connected {
            Ok(Ok(connected)) => connected,
            Ok(Err(m31r_protocol::ClientError::Connect { source, .. })) => bail!(
                "cannot reach m31rd at {}: {source}\nis m31rd running? start it with \
                 `m31rd --bundle DIR`, or pass --bundle DIR to run the model in this process",
                socket.display()
            ),
            Ok(Err(e)) => {
                return Err(e)
                    .with_context(|| format!("handshake with m31rd at {}", socket.display()));
            }
            Err(_) => bail!(
                "m31rd at {} did not answer hello within {} s",
                socket.display(),
                HANDSHAKE_TIMEOUT.as_secs()
            ),
        };
        let handshake = started.elapsed();
        Ok(Self::Daemon(Box::new(Daemon {
            runtime,
            client,
            model,
            socket: socket.to_path_buf(),
            handshake,
        })))
    }

    /// Loads the bundle in `dir` (at its own precision) on `device` and starts an engine on it.
    pub fn load(dir: &Path, device: DeviceSpec, recall: RecallParams) -> anyhow::Result<Self> {
        let device = device.open()?;
        let started = Instant::now();
        let bundle =
            Bundle::open(dir).with_context(|| format!("cannot load bundle {}", dir.display()))?;
        let model = bundle
            .model_at(bundle.precision(), &device)
            .with_context(|| format!("cannot build the model from bundle {}", dir.display()))?;
        let load = started.elapsed();
        let config = bundle.config().clone();
        let tokenizer = bundle.tokenizer().clone();
        let info = ModelInfo {
            version: bundle.metadata().model_version.clone(),
            parameters: config.param_count(),
            context_length: config.context_length() as u32,
            precision: bundle.precision().to_string(),
        };
        // The model holds its own copy of the weights; keeping the bundle's mapping alive would
        // only count them twice in resident memory.
        drop(bundle);
        let engine = Engine::start(
            model,
            tokenizer.clone(),
            EngineConfig { recall, ..EngineConfig::default() },
        );
        Ok(Self::Local(Box::new(Local {
            engine,
            model: info,
            config,
            tokenizer,
            bundle: dir.to_path_buf(),
            load,
            started: Instant::now(),
        })))
    }

    /// The model serving requests.
    pub fn model(&self) -> &ModelInfo {
        match self {
            Self::Daemon(d) => &d.model,
            Self::Local(l) => &l.model,
        }
    }

    /// Names the target in messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Daemon(d) => format!("m31rd at {}", d.socket.display()),
            Self::Local(l) => format!("in-process engine on bundle {}", l.bundle.display()),
        }
    }

    /// Sends `request`, calls `on_token` for each piece of streamed text, and returns the event
    /// that ends it: `done`, `error`, `status`, `shutting_down` or `hello`.
    pub fn run(
        &mut self,
        request: &Request,
        on_token: &mut dyn FnMut(&str),
    ) -> anyhow::Result<Event> {
        match self {
            Self::Daemon(d) => {
                let socket = d.socket.display().to_string();
                d.runtime
                    .block_on(d.client.run(request, |text| on_token(text)))
                    .with_context(|| format!("request to m31rd at {socket} failed"))
            }
            Self::Local(l) => l.run(request, on_token),
        }
    }
}

impl Daemon {
    /// Time from connecting to the daemon's `hello` answer.
    pub fn handshake(&self) -> Duration {
        self.handshake
    }
}

impl Local {
    /// Time to open (verify) the bundle and build the model.
    pub fn load_time(&self) -> Duration {
        self.load
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The bundle's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Bytes the prefix cache holds.
    pub fn cache_bytes(&self) -> usize {
        self.engine.cache_stats().bytes
    }

    fn run(&mut self, request: &Request, on_token: &mut dyn FnMut(&str)) -> anyhow::Result<Event> {
        let id = request.id().unwrap_or_default().to_owned();
        let error = |code, message: String| Event::Error { id: Some(id.clone()), code, message };
        let (kind, params) = match request.clone() {
            Request::Hello { version, .. } => {
                if version != PROTOCOL_VERSION {
                    bail!(
                        "protocol version {version} requested; this build speaks {PROTOCOL_VERSION}"
                    );
                }
                return Ok(Event::Hello {
                    version: PROTOCOL_VERSION,
                    daemon: concat!("m31r/", env!("CARGO_PKG_VERSION"), " (in-process)").into(),
                    model: self.model.clone(),
                });
            }
            Request::Status { id } => return Ok(Event::Status { id, status: self.status() }),
            Request::Shutdown { .. } => bail!(
                "nothing to shut down: with --bundle the engine runs inside this command and \
                 stops with it"
            ),
            Request::Cancel { .. } => bail!("cancel needs a daemon connection"),
            Request::Generate { prompt, params, .. } => (JobKind::Generate { prompt }, params),
            Request::Complete { prompt, params, .. } => (JobKind::Complete { prompt }, params),
            Request::Fim { input, params, .. } => (JobKind::Fim(input), params),
            Request::Warm { input, max_tokens, .. } => {
                let defaults = GenerationParams::default();
                let max_tokens = max_tokens.unwrap_or(defaults.max_tokens);
                (JobKind::Warm(input), GenerationParams { max_tokens, ..defaults })
            }
        };
        // The daemon's own checks, so both modes refuse the same requests the same way.
        if let Err(message) = m31r_daemon::server::validate(&params) {
            return Ok(error(ErrorCode::InvalidParams, format!("request {id}: {message}")));
        }
        let (events, mut inbox) = tokio::sync::mpsc::unbounded_channel();
        let job = Job {
            id: id.clone(),
            kind,
            params,
            cancel: Arc::new(AtomicBool::new(false)),
            events,
            arrived: Instant::now(),
        };
        if let Err(e) = self.engine.submit(job) {
            return Ok(error(e.code(), e.to_string()));
        }
        while let Some(event) = inbox.blocking_recv() {
            match event {
                Event::Token { text, .. } => on_token(&text),
                Event::Done { .. } | Event::Error { .. } => return Ok(event),
                _ => {}
            }
        }
        bail!("the in-process engine stopped without answering request {id}")
    }

    fn status(&self) -> DaemonStatus {
        self.engine.status(&self.model, self.started.elapsed(), 0)
    }
}
