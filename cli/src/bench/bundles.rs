//! The bench's bundles: random seeded weights of a preset's shape at each asked precision, with a
//! tokenizer trained on the bench corpus, and optionally their GGUF twins with a parity fixture.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use m31r_model::bundle::write_quantized_bundle;
use m31r_model::{Bundle, BundleInfo, Model, ModelConfig, Precision, Tokenizer};

use super::corpus;

/// Directory name of a bench bundle: the preset, plus the precision when not f32.
pub(super) fn bundle_name(preset: &str, precision: Precision) -> String {
    match precision {
        Precision::F32 => preset.to_string(),
        p => format!("{preset}-{p}"),
    }
}

/// Bundles of `preset`'s shape with the same random weights at each precision and a tokenizer
/// trained on `corpus`, whose vocabulary size the config then takes (a small corpus may give
/// fewer tokens than asked).
pub(super) fn build_random_bundles(
    preset: &str,
    corpus: &corpus::Corpus,
    dirs: &[(Precision, PathBuf)],
) -> anyhow::Result<()> {
    let config = ModelConfig::preset(preset)
        .with_context(|| format!("unknown preset {preset:?} (try tiny, small, medium, large)"))?;
    let t = Instant::now();
    let tokenizer = Tokenizer::train(corpus.files.iter(), config.vocab_size())
        .with_context(|| format!("cannot train the {preset} tokenizer"))?;
    let train_s = t.elapsed().as_secs_f64();
    let mut raw = config.to_raw();
    raw.vocab_size = tokenizer.vocab_size();
    let config = ModelConfig::new(&raw)
        .with_context(|| format!("{preset} with vocab_size {}", raw.vocab_size))?;
    let t = Instant::now();
    let (model, _vars) = Model::init(&config, 0, &Device::Cpu)
        .with_context(|| format!("cannot initialise the {preset} model"))?;
    let info = BundleInfo {
        model_version: format!("{preset}-random-seed0"),
        dataset_id: "random-weights".into(),
        ..BundleInfo::default()
    };
    let tensors = model.named_tensors();
    for (precision, dir) in dirs {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot replace stale bundle {}", dir.display()))?;
        }
        write_quantized_bundle(dir, &tensors, *precision, &tokenizer, &config, &info)
            .with_context(|| format!("cannot write bundle {}", dir.display()))?;
    }
    println!(
        "built {preset}: tokenizer {} tokens in {train_s:.1} s, random weights written in {:.1} s",
        tokenizer.vocab_size(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prompts of the parity fixture: (name, text), cut from the bench's prompt text.
fn parity_prompts(text: &str) -> Vec<(String, String)> {
    let cut = |start: usize, len: usize| -> String { text.chars().skip(start).take(len).collect() };
    vec![
        ("code-200".into(), cut(0, 200)),
        ("code-1000".into(), cut(5000, 1000)),
        ("fn".into(), "fn main() {\n    let mut total = 0;\n    for i in 0..10 {\n".into()),
    ]
}

/// `<bundle>.gguf` (the bundle's own weights) and `<bundle>.parity.json`: for each parity prompt,
/// our token ids and the top 8 logits (id, value) at the last position.
pub(super) fn write_gguf_and_parity(dir: &Path, text: &str) -> anyhow::Result<()> {
    let gguf = dir.with_extension("gguf");
    let parity = dir.with_extension("parity.json");
    let bundle = Bundle::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    let precision = bundle.precision();
    let model = bundle.model_at(precision, &Device::Cpu)?;
    if !gguf.exists() {
        let weights = bundle.stored_weights(&Device::Cpu)?;
        m31r_model::gguf::write_gguf(
            &gguf,
            &weights,
            precision,
            bundle.tokenizer(),
            bundle.config(),
            &bundle.metadata().model_version,
        )?;
    }
    let mut cases = Vec::new();
    for (name, prompt) in parity_prompts(text) {
        let ids = bundle.tokenizer().encode(&prompt)?;
        let mut cache = model.new_cache(ids.len())?;
        let input = candle_core::Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&input, &mut cache)?;
        let last: Vec<f32> =
            logits.get(0)?.get(ids.len() - 1)?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let mut order: Vec<usize> = (0..last.len()).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        let top: Vec<(usize, f32)> = order.iter().take(8).map(|&i| (i, last[i])).collect();
        cases.push(serde_json::json!({ "name": name, "text": prompt, "ids": ids, "top": top }));
    }
    std::fs::write(&parity, serde_json::to_string_pretty(&cases)?)
        .with_context(|| format!("cannot write {}", parity.display()))?;
    println!("wrote {} and {}", gguf.display(), parity.display());
    Ok(())
}
