//! Daemon configuration (DESIGN §7): built-in defaults < `~/.config/m31r/m31r.toml` (its `[daemon]`
//! table) < `M31R_*` environment variables < command-line flags. Unknown keys are errors.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;
use crate::server::ConnectionLimits;

pub use m31r_model::Precision;
use m31r_model::{DeviceSpec, ModelConfig};
use m31r_protocol::socket::default_socket_path;

/// Everything `m31rd` can be configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Release bundle directory to load.
    pub bundle: Option<PathBuf>,
    /// Socket path; default `$XDG_RUNTIME_DIR/m31r/m31rd.sock`.
    pub socket: Option<PathBuf>,
    /// Weight precision in memory (`f32`, `f16`, `q8_0`, `q4_0`, `q4_k`); unset: the bundle's
    /// own. A dense bundle served quantized is quantized at start-up; a quantized bundle is
    /// served only at its own precision.
    pub precision: Option<Precision>,
    /// Device the model runs on: `cpu` (default) or `cuda[:N]` (a binary built with the `cuda`
    /// feature, see scripts/cuda-build.sh).
    #[serde(default)]
    pub device: DeviceSpec,
    /// Memory budget in MiB for the weights plus the prefix cache; a model that would exceed it
    /// is refused at start-up with the quantized variants that fit. 0 = no limit.
    pub memory_budget_mb: usize,
    /// Compute threads (0 = all cores): a cap; the kernels use fewer while other processes keep
    /// the cores busy (`M31R_ADAPTIVE_THREADS=0` in the environment: always this many).
    pub threads: usize,
    /// Jobs that may wait for the engine.
    pub queue_len: usize,
    /// Simultaneous client connections; when all are taken, the longest-idle one is closed to
    /// admit a new one.
    pub max_connections: usize,
    /// Milliseconds after which a connection that exchanges nothing, with no request in flight,
    /// is closed (0 = never).
    pub idle_timeout_ms: u64,
    /// Largest request frame in bytes.
    pub max_frame_bytes: usize,
    /// Prompt tokens per prefill chunk (cancellation is checked between chunks).
    pub prefill_chunk: usize,
    /// Prefix-cache memory budget in MiB.
    pub cache_budget_mb: usize,
    /// Most cached sequences.
    pub max_cache_entries: usize,
    /// Token healing of `complete` and `fim` prompts that end inside a token (docs/protocol.md).
    pub token_healing: bool,
    /// Recall: what followed earlier occurrences of the last tokens in the prompt, mixed into
    /// the model's next-token distribution (docs/eval.md, "Recall"); `off` or
    /// `ORDER,WEIGHT,HALF`.
    pub recall: m31r_model::recall::RecallParams,
    /// Log file; default stderr.
    pub log_file: Option<PathBuf>,
    /// Log filter (`tracing` syntax), e.g. `info` or `m31r_daemon=debug`.
    pub log: String,
    /// The optional localhost HTTP API (`[daemon.http]`).
    pub http: HttpConfig,
}

/// The HTTP API (docs/http.md): off by default, loopback only unless explicitly allowed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve HTTP at all.
    pub enabled: bool,
    /// Address to listen on; port 0 picks a free port (see `addr_file`).
    pub bind: SocketAddr,
    /// Permit a `bind` address that is not loopback (logged as a warning): anyone who can reach
    /// it can use the model, as there is no authentication.
    pub allow_non_loopback: bool,
    /// Host names accepted in the `Host` header besides `localhost`, `127.0.0.1`, `[::1]` and the
    /// bound address (DNS-rebinding protection).
    pub allowed_hosts: Vec<String>,
    /// Browser origins (`scheme://host[:port]`) allowed to call the API, with CORS headers for
    /// them; requests carrying any other `Origin` are refused.
    pub allowed_origins: Vec<String>,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Time a client has to send a request's headers, in milliseconds.
    pub header_timeout_ms: u64,
    /// Time a client has to send a request's body, in milliseconds.
    pub body_timeout_ms: u64,
    /// Once listening, write the bound address (`IP:PORT` and a newline) to this file.
    pub addr_file: Option<PathBuf>,
}

