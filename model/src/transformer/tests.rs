//! Property tests of the decoder's building blocks (private, so they live in the crate).

use proptest::prelude::*;

use std::sync::Arc;

use super::*;
use crate::config::RawModelConfig;
use crate::testing::hermetic_config;

fn config(head_dim: usize) -> ModelConfig {
    ModelConfig::new(&RawModelConfig {
        vocab_size: 300,
        d_model: head_dim * 2,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: None,
        d_ff: 32,
        context_length: 256,
        rope_theta: 10_000.0,
        norm_eps: 1e-6,
        tie_embeddings: true,
    })
    .unwrap()
}

fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
}

fn vec_of(len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-3f32..3.0, len)
}

fn dot(a: &Tensor, b: &Tensor) -> f32 {
    (a * b).unwrap().sum_all().unwrap().to_scalar().unwrap()
}

proptest! {
    #![proptest_config(hermetic_config(64))]

    #[test]
    fn rope_preserves_norms(x in vec_of(16), pos in 0usize..250, fused in any::<bool>()) {
        let rope = Rope::new(&config(16), DType::F32, &Device::Cpu).unwrap();
        let x = tensor(&x, &[1, 1, 1, 16]);
        let y = if fused { rope.apply_fused(&x, pos) } else { rope.apply_train(&x, pos) }.unwrap();
        let (nx, ny) = (dot(&x, &x).sqrt(), dot(&y, &y).sqrt());
        prop_assert!((nx - ny).abs() <= 1e-4 * nx.max(1.0), "{nx} vs {ny}");
    }

    #[test]
    fn rope_scores_depend_only_on_the_offset(
        q in vec_of(16), k in vec_of(16), m in 0usize..120, n in 0usize..120, shift in 0usize..120,
    ) {
        let rope = Rope::new(&config(16), DType::F32, &Device::Cpu).unwrap();
        let (q, k) = (tensor(&q, &[1, 1, 1, 16]), tensor(&k, &[1, 1, 1, 16]));
        let score = |a: usize, b: usize| {
            dot(&rope.apply_fused(&q, a).unwrap(), &rope.apply_fused(&k, b).unwrap())
        };
        let (s1, s2) = (score(m, n), score(m + shift, n + shift));
        prop_assert!((s1 - s2).abs() <= 1e-3 * s1.abs().max(1.0), "{s1} vs {s2}");
    }

    #[test]
    fn inference_and_training_rope_agree(x in vec_of(3 * 2 * 16), start in 0usize..200) {
        let rope = Rope::new(&config(16), DType::F32, &Device::Cpu).unwrap();
        let x = tensor(&x, &[1, 3, 2, 16]);
        let a = rope.apply_fused(&x, start).unwrap();
        let b = rope.apply_train(&x, start).unwrap();
        let diff: f32 = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        prop_assert!(diff <= 1e-5);
    }

    #[test]
    fn attention_is_linear_in_values(
        q in vec_of(5 * 4 * 8), k in vec_of(5 * 2 * 8), v1 in vec_of(5 * 2 * 8), v2 in vec_of(5 * 2 * 8),
        a in -2f32..2.0, b in -2f32..2.0, fused in any::<bool>(),
    ) {
        let (q, k) = (tensor(&q, &[1, 5, 4, 8]), tensor(&k, &[1, 5, 2, 8]));
        let (v1, v2) = (tensor(&v1, &[1, 5, 2, 8]), tensor(&v2, &[1, 5, 2, 8]));
        let attend = |v: &Tensor| -> Tensor {
            if fused {
                fused_attention(&q, &k, v, 0.35).unwrap().unwrap()
            } else {
                plain_attention(&q, &k, v, 0.35, 0, true).unwrap()
            }
        };
        let mixed = ((&v1 * f64::from(a)).unwrap() + (&v2 * f64::from(b)).unwrap()).unwrap();
        let lhs = attend(&mixed);
        let rhs = ((attend(&v1) * f64::from(a)).unwrap() + (attend(&v2) * f64::from(b)).unwrap()).unwrap();
        let diff: f32 = (lhs - rhs).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        prop_assert!(diff <= 1e-4, "{diff}");
    }

    #[test]
    fn rms_norm_is_scale_invariant(x in vec_of(32), w in vec_of(32), scale in 0.05f32..20.0) {
        // ε is a numerical guard, not part of the property: leave it out and keep x away from 0.
        prop_assume!(x.iter().map(|v| v * v).sum::<f32>() > 0.1);
        let norm = RmsNorm { weight: tensor(&w, &[32]), eps: 0.0 };
        let x = tensor(&x, &[1, 32]);
        let scaled = (&x * f64::from(scale)).unwrap();
        for (p, q) in [
            (norm.forward_fused(&x).unwrap(), norm.forward_fused(&scaled).unwrap()),
            (norm.forward_train(&x).unwrap(), norm.forward_train(&scaled).unwrap()),
        ] {
            let diff: f32 = (p - q).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            prop_assert!(diff <= 1e-4, "{diff}");
        }
    }
}

