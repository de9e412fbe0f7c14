//! Quantized inference (issue 10): every precision's forward stays close to f32 on a fixture, with
//! the tolerances stated below; decoding under int8 is exact against its own full forward and
//! deterministic run to run.

use std::collections::HashMap;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use m31r_model::quant::{self, Weight};
use m31r_model::{Model, ModelConfig, Precision, RawModelConfig};

use m31r_model::testing::{ids, max_abs_diff, row, tiny_config};

/// A fixture whose rows divide into Q4_K's 256-value super-blocks (the tiny test config's 64 and
/// 160 do not).
fn k_config() -> ModelConfig {
    ModelConfig::new(&RawModelConfig {
        vocab_size: 300,
        d_model: 256,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        d_ff: 512,
        context_length: 128,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
    })
    .unwrap()
}

/// A seeded model whose projections are scaled up (std 0.02 → `scale`·0.02) so each layer changes
/// the residual stream as much as a trained model's do; at init the output is nearly the input
/// token's own embedding and every precision would trivially agree.
fn fixture(config: &ModelConfig, seed: u64, scale: f64) -> Vec<(String, Tensor)> {
    let (model, _) = Model::init(config, seed, &Device::Cpu).unwrap();
    model
        .named_tensors()
        .into_iter()
        .map(|(name, t)| {
            let t = if name.ends_with("_proj.weight") { (t * scale).unwrap() } else { t };
            (name, t)
        })
        .collect()
}

fn build(config: &ModelConfig, tensors: &[(String, Tensor)], precision: Precision) -> Model {
    let weights: HashMap<String, Weight> =
        quant::inference_weights(tensors, precision, &Device::Cpu).unwrap().into_iter().collect();
    Model::from_weights(config, weights, precision.activation_dtype(&Device::Cpu), &Device::Cpu)
        .unwrap()
}

fn logits(model: &Model, tokens: &[u32]) -> Tensor {
    let mut cache = model.new_cache(tokens.len()).unwrap();
    model.forward(&row(tokens), &mut cache).unwrap().to_dtype(DType::F32).unwrap().i(0).unwrap()
}

/// (fraction of positions whose argmax agrees, RMS error ÷ RMS of the reference logits).
fn compare(reference: &Tensor, other: &Tensor) -> (f64, f64) {
    let a = reference.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    let b = other.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
    let rms = |t: &Tensor| -> f64 {
        f64::from(t.sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()).sqrt()
    };
    (agree, rms(&(reference - other).unwrap()) / rms(reference))
}

/// Stated tolerances: (precision, least top-1 agreement, largest relative RMS logit error), on
/// 96 positions of a random model with projections at 3× the init scale. Its top-2 margins are
/// far smaller than a trained model's, so these bound the error, not a trained model's agreement.
/// Measured when written (tiny / Q4_K-able shape): f16 1.00 / 1.00 agreement, ≈0.1% error; q8_0
/// ≈0.96 / ≈0.98, ≈2%; q4_0 and q4_k ≈0.6, 26–36%.
const TOLERANCES: [(Precision, f64, f64); 4] = [
    (Precision::F16, 0.99, 0.005),
    (Precision::Q8_0, 0.90, 0.04),
    (Precision::Q4_0, 0.45, 0.40),
    (Precision::Q4K, 0.45, 0.40),
];

#[test]
fn quantized_forward_matches_f32_within_tolerance() {
    for (config, label) in [(tiny_config(2, true), "tiny"), (k_config(), "k")] {
        let tensors = fixture(&config, 11, 3.0);
        let tokens = ids(96, 300, 5);
        let reference = logits(&build(&config, &tensors, Precision::F32), &tokens);
        for (precision, min_agree, max_err) in TOLERANCES {
            let got = logits(&build(&config, &tensors, precision), &tokens);
            let (agree, err) = compare(&reference, &got);
            eprintln!(
                "{label} {precision}: top-1 agreement {agree:.3}, relative RMS error {err:.4}"
            );
            assert!(
                agree >= min_agree && err <= max_err,
                "{label} {precision}: top-1 agreement {agree:.3} (need ≥ {min_agree}), \
                 relative error {err:.4} (need ≤ {max_err})"
            );
        }
    }
}

#[test]
fn rows_that_blocks_cannot_hold_fall_back_to_f16() {
    // 64-value rows: no Q4_K super-block (256) fits, so every matrix is stored f16.
    let tensors = fixture(&tiny_config(2, true), 1, 1.0);
    for (name, w) in quant::quantize(&tensors, Precision::Q4K).unwrap() {
        if let Weight::Quantized(q) = w {
            assert_eq!(q.dtype(), candle_core::quantized::GgmlDType::F16, "{name}");
        }
    }
}