/// The HTTP API's default port (unassigned by IANA).
pub const DEFAULT_HTTP_PORT: u16 = 8731;

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_HTTP_PORT)),
            allow_non_loopback: false,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            max_body_bytes: m31r_protocol::MAX_FRAME_BYTES,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            addr_file: None,
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        let engine = EngineConfig::default();
        Self {
            bundle: None,
            socket: None,
            precision: None,
            device: DeviceSpec::Cpu,
            // The serving spec's ceiling (8 GB of accelerator memory), applied to RAM on a CPU.
            memory_budget_mb: 8192,
            threads: 0,
            queue_len: engine.queue_len,
            max_connections: 64,
            idle_timeout_ms: 300_000,
            max_frame_bytes: m31r_protocol::MAX_FRAME_BYTES,
            prefill_chunk: engine.prefill_chunk,
            cache_budget_mb: engine.cache_budget_bytes >> 20,
            max_cache_entries: engine.max_cache_entries,
            token_healing: engine.token_healing,
            recall: engine.recall,
            log_file: None,
            log: "info".into(),
            http: HttpConfig::default(),
        }
    }
}

/// Keys accepted from `M31R_*` variables (others, like `M31R_SLOW_TESTS`, belong to other tools);
/// a double underscore reaches into a table: `M31R_HTTP__ENABLED` sets `http.enabled`.
const ENV_KEYS: &[&str] = &[
    "bundle",
    "socket",
    "precision",
    "device",
    "memory_budget_mb",
    "threads",
    "queue_len",
    "max_connections",
    "idle_timeout_ms",
    "max_frame_bytes",
    "prefill_chunk",
    "cache_budget_mb",
    "max_cache_entries",
    "token_healing",
    "recall",
    "log_file",
    "log",
    "http.enabled",
    "http.bind",
    "http.allow_non_loopback",
    "http.allowed_hosts",
    "http.allowed_origins",
    "http.max_body_bytes",
    "http.header_timeout_ms",
    "http.body_timeout_ms",
    "http.addr_file",
];

impl DaemonConfig {
    /// Resolves the layers; `file` overrides the default config-file location, `flags` are the
    /// command-line overrides (only keys that were given).
    pub fn resolve(
        file: Option<&Path>,
        flags: impl Serialize,
    ) -> Result<Self, Box<figment::Error>> {
        let file = file.map(Path::to_path_buf).or_else(default_config_file);
        let mut figment = Figment::from(Serialized::defaults(DaemonConfig::default()));
        if let Some(file) = file {
            figment = figment.merge(Figment::from(Toml::file(file)).focus("daemon"));
        }
        figment
            .merge(Env::prefixed("M31R_").split("__").only(ENV_KEYS))
            .merge(Serialized::defaults(flags))
            .extract()
            .map_err(Box::new)
    }

    /// The socket path, with the protocol's default ([`default_socket_path`]).
    pub fn socket_path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(default_socket_path)
    }

    /// The socket server's limits on connections.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            max_frame_bytes: self.max_frame_bytes,
            idle_timeout: (self.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(self.idle_timeout_ms)),
        }
    }

    /// The engine's part of the config.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            queue_len: self.queue_len,
            prefill_chunk: self.prefill_chunk,
            cache_budget_bytes: self.cache_budget_mb << 20,
            max_cache_entries: self.max_cache_entries,
            token_healing: self.token_healing,
            recall: self.recall,
            ..EngineConfig::default()
        }
    }
}

