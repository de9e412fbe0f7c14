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

    /// The full Hugging Face name of this weight in block `layer`.
    pub fn name(&self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.suffix)
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
    let (layer, suffix) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let weight = LAYER.iter().find(|w| w.suffix == suffix)?;
    Some(format!("blk.{layer}.{}.weight", weight.gguf))
}