#[test]
fn quantized_weights_are_blocks_and_norms_stay_f32() {
    let config = tiny_config(2, true);
    let tensors = fixture(&config, 2, 1.0);
    let weights = quant::quantize(&tensors, Precision::Q8_0).unwrap();
    let bytes: usize = weights.iter().map(|(_, w)| w.size_in_bytes()).sum();
    assert_eq!(bytes as u64, Precision::Q8_0.weight_bytes(&config));
    for (name, w) in &weights {
        match w {
            Weight::Quantized(q) => assert_eq!(q.shape().rank(), 2, "{name}"),
            Weight::Dense(t) => {
                assert!(name.ends_with("norm.weight"), "{name} left dense");
                assert_eq!(t.dtype(), DType::F32);
            }
        }
    }
    // The quantized model reports f32 activations and dequantizes on request.
    let model = build(&config, &tensors, Precision::Q8_0);
    assert_eq!(model.dtype(), DType::F32);
    let named: HashMap<String, Tensor> = model.named_tensors().into_iter().collect();
    for (name, original) in &tensors {
        let diff = max_abs_diff(original, &named[name]);
        let scale: f32 = original.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff <= scale / 100.0, "{name}: dequantized differs by {diff} (max {scale})");
    }
}

#[test]
fn int8_decoding_matches_its_full_forward() {
    let config = tiny_config(2, true);
    let model = build(&config, &fixture(&config, 3, 3.0), Precision::Q8_0);
    let tokens = ids(40, 300, 8);
    let full = logits(&model, &tokens);
    let mut cache = model.new_cache(4).unwrap();
    let steps: Vec<Tensor> = tokens
        .iter()
        .map(|&t| model.forward(&row(&[t]), &mut cache).unwrap().i(0).unwrap())
        .collect();
    let stepped = Tensor::cat(&steps, 0).unwrap();
    let (agree, err) = compare(&full, &stepped);
    // Both quantize activations to Q8_0 per row and read the same f16 KV cache; only summation
    // order differs (the decode kernels vs candle's prefill kernels), which can move a quantized
    // activation by one rounding step (f32 models agree to ~1e-6 here).
    assert!(agree == 1.0 && err <= 1e-2, "incremental vs full: agreement {agree}, error {err}");
}

/// Greedy generation of `n` tokens after `prompt`.
fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_cache(8).unwrap();
    let mut out = Vec::new();
    let mut next = model.forward(&row(prompt), &mut cache).unwrap();
    for _ in 0..n {
        let last = next.i((0, next.dim(1).unwrap() - 1)).unwrap();
        let id = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        out.push(id);
        next = model.forward(&row(&[id]), &mut cache).unwrap();
    }
    out
}

#[test]
fn greedy_int8_output_is_deterministic_run_to_run() {
    let config = tiny_config(2, true);
    let tensors = fixture(&config, 4, 6.0);
    let prompt = ids(20, 300, 6);
    let first = greedy(&build(&config, &tensors, Precision::Q8_0), &prompt, 48);
    for _ in 0..3 {
        // A fresh quantization and model each time: nothing carries over between runs.
        assert_eq!(greedy(&build(&config, &tensors, Precision::Q8_0), &prompt, 48), first);
    }
    // Not a degenerate constant (random models at init scale repeat one token).
    let distinct: std::collections::HashSet<_> = first.iter().collect();
    assert!(distinct.len() > 4, "degenerate output {first:?}");
}

#[test]
fn precision_names_round_trip() {
    for p in Precision::ALL {
        assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{}\"", p.name()));
    }
    assert!("int3".parse::<Precision>().unwrap_err().to_string().contains("int3"));
}

/// The single-token decode path (`forward_last` of one token: plain slices, no tensor per
/// intermediate) computes what the chunk path (`forward`) computes, at every precision, step by
/// step over a growing cache.
#[test]
fn single_token_path_matches_the_chunk_path() {
    let config = tiny_config(2, true);
    let tensors = fixture(&config, 5, 3.0);
    for precision in [Precision::F32, Precision::F16, Precision::Q8_0, Precision::Q4_0] {
        let model = build(&config, &tensors, precision);
        let tokens = ids(24, 300, 9);
        let (mut fast, mut chunk) = (model.new_cache(4).unwrap(), model.new_cache(4).unwrap());
        for (step, &t) in tokens.iter().enumerate() {
            let a = model.forward_last(&row(&[t]), &mut fast).unwrap();
            let b = model.forward(&row(&[t]), &mut chunk).unwrap();
            assert_eq!(a.dims(), b.dims());
            let scale: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            let diff = max_abs_diff(&a, &b);
            assert!(diff <= 1e-4 * scale.max(1.0), "{precision} step {step}: {diff} (max {scale})");
        }
        assert_eq!(fast.len(), tokens.len());
    }
}
