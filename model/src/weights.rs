//! Every weight of the model, named once: Hugging Face LLaMA names and their shapes for a config,
//! the table that initialisation, loading, quantization and the bundle all read.

use crate::config::ModelConfig;

/// Names and shapes of every weight, in Hugging Face LLaMA naming; the single source of truth for
/// initialisation, loading and bundle validation.
pub fn weight_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let d = config.d_model();
    let kv = config.n_kv_heads() * config.head_dim();
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![config.vocab_size(), d])];
    for i in 0..config.n_layers() {
        let p = format!("model.layers.{i}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![d]),
            (format!("{p}.self_attn.q_proj.weight"), vec![d, d]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, d]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, d]),
            (format!("{p}.self_attn.o_proj.weight"), vec![d, d]),
            (format!("{p}.post_attention_layernorm.weight"), vec![d]),
            (format!("{p}.mlp.gate_proj.weight"), vec![config.d_ff(), d]),
            (format!("{p}.mlp.up_proj.weight"), vec![config.d_ff(), d]),
            (format!("{p}.mlp.down_proj.weight"), vec![d, config.d_ff()]),
        ]);
    }
    shapes.push(("model.norm.weight".to_string(), vec![d]));
    if !config.tie_embeddings() {
        shapes.push(("lm_head.weight".to_string(), vec![config.vocab_size(), d]));
    }
    shapes
}
