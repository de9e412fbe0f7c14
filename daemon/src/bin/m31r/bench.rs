//! `m31r bench`: start-up, cold prefill, keystroke latency, decode and memory of the engine, each
//! printed beside the physical bound this machine sets, measured in the same run. The parent
//! measures the machine and builds bundles; a child process per model (`bench-worker`) loads it
//! and measures, so start-up and memory are a fresh process's, as the daemon's would be.
//!
//! `--precisions` benches the same random weights stored at several precisions (issue 10);
//! `--gguf` also writes each as GGUF with a parity fixture (token ids and top logits of a few
//! prompts), and `--json` the reports, which `scripts/llamacpp_bench.sh` runs llama.cpp beside.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Args;
use m31r_model::bundle::write_quantized_bundle;
use m31r_model::{Bundle, BundleInfo, Model, ModelConfig, Precision, Tokenizer};
use m31r_protocol::{Event, FimInput, GenerationParams, Request, StopReason, Usage};
use serde::{Deserialize, Serialize};

use crate::target::Target;
use crate::{Connection, corpus};

/// The fastest peer on this machine (DESIGN §8): llama.cpp, 2 threads, a 55M LLaMA shape in f16.
const PEER: &str = "llama.cpp, 55M f16";
const PEER_PREFILL_1000_MS: f64 = 850.0;
const PEER_KEYSTROKE_MS: f64 = 6.0;
const PEER_DECODE_MS: f64 = 4.7;
/// Start-up goal of issue 4.
const STARTUP_GOAL_MS: f64 = 500.0;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Fewer repetitions and a smaller tokenizer corpus (about a minute on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Presets to bench with random weights, comma-separated (ignored with --bundle).
    #[arg(long, value_delimiter = ',', default_value = "tiny,small")]
    presets: Vec<String>,
    /// Prompt tokens of the cold-prefill and keystroke prompts (capped by the context).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    prompt_tokens: usize,
    /// Write the random-weight bundles to DIR/<preset> and keep them (to try `m31rd` or
    /// `m31r --bundle` without a trained model); by default they go to a temporary directory.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Weight precisions to bench, comma-separated (f32, f16, q8_0, q4_0, q4_k), each the same
    /// random weights stored at that precision (ignored with --bundle).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    precisions: Vec<Precision>,
    /// Also write each bundle's weights as `<bundle>.gguf` with a llama.cpp parity fixture
    /// `<bundle>.parity.json` (needs --keep).
    #[arg(long, requires = "keep")]
    gguf: bool,
    /// Write the reports (and the machine's measurements) as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Rust text to cut prompts from.
    #[arg(long)]
    text: PathBuf,
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    prompt_tokens: usize,
}

/// What a worker measured; sent to the parent as one JSON line on stdout.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    model_version: String,
    precision: Precision,
    weight_bytes: u64,
    params: u64,
    vocab: usize,
    n_layers: usize,
    d_model: usize,
    context: usize,
    kv_bytes_per_token: usize,
    weight_file_bytes: u64,
    threads: usize,
    startup_ms: f64,
    /// Best of the repetitions, each on a prompt sharing nothing with the cache.
    prefill: Sample,
    prefill_reps: usize,
    /// Median over the keystrokes.
    keystroke: Sample,
    keystroke_p90_ms: f64,
    keystrokes: usize,
    /// Tokens evaluated per keystroke, mean.
    keystroke_new_tokens: f64,
    decode_ms_per_token: f64,
    decode_tokens: u32,
    decode_context: f64,
    resident_before: u64,
    resident_loaded: u64,
    resident_after: u64,
    cache_bytes: u64,
}

/// One measured request.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Sample {
    /// Wall time from submitting to the first event (a token, or `done` when none came).
    first_ms: f64,
    /// The engine's own timings: evaluating the uncached prompt tokens, and arrival to done.
    prefill_ms: f64,
    total_ms: f64,
    prompt_tokens: u32,
    cached_tokens: u32,
}

/// This machine's limits, measured at the start of the run.
struct Machine {
    gflops: f64,
    bandwidth_gbs: f64,
    sha256_gbs: f64,
}

