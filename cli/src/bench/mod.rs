//! `m31r bench`: start-up, cold prefill, keystroke latency, decode and memory of the engine, each
//! printed beside the physical bound this machine sets, measured in the same run. The parent
//! measures the machine and builds bundles; a child process per model (`bench-worker`) loads it
//! and measures, so start-up and memory are a fresh process's, as the daemon's would be.
//!
//! `--precisions` benches the same random weights stored at several precisions (issue 10);
//! `--gguf` also writes each as GGUF with a parity fixture (token ids and top logits of a few
//! prompts), and `--json` the reports, which `scripts/llamacpp_bench.sh` runs llama.cpp beside.
//!
//! `--load N` (issue 18) repeats each model's measurements `--repeat` times quiet and then as many
//! times with N CPU-bound competitor processes that the bench starts and stops itself, and prints
//! the quiet median, the loaded median and the loaded worst of each figure.

mod bundles;
mod corpus;
pub mod replay;
mod report;
mod worker;

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use m31r_model::Precision;
use m31r_protocol::{Event, GenerationParams, Request};
use serde::{Deserialize, Serialize};

use crate::connection::{Connection, socket_path};
use crate::target::Target;

pub use worker::worker;

/// `m31r bench`'s options.
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
    /// Also measure each model with N CPU-bound competitor processes running (started and
    /// stopped by the bench), beside the quiet runs: quiet median, loaded median, loaded worst.
    #[arg(long, value_name = "N", default_value_t = 0)]
    load: usize,
    /// Runs of each model's measurements, quiet and (with --load) loaded [default: 5 with
    /// --load, else 1].
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: Option<u32>,
    /// The executable whose `bench-worker` measures (default: this one), e.g. an older build
    /// to compare against in the same sitting.
    #[arg(long, value_name = "PATH", hide = true)]
    worker_exe: Option<PathBuf>,
    /// A benchmark other than the engine's.
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
}

/// `m31r bench`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Retype sampled lines of the held-out Rust files under DIR through the real m31r-lsp and
    /// m31rd (serving --bundle), accepting a suggestion once it completes the line: characters
    /// saved, requests, daemon requests per keystroke and keystroke latency.
    Replay(replay::ReplayArgs),
}

/// `m31r bench-worker`'s options: what the parent passes to each child.
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

