//! Model configuration: the serde boundary type, its validated form, and the named presets.

use serde::{Deserialize, Serialize};

pub use crate::params::MAX_PARAMS;
use crate::params::{self, ParamRow, ParamTable, SolverSpec};

pub use crate::tokenizer::MIN_VOCAB_SIZE as MIN_VOCAB;

/// Why a model configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field has a value the model cannot be built with.
    #[error("invalid model config: {field} = {value}: {reason}")]
    Invalid {
        /// The offending key.
        field: &'static str,
        /// Its value, as written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The config text could not be parsed (syntax, wrong type, unknown key).
    #[error("cannot parse model config: {0}")]
    Parse(String),
    /// A preset name that does not exist.
    #[error("unknown model preset {0:?} (known presets: tiny, small, medium, large)")]
    UnknownPreset(String),
    /// The parameter-budget solver found no shape for the requested budget.
    #[error(transparent)]
    Solver(#[from] params::SolverError),
}

/// The model config as written in `config.yaml` and `configs/`: every key checked, unknown keys refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelConfig {
    /// Vocabulary size, special tokens included.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to `n_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_heads: Option<usize>,
    /// Hidden width of the SwiGLU feed-forward block.
    pub d_ff: usize,
    /// Longest sequence (prompt + generated tokens) the model serves.
    pub context_length: usize,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Whether the LM head shares the token embedding matrix.
    #[serde(default = "default_tied")]
    pub tie_embeddings: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_tied() -> bool {
    true
}

/// A validated model configuration; [`ModelConfig::new`] is the only way to get one from raw values.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    vocab_size: usize,
    d_model: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    d_ff: usize,
    context_length: usize,
    rope_theta: f64,
    norm_eps: f64,
    tie_embeddings: bool,
}

fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, value: value.to_string(), reason: reason.into() }
}

impl ModelConfig {
    /// Validates a raw config: positive sizes, heads that divide the width, an even head size (RoPE
    /// rotates pairs), at most [`MAX_PARAMS`] parameters.
    pub fn new(raw: &RawModelConfig) -> Result<Self, ConfigError> {
        let n_kv_heads = raw.n_kv_heads.unwrap_or(raw.n_heads);
        for (field, value) in [
            ("d_model", raw.d_model),
            ("n_layers", raw.n_layers),
            ("n_heads", raw.n_heads),
            ("n_kv_heads", n_kv_heads),
            ("d_ff", raw.d_ff),
        ] {
            if value == 0 {
                return Err(invalid(field, value, "must be positive"));
            }
        }
        if raw.vocab_size < MIN_VOCAB {
            return Err(invalid(
                "vocab_size",
                raw.vocab_size,
                format!("must be at least {MIN_VOCAB} (256 byte tokens + 8 specials)"),
            ));
        }
        if raw.vocab_size > u32::MAX as usize {
            return Err(invalid("vocab_size", raw.vocab_size, "does not fit a u32 token id"));
        }
        if !raw.d_model.is_multiple_of(raw.n_heads) {
            return Err(invalid(
                "n_heads",
                raw.n_heads,
                format!("must divide d_model = {}", raw.d_model),
            ));
        }
        if !(raw.d_model / raw.n_heads).is_multiple_of(2) {
            return Err(invalid(
                "n_heads",
                raw.n_heads,
                format!(
                    "head size d_model / n_heads = {} must be even for RoPE",
                    raw.d_model / raw.n_heads
                ),
            ));
        }
        if !raw.n_heads.is_multiple_of(n_kv_heads) {
            return Err(invalid(
                "n_kv_heads",
                n_kv_heads,
                format!("must divide n_heads = {}", raw.n_heads),
            ));
        }
        if raw.context_length < 16 {
            return Err(invalid("context_length", raw.context_length, "must be at least 16"));
        }
        if !(raw.rope_theta.is_finite() && raw.rope_theta > 1.0) {
            return Err(invalid("rope_theta", raw.rope_theta, "must be a finite number above 1"));
        }
        if !(raw.norm_eps > 0.0 && raw.norm_eps < 0.1) {
            return Err(invalid("norm_eps", raw.norm_eps, "must be in (0, 0.1)"));
        }
        let config = Self {
            vocab_size: raw.vocab_size,
            d_model: raw.d_model,
            n_layers: raw.n_layers,
            n_heads: raw.n_heads,
            n_kv_heads,
            d_ff: raw.d_ff,
            context_length: raw.context_length,
            rope_theta: raw.rope_theta,
            norm_eps: raw.norm_eps,
            tie_embeddings: raw.tie_embeddings,
        };
        let total = config.param_count();
        if total > MAX_PARAMS {
            return Err(invalid(
                "d_model/n_layers/d_ff",
                format!("{} parameters", total),
                format!("models above {MAX_PARAMS} parameters are not supported"),
            ));
        }
        Ok(config)
    }

