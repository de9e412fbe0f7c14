//! The data-stage settings of a training config file (`configs/train/<preset>.toml`): corpus
//! filters, split ratios, tokenizer vocabulary and shard size, and (in [`train`]) the loop's
//! `[train]` table. Unknown keys are errors. A leaf: the stages read these types, never the
//! other way round.

use std::path::{Path, PathBuf};

use m31r_model::config::ModelConfig;
use m31r_model::tokenizer::MIN_VOCAB_SIZE;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, invalid, io_err};

pub mod train;

pub use train::{OptimizerKind, Schedule, TrainConfig, TrainPrecision};

/// The shipped configs, embedded so the binary works from any directory: one per model preset
/// it is named after, plus `cpu` (the tiny shape trained for the best model a 2-core CPU makes in
/// under 3 hours).
const PRESETS: [(&str, &str); 3] = [
    ("tiny", include_str!("../../configs/train/tiny.toml")),
    ("small", include_str!("../../configs/train/small.toml")),
    ("cpu", include_str!("../../configs/train/cpu.toml")),
];

/// Names of the presets [`DataConfig::load`] accepts instead of a file path.
pub fn preset_names() -> impl Iterator<Item = &'static str> {
    PRESETS.iter().map(|(name, _)| *name)
}

/// A training config file as far as the data stages are concerned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Model preset this run trains (`tiny`, `small`, `medium`, `large`); its vocabulary size is
    /// the tokenizer's unless `[tokenizer] vocab_size` says otherwise.
    pub model: String,
    /// Corpus filters.
    #[serde(default)]
    pub corpus: CorpusConfig,
    /// Train/validation/test split.
    #[serde(default)]
    pub split: SplitConfig,
    /// Tokenizer training.
    #[serde(default)]
    pub tokenizer: TokenizerConfig,
    /// Token shards.
    #[serde(default)]
    pub shards: ShardConfig,
    /// The training loop.
    #[serde(default)]
    pub train: TrainConfig,
}

/// Thresholds of the corpus filters (see [`crate::filters`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorpusConfig {
    /// Files larger than this many bytes are dropped as `huge_file`.
    pub max_file_bytes: u64,
    /// Files with a line longer than this many characters are dropped as `huge_line`.
    pub max_line_chars: usize,
    /// How many leading lines are searched for a "generated, do not edit" header.
    pub header_lines: usize,
    /// A file whose share of data lines (see [`crate::filters::is_data_line`]) among its
    /// non-blank lines exceeds this is dropped as `table_dump`…
    pub max_data_line_share: f64,
    /// …provided it has at least this many data lines, so a short file with one small table
    /// is kept.
    pub min_data_lines: usize,
    /// In a `-sys` crate, a file whose share of bare FFI declarations among its non-blank lines
    /// exceeds this is dropped as `sys_bindings`…
    pub max_sys_decl_share: f64,
    /// …provided it has at least this many declaration lines.
    pub min_sys_decl_lines: usize,
}

impl Default for CorpusConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: 1_000_000,
            max_line_chars: 1000,
            header_lines: 20,
            max_data_line_share: 0.5,
            min_data_lines: 20,
            max_sys_decl_share: 0.5,
            min_sys_decl_lines: 30,
        }
    }
}

/// Shares of crates that go to validation and test; the rest is train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// Share of crates in the validation split.
    pub validation: f64,
    /// Share of crates in the test split.
    pub test: f64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self { validation: 0.05, test: 0.05 }
    }
}

/// Tokenizer training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerConfig {
    /// Vocabulary size, special tokens included; the model preset's when absent.
    pub vocab_size: Option<usize>,
    /// Cap on the train-split bytes the BPE trainer sees; documents are taken in sha256 order,
    /// a deterministic sample that does not favour crates early in the alphabet.
    pub max_train_bytes: u64,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self { vocab_size: None, max_train_bytes: 256 << 20 }
    }
}

/// Packed shard settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardConfig {
    /// A shard holds at most this many tokens; documents never straddle shards, so one
    /// document longer than this gets a shard of its own.
    pub shard_tokens: u64,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self { shard_tokens: 1 << 24 }
    }
}

impl DataConfig {
    /// Loads `spec`: a path to a TOML file, or the name of a shipped preset (`tiny`, `small`)
    /// when no such file exists.
    pub fn load(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            return Self::from_file(path);
        }
        match PRESETS.iter().find(|(name, _)| *name == spec) {
            Some((name, text)) => Self::parse(text, Path::new(&format!("<preset {name}>"))),
            None => Err(Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "no such config file, and not a preset name ({})",
                        preset_names().collect::<Vec<_>>().join(", ")
                    ),
                ),
            }),
        }
    }

    /// Loads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let config: Self = toml::from_str(text).map_err(|e| invalid(origin, e.to_string()))?;
        config.validate(origin)?;
        Ok(config)
    }

    /// The built-in `tiny` preset.
    pub fn tiny() -> Self {
        // The embedded preset is checked by a test; this cannot fail in a released build.
        Self::load("tiny").unwrap_or_else(|_| Self {
            model: "tiny".into(),
            corpus: CorpusConfig::default(),
            split: SplitConfig::default(),
            tokenizer: TokenizerConfig::default(),
            shards: ShardConfig::default(),
            train: TrainConfig::default(),
        })
    }

    /// The tokenizer vocabulary size: the explicit one, else the model preset's.
    pub fn vocab_size(&self) -> Result<usize> {
        match self.tokenizer.vocab_size {
            Some(n) => Ok(n),
            None => ModelConfig::preset(&self.model)
                .map(|c| c.vocab_size())
                .map_err(|e| invalid(PathBuf::from("<config>"), e.to_string())),
        }
    }

    fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |key: &str, why: &str| Err(invalid(origin, format!("{key}: {why}")));
        if let Err(e) = ModelConfig::preset(&self.model) {
            return bad("model", &e.to_string());
        }
        let c = &self.corpus;
        if c.max_file_bytes == 0 || c.max_line_chars == 0 {
            return bad("corpus", "max_file_bytes and max_line_chars must be positive");
        }
        for (key, v) in [
            ("corpus.max_data_line_share", c.max_data_line_share),
            ("corpus.max_sys_decl_share", c.max_sys_decl_share),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(key, "must be between 0 and 1");
            }
        }
        let s = &self.split;
        if !(0.0..1.0).contains(&s.validation)
            || !(0.0..1.0).contains(&s.test)
            || s.validation + s.test >= 1.0
        {
            return bad("split", "validation and test must be in [0, 1) and sum to less than 1");
        }
        if let Some(n) = self.tokenizer.vocab_size
            && !(MIN_VOCAB_SIZE..=u32::MAX as usize).contains(&n)
        {
            return bad("tokenizer.vocab_size", &format!("must be at least {MIN_VOCAB_SIZE}"));
        }
        if self.tokenizer.max_train_bytes == 0 {
            return bad("tokenizer.max_train_bytes", "must be positive");
        }
        if self.shards.shard_tokens == 0 {
            return bad("shards.shard_tokens", "must be positive");
        }
        Ok(())
    }
}