/// Mixed precision: a bf16 forward of f32 weights returns f32 logits close to the f32 forward's,
/// and its gradients reach every weight in f32 (the optimizer's master weights and moments).
#[test]
fn bf16_forward_of_f32_weights_tracks_f32_and_its_gradients_are_f32() {
    let (model, vars) =
        Model::init(&crate::testing::tiny_config(2, true), 3, &Device::Cpu).unwrap();
    let input = crate::testing::row(&crate::testing::ids(48, 300, 1));
    let exact = model.forward_train(&input).unwrap();
    let mixed = model.forward_train_in(&input, DType::BF16).unwrap();
    assert_eq!(mixed.dtype(), DType::F32);
    let diff = crate::testing::max_abs_diff(&exact, &mixed);
    let scale = exact.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let scale: f32 = scale.to_scalar().unwrap();
    // bf16 keeps 8 bits of mantissa: here 0.3 % of the largest logit (0.0046 of 1.44).
    assert!(diff > 0.0 && diff < 0.01 * scale, "max |Δ| {diff} against max |logit| {scale}");
    let grads = mixed.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    for (name, var) in vars.data().lock().unwrap().iter() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dtype(), DType::F32, "{name}");
        assert_eq!(g.dims(), var.dims(), "{name}");
    }
}

/// The step program's logits and cache rows, as bits, for a prompt and then decode steps and a
/// few-token chunk, under the pool's current thread count.
fn step_outputs(model: &Model) -> Vec<u32> {
    use crate::testing::{ids, row};
    let mut cache = model.new_cache(8).unwrap();
    model.forward(&row(&ids(40, 200, 3)), &mut cache).unwrap();
    let mut bits = Vec::new();
    let mut push = |t: &Tensor| {
        let v = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        bits.extend(v.iter().map(|x| x.to_bits()));
    };
    for t in 0..6u32 {
        push(&model.forward_step(&row(&[t * 7 % 200]), &mut cache).unwrap().unwrap());
    }
    push(&model.forward_step(&row(&ids(5, 200, 9)), &mut cache).unwrap().unwrap());
    for layer in 0..cache.keys.len() {
        push(&cache.keys[layer].narrow(2, 0, cache.len()).unwrap());
        push(&cache.values[layer].narrow(2, 0, cache.len()).unwrap());
    }
    bits
}

#[test]
fn the_step_program_gives_the_same_bits_on_every_thread_count_and_tracks_the_tensor_path() {
    use crate::testing::{ids, max_abs_diff, row, tiny_model};
    use m31r_kernels::pool;
    for kv_heads in [1, 2, 4] {
        let model = tiny_model(kv_heads, 7);
        let mut seen = Vec::new();
        for cap in 1..=pool::max_threads() {
            pool::set_thread_cap(cap);
            seen.push(step_outputs(&model));
        }
        pool::set_thread_cap(0);
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "kv heads {kv_heads}");

        // The same chunk through the tensor path: equal up to summation order.
        let prompt = ids(40, 200, 3);
        let (mut a, mut b) = (model.new_cache(8).unwrap(), model.new_cache(8).unwrap());
        model.forward(&row(&prompt), &mut a).unwrap();
        model.forward(&row(&prompt), &mut b).unwrap();
        for chunk in [ids(1, 200, 5), ids(5, 200, 9)] {
            let n = chunk.len();
            let reference =
                model.forward(&row(&chunk), &mut a).unwrap().narrow(1, n - 1, 1).unwrap();
            let step = model.forward_step(&row(&chunk), &mut b).unwrap().unwrap();
            let d = max_abs_diff(&reference, &step);
            assert!(d < 1e-4, "kv heads {kv_heads}, {n} rows: {d}");
            assert_eq!(a.len(), b.len());
        }
        let keys =
            |c: &KvCache| c.keys[0].narrow(2, 0, c.len()).unwrap().to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&keys(&a), &keys(&b)) < 1e-3, "cached keys differ");
    }
}

/// A pick for the decode tests: it rewrites the logits from the last input token (as recall
/// does from the tokens so far), never picks [`STOP`] by itself, and picks it after an input
/// equal to `stop_after`.
struct TestPick {
    stop_after: Option<u32>,
}

const STOP: u32 = 199;

impl super::Pick for TestPick {
    fn pick(&self, inputs: &[u32], logits: &mut [f32]) -> u32 {
        let last = *inputs.last().expect("a run has a first token");
        let n = logits.len();
        logits[last as usize * 31 % n] += 1.0;
        if Some(last) == self.stop_after {
            return STOP;
        }
        crate::sampling::argmax(&logits[..STOP as usize])
    }

