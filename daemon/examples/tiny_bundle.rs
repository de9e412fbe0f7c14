//! Writes a tiny release bundle with seeded random weights (the shape the daemon's integration
//! tests serve), to try `m31rd` and its clients without training a model. Its completions are
//! gibberish but deterministic. Usage: `cargo run -p m31r-daemon --example tiny_bundle -- DIR`.

use anyhow::{Context, bail};
use candle_core::Device;
use m31r_model::{BundleInfo, Model, ModelConfig, RawModelConfig, Tokenizer, write_bundle};

/// Rust text the tokenizer is trained on.
const CORPUS: &[&str] = &[
    "fn main() {\n    let names = vec![\"alpha\", \"beta\"];\n    for n in &names {\n        println!(\"{n}\");\n    }\n}\n",
    "pub struct Point {\n    pub x: f64,\n    pub y: f64,\n}\n\nimpl Point {\n    pub fn norm(&self) -> f64 {\n        (self.x * self.x + self.y * self.y).sqrt()\n    }\n}\n",
    "use std::collections::HashMap;\n\npub fn count(words: &[&str]) -> HashMap<String, usize> {\n    let mut map = HashMap::new();\n    for w in words {\n        *map.entry(w.to_string()).or_insert(0) += 1;\n    }\n    map\n}\n",
];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        bail!("usage: tiny_bundle DIR (DIR must not exist yet)");
    };
    let out = std::path::PathBuf::from(out);
    let tokenizer = Tokenizer::train(CORPUS.iter().cycle().take(30), 400)
        .context("cannot train the tokenizer")?;
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
    })
    .context("invalid model config")?;
    let (model, _) =
        Model::init(&config, 31, &Device::Cpu).context("cannot initialise the model")?;
    let info = BundleInfo { model_version: "tiny-random".into(), ..Default::default() };
    write_bundle(&out, &model.named_tensors(), &tokenizer, &config, &info)
        .with_context(|| format!("cannot write the bundle to {}", out.display()))?;
    println!("{}", out.display());
    Ok(())
}