/// Checks that `model` at `precision`, plus the prefix-cache budget, fits `memory_budget_mb`;
/// the refusal says what each smaller precision would need and how to get it.
pub fn check_memory_budget(
    model: &ModelConfig,
    precision: Precision,
    cache_budget_mb: usize,
    memory_budget_mb: usize,
) -> Result<(), String> {
    if memory_budget_mb == 0 {
        return Ok(());
    }
    let mib = |bytes: u64| bytes.div_ceil(1 << 20);
    let need = |p: Precision| mib(p.weight_bytes(model)) + cache_budget_mb as u64;
    if need(precision) <= memory_budget_mb as u64 {
        return Ok(());
    }
    let fitting: Vec<String> = [Precision::Q8_0, Precision::Q4K, Precision::Q4_0]
        .into_iter()
        .filter(|&p| p != precision && need(p) <= memory_budget_mb as u64)
        .map(|p| format!("{p} ({} MiB)", need(p)))
        .collect();
    let advice = match fitting.first() {
        Some(_) => format!(
            "serve a quantized variant that fits: {} — export it with `m31r-train export \
             --quantize {}` (fast start-up), or set precision = \"{}\" to quantize at start-up",
            fitting.join(", "),
            fitting[0].split(' ').next().unwrap_or("q8_0"),
            fitting[0].split(' ').next().unwrap_or("q8_0"),
        ),
        None => "no quantized variant fits either; raise memory_budget_mb or lower \
                 cache_budget_mb"
            .to_string(),
    };
    Err(format!(
        "the model needs {} MiB at {precision} ({} MiB of weights + {cache_budget_mb} MiB of \
         prefix cache), over memory_budget_mb = {memory_budget_mb}; {advice}",
        need(precision),
        mib(precision.weight_bytes(model)),
    ))
}

