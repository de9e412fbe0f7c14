//! `m31r bench-worker`, the child side of the bench: loads one bundle in a fresh process and
//! measures start-up, cold prefill, keystrokes, decode and memory, printing one JSON line.

use std::time::Instant;

use anyhow::{Context, bail};
use m31r_model::{Precision, Tokenizer};
use m31r_protocol::{Event, FimInput, GenerationParams, Request, StopReason, Usage};

use super::{Report, Sample, WorkerArgs, rayon_threads};
use crate::connection::Connection;
use crate::target::Target;

/// The child side: load the bundle, measure, print one JSON line.
pub fn worker(conn: &Connection, args: &WorkerArgs) -> anyhow::Result<()> {
    let Some(bundle) = &conn.bundle else { bail!("bench-worker needs --bundle DIR") };
    let resident_before = m31r_daemon::sys::resident_bytes();
    let weight_file = bundle.join("model.safetensors");
    let weight_file_bytes = std::fs::metadata(&weight_file)
        .with_context(|| format!("cannot stat {}", weight_file.display()))?
        .len();
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("cannot read prompt text {}", args.text.display()))?;

    let mut target = Target::load(bundle, conn.device, conn.recall.unwrap_or_default())?;
    let resident_loaded = m31r_daemon::sys::resident_bytes();
    let Target::Local(local) = &target else { bail!("expected an in-process engine") };
    let startup_ms = local.load_time().as_secs_f64() * 1e3;
    let config = local.config().clone();
    let model_version = target.model().version.clone();
    let ids = local.tokenizer().encode(&text).context("cannot encode the prompt text")?;
    let prompts = Prompts { tokenizer: local.tokenizer().clone(), ids, next: 0 };
    let mut bench = Bench { target: &mut target, prompts, requests: 0 };
    let context = config.context_length();
    let reps = if args.quick { 2 } else { 3 };

    // Spin up the thread pool and touch every weight once, so the first measurement is not
    // charged for it.
    let warmup = bench.prompts.take(32)?;
    bench.request(|id| generate(id, warmup, 2))?;

    // Margins keep re-encoded windows (which may differ by a token or two) within the budget.
    let prefill_len = args.prompt_tokens.min(context.saturating_sub(8)).max(8);
    let mut prefill = Sample { prefill_ms: f64::MAX, ..Sample::default() };
    for _ in 0..reps {
        let prompt = bench.prompts.take(prefill_len)?;
        let done = bench.request(|id| generate(id, prompt, 1))?;
        if done.prefill_ms < prefill.prefill_ms {
            prefill = done;
        }
    }

    // Keystrokes: the prefix is limited so the whole FIM prompt fits without truncation moving.
    let suffix_len = 64.min(context / 8);
    let prefix_len = args.prompt_tokens.min(context.saturating_sub(suffix_len + 64)).max(8);
    let mut prefix = bench.prompts.take(prefix_len)?;
    let typed: Vec<char> = bench.prompts.take(48)?.chars().collect();
    let suffix = bench.prompts.take(suffix_len)?;
    let fim = |id: String, prefix: &str, max_tokens| -> Request {
        let input =
            FimInput { prefix: prefix.into(), suffix: suffix.clone(), context_files: vec![] };
        match max_tokens {
            None => Request::Warm { id, input, max_tokens: None },
            Some(max_tokens) => Request::Fim {
                id,
                input,
                params: GenerationParams { max_tokens, ..GenerationParams::default() },
            },
        }
    };
    bench.request(|id| fim(id, &prefix, None))?;
    let keystrokes = if args.quick { 12 } else { 24 };
    let mut samples = Vec::new();
    for &c in typed.iter().take(keystrokes) {
        prefix.push(c);
        samples.push(bench.request(|id| fim(id, &prefix, Some(1)))?);
    }
    samples.sort_by(|a, b| a.first_ms.total_cmp(&b.first_ms));
    let keystroke = samples.get(samples.len() / 2).copied().unwrap_or_default();
    let keystroke_p90_ms = samples.get(samples.len() * 9 / 10).map_or(0.0, |s| s.first_ms);
    let keystroke_new_tokens =
        samples.iter().map(|s| f64::from(s.prompt_tokens - s.cached_tokens)).sum::<f64>()
            / samples.len().max(1) as f64;

    // Decode: random weights may pick end-of-text early; retry on other prompts and keep the
    // longest run.
    let decode_prompt = 256.min(context / 4);
    let want = (if args.quick { 32 } else { 64 }).min(context - decode_prompt - 16) as u32;
    let mut best: Option<(Usage, f64)> = None;
    for _ in 0..4 {
        let prompt = bench.prompts.take(decode_prompt)?;
        let event = bench.target.run(&generate("decode".into(), prompt, want), &mut |_| {})?;
        let Event::Done { usage, timings, .. } = event else {
            bail!("decode request ended with {event:?}");
        };
        if best.is_none_or(|(u, _)| usage.completion_tokens > u.completion_tokens) {
            best = Some((usage, timings.decode_ms));
        }
        if usage.completion_tokens >= want / 2 {
            break;
        }
    }
    let (usage, decode_ms) = best.context("no decode measurement")?;
    // Each generated token but the first costs one forward pass.
    let passes = usage.completion_tokens.saturating_sub(1).max(1);
    let decode_context = f64::from(usage.prompt_tokens) + f64::from(usage.completion_tokens) / 2.0;

    let Target::Local(local) = &*bench.target else { bail!("expected an in-process engine") };
    let precision: Precision = target_precision(bench.target).unwrap_or_default();
    let report = Report {
        model_version,
        precision,
        weight_bytes: precision.weight_bytes(&config),
        params: config.param_count(),
        vocab: config.vocab_size(),
        n_layers: config.n_layers(),
        d_model: config.d_model(),
        context,
        // The CPU engine keeps its KV cache in f16 (`Model::new_cache`).
        kv_bytes_per_token: config.kv_bytes_per_token(2),
        weight_file_bytes,
        threads: rayon_threads(),
        startup_ms,
        prefill,
        prefill_reps: reps,
        keystroke,
        keystroke_p90_ms,
        keystrokes: samples.len(),
        keystroke_new_tokens,
        decode_ms_per_token: decode_ms / f64::from(passes),
        decode_tokens: usage.completion_tokens,
        decode_context,
        resident_before,
        resident_loaded,
        resident_after: m31r_daemon::sys::resident_bytes(),
        cache_bytes: local.cache_bytes() as u64,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The precision the target serves, from its model info.
fn target_precision(target: &Target) -> Option<Precision> {
    target.model().precision.parse().ok()
}

fn generate(id: String, prompt: String, max_tokens: u32) -> Request {
    Request::Generate {
        id,
        prompt,
        params: GenerationParams { max_tokens, ..GenerationParams::default() },
    }
}

/// Consecutive windows of the prompt text, so no two prompts share a prefix.
struct Prompts {
    tokenizer: Tokenizer,
    ids: Vec<u32>,
    next: usize,
}

impl Prompts {
    /// The text of the next `n` tokens.
    fn take(&mut self, n: usize) -> anyhow::Result<String> {
        if self.next + n > self.ids.len() {
            bail!(
                "the bench's prompt text has only {} tokens; {} more needed",
                self.ids.len(),
                self.next + n - self.ids.len()
            );
        }
        let text = self.tokenizer.decode(&self.ids[self.next..self.next + n])?;
        self.next += n;
        Ok(text)
    }
}

struct Bench<'a> {
    target: &'a mut Target,
    prompts: Prompts,
    requests: u64,
}

impl Bench<'_> {
    /// Runs one request and measures it.
    fn request(&mut self, make: impl FnOnce(String) -> Request) -> anyhow::Result<Sample> {
        self.requests += 1;
        let request = make(format!("bench-{}", self.requests));
        let t = Instant::now();
        let mut first = None;
        let event = self.target.run(&request, &mut |_| {
            first.get_or_insert_with(Instant::now);
        })?;
        let end = Instant::now();
        match event {
            Event::Done { stop, usage, timings, .. } if stop != StopReason::Cancelled => {
                Ok(Sample {
                    first_ms: (first.unwrap_or(end) - t).as_secs_f64() * 1e3,
                    prefill_ms: timings.prefill_ms,
                    total_ms: timings.total_ms,
                    prompt_tokens: usage.prompt_tokens,
                    cached_tokens: usage.cached_tokens,
                })
            }
            other => bail!("bench request {} ended with {other:?}", request.id().unwrap_or("?")),
        }
    }
}
