//! A tiny release bundle with seeded random weights: to try `m31rd` and its clients without
//! training a model, and the fixture the daemon's and the language server's tests serve. Its
//! completions are gibberish, but deterministic: same bytes every time it is written.

use std::path::Path;

use candle_core::Device;

use crate::bundle::{BundleInfo, write_bundle};
use crate::config::{ModelConfig, RawModelConfig};
use crate::tokenizer::Tokenizer;
use crate::transformer::Model;

/// The Rust text the demo tokenizer is trained on (also handy as test prompts).
pub const CORPUS: &[&str] = &[
    "fn main() {\n    let names = vec![\"alpha\", \"beta\"];\n    for n in &names {\n        println!(\"{n}\");\n    }\n}\n",
    "pub struct Point {\n    pub x: f64,\n    pub y: f64,\n}\n\nimpl Point {\n    pub fn norm(&self) -> f64 {\n        (self.x * self.x + self.y * self.y).sqrt()\n    }\n}\n",
    "use std::collections::HashMap;\n\npub fn count(words: &[&str]) -> HashMap<String, usize> {\n    let mut map = HashMap::new();\n    for w in words {\n        *map.entry(w.to_string()).or_insert(0) += 1;\n    }\n    map\n}\n",
];

/// Writes the demo bundle (a 400-token vocabulary, 2 blocks of width 64 with grouped-query
/// attention, context 512, seed 31) to `dest`, which must not exist, naming it `model_version`.
pub fn write_demo_bundle(
    dest: &Path,
    model_version: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let tokenizer = Tokenizer::train(CORPUS.iter().cycle().take(30), 400)?;
    let config = ModelConfig::new(&RawModelConfig {
        vocab_size: tokenizer.vocab_size(),
        d_model: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        d_ff: 128,
        context_length: 512,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
    })?;
    let (model, _) = Model::init(&config, 31, &Device::Cpu)?;
    let info = BundleInfo { model_version: model_version.into(), ..Default::default() };
    write_bundle(dest, &model.named_tensors(), &tokenizer, &config, &info)?;
    Ok(())
}
