//! Times the inference forward of a bundle in isolation (prefill of a prompt, then single-token
//! decode steps, each at the context right after the prompt), for profiling the hot paths with
//! `perf`:
//!
//! ```sh
//! cargo run --release -p m31r-model --example forward_timing -- BUNDLE [PROMPT_TOKENS] [DECODE_STEPS] [ROUNDS]
//! M31R_ATTENTION=plain …   # matmul + softmax attention instead of the fused kernels
//! M31R_CHUNK=1000 …         # prefill chunk (default 256, as m31rd)
//! ```

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use m31r_model::bundle::Bundle;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or_else(|| {
        anyhow::anyhow!("usage: forward_timing BUNDLE [PROMPT] [STEPS] [ROUNDS]")
    })?);
    let prompt: usize = args.next().map_or(Ok(256), |s| s.parse())?;
    let steps: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let rounds: usize = args.next().map_or(Ok(3), |s| s.parse())?;
    // Prefill in chunks of this many tokens, as m31rd does (its `prefill_chunk`, default 256).
    let chunk_len: usize = std::env::var("M31R_CHUNK").map_or(Ok(256), |s| s.parse())?;
    let bundle = Bundle::open(&dir)?;
    let mut model = bundle.model_at(bundle.precision(), &Device::Cpu)?;
    if std::env::var("M31R_ATTENTION").is_ok_and(|k| k == "plain") {
        model.set_attention_kernel(m31r_model::AttentionKernel::Plain);
    }
    let vocab = model.config().vocab_size() as u32;
    let ids: Vec<u32> = (0..prompt as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    for round in 0..rounds {
        let mut cache = model.new_cache(prompt + steps)?;
        let t = Instant::now();
        for chunk in ids.chunks(chunk_len) {
            let input = Tensor::new(chunk, &Device::Cpu)?.unsqueeze(0)?;
            model.forward_last(&input, &mut cache)?;
        }
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut next = 1u32;
        for _ in 0..steps {
            let input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
            let logits = model.forward_last(&input, &mut cache)?;
            next = logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?;
            // Every step decodes at the same context: right after the prompt.
            cache.truncate(prompt);
        }
        let decode = t.elapsed().as_secs_f64();
        println!(
            "round {round}: prefill {prompt} tokens {:.1} ms ({:.0} tok/s) · decode {:.2} ms/token",
            prefill * 1e3,
            prompt as f64 / prefill,
            decode * 1e3 / steps.max(1) as f64
        );
    }
    Ok(())
}