    /// Parses and validates YAML (the bundle's `config.yaml`); unknown keys are errors.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let raw: RawModelConfig =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Self::new(&raw)
    }

    /// Resolves a named preset (`tiny`, `small`, `medium`, `large`) through the parameter solver.
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let preset =
            Preset::by_name(name).ok_or_else(|| ConfigError::UnknownPreset(name.into()))?;
        preset.config()
    }

    /// The serde form of this config, for writing.
    pub fn to_raw(&self) -> RawModelConfig {
        RawModelConfig {
            vocab_size: self.vocab_size,
            d_model: self.d_model,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            n_kv_heads: (self.n_kv_heads != self.n_heads).then_some(self.n_kv_heads),
            d_ff: self.d_ff,
            context_length: self.context_length,
            rope_theta: self.rope_theta,
            norm_eps: self.norm_eps,
            tie_embeddings: self.tie_embeddings,
        }
    }

    /// Vocabulary size, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    /// Width of the residual stream.
    pub fn d_model(&self) -> usize {
        self.d_model
    }
    /// Number of transformer blocks.
    pub fn n_layers(&self) -> usize {
        self.n_layers
    }
    /// Number of query heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }
    /// Number of key/value heads.
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
    /// Hidden width of the feed-forward block.
    pub fn d_ff(&self) -> usize {
        self.d_ff
    }
    /// Longest sequence the model serves.
    pub fn context_length(&self) -> usize {
        self.context_length
    }
    /// RoPE base frequency.
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
    }
    /// RMSNorm epsilon.
    pub fn norm_eps(&self) -> f64 {
        self.norm_eps
    }
    /// Whether the LM head is the token embedding.
    pub fn tie_embeddings(&self) -> bool {
        self.tie_embeddings
    }

    /// Exact number of trainable parameters.
    pub fn param_count(&self) -> u64 {
        ParamTable::for_config(self).total
    }

    /// Bytes of KV cache one token occupies, for a cache element size of `dtype_bytes`.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim() * dtype_bytes
    }
}

// Counting a config's parameters belongs with the config: `params` (the solver) then needs
// nothing from here, and `ModelConfig::new` checks the count against the cap.
impl ParamTable {
    /// Counts the parameters of `config` from its shapes (the same shapes the transformer allocates).
    pub fn for_config(config: &ModelConfig) -> Self {
        let d = config.d_model() as u64;
        let kv_dim = (config.n_kv_heads() * config.head_dim()) as u64;
        let layers = config.n_layers() as u64;
        let vocab = config.vocab_size() as u64;
        let attention = 2 * d * d + 2 * d * kv_dim;
        let ffn = 3 * d * config.d_ff() as u64;
        let norms_per_layer = 2 * d;
        let head = if config.tie_embeddings() { 0 } else { vocab * d };
        let parts: [(&'static str, Option<u64>, u64); 5] = [
            ("token embedding", None, vocab * d),
            ("attention", Some(attention), attention * layers),
            ("feed-forward (SwiGLU)", Some(ffn), ffn * layers),
            ("RMSNorm weights", Some(norms_per_layer), norms_per_layer * layers + d),
            ("LM head (untied)", None, head),
        ];
        let total: u64 = parts.iter().map(|p| p.2).sum();
        let rows = parts
            .into_iter()
            .map(|(component, per_layer, count)| ParamRow {
                component,
                per_layer,
                count,
                percent: 100.0 * count as f64 / total as f64,
            })
            .collect();
        Self { rows, total }
    }
}

/// A named model size: the solver inputs that define it plus the context length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    /// Preset name as used on command lines and in `configs/`.
    pub name: &'static str,
    /// What the parameter solver is asked for.
    pub spec: SolverSpec,
    /// Context length of the preset.
    pub context_length: usize,
}

impl Preset {
    /// Every preset, smallest first.
    pub const ALL: [Preset; 4] = [
        Preset {
            name: "tiny",
            spec: SolverSpec {
                target_params: 2_000_000,
                vocab_size: 2048,
                embedding_ratio: 0.15,
                glu_expansion: 8.0 / 3.0,
                head_dim: 32,
                tied: true,
            },
            context_length: 512,
        },
        Preset {
            name: "small",
            spec: SolverSpec {
                target_params: 60_000_000,
                vocab_size: 16384,
                embedding_ratio: 0.15,
                glu_expansion: 8.0 / 3.0,
                head_dim: 64,
                tied: true,
            },
            context_length: 2048,
        },
        Preset {
            name: "medium",
            spec: SolverSpec {
                target_params: 200_000_000,
                vocab_size: 24576,
                embedding_ratio: 0.1,
                glu_expansion: 8.0 / 3.0,
                head_dim: 64,
                tied: true,
            },
            context_length: 4096,
        },
        Preset {
            name: "large",
            spec: SolverSpec {
                target_params: 450_000_000,
                vocab_size: 24576,
                embedding_ratio: 0.07,
                glu_expansion: 8.0 / 3.0,
                head_dim: 64,
                tied: true,
            },
            context_length: 4096,
        },
    ];

