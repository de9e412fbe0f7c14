//! GGUF export: candle's GGUF reader gets back exactly our tensors (dequantized, with the q/k rows
//! in llama.cpp's RoPE order), the LLaMA and tokenizer keys, and no `output.weight`; and candle's
//! own GGUF LLaMA (`quantized_llama`, interleaved RoPE as in llama.cpp) computes our logits.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use m31r_model::gguf::{gguf_name, rope_row_order, write_gguf};
use m31r_model::quant::{self, Weight};
use m31r_model::{Model, ModelConfig, Precision, RawModelConfig, SpecialToken, Tokenizer};

use m31r_model::testing::{max_abs_diff, row};

const CORPUS: &[&str] = &[
    "fn main() {\n    let v = vec![1, 2, 3];\n    for x in &v {\n        println!(\"{x}\");\n    }\n}\n",
    "impl Point {\n    pub fn norm(&self) -> f64 {\n        (self.x * self.x + self.y * self.y).sqrt()\n    }\n}\n",
];

fn setup() -> (Tokenizer, ModelConfig, Vec<(String, Tensor)>) {
    let tokenizer = Tokenizer::train(CORPUS.iter().cycle().take(40), 320).unwrap();
    let config = ModelConfig::new(&RawModelConfig {
        vocab_size: tokenizer.vocab_size(),
        d_model: 128,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        d_ff: 192,
        context_length: 64,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
    })
    .unwrap();
    let (model, _) = Model::init(&config, 21, &Device::Cpu).unwrap();
    // Projections at 3× init scale so attention patterns (and RoPE) matter to the logits.
    let tensors = model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| if n.ends_with("_proj.weight") { (n, (t * 3.0).unwrap()) } else { (n, t) })
        .collect();
    (tokenizer, config, tensors)
}

#[test]
fn gguf_reads_back_as_the_same_tensors_and_keys() {
    let (tokenizer, config, tensors) = setup();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let weights = quant::quantize(&tensors, Precision::Q8_0).unwrap();
    write_gguf(&path, &weights, Precision::Q8_0, &tokenizer, &config, "test").unwrap();

    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let md = |k: &str| content.metadata.get(k).unwrap_or_else(|| panic!("missing key {k}"));
    assert_eq!(md("general.architecture").to_string().unwrap(), "llama");
    assert_eq!(md("tokenizer.ggml.pre").to_string().unwrap(), "llama-bpe");
    assert_eq!(md("tokenizer.ggml.model").to_string().unwrap(), "gpt2");
    assert_eq!(md("llama.block_count").to_u32().unwrap(), 2);
    assert_eq!(md("llama.attention.head_count_kv").to_u32().unwrap(), 2);
    assert_eq!(md("llama.rope.dimension_count").to_u32().unwrap(), 32);
    let ids = tokenizer.special_ids();
    for (key, token) in [
        ("tokenizer.ggml.fim_pre_token_id", SpecialToken::FimPrefix),
        ("tokenizer.ggml.fim_suf_token_id", SpecialToken::FimSuffix),
        ("tokenizer.ggml.fim_mid_token_id", SpecialToken::FimMiddle),
        ("tokenizer.ggml.eos_token_id", SpecialToken::EndOfText),
    ] {
        assert_eq!(md(key).to_u32().unwrap(), ids.get(token), "{key}");
    }
    let tokens = md("tokenizer.ggml.tokens").to_vec().unwrap();
    assert_eq!(tokens.len(), tokenizer.vocab_size());
    let fim = ids.get(SpecialToken::FimPrefix) as usize;
    assert_eq!(tokens[fim].to_string().unwrap(), "<|fim_prefix|>");
    let types = md("tokenizer.ggml.token_type").to_vec().unwrap();
    assert_eq!(types[fim].to_i32().unwrap(), 3, "special tokens are control tokens");
    assert!(!md("tokenizer.ggml.merges").to_vec().unwrap().is_empty());

    assert!(!content.tensor_infos.contains_key("output.weight"), "tied head is not duplicated");
    assert_eq!(content.tensor_infos.len(), weights.len());
    let q_order = rope_row_order(4, 32);
    let k_order = rope_row_order(2, 32);
    for (name, weight) in &weights {
        let read = content.tensor(&mut file, &gguf_name(name).unwrap(), &Device::Cpu).unwrap();
        let mut expected = weight.dequantize(&Device::Cpu).unwrap();
        let order = if name.contains("q_proj") {
            Some(&q_order)
        } else if name.contains("k_proj") {
            Some(&k_order)
        } else {
            None
        };
        if let Some(order) = order {
            let idx: Vec<u32> = order.iter().map(|&r| r as u32).collect();
            expected = expected
                .index_select(&Tensor::new(idx.as_slice(), &Device::Cpu).unwrap(), 0)
                .unwrap();
        }
        if let Weight::Quantized(q) = weight {
            assert_eq!(read.dtype(), q.dtype(), "{name}");
        }
        let got = read.dequantize(&Device::Cpu).unwrap();
        assert_eq!(got.dims(), expected.dims(), "{name}");
        assert_eq!(max_abs_diff(&got, &expected), 0.0, "{name}: blocks changed on the way");
    }
}

#[test]
fn candles_gguf_llama_computes_our_logits() {
    let (tokenizer, config, tensors) = setup();
    let dir = tempfile::tempdir().unwrap();
    let prompt = tokenizer.encode("fn main() {\n    let v = vec![1, 2, 3];\n    for x").unwrap();
    assert!(prompt.len() > 8);
    for precision in [Precision::F32, Precision::Q8_0] {
        let path = dir.path().join(format!("{precision}.gguf"));
        let weights = quant::quantize(&tensors, precision).unwrap();
        write_gguf(&path, &weights, precision, &tokenizer, &config, "test").unwrap();
        let ours = Model::from_weights(
            &config,
            weights.into_iter().collect::<HashMap<_, _>>(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let all = ours.forward(&row(&prompt), &mut ours.new_cache(64).unwrap()).unwrap();
        let ours_last = all.i((0, prompt.len() - 1)).unwrap();

        let mut file = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let mut theirs = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
        let theirs_last = theirs.forward(&row(&prompt), 0).unwrap().i(0).unwrap();
        let diff = max_abs_diff(&ours_last, &theirs_last);
        let scale: f32 = ours_last.abs().unwrap().max(0).unwrap().to_scalar().unwrap();
        // Our CPU KV cache is f16 (candle's GGUF LLaMA keeps f32): the rounded keys and values
        // move a Q8_0-quantized activation by one rounding step here and there (f32: ~1e-4).
        let tolerance = if precision == Precision::F32 { 1e-3 } else { 2e-2 };
        assert!(
            diff <= tolerance * scale.max(1.0),
            "{precision}: logits differ by {diff} (max {scale})"
        );
        // Without the q/k permutation the same weights give other logits (the test can fail).
        assert_eq!(
            ours_last.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
            theirs_last.argmax(0).unwrap().to_scalar::<u32>().unwrap()
        );
    }
}