/// `~/.config/m31r/m31r.toml` (platform equivalent), if a home directory is known.
pub fn default_config_file() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "m31r").map(|d| d.config_dir().join("m31r.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        threads: Option<usize>,
    }

    #[test]
    fn layers_apply_in_order_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m31r.toml");
        std::fs::write(&file, "[daemon]\nthreads = 3\nqueue_len = 5\n[lsp]\nwhatever = 1\n")
            .unwrap();
        let c = DaemonConfig::resolve(Some(&file), Flags { threads: None }).unwrap();
        assert_eq!((c.threads, c.queue_len, c.max_connections), (3, 5, 64));
        let c = DaemonConfig::resolve(Some(&file), Flags { threads: Some(1) }).unwrap();
        assert_eq!(c.threads, 1);
        std::fs::write(&file, "[daemon]\nthread = 3\n").unwrap();
        let err = DaemonConfig::resolve(Some(&file), Flags { threads: None }).unwrap_err();
        assert!(err.to_string().contains("thread"), "{err}");
    }

    #[test]
    fn the_http_table_is_optional_partial_and_strict() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m31r.toml");
        let resolve = |text: &str| {
            std::fs::write(&file, text).unwrap();
            DaemonConfig::resolve(Some(&file), Flags { threads: None })
        };
        assert_eq!(resolve("[daemon]\n").unwrap().http, HttpConfig::default());
        let c = resolve("[daemon.http]\nenabled = true\nbind = \"127.0.0.1:0\"\n").unwrap();
        assert!(c.http.enabled);
        assert_eq!(c.http.bind.port(), 0);
        assert_eq!(c.http.max_body_bytes, HttpConfig::default().max_body_bytes);
        let c = resolve("[daemon]\nhttp = { enabled = true }\n").unwrap();
        assert!(c.http.enabled);
        let err = resolve("[daemon.http]\nenable = true\n").unwrap_err();
        assert!(err.to_string().contains("enable"), "{err}");
        let err = resolve("[daemon.http]\nbind = \"localhost\"\n").unwrap_err();
        assert!(err.to_string().contains("bind"), "{err}");
    }

    #[test]
    fn device_defaults_to_the_cpu_and_takes_cuda_names() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m31r.toml");
        std::fs::write(&file, "[daemon]\n").unwrap();
        let c = DaemonConfig::resolve(Some(&file), Flags { threads: None }).unwrap();
        assert_eq!(c.device, DeviceSpec::Cpu);
        std::fs::write(&file, "[daemon]\ndevice = \"cuda:1\"\n").unwrap();
        let c = DaemonConfig::resolve(Some(&file), Flags { threads: None }).unwrap();
        assert_eq!(c.device, DeviceSpec::Cuda(1));
        std::fs::write(&file, "[daemon]\ndevice = \"gpu\"\n").unwrap();
        let err = DaemonConfig::resolve(Some(&file), Flags { threads: None }).unwrap_err();
        assert!(err.to_string().contains("\"gpu\""), "{err}");
    }

    #[test]
    fn precision_is_the_bundles_unless_set_and_takes_quantized_names() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m31r.toml");
        std::fs::write(&file, "[daemon]\n").unwrap();
        let c = DaemonConfig::resolve(Some(&file), Flags { threads: None }).unwrap();
        assert_eq!(c.precision, None);
        std::fs::write(&file, "[daemon]\nprecision = \"q4_k\"\n").unwrap();
        let c = DaemonConfig::resolve(Some(&file), Flags { threads: None }).unwrap();
        assert_eq!(c.precision, Some(Precision::Q4K));
        std::fs::write(&file, "[daemon]\nprecision = \"int3\"\n").unwrap();
        assert!(DaemonConfig::resolve(Some(&file), Flags { threads: None }).is_err());
    }

    #[test]
    fn over_budget_models_are_refused_with_the_variant_that_fits() {
        let small = ModelConfig::preset("small").unwrap();
        let f32_mib = Precision::F32.weight_bytes(&small) >> 20;
        let q8_mib = Precision::Q8_0.weight_bytes(&small) >> 20;
        // Room for q8_0 weights and a 16 MiB cache, not for f32.
        let budget = (q8_mib + 20) as usize;
        assert!(f32_mib + 16 > budget as u64);
        let err = check_memory_budget(&small, Precision::F32, 16, budget).unwrap_err();
        assert!(err.contains("--quantize q8_0") && err.contains("precision = \"q8_0\""), "{err}");
        assert!(check_memory_budget(&small, Precision::Q8_0, 16, budget).is_ok());
        assert!(check_memory_budget(&small, Precision::F32, 16, 0).is_ok());
        let err = check_memory_budget(&small, Precision::F32, 16, 10).unwrap_err();
        assert!(err.contains("no quantized variant fits"), "{err}");
    }

    /// Every key of the config, tables included, as `table.key` paths.
    fn key_paths(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(table) = value {
            for (key, value) in table {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                if value.is_table() {
                    key_paths(value, &path, out);
                } else {
                    out.push(path);
                }
            }
        }
    }

    #[test]
    fn env_keys_name_every_key_and_the_example_documents_the_http_table() {
        let every_key = DaemonConfig {
            bundle: Some("b".into()),
            precision: Some(Precision::Q8_0),
            socket: Some("s".into()),
            log_file: Some("l".into()),
            http: HttpConfig { addr_file: Some("a".into()), ..HttpConfig::default() },
            ..DaemonConfig::default()
        };
        let mut paths = Vec::new();
        key_paths(&toml::Value::try_from(&every_key).unwrap(), "", &mut paths);
        paths.sort();
        let mut env: Vec<String> = ENV_KEYS.iter().map(|k| k.to_string()).collect();
        env.sort();
        assert_eq!(env, paths, "ENV_KEYS must list every config key");

        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/daemon/m31r.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let (_, table) = text.split_once("\n[daemon.http]\n").expect("a [daemon.http] table");
        for key in paths.iter().filter_map(|p| p.strip_prefix("http.")) {
            let (set, unset) = (format!("\n{key} = "), format!("\n# {key} = "));
            assert!(table.contains(&set) || table.contains(&unset), "{path} lacks http.{key}");
        }
    }
}
