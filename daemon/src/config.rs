//! Daemon configuration (DESIGN §7): built-in defaults < `~/.config/m31r/m31r.toml` (its `[daemon]`
//! table) < `M31R_*` environment variables < command-line flags. Unknown keys are errors.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;

/// Weight precision in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats (exact).
    F32,
    /// 16-bit floats (half the memory; on this CPU no faster).
    F16,
}

/// Everything `m31rd` can be configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Release bundle directory to load.
    pub bundle: Option<PathBuf>,
    /// Socket path; default `$XDG_RUNTIME_DIR/m31r/m31rd.sock`.
    pub socket: Option<PathBuf>,
    /// Weight precision.
    pub precision: Precision,
    /// Compute threads (0 = all cores).
    pub threads: usize,
    /// Jobs that may wait for the engine.
    pub queue_len: usize,
    /// Simultaneous client connections.
    pub max_connections: usize,
    /// Largest request frame in bytes.
    pub max_frame_bytes: usize,
    /// Prompt tokens per prefill chunk (cancellation is checked between chunks).
    pub prefill_chunk: usize,
    /// Prefix-cache memory budget in MiB.
    pub cache_budget_mb: usize,
    /// Most cached sequences.
    pub max_cache_entries: usize,
    /// Log file; default stderr.
    pub log_file: Option<PathBuf>,
    /// Log filter (`tracing` syntax), e.g. `info` or `m31r_daemon=debug`.
    pub log: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        let engine = EngineConfig::default();
        Self {
            bundle: None,
            socket: None,
            precision: Precision::F32,
            threads: 0,
            queue_len: engine.queue_len,
            max_connections: 64,
            max_frame_bytes: m31r_protocol::MAX_FRAME_BYTES,
            prefill_chunk: engine.prefill_chunk,
            cache_budget_mb: engine.cache_budget_bytes >> 20,
            max_cache_entries: engine.max_cache_entries,
            log_file: None,
            log: "info".into(),
        }
    }
}

/// Keys accepted from `M31R_*` variables (others, like `M31R_SLOW_TESTS`, belong to other tools).
const ENV_KEYS: &[&str] = &[
    "bundle",
    "socket",
    "precision",
    "threads",
    "queue_len",
    "max_connections",
    "max_frame_bytes",
    "prefill_chunk",
    "cache_budget_mb",
    "max_cache_entries",
    "log_file",
    "log",
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
            .merge(Env::prefixed("M31R_").only(ENV_KEYS))
            .merge(Serialized::defaults(flags))
            .extract()
            .map_err(Box::new)
    }

    /// The socket path, with the documented default.
    pub fn socket_path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(default_socket_path)
    }

    /// The engine's part of the config.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            queue_len: self.queue_len,
            prefill_chunk: self.prefill_chunk,
            cache_budget_bytes: self.cache_budget_mb << 20,
            max_cache_entries: self.max_cache_entries,
            ..EngineConfig::default()
        }
    }
}

/// `~/.config/m31r/m31r.toml` (platform equivalent), if a home directory is known.
pub fn default_config_file() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "m31r").map(|d| d.config_dir().join("m31r.toml"))
}

/// `$XDG_RUNTIME_DIR/m31r/m31rd.sock`, else a per-user directory under the cache dir.
pub fn default_socket_path() -> PathBuf {
    let dirs = directories::ProjectDirs::from("", "", "m31r");
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| PathBuf::from(d).join("m31r"))
        .or_else(|| dirs.as_ref().map(|d| d.cache_dir().join("run")))
        .unwrap_or_else(|| std::env::temp_dir().join(format!("m31r-{}", current_uid())));
    dir.join("m31rd.sock")
}

/// The real user id of this process.
pub fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
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
}
