//! Inference bench (`cargo bench -p m31r-model --bench model`): measures this machine's f32 matmul
//! throughput and memory bandwidth, then, for the `tiny` and `small` presets with random weights,
//! prefill throughput on 512 tokens and decode latency at context 512, each stated against its
//! physical bound. Pass preset names to restrict (`-- tiny`), `--quick` for fewer repetitions.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, IndexOp, Tensor};
use m31r_model::{Model, ModelConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let quick = args.iter().any(|a| a == "--quick");
    let presets: Vec<&str> = match args.iter().filter(|a| !a.starts_with("--")).collect::<Vec<_>>()
    {
        names if names.is_empty() => vec!["tiny", "small"],
        names => names.into_iter().map(String::as_str).collect(),
    };
    let reps = if quick { 2 } else { 5 };

    let gflops = m31r_model::machine::matmul_gflops(reps)?;
    let bandwidth = m31r_model::machine::memory_bandwidth_gbs(reps);
    println!(
        "machine: f32 matmul {gflops:.1} GFLOP/s (1024³, candle), memory read {bandwidth:.1} GB/s"
    );
    println!(
        "{:<7} {:>10} {:>14} {:>13} {:>15} {:>14} {:>12} {:>10}",
        "preset",
        "params",
        "prefill tok/s",
        "prefill GF/s",
        "decode ms/tok",
        "decode tok/s",
        "bound ms",
        "× bound"
    );
    for name in presets {
        let config = ModelConfig::preset(name)?;
        let (model, _) = Model::init(&config, 0, &Device::Cpu)?;
        let ctx = 512.min(config.context_length());
        let ids: Vec<u32> =
            (0..ctx as u32).map(|i| (i * 7919) % config.vocab_size() as u32).collect();

        // Prefill: one chunk of `ctx` tokens into an empty cache.
        let prompt = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let mut cache = model.new_cache(ctx)?;
        let prefill = best_of(reps, || {
            cache.clear();
            black_box(model.forward(&prompt, &mut cache)?);
            Ok(())
        })?;
        let prefill_tps = ctx as f64 / prefill.as_secs_f64();
        let flops_per_token = 2.0 * config.param_count() as f64;

        // Decode: one token at a time at context ctx, rolled back after each step so the context
        // length stays fixed; includes reading the logits back, as a server must.
        cache.clear();
        model.forward(&prompt.i((.., ..ctx - 1))?, &mut cache)?;
        let steps = if quick { 10 } else { 40 };
        let next = Tensor::new(&[ids[ctx - 1]], &Device::Cpu)?.unsqueeze(0)?;
        let decode = best_of(reps, || {
            for _ in 0..steps {
                let logits = model.forward(&next, &mut cache)?;
                black_box(logits.i((0, 0))?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
                cache.truncate(ctx - 1);
            }
            Ok(())
        })? / steps as u32;
        let weight_bytes = config.param_count() as f64 * 4.0;
        // The CPU KV cache is f16 (`Model::new_cache`).
        let kv_bytes = (config.kv_bytes_per_token(2) * ctx) as f64;
        let bound_ms = (weight_bytes + kv_bytes) / (bandwidth * 1e9) * 1e3;
        let decode_ms = decode.as_secs_f64() * 1e3;
        println!(
            "{:<7} {:>10} {:>14.0} {:>13.1} {:>15.2} {:>14.1} {:>12.2} {:>10.2}",
            name,
            config.param_count(),
            prefill_tps,
            prefill_tps * flops_per_token / 1e9,
            decode_ms,
            1e3 / decode_ms,
            bound_ms,
            decode_ms / bound_ms
        );
    }
    println!(
        "bound = (f32 weight bytes + KV bytes at context 512) ÷ measured bandwidth; \
         prefill GF/s counts 2·params FLOPs per token (attention excluded)"
    );
    Ok(())
}

fn best_of(reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    f()?; // warm-up: page in weights, grow the cache, spin up the thread pool
    let mut best = Duration::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}