/// The parent side: measures the machine, builds or opens the bundles, benches each in a child
/// process and prints the reports.
pub fn run(conn: &Connection, args: &BenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let reps = if args.quick { 2 } else { 4 };
    let threads = rayon_threads();
    // Refuse a device this binary or machine lacks before measuring anything.
    conn.device.open()?;
    if conn.device.is_cuda() {
        println!(
            "m31r bench: engine in-process, on {} (the bounds below are this machine's CPU's, \
             not the GPU's)",
            conn.device
        );
    } else {
        println!("m31r bench: engine in-process, on CPU, {threads} threads");
    }
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
                    .map(|&p| (p, root.join(bundles::bundle_name(preset, p))))
                    .collect();
                if args.keep.is_some() && dirs.iter().all(|(_, d)| d.exists()) {
                    println!("reusing {preset} bundles (kept by an earlier --keep)");
                } else {
                    bundles::build_random_bundles(preset, &corpus, &dirs)?;
                }
                for (precision, dir) in dirs {
                    if args.gguf {
                        bundles::write_gguf_and_parity(&dir, &prompt_text)?;
                    }
                    bundles.push((format!("{preset} {precision}"), dir));
                }
            }
            bundles
        }
    };

    let repeat = args.repeat.map_or(if args.load > 0 { 5 } else { 1 }, |r| r as usize);
    if args.load > 0 {
        println!(
            "load: {} CPU-bound competitor processes; each model measured {repeat} times quiet, \
             then {repeat} times with them running",
            args.load
        );
    }
    let mut reports = Vec::new();
    for (name, dir) in &bundles {
        let quiet = (0..repeat)
            .map(|_| spawn_worker(dir, &text_path, args, conn))
            .collect::<anyhow::Result<Vec<_>>>()?;
        report::print_report(name, &quiet[0], &machine, conn.bundle.is_none());
        let mut entry = serde_json::json!({ "name": name, "bundle": dir, "report": quiet[0] });
        if repeat > 1 {
            report::print_repeats(&quiet);
            entry["quiet_runs"] = serde_json::to_value(&quiet)?;
        }
        if args.load > 0 {
            let load = Load::start(args.load)?;
            let loaded = (0..repeat)
                .map(|_| spawn_worker(dir, &text_path, args, conn))
                .collect::<anyhow::Result<Vec<_>>>()?;
            drop(load);
            report::print_load(args.load, &quiet, &loaded);
            entry["loaded_runs"] = serde_json::to_value(&loaded)?;
        }
        reports.push(entry);
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "threads": threads,
            "load": args.load,
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

/// CPU-bound competitor processes (`sh` busy loops), stopped when this is dropped; each also
/// stops by itself once the bench process is gone (Ctrl-C, a crash), as it polls its parent.
struct Load {
    children: Vec<Child>,
}

impl Load {
    /// One competitor's shell loop: mostly arithmetic, with a `kill -0` on the bench (its first
    /// argument, the bench's pid) every few thousand steps, so it ends once the bench is gone.
    /// Not `$PPID`: a parent that died before the shell read it would leave it init's pid, and
    /// the loop running for ever.
    const LOOP: &str = "parent=$1; while kill -0 \"$parent\" 2>/dev/null; do i=0; \
                        while [ $i -lt 5000 ]; do i=$((i+1)); done; done";

    /// Starts `n` competitors.
    fn start(n: usize) -> anyhow::Result<Self> {
        let mut load = Self { children: Vec::with_capacity(n) };
        for k in 0..n {
            let child = Command::new("sh")
                .args(["-c", Self::LOOP, "sh", &std::process::id().to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| {
                    format!("cannot start competitor process {} of {n} (sh)", k + 1)
                })?;
            load.children.push(child);
        }
        Ok(load)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

fn spawn_worker(
    bundle: &Path,
    text: &Path,
    args: &BenchArgs,
    conn: &Connection,
) -> anyhow::Result<Report> {
    let exe = match &args.worker_exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().context("cannot find the m31r executable to re-run")?,
    };
    let mut command = Command::new(&exe);
    command
        .arg("bench-worker")
        .arg("--bundle")
        .arg(bundle)
        .arg("--text")
        .arg(text)
        .arg("--prompt-tokens")
        .arg(args.prompt_tokens.to_string())
        .arg("--device")
        .arg(conn.device.to_string());
    if let Some(recall) = conn.recall {
        command.arg("--recall").arg(recall.to_string());
    }
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

/// One request through the daemon's socket, if one answers: what the socket adds to the engine.
fn socket_round_trip(conn: &Connection) {
    let socket = socket_path(conn);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether process `pid` still runs (gone, or a zombie nobody reaped yet, counts as not).
    fn running(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
    }

    fn wait_until(what: &str, ok: impl Fn() -> bool) {
        let start = Instant::now();
        while !ok() {
            assert!(start.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn load_runs_its_competitors_until_dropped() {
        let load = Load::start(2).unwrap();
        let pids: Vec<u32> = load.children.iter().map(Child::id).collect();
        std::thread::sleep(Duration::from_millis(50));
        assert!(pids.iter().all(|&p| running(p)), "competitors {pids:?} not running");
        drop(load);
        assert!(pids.iter().all(|&p| !running(p)), "competitors {pids:?} outlived the load");
    }

    #[test]
    fn a_competitor_stops_by_itself_once_its_parent_is_gone() {
        // A parent shell that starts the loop and exits at once, as a killed bench would.
        let out = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "sh -c '{}' sh $$ >/dev/null 2>&1 & echo $!",
                    Load::LOOP.replace('\'', "'\\''")
                ),
            ])
            .output()
            .unwrap();
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        wait_until("the orphaned competitor kept running", || !running(pid));
    }

    #[test]
    fn load_and_repeat_flags_parse() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        use clap::Parser;
        let cli = Cli::try_parse_from(["m31r", "--load", "2", "--repeat", "3"]).unwrap();
        assert_eq!((cli.bench.load, cli.bench.repeat), (2, Some(3)));
        let cli = Cli::try_parse_from(["m31r"]).unwrap();
        assert_eq!((cli.bench.load, cli.bench.repeat), (0, None));
        assert!(Cli::try_parse_from(["m31r", "--repeat", "0"]).is_err());
    }
}
