//! Every weight of the model, named once: Hugging Face LLaMA names, their llama.cpp (GGUF) names
//! and their shapes for a config — the table that initialisation, loading, `named_tensors`,
//! quantization, the bundle and the GGUF writer all read.

use crate::config::ModelConfig;

/// The token embedding (also the LM head when the embeddings are tied).
pub const EMBEDDING: &str = "model.embed_tokens.weight";
/// The final RMSNorm's scale.
pub const FINAL_NORM: &str = "model.norm.weight";
/// The untied LM head.
pub const LM_HEAD: &str = "lm_head.weight";
/// Where the blocks' weights live: block `i`'s are under `model.layers.{i}.`.
const LAYERS: &str = "model.layers";

/// The module path of a weight: its name without the trailing `.weight`, the prefix a loader
/// reads the weight under.
pub fn module(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

/// The module path of block `layer` (the prefix of its [`LAYER`] weights).
pub fn layer_module(layer: usize) -> String {
    format!("{LAYERS}.{layer}")
}

/// Indices into [`LAYER`], so that code naming one weight of a block reads it from the table.
pub mod layer {
    /// The attention's input RMSNorm.
    pub const ATTN_NORM: usize = 0;
    /// Query projection.
    pub const Q: usize = 1;
    /// Key projection.
    pub const K: usize = 2;
    /// Value projection.
    pub const V: usize = 3;
    /// Attention output projection.
    pub const O: usize = 4;
    /// The feed-forward's input RMSNorm.
    pub const FFN_NORM: usize = 5;
    /// SwiGLU gate projection.
    pub const GATE: usize = 6;
    /// SwiGLU up projection.
    pub const UP: usize = 7;
    /// Feed-forward down projection.
    pub const DOWN: usize = 8;
}

/// One weight of a block: its name under `model.layers.{i}.`, its GGUF name under `blk.{i}.`, and
/// its `(rows, cols)` for a config (one dimension for a norm).
#[derive(Debug, Clone, Copy)]
pub struct LayerWeight {
    /// Name after `model.layers.{i}.`.
    pub suffix: &'static str,
    /// llama.cpp's name after `blk.{i}.` (before `.weight`).
    pub gguf: &'static str,
    dims: &'static [Dim],
}

/// A dimension of a weight, read from the config.
#[derive(Debug, Clone, Copy)]
enum Dim {
    Model,
    KeyValue,
    FeedForward,
}

impl Dim {
    fn of(self, config: &ModelConfig) -> usize {
        match self {
            Dim::Model => config.d_model(),
            Dim::KeyValue => config.n_kv_heads() * config.head_dim(),
            Dim::FeedForward => config.d_ff(),
        }
    }
}

impl LayerWeight {
    /// The weight's shape for `config`.
    pub fn shape(&self, config: &ModelConfig) -> Vec<usize> {
        self.dims.iter().map(|d| d.of(config)).collect()
    }

    /// The `(rows, cols)` of a matrix weight for `config` (a norm's one dimension is `(n, 1)`).
    pub fn matrix(&self, config: &ModelConfig) -> (usize, usize) {
        let dim = |i: usize| self.dims.get(i).map_or(1, |d| d.of(config));
        (dim(0), dim(1))
    }

    /// The weight's module path under its block: [`module`] of its suffix.
    pub fn module(&self) -> &'static str {
        module(self.suffix)
    }

    /// The full Hugging Face name of this weight in block `layer`.
    pub fn name(&self, layer: usize) -> String {
        format!("{}.{}", layer_module(layer), self.suffix)
    }
}

/// The weights of one block, in the order of [`weight_shapes`].
pub const LAYER: [LayerWeight; 9] = [
    LayerWeight { suffix: "input_layernorm.weight", gguf: "attn_norm", dims: &[Dim::Model] },
    LayerWeight {
        suffix: "self_attn.q_proj.weight",
        gguf: "attn_q",
        dims: &[Dim::Model, Dim::Model],
    },
    LayerWeight {
        suffix: "self_attn.k_proj.weight",
        gguf: "attn_k",
        dims: &[Dim::KeyValue, Dim::Model],
    },
    LayerWeight {
        suffix: "self_attn.v_proj.weight",
        gguf: "attn_v",
        dims: &[Dim::KeyValue, Dim::Model],
    },
    LayerWeight {
        suffix: "self_attn.o_proj.weight",
        gguf: "attn_output",
        dims: &[Dim::Model, Dim::Model],
    },
    LayerWeight {
        suffix: "post_attention_layernorm.weight",
        gguf: "ffn_norm",
        dims: &[Dim::Model],
    },
    LayerWeight {
        suffix: "mlp.gate_proj.weight",
        gguf: "ffn_gate",
        dims: &[Dim::FeedForward, Dim::Model],
    },
    LayerWeight {
        suffix: "mlp.up_proj.weight",
        gguf: "ffn_up",
        dims: &[Dim::FeedForward, Dim::Model],
    },
    LayerWeight {
        suffix: "mlp.down_proj.weight",
        gguf: "ffn_down",
        dims: &[Dim::Model, Dim::FeedForward],
    },
];

/// Names and shapes of every weight, in Hugging Face LLaMA naming and a fixed order (embedding,
/// each block's [`LAYER`] weights, final norm, untied head); the single source of truth for
/// initialisation, loading and bundle validation.
pub fn weight_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let table = vec![config.vocab_size(), config.d_model()];
    let mut shapes = vec![(EMBEDDING.to_string(), table.clone())];
    for i in 0..config.n_layers() {
        shapes.extend(LAYER.iter().map(|w| (w.name(i), w.shape(config))));
    }
    shapes.push((FINAL_NORM.to_string(), vec![config.d_model()]));
    if !config.tie_embeddings() {
        shapes.push((LM_HEAD.to_string(), table));
    }
    shapes
}

/// The llama.cpp name of a Hugging Face LLaMA tensor name, `None` for a name not in the table.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        EMBEDDING => return Some("token_embd.weight".into()),
        FINAL_NORM => return Some("output_norm.weight".into()),
        LM_HEAD => return Some("output.weight".into()),
        _ => {}
    }
    let (layer, suffix) = hf.strip_prefix(LAYERS)?.strip_prefix('.')?.split_once('.')?;
    let weight = LAYER.iter().find(|w| w.suffix == suffix)?;
    Some(format!("blk.{layer}.{}.weight", weight.gguf))
}
