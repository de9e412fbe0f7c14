//! Shared fixtures: tiny seeded configs and models.

use candle_core::{Device, Tensor};
use m31r_model::{Model, ModelConfig, RawModelConfig};

/// A tiny config; `n_kv_heads < n_heads` exercises grouped-query attention.
pub fn tiny_config(n_kv_heads: usize, tied: bool) -> ModelConfig {
    ModelConfig::new(&RawModelConfig {
        vocab_size: 300,
        d_model: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(n_kv_heads),
        d_ff: 160,
        context_length: 128,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: tied,
    })
    .unwrap()
}

pub fn tiny_model(n_kv_heads: usize, seed: u64) -> Model {
    Model::init(&tiny_config(n_kv_heads, true), seed, &Device::Cpu).unwrap().0
}

/// Deterministic pseudo-random ids below `vocab`.
pub fn ids(len: usize, vocab: u32, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(salt * 97)) % vocab)
        .collect()
}

pub fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}