    fn stops(&self, token: u32) -> bool {
        token == STOP
    }
}

/// Picks (with the bits of the logits they came from) and cached keys and values of greedy
/// decoding from `first`: by decode runs of `runs` steps each when `runs` is not empty (the
/// caller taking `take` picks of each), else by one `forward_step` and pick at a time.
fn decoded(
    model: &Model,
    first: u32,
    picks: usize,
    runs: &[(usize, usize)],
    pick: &Arc<TestPick>,
) -> (Vec<(u32, Vec<u32>)>, Vec<u32>) {
    use super::Pick;
    use crate::testing::{ids, row};
    let mut cache = model.new_cache(8).unwrap();
    model.forward(&row(&ids(40, 200, 3)), &mut cache).unwrap();
    let mut out = Vec::new();
    let mut next = first;
    if runs.is_empty() {
        for _ in 0..picks {
            let logits = model.forward_step(&row(&[next]), &mut cache).unwrap().unwrap();
            let mut logits = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            next = pick.pick(&[next], &mut logits);
            out.push((next, logits.iter().map(|x| x.to_bits()).collect()));
            if pick.stops(next) {
                break;
            }
        }
    } else {
        'runs: for &(steps, take) in runs {
            let before = cache.len();
            let mut run = model.decode(next, &mut cache, steps, pick.clone()).unwrap().unwrap();
            for _ in 0..take {
                let Some((token, logits)) = run.next_pick() else { break };
                out.push((token, logits.iter().map(|x| x.to_bits()).collect()));
                next = token;
            }
            let taken = run.taken();
            let tokens = run.finish(&mut cache).unwrap();
            assert_eq!(tokens.len(), taken);
            assert_eq!(cache.len(), before + taken);
            if pick.stops(next) {
                break 'runs;
            }
        }
    }
    let mut bits = Vec::new();
    for layer in 0..cache.keys.len() {
        for t in [&cache.keys[layer], &cache.values[layer]] {
            let v = t.narrow(2, 0, cache.len()).unwrap().flatten_all().unwrap();
            bits.extend(
                v.to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits()),
            );
        }
    }
    (out, bits)
}

#[test]
fn a_decode_run_gives_the_picks_and_cache_of_one_step_at_a_time_on_every_thread_count() {
    use m31r_kernels::pool;
    for kv_heads in [1, 2] {
        let model = tiny_model_for_decode(kv_heads);
        let pick = Arc::new(TestPick { stop_after: None });
        let reference = decoded(&model, 17, 12, &[], &pick);
        assert_eq!(reference.0.len(), 12);
        for cap in 1..=pool::max_threads() {
            pool::set_thread_cap(cap);
            // One run, runs cut short by the caller, runs shorter than what is left.
            for runs in [&[(12, 12)][..], &[(8, 3), (5, 5), (16, 4)], &[(1, 1); 12]] {
                let got = decoded(&model, 17, 12, runs, &pick);
                assert!(got == reference, "kv heads {kv_heads}, {cap} threads, runs {runs:?}");
            }
        }
        pool::set_thread_cap(0);
    }
}

#[test]
fn a_pick_that_ends_the_run_is_the_last() {
    let model = tiny_model_for_decode(2);
    let free = decoded(&model, 17, 12, &[], &Arc::new(TestPick { stop_after: None }));
    // Stop after the fourth pick's token.
    let pick = Arc::new(TestPick { stop_after: Some(free.0[3].0) });
    let reference = decoded(&model, 17, 12, &[], &pick);
    assert_eq!(reference.0.last().map(|p| p.0), Some(STOP));
    let got = decoded(&model, 17, 12, &[(12, 12)], &pick);
    assert!(got == reference, "{} picks against {}", got.0.len(), reference.0.len());
    // The run computed nothing after the stop: no pick is there to take.
    let mut cache = model.new_cache(8).unwrap();
    let mut run = model
        .decode(STOP, &mut cache, 4, Arc::new(TestPick { stop_after: Some(STOP) }))
        .unwrap()
        .unwrap();
    assert_eq!(run.next_pick().map(|p| p.0), Some(STOP));
    assert!(run.next_pick().is_none());
    assert_eq!(run.finish(&mut cache).unwrap(), vec![STOP]);
    assert_eq!(cache.len(), 1);
}

/// A tiny model whose vocabulary the decode tests' picks fit in.
fn tiny_model_for_decode(kv_heads: usize) -> Model {
    let model = crate::testing::tiny_model(kv_heads, 11);
    assert!(model.config().vocab_size() > STOP as usize);
    model
}