    /// Looks a preset up by name.
    pub fn by_name(name: &str) -> Option<Preset> {
        Self::ALL.into_iter().find(|p| p.name == name)
    }

    /// Solves the preset's shape and validates it.
    pub fn config(&self) -> Result<ModelConfig, ConfigError> {
        let shape = params::solve(&self.spec)?;
        ModelConfig::new(&RawModelConfig {
            vocab_size: self.spec.vocab_size,
            d_model: shape.d_model,
            n_layers: shape.n_layers,
            n_heads: shape.d_model / self.spec.head_dim,
            n_kv_heads: None,
            d_ff: shape.d_ff,
            context_length: self.context_length,
            rope_theta: default_rope_theta(),
            norm_eps: default_norm_eps(),
            tie_embeddings: self.spec.tied,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{MIN_ASPECT, SOLVER_TOLERANCE, Shape, solve};

    fn raw() -> RawModelConfig {
        ModelConfig::preset("tiny").unwrap().to_raw()
    }

    #[test]
    fn yaml_round_trip_and_unknown_keys() {
        let text = serde_yaml::to_string(&raw()).unwrap();
        assert_eq!(ModelConfig::from_yaml(&text).unwrap().to_raw(), raw());
        let err = ModelConfig::from_yaml(&format!("{text}dropout: 0.1\n")).unwrap_err();
        assert!(err.to_string().contains("dropout"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        type Mutation = fn(&mut RawModelConfig);
        let cases: [(&str, Mutation); 5] = [
            ("n_heads", |r| r.n_heads = 3),
            ("n_kv_heads", |r| r.n_kv_heads = Some(3)),
            ("vocab_size", |r| r.vocab_size = 100),
            ("d_ff", |r| r.d_ff = 0),
            ("rope_theta", |r| r.rope_theta = f64::NAN),
        ];
        for (field, mutate) in cases {
            let mut r = raw();
            mutate(&mut r);
            let err = ModelConfig::new(&r).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn rejects_models_above_the_cap() {
        let mut r = raw();
        r.vocab_size = 32000;
        r.d_model = 4096;
        r.n_heads = 32;
        r.d_ff = 11008;
        r.n_layers = 32;
        let err = ModelConfig::new(&r).unwrap_err().to_string();
        assert!(err.contains("500000000"), "{err}");
    }

    #[test]
    fn presets_resolve() {
        for p in Preset::ALL {
            let c = p.config().unwrap();
            assert_eq!(c.vocab_size(), p.spec.vocab_size);
            assert!(c.param_count() <= MAX_PARAMS);
        }
        assert!(matches!(ModelConfig::preset("huge"), Err(ConfigError::UnknownPreset(_))));
    }

    fn spec(target: u64, vocab: usize, tied: bool) -> SolverSpec {
        SolverSpec {
            target_params: target,
            vocab_size: vocab,
            embedding_ratio: 0.12,
            glu_expansion: 8.0 / 3.0,
            head_dim: 64,
            tied,
        }
    }

    fn config_of(spec: &SolverSpec, shape: Shape) -> ModelConfig {
        ModelConfig::new(&RawModelConfig {
            vocab_size: spec.vocab_size,
            d_model: shape.d_model,
            n_layers: shape.n_layers,
            n_heads: shape.d_model / spec.head_dim,
            n_kv_heads: None,
            d_ff: shape.d_ff,
            context_length: 2048,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: spec.tied,
        })
        .unwrap()
    }

    fn assert_within(total: u64, target: u64) {
        let err = (total as f64 - target as f64).abs() / target as f64;
        assert!(err <= SOLVER_TOLERANCE, "total {total} vs target {target}: {err}");
    }

    #[test]
    fn targets_are_met_and_tables_sum() {
        for target in [10_000_000, 60_000_000, 200_000_000, 450_000_000] {
            for tied in [true, false] {
                let s = spec(target, 16384, tied);
                let shape = solve(&s).unwrap();
                let table = ParamTable::for_config(&config_of(&s, shape));
                assert_within(table.total, target);
                assert_eq!(table.rows.iter().map(|r| r.count).sum::<u64>(), table.total);
                let pct: f64 = table.rows.iter().map(|r| r.percent).sum();
                assert!((pct - 100.0).abs() < 1e-9);
                assert!(shape.n_layers * MIN_ASPECT <= shape.d_model, "{shape:?}");
            }
        }
    }

    #[test]
    fn presets_are_within_tolerance() {
        for preset in Preset::ALL {
            let config = preset.config().unwrap();
            assert_within(config.param_count(), preset.spec.target_params);
        }
    }

    #[test]
    fn table_prints() {
        let table = ParamTable::for_config(&ModelConfig::preset("tiny").unwrap());
        let text = table.to_string();
        assert!(text.contains("token embedding") && text.contains("total"), "{text}");
        assert_eq!(text.lines().count(), 7);
    }
}
