//! The two forward paths agree, the KV cache is exact (including truncation), the model is causal,
//! gradients reach every weight, a tiny model can overfit, and init is seeded.

use candle_core::{D, DType, Device, IndexOp, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use m31r_model::{AttentionKernel, Model};

use m31r_model::testing::{ids, max_abs_diff, row, tiny_config, tiny_model};

const TOL: f32 = 1e-4;

#[test]
fn training_and_inference_forward_agree() {
    for kv_heads in [4, 2, 1] {
        let mut model = tiny_model(kv_heads, 1);
        let input = row(&ids(57, 300, 1));
        let train = model.forward_train(&input).unwrap();
        for kernel in [AttentionKernel::Fused, AttentionKernel::Plain] {
            model.set_attention_kernel(kernel);
            let mut cache = model.new_cache(16).unwrap();
            let infer = model.forward(&input, &mut cache).unwrap();
            let diff = max_abs_diff(&train, &infer);
            assert!(diff <= TOL, "kv_heads {kv_heads} {kernel:?}: max diff {diff}");
            assert_eq!(cache.len(), 57);
        }
    }
}

#[test]
fn fused_attention_matches_plain_when_extending_a_cache() {
    let mut model = tiny_model(2, 2);
    let tokens = ids(90, 300, 2);
    let mut outputs = Vec::new();
    for kernel in [AttentionKernel::Plain, AttentionKernel::Fused] {
        model.set_attention_kernel(kernel);
        let mut cache = model.new_cache(8).unwrap();
        let mut chunks = Vec::new();
        for chunk in [&tokens[..40], &tokens[40..41], &tokens[41..77], &tokens[77..]] {
            chunks.push(model.forward(&row(chunk), &mut cache).unwrap());
        }
        outputs.push(Tensor::cat(&chunks, 1).unwrap());
    }
    let diff = max_abs_diff(&outputs[0], &outputs[1]);
    assert!(diff <= TOL, "fused vs plain: {diff}");
}

#[test]
fn token_by_token_decoding_equals_one_full_forward() {
    let model = tiny_model(2, 3);
    let tokens = ids(48, 300, 3);
    let full = model.forward(&row(&tokens), &mut model.new_cache(48).unwrap()).unwrap();
    let mut cache = model.new_cache(4).unwrap(); // forces the cache to grow several times
    let steps: Vec<Tensor> =
        tokens.iter().map(|&t| model.forward(&row(&[t]), &mut cache).unwrap()).collect();
    let stepped = Tensor::cat(&steps, 1).unwrap();
    let diff = max_abs_diff(&full, &stepped);
    assert!(diff <= TOL, "incremental vs full: {diff}");
    assert!(cache.capacity() >= 48);
}

#[test]
fn truncate_then_reextend_equals_fresh_computation() {
    let model = tiny_model(4, 4);
    let first = ids(60, 300, 4);
    let mut cache = model.new_cache(64).unwrap();
    model.forward(&row(&first), &mut cache).unwrap();
    // Roll back to a common prefix of 25 tokens and continue with a different tail.
    cache.truncate(25);
    assert_eq!(cache.len(), 25);
    let tail = ids(30, 300, 99);
    let continued = model.forward(&row(&tail), &mut cache).unwrap();
    let mut sequence = first[..25].to_vec();
    sequence.extend(&tail);
    let fresh = model.forward(&row(&sequence), &mut model.new_cache(64).unwrap()).unwrap();
    let diff = max_abs_diff(&continued, &fresh.i((.., 25.., ..)).unwrap());
    assert!(diff <= TOL, "truncated cache vs fresh: {diff}");
    cache.truncate(1000); // beyond len: no-op
    assert_eq!(cache.len(), 55);
}

#[test]
fn context_overflow_is_an_error_not_a_crash() {
    let model = tiny_model(4, 5);
    let mut cache = model.new_cache(8).unwrap();
    model.forward(&row(&ids(100, 300, 5)), &mut cache).unwrap();
    let err = model.forward(&row(&ids(29, 300, 6)), &mut cache).unwrap_err();
    assert!(err.to_string().contains("context length 128"), "{err}");
    assert_eq!(cache.len(), 100, "a failed call leaves the cache as it was");
    assert!(model.forward_train(&row(&ids(129, 300, 7))).is_err());
}

#[test]
fn changing_a_token_never_changes_earlier_logits() {
    let model = tiny_model(2, 6);
    let tokens = ids(40, 300, 8);
    let base_train = model.forward_train(&row(&tokens)).unwrap();
    let base_infer = model.forward(&row(&tokens), &mut model.new_cache(40).unwrap()).unwrap();
    for t in [0, 13, 39] {
        let mut changed = tokens.clone();
        changed[t] = (changed[t] + 1) % 300;
        let train = model.forward_train(&row(&changed)).unwrap();
        let infer = model.forward(&row(&changed), &mut model.new_cache(40).unwrap()).unwrap();
        if t > 0 {
            for (a, b) in [(&base_train, &train), (&base_infer, &infer)] {
                let before =
                    max_abs_diff(&a.i((.., ..t, ..)).unwrap(), &b.i((.., ..t, ..)).unwrap());
                assert_eq!(before, 0.0, "token {t} changed earlier logits by {before}");
            }
        }
        let at = max_abs_diff(&base_train.i((.., t, ..)).unwrap(), &train.i((.., t, ..)).unwrap());
        assert!(at > 0.0, "token {t} should change its own logits");
    }
}

fn loss(model: &Model, input: &Tensor, target: &Tensor) -> Tensor {
    let logits = model.forward_train(input).unwrap();
    let vocab = logits.dim(D::Minus1).unwrap();
    candle_nn::loss::cross_entropy(
        &logits.reshape(((), vocab)).unwrap(),
        &target.flatten_all().unwrap(),
    )
    .unwrap()
}

fn batch(seed: u32) -> (Tensor, Tensor) {
    let rows: Vec<Vec<u32>> = (0..2).map(|b| ids(33, 300, seed + b)).collect();
    let input: Vec<u32> = rows.iter().flat_map(|r| r[..32].to_vec()).collect();
    let target: Vec<u32> = rows.iter().flat_map(|r| r[1..].to_vec()).collect();
    (
        Tensor::from_vec(input, (2, 32), &Device::Cpu).unwrap(),
        Tensor::from_vec(target, (2, 32), &Device::Cpu).unwrap(),
    )
}

#[test]
fn every_trainable_tensor_receives_a_gradient() {
    for tied in [true, false] {
        let (model, vars) = Model::init(&tiny_config(2, tied), 7, &Device::Cpu).unwrap();
        let (input, target) = batch(10);
        let grads = loss(&model, &input, &target).backward().unwrap();
        let all = vars.data().lock().unwrap();
        assert_eq!(all.len(), model.named_tensors().len());
        for (name, var) in all.iter() {
            let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm: f32 = grad.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
        }
    }
}

#[test]
fn tiny_model_overfits_one_batch() {
    let (model, vars) = Model::init(&tiny_config(2, true), 8, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(
        vars.all_vars(),
        ParamsAdamW { lr: 1e-2, weight_decay: 0.0, ..Default::default() },
    )
    .unwrap();
    let (input, target) = batch(20);
    let initial: f32 = loss(&model, &input, &target).to_scalar().unwrap();
    let mut last = initial;
    for step in 0..300 {
        let l = loss(&model, &input, &target);
        last = l.to_scalar().unwrap();
        if last < 0.1 * initial {
            eprintln!("loss {initial:.3} -> {last:.3} after {step} steps");
            return;
        }
        opt.backward_step(&l).unwrap();
    }
    panic!("loss only fell from {initial} to {last} in 300 steps");
}

#[test]
fn init_is_a_pure_function_of_the_seed() {
    let bits = |seed| -> Vec<Vec<u32>> {
        tiny_model(2, seed)
            .named_tensors()
            .iter()
            .map(|(_, t)| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            })
            .collect()
    };
    assert_eq!(bits(11), bits(11));
    let (a, b) = (bits(11), bits(12));
    // Every random tensor differs; norms (all ones) are equal by design.
    let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(differing, a.len() - (2 * 2 + 1));
}

#[test]
fn parameter_count_matches_allocated_weights() {
    for tied in [true, false] {
        let config = tiny_config(2, tied);
        let (model, _) = Model::init(&config, 1, &Device::Cpu).unwrap();
        let allocated: usize = model.named_tensors().iter().map(|(_, t)| t.elem_count()).sum();
        assert_eq!(allocated as u64, config.param_count());
    }
}

#[test]
fn half_precision_inference_stays_close() {
    let model = tiny_model(2, 9);
    let tokens = ids(30, 300, 9);
    let reference = model.forward(&row(&tokens), &mut model.new_cache(30).unwrap()).unwrap();
    let tensors = model.named_tensors().into_iter().collect();
    let half = Model::from_tensors(model.config(), tensors, DType::F16, &Device::Cpu).unwrap();
    let logits = half.forward(&row(&tokens), &mut half.new_cache(30).unwrap()).unwrap();
    let diff = max_abs_diff(&reference, &logits.to_dtype(DType::F32).unwrap());
    assert!(diff < 0.05, "f16 drifted by {diff}");
}