/// Removes the bench's temporary directory however the run ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(conn: &Connection, args: &BenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let reps = if args.quick { 2 } else { 4 };
    let threads = rayon_threads();
    println!("m31r bench: engine in-process, on CPU, {threads} threads");
    let machine = Machine {
        gflops: m31r_model::machine::matmul_gflops(reps)?,
        bandwidth_gbs: m31r_model::machine::memory_bandwidth_gbs(reps),
        sha256_gbs: sha256_gbs(),
    };
    println!(
        "machine: f32 matmul {:.1} GFLOP/s (candle, 1024³) · memory read {:.1} GB/s · sha256 {:.2} GB/s",
        machine.gflops, machine.bandwidth_gbs, machine.sha256_gbs
    );

    let temp = std::env::temp_dir().join(format!("m31r-bench-{}", std::process::id()));
    std::fs::create_dir_all(&temp)
        .with_context(|| format!("cannot create bench directory {}", temp.display()))?;
    let temp = TempDir(temp);
    // Enough text that the small preset's tokenizer gets (nearly) its whole vocabulary.
    let corpus = corpus::collect(if args.quick { 4 << 20 } else { 12 << 20 })?;
    // Prompts come from the end of the corpus: they need not be text the tokenizer saw.
    let text_path = temp.0.join("prompts.rs");
    let mut prompt_text = String::new();
    for file in corpus.files.iter().rev() {
        if prompt_text.len() >= 512 << 10 {
            break;
        }
        prompt_text.push_str(file);
        prompt_text.push('\n');
    }
    std::fs::write(&text_path, &prompt_text)
        .with_context(|| format!("cannot write {}", text_path.display()))?;

    if let Some(keep) = &args.keep {
        std::fs::create_dir_all(keep)
            .with_context(|| format!("cannot create bundle directory {}", keep.display()))?;
    }
    let bundles: Vec<(String, PathBuf)> = match &conn.bundle {
        Some(dir) => {
            println!("bundle: {} (its own weights)", dir.display());
            vec![(dir.display().to_string(), dir.clone())]
        }
        None => {
            println!(
                "weights: RANDOM, seeded (speed does not depend on weight values); tokenizers \
                 trained here on {:.1} MB of Rust from {}",
                corpus.bytes() as f64 / 1e6,
                corpus.root.display()
            );
            let mut bundles = Vec::new();
            for preset in &args.presets {
                let root = args.keep.as_ref().unwrap_or(&temp.0);
                let dirs: Vec<(Precision, PathBuf)> = args
                    .precisions
                    .iter()
                    .map(|&p| (p, root.join(bundle_name(preset, p))))
                    .collect();
                if args.keep.is_some() && dirs.iter().all(|(_, d)| d.exists()) {
                    println!("reusing {preset} bundles (kept by an earlier --keep)");
                } else {
                    build_random_bundles(preset, &corpus, &dirs)?;
                }
                for (precision, dir) in dirs {
                    if args.gguf {
                        write_gguf_and_parity(&dir, &prompt_text)?;
                    }
                    bundles.push((format!("{preset} {precision}"), dir));
                }
            }
            bundles
        }
    };

    let mut reports = Vec::new();
    for (name, dir) in &bundles {
        let report = spawn_worker(dir, &text_path, args)?;
        print_report(name, &report, &machine, conn.bundle.is_none());
        reports.push(serde_json::json!({
            "name": name, "bundle": dir, "report": report,
        }));
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "threads": threads,
            "matmul_gflops": machine.gflops,
            "bandwidth_gbs": machine.bandwidth_gbs,
            "runs": reports,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    socket_round_trip(conn);
    println!(
        "bounds: start-up = sha256 of the weights + one copy at memory bandwidth; prefill = \
         2·params·tokens ÷ f32 matmul FLOP/s (attention not counted); keystroke and decode = \
         (weight bytes at the bundle's precision + KV read) ÷ memory bandwidth (one pass over the \
         weights per forward); memory = weights + allocated KV. × bound = measured ÷ bound (1.00 \
         is the physical limit)."
    );
    println!(
        "keystroke: a FIM prompt warmed once, then one request per typed character \
         (max_tokens 1), timed from submit to the first event, median. decode: per forward pass \
         (every generated token but the first)."
    );
    println!("bench took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Directory name of a bench bundle: the preset, plus the precision when not f32.
fn bundle_name(preset: &str, precision: Precision) -> String {
    match precision {
        Precision::F32 => preset.to_string(),
        p => format!("{preset}-{p}"),
    }
}

/// Bundles of `preset`'s shape with the same random weights at each precision and a tokenizer
/// trained on `corpus`, whose vocabulary size the config then takes (a small corpus may give
/// fewer tokens than asked).
fn build_random_bundles(
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
fn write_gguf_and_parity(dir: &Path, text: &str) -> anyhow::Result<()> {
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

fn spawn_worker(bundle: &Path, text: &Path, args: &BenchArgs) -> anyhow::Result<Report> {
    let exe = std::env::current_exe().context("cannot find the m31r executable to re-run")?;
    let mut command = Command::new(&exe);
    command
        .arg("bench-worker")
        .arg("--bundle")
        .arg(bundle)
        .arg("--text")
        .arg(text)
        .arg("--prompt-tokens")
        .arg(args.prompt_tokens.to_string());
    if args.quick {
        command.arg("--quick");
    }
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    if !output.status.success() {
        bail!("benching bundle {} failed ({})", bundle.display(), output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .with_context(|| format!("bench worker for {} printed {line:?}", bundle.display()))
}

fn print_report(name: &str, r: &Report, m: &Machine, random: bool) {
    let bw = m.bandwidth_gbs * 1e9;
    let weights = r.weight_bytes as f64;
    let file = r.weight_file_bytes as f64;
    let startup_bound = (file / (m.sha256_gbs * 1e9) + file / bw) * 1e3;
    let prefill_bound =
        2.0 * r.params as f64 * f64::from(r.prefill.prompt_tokens) / (m.gflops * 1e9) * 1e3;
    let pass_ms = |context: f64| (weights + r.kv_bytes_per_token as f64 * context) / bw * 1e3;
    let keystroke_bound = pass_ms(f64::from(r.keystroke.prompt_tokens));
    let decode_bound = pass_ms(r.decode_context);
    let memory_bound = weights + r.cache_bytes as f64;
    // The peer's numbers are for a model of about small's size; beside tiny they would mislead.
    let peer = r.params > 20_000_000;
    let reference =
        |value: f64| if peer { format!("{PEER} ≈ {value} ms") } else { String::new() };

    println!();
    println!(
        "── {name}: {:.1}M parameters · vocab {} · {} layers × d_model {} · context {}{} · \
         {} threads ──",
        r.params as f64 / 1e6,
        r.vocab,
        r.n_layers,
        r.d_model,
        r.context,
        if random { " · random weights" } else { "" },
        r.threads,
    );
    println!("{:<40} {:>12} {:>12} {:>8}   reference", "", "measured", "bound", "× bound");
    let row = |what: String, measured: f64, bound: f64, unit: &str, reference: String| {
        println!(
            "{what:<40} {:>12} {:>12} {:>8.2}   {reference}",
            format!("{measured:.1} {unit}"),
            format!("{bound:.1} {unit}"),
            measured / bound
        );
    };
    row(
        "start-up (open + verify + build)".into(),
        r.startup_ms,
        startup_bound,
        "ms",
        format!("goal ≤ {STARTUP_GOAL_MS} ms"),
    );
    let tokens = r.prefill.prompt_tokens;
    row(
        format!(
            "cold prefill, {tokens} tokens ({:.0} tok/s)",
            f64::from(tokens) * 1e3 / r.prefill.prefill_ms
        ),
        r.prefill.prefill_ms,
        prefill_bound,
        "ms",
        if peer {
            format!("{PEER} ≈ {:.0} ms", PEER_PREFILL_1000_MS * f64::from(tokens) / 1000.0)
        } else {
            String::new()
        },
    );
    row(
        format!("keystroke → first token ({:.1} new tok)", r.keystroke_new_tokens),
        r.keystroke.first_ms,
        keystroke_bound,
        "ms",
        reference(PEER_KEYSTROKE_MS),
    );
    row(
        format!("decode per token ({:.0} tok/s)", 1e3 / r.decode_ms_per_token),
        r.decode_ms_per_token,
        decode_bound,
        "ms",
        reference(PEER_DECODE_MS),
    );
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    row(
        "resident memory".into(),
        mib(r.resident_after),
        mib(memory_bound as u64),
        "MiB",
        String::new(),
    );
    let k = &r.keystroke;
    println!(
        "  prefill    best of {} prompts sharing nothing with the cache ({} cached tokens)",
        r.prefill_reps, r.prefill.cached_tokens
    );
    println!(
        "  keystroke  {} typed characters on a {}-token FIM prompt warmed once; the median one: \
         {} tokens cached, engine {:.1} ms of which forward {:.1} ms (the rest: encoding the \
         prompt, cache lookup, sampling); p90 {:.1} ms",
        r.keystrokes,
        k.prompt_tokens,
        k.cached_tokens,
        k.total_ms,
        k.prefill_ms,
        r.keystroke_p90_ms,
    );
    println!(
        "  decode     {} tokens, ~{:.0} tokens of context on average",
        r.decode_tokens, r.decode_context
    );
    println!(
        "  memory     {:.1} MiB before loading, {:.1} MiB loaded, {:.1} MiB after the runs \
         (KV cache {:.1} MiB)",
        mib(r.resident_before),
        mib(r.resident_loaded),
        mib(r.resident_after),
        mib(r.cache_bytes),
    );
}

/// One request through the daemon's socket, if one answers: what the socket adds to the engine.
fn socket_round_trip(conn: &Connection) {
    let socket = crate::socket_path(conn);
    if !socket.exists() {
        println!("\nsocket: no m31rd at {}; round trip not measured", socket.display());
        return;
    }
    let measured = (|| -> anyhow::Result<String> {
        let mut target = Target::connect(&socket)?;
        let handshake = match &target {
            Target::Daemon(d) => d.handshake(),
            Target::Local(_) => Duration::ZERO,
        };
        let t = Instant::now();
        target.run(&Request::Status { id: "bench-status".into() }, &mut |_| {})?;
        let status = t.elapsed();
        let request = Request::Generate {
            id: "bench-generate".into(),
            prompt: "fn main() {".into(),
            params: GenerationParams { max_tokens: 1, ..GenerationParams::default() },
        };
        let t = Instant::now();
        let event = target.run(&request, &mut |_| {})?;
        let wall = t.elapsed().as_secs_f64() * 1e3;
        let Event::Done { timings, .. } = event else {
            bail!("the 1-token request ended with {event:?}");
        };
        Ok(format!(
            "connect + hello {:.2} ms · status round trip {:.2} ms · 1-token generate {wall:.2} ms \
             of which the daemon reports {:.2} ms → socket and framing {:.2} ms",
            handshake.as_secs_f64() * 1e3,
            status.as_secs_f64() * 1e3,
            timings.total_ms,
            wall - timings.total_ms
        ))
    })();
    match measured {
        Ok(line) => println!("\nsocket: m31rd at {}: {line}", socket.display()),
        Err(e) => println!("\nsocket: m31rd at {} not measured: {e:#}", socket.display()),
    }
}

/// The child side: load the bundle, measure, print one JSON line.
pub fn worker(conn: &Connection, args: &WorkerArgs) -> anyhow::Result<()> {
    let Some(bundle) = &conn.bundle else { bail!("bench-worker needs --bundle DIR") };
    let resident_before = m31r_daemon::server::resident_bytes();
    let weight_file = bundle.join("model.safetensors");
    let weight_file_bytes = std::fs::metadata(&weight_file)
        .with_context(|| format!("cannot stat {}", weight_file.display()))?
        .len();
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("cannot read prompt text {}", args.text.display()))?;

    let mut target = Target::load(bundle)?;
    let resident_loaded = m31r_daemon::server::resident_bytes();
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
            None => Request::Warm { id, input },
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
        resident_after: m31r_daemon::server::resident_bytes(),
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

/// Threads candle's CPU kernels use.
fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Throughput of the bundle checksum (one thread, as `Bundle::open` hashes), in GB/s.
fn sha256_gbs() -> f64 {
    let buffer = vec![0x5au8; 64 << 20];
    let t = Instant::now();
    black_box(m31r_model::bundle::sha256_hex(black_box(&buffer)));
    buffer.len() as f64 / t.elapsed().as_secs_f64() / 1e9
}
