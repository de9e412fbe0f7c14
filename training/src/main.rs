//! `m31r-train`: command-line entry point of the training pipeline.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use m31r_train::budget::TimeBudget;
use m31r_train::config::OptimizerKind;
use m31r_train::corpus::{CorpusOptions, build_corpus, default_registry_src};
use m31r_train::eval::{EvalOptions, EvalReport, evaluate_bundle};
use m31r_train::params::{ParamsQuery, params_report};
use m31r_train::quickstart::{QuickstartOptions, quickstart};
use m31r_train::shards::{PrepareOptions, prepare};
use m31r_train::tok::{TokenizerOptions, train_tokenizer};
use m31r_train::train::TrainOptions;
use m31r_train::train::bench::BenchShape;
use m31r_train::{DataConfig, Progress, fetch};

/// Default data directory, relative to the working directory.
const DEFAULT_DATA: &str = "runs/data";

/// Training budget of `quickstart` with the built-in tiny config, in minutes, measuring the
/// candidate shapes included (see `m31r_train::budget`). On 2 idle cores a fresh clone's release
/// build took 3 min 34 s – 3 min 45 s and the other stages (corpus, tokenizer, shards, a
/// 400-line eval, export, the daemon check) about 50 s; with a 10-minute budget the whole of
/// scripts/quickstart.sh took 13 min 23 s (training ended 54 s inside its budget; see
/// `STEP_TIME_SHARE` there), within the 15 minutes it is meant to fit. The `quickstart` help
/// text, scripts/quickstart.sh and README.md repeat this number.
const DEFAULT_QUICKSTART_MINUTES: f64 = 10.0;

/// M31R's training pipeline. The data stages run in order on one data directory:
/// `corpus`, then `tokenizer`, then `prepare`.
#[derive(Debug, Parser)]
#[command(name = "m31r-train", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Collect Rust sources into a filtered, deduplicated corpus split by crate.
    ///
    /// Writes manifest.jsonl (every file seen: kept with its split, or dropped with a reason),
    /// documents.bin (the kept texts) and dataset.json (dataset id and statistics) to --out.
    Corpus {
        /// Directories of Rust code [default: $CARGO_HOME/registry/src, unless --fetch-crates].
        dirs: Vec<PathBuf>,
        /// Download the crates pinned in this list (e.g. configs/corpus/crates.txt) with
        /// `cargo fetch` and add their sources to the inputs.
        #[arg(long, value_name = "FILE")]
        fetch_crates: Option<PathBuf>,
        /// Data directory to write.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA)]
        out: PathBuf,
        /// Training config: a TOML file or a shipped config name (tiny, small, cpu).
        #[arg(long, value_name = "FILE|PRESET", default_value = "tiny")]
        config: String,
        /// Replace a data directory that holds a different dataset (its tokenizer and shards
        /// are deleted).
        #[arg(long)]
        force: bool,
    },
    /// Train the byte-level BPE tokenizer on the train split; writes tokenizer.json.
    Tokenizer {
        /// Data directory written by `corpus`.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// Training config: a TOML file or a shipped config name (tiny, small, cpu).
        #[arg(long, value_name = "FILE|PRESET", default_value = "tiny")]
        config: String,
        /// Vocabulary size, special tokens included [default: from the config].
        #[arg(long, value_name = "N")]
        vocab_size: Option<usize>,
    },
    /// Tokenize every split into packed shards with an index; writes <data>/shards/.
    Prepare {
        /// Data directory with a corpus and a tokenizer.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// Training config: a TOML file or a shipped config name (tiny, small, cpu).
        #[arg(long, value_name = "FILE|PRESET", default_value = "tiny")]
        config: String,
    },
    /// Train the model on the prepared shards (next-token + FIM + CoT objectives).
    ///
    /// Writes run.json (the resolved run), metrics.jsonl (a JSON line per log step and per
    /// validation pass) and checkpoints/ to the run directory. Ctrl-C checkpoints and stops;
    /// --resume continues exactly where the newest checkpoint left off.
    Train {
        /// Data directory with shards (from `prepare`).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// Training config: a TOML file or a shipped config name (tiny, small, cpu).
        #[arg(long, value_name = "FILE|PRESET", default_value = "tiny")]
        config: String,
        /// Run directory.
        #[arg(long, value_name = "DIR", default_value = "runs/tiny")]
        run_dir: PathBuf,
        /// Continue the run in --run-dir from its newest checkpoint.
        #[arg(long)]
        resume: bool,
        /// Replace a run directory that holds another run.
        #[arg(long)]
        force: bool,
        /// Override train.steps.
        #[arg(long)]
        steps: Option<u64>,
        /// Size the run to a training budget of M minutes, measuring included: as `quickstart
        /// --minutes` does, measures the training step of candidate shapes at the config's batch
        /// shape and trains the one with the lowest predicted loss for the time, for as many
        /// steps as fit (instead of the config's model and steps). Prints what it chose and why.
        #[arg(long, value_name = "M", conflicts_with_all = ["steps", "resume"], value_parser = positive_minutes)]
        minutes: Option<f64>,
        /// Parameter targets of the candidate shapes for --minutes, comma-separated (tests).
        #[arg(
            long,
            value_name = "N,N,...",
            value_delimiter = ',',
            requires = "minutes",
            hide = true
        )]
        ladder: Option<Vec<u64>>,
        /// Override train.lr.
        #[arg(long)]
        lr: Option<f64>,
        /// Override train.batch_size.
        #[arg(long)]
        batch_size: Option<usize>,
        /// Override train.seq_len.
        #[arg(long)]
        seq_len: Option<usize>,
        /// Override train.seed.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Export a run's newest checkpoint as a release bundle (weights, tokenizer, config,
    /// metadata, checksums), loadable by m31rd.
    Export {
        /// Run directory written by `train`.
        run_dir: PathBuf,
        /// Data directory whose tokenizer the run used.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// Bundle directory to create (must not exist).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Store the weights quantized (q8_0, q4_0, q4_k) or as f16, so m31rd loads them without
        /// converting [default: f32].
        #[arg(long, value_name = "PRECISION")]
        quantize: Option<m31r_model::Precision>,
        /// Also write the same weights as a GGUF file (llama.cpp, Ollama) to PATH.
        #[arg(long, value_name = "PATH")]
        gguf: Option<PathBuf>,
        /// JSON report of `eval` on this checkpoint (`eval --out`); its metrics go into the
        /// bundle's metadata.
        #[arg(long, value_name = "FILE")]
        eval_report: Option<PathBuf>,
    },
    /// Measure training throughput (tokens/s, achieved GFLOP/s as a share of this machine's f32
    /// matmul throughput, measured in the same run) of the real training step on preset shapes.
    Bench {
        /// Presets to measure; `sized:N` measures the shape the quickstart's sizing solves for a
        /// target of N parameters (e.g. `sized:1500000`, the 160×4 model the 10-minute budget
        /// picked here).
        #[arg(long, value_delimiter = ',', default_value = "tiny,small")]
        presets: Vec<String>,
        /// Timed steps per preset [default: 5 for tiny, 2 for larger presets].
        #[arg(long)]
        steps: Option<usize>,
        /// Sequences per step [default: 8 for tiny, 2 for larger presets].
        #[arg(long)]
        batch_size: Option<usize>,
        /// Tokens per sequence [default: 256 for tiny, 512 for larger presets].
        #[arg(long)]
        seq_len: Option<usize>,
        /// Optimizers to measure, a row each (`adamw`, `muon`).
        #[arg(long, value_delimiter = ',', default_value = "adamw,muon", value_parser = parse_optimizer)]
        optimizers: Vec<OptimizerKind>,
    },
    /// Evaluate a bundle on the test split: bits/byte beside xz -9 and zstd -19, and single-line
    /// completion (FIM and left to right) beside an n-gram baseline. See docs/eval.md.
    Eval {
        /// Release bundle directory.
        #[arg(long, value_name = "DIR")]
        bundle: PathBuf,
        /// Data directory the model was trained on (same tokenizer).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// Masked lines in the completion benchmark.
        #[arg(long, value_name = "N", default_value_t = 400)]
        items: usize,
        /// Test bytes scored for bits/byte (whole documents until reached).
        #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024)]
        max_bytes: u64,
        /// Seed of the line sample.
        #[arg(long, default_value_t = 31)]
        seed: u64,
        /// Prompt budget in tokens [default: the context minus 64 generated tokens].
        #[arg(long, value_name = "N")]
        max_prompt_tokens: Option<usize>,
        /// Order of the n-gram baseline.
        #[arg(long, value_name = "N", default_value_t = 4)]
        ngram_order: usize,
        /// Train-split tokens the n-gram baseline counts.
        #[arg(long, value_name = "N", default_value_t = 4_000_000)]
        ngram_tokens: u64,
        /// Write the JSON report here.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Device: cpu, cuda or cuda:N (a CUDA build, see scripts/cuda-build.sh).
        #[arg(long, default_value = "cpu")]
        device: m31r_model::DeviceSpec,
        /// Recall mixed into the model's predictions: `off` or ORDER,WEIGHT,HALF (see
        /// docs/eval.md) [default: the daemon's]
        #[arg(long, value_name = "SPEC", value_parser = m31r_model::recall::RecallParams::parse)]
        recall: Option<m31r_model::recall::RecallParams>,
        /// Split to score: test (the report's) or validation (to choose settings on).
        #[arg(long, default_value = "test")]
        split: m31r_train::split::Split,
        /// Also print bits/byte over a grid of recall weights and half-lengths.
        #[arg(long)]
        tune_recall: bool,
    },
    /// Draw a run's training and validation curves (SVG) and print its summary.
    Report {
        /// Run directory written by `train`.
        run_dir: PathBuf,
        /// Picture to write [default: RUN_DIR/loss.svg].
        #[arg(long, value_name = "FILE.svg")]
        out: Option<PathBuf>,
    },
    /// The whole pipeline for a first model: corpus → tokenizer → prepare → train → eval →
    /// export. Training is sized to a time budget (--minutes, default 10): the model size and
    /// the number of steps with the lowest predicted loss for the time, from the training speed
    /// of candidate shapes measured on this machine; the other stages add under a minute on 2
    /// CPU cores. Ends with the eval table and the bundle's path: the default model directory,
    /// which m31rd serves when no bundle is configured.
    Quickstart {
        /// Directories of Rust code [default: $CARGO_HOME/registry/src].
        dirs: Vec<PathBuf>,
        /// Bundle directory to write [default: ~/.local/share/m31r/bundle or the platform's
        /// equivalent].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Work directory for the corpus, shards, run and eval report (replaced each time)
        /// [default: quickstart/ in M31R's data directory].
        #[arg(long, value_name = "DIR")]
        work: Option<PathBuf>,
        /// Replace the model already in --out (once the new one is complete).
        #[arg(long)]
        force: bool,
        /// Training config: a TOML file or a shipped config name (tiny, small, cpu).
        #[arg(long, value_name = "FILE|PRESET", default_value = "tiny")]
        config: String,
        /// Training budget in minutes, measuring the candidate shapes included: picks the model
        /// size (tiny's proportions, 0.5M–6M parameters) and the steps for it [default: 10 with
        /// the built-in tiny config; other configs train their preset for their train.steps].
        #[arg(long, value_name = "M", conflicts_with = "steps", value_parser = positive_minutes)]
        minutes: Option<f64>,
        /// Train the config's model preset for this many steps, without sizing.
        #[arg(long, value_name = "N")]
        steps: Option<u64>,
        /// Masked lines in the eval's completion benchmark (at 100, one line moves the exact
        /// match by 1 %, as much as the model and the n-gram differ at this size).
        #[arg(long, value_name = "N", default_value_t = 400)]
        eval_items: usize,
    },
    /// Print the parameter table of a preset or of the solver's shape for a target size.
    #[command(group(clap::ArgGroup::new("model").required(true).args(["preset", "target_params"])))]
    Params {
        /// Model preset (tiny, small, medium, large).
        #[arg(long, value_name = "NAME")]
        preset: Option<String>,
        /// Target parameter count (solved with the small preset's ratios and head size).
        #[arg(long, value_name = "N")]
        target_params: Option<u64>,
        /// Vocabulary size [default: the preset's; 16384 for --target-params].
        #[arg(long, value_name = "V")]
        vocab: Option<usize>,
    },
}

/// An optimizer name as `train.optimizer` spells it.
fn parse_optimizer(name: &str) -> Result<OptimizerKind, String> {
    match name {
        "adamw" => Ok(OptimizerKind::Adamw),
        "muon" => Ok(OptimizerKind::Muon),
        other => Err(format!("unknown optimizer {other:?}: expected adamw or muon")),
    }
}

fn main() -> Result<()> {
    // SAFETY: the first statement of main: no other thread exists yet.
    unsafe { m31r_model::machine::park_idle_candle_threads() };
    let cli = Cli::parse();
    m31r_model::machine::keep_freed_memory();
    let progress = Progress::stderr();
    let started = Instant::now();
    match cli.command {
        Command::Corpus { dirs, fetch_crates, out, config, force } => {
            let config = load_config(&config)?;
            let mut inputs = dirs;
            if let Some(list) = &fetch_crates {
                let fetched = fetch::fetch_crates(list)
                    .with_context(|| format!("fetching the crates of {}", list.display()))?;
                eprintln!("fetched {} crates listed in {}", fetched.len(), list.display());
                inputs.extend(fetched);
            } else if inputs.is_empty() {
                inputs.push(
                    default_registry_src().context(
                        "no input directory given and neither CARGO_HOME nor HOME is set",
                    )?,
                );
            }
            let opts = CorpusOptions {
                inputs,
                out: out.clone(),
                corpus: config.corpus,
                split: config.split,
                force,
                progress,
            };
            let info = build_corpus(&opts)
                .with_context(|| format!("building the corpus in {}", out.display()))?;
            print!("{}", info.table());
        }
        Command::Tokenizer { data, config, vocab_size } => {
            let config = load_config(&config)?;
            let vocab_size = match vocab_size {
                Some(n) => n,
                None => config.vocab_size()?,
            };
            let opts = TokenizerOptions {
                data: data.clone(),
                vocab_size,
                max_train_bytes: config.tokenizer.max_train_bytes,
                progress,
            };
            let report = train_tokenizer(&opts)
                .with_context(|| format!("training the tokenizer of {}", data.display()))?;
            print!("{}", report.table());
        }
        Command::Prepare { data, config } => {
            let config = load_config(&config)?;
            let opts = PrepareOptions {
                data: data.clone(),
                shard_tokens: config.shards.shard_tokens,
                progress,
            };
            let index = prepare(&opts)
                .with_context(|| format!("preparing shards in {}", data.display()))?;
            print!("{}", index.table());
        }
        Command::Train {
            data,
            config,
            run_dir,
            resume,
            force,
            steps,
            minutes,
            ladder,
            lr,
            batch_size,
            seq_len,
            seed,
        } => {
            let config = load_config(&config)?;
            let mut train = config.train.clone();
            train.steps = steps.unwrap_or(train.steps);
            train.lr = lr.unwrap_or(train.lr);
            train.batch_size = batch_size.unwrap_or(train.batch_size);
            train.seq_len = seq_len.unwrap_or(train.seq_len);
            train.seed = seed.unwrap_or(train.seed);
            install_interrupt_handler();
            let mut opts = TrainOptions {
                data,
                run_dir: run_dir.clone(),
                model: config.model,
                shape: None,
                train,
                resume,
                force,
                progress,
            };
            let plan = match minutes {
                Some(minutes) => {
                    let budget = match ladder {
                        Some(ladder) => TimeBudget { minutes, ladder },
                        None => TimeBudget::minutes(minutes),
                    };
                    let plan = m31r_train::budget::size_run(&mut opts, &budget, true)
                        .with_context(|| format!("sizing training run {}", run_dir.display()))?;
                    eprint!("{}", plan.table());
                    Some(plan)
                }
                None => None,
            };
            let s = m31r_train::train::train(&opts)
                .with_context(|| format!("training run {}", run_dir.display()))?;
            println!(
                "steps {} · tokens {} · loss {:.4} · {:.0} tok/s{}",
                s.steps,
                s.tokens_seen,
                s.final_loss,
                s.tokens_per_s,
                if s.interrupted { " · interrupted (checkpoint written)" } else { "" }
            );
            if let Some((loss, bpb)) = s.validation {
                println!("validation loss {loss:.4} nats/token · {bpb:.4} bits/byte");
            }
            if let Some(plan) = plan {
                println!("{}", plan.summary());
            }
        }
        Command::Export { run_dir, data, out, quantize, gguf, eval_report } => {
            let eval = match eval_report {
                Some(path) => {
                    let report = EvalReport::read(&path)
                        .with_context(|| format!("reading the eval report {}", path.display()))?;
                    Some((path, report))
                }
                None => None,
            };
            let options = m31r_train::export::ExportOptions {
                precision: quantize.unwrap_or_default(),
                gguf: gguf.clone(),
                eval,
            };
            let meta = m31r_train::export::export_with(&run_dir, &data, &out, &options)
                .with_context(|| format!("exporting {} to {}", run_dir.display(), out.display()))?;
            println!(
                "bundle {} · {} · step {} · {} tokens seen · dataset {}",
                out.display(),
                meta.precision,
                meta.steps,
                meta.tokens_seen,
                meta.dataset_id
            );
            if let Some(gguf) = gguf {
                println!("gguf {}", gguf.display());
            }
        }
        Command::Bench { presets, steps, batch_size, seq_len, optimizers } => {
            let shapes: Vec<_> = presets
                .iter()
                .flat_map(|p| optimizers.iter().map(move |o| (p, o)))
                .map(|(p, o)| {
                    // A sizing candidate runs at tiny's batch; its model replaces the preset's.
                    let sized = m31r_train::budget::sized_config(p).transpose()?;
                    let mut shape =
                        BenchShape::default_for(if sized.is_some() { "tiny" } else { p });
                    shape.preset = p.clone();
                    shape.config = sized;
                    shape.steps = steps.unwrap_or(shape.steps);
                    shape.batch_size = batch_size.unwrap_or(shape.batch_size);
                    shape.seq_len = seq_len.unwrap_or(shape.seq_len);
                    shape.optimizer = *o;
                    Ok(shape)
                })
                .collect::<Result<_, String>>()
                .map_err(anyhow::Error::msg)?;
            print!("{}", m31r_train::train::bench::run(&shapes).context("training bench")?);
        }
        Command::Eval {
            bundle,
            data,
            items,
            max_bytes,
            seed,
            max_prompt_tokens,
            ngram_order,
            ngram_tokens,
            out,
            device,
            recall,
            split,
            tune_recall,
        } => {
            let opts = EvalOptions {
                device,
                recall: recall.unwrap_or_default(),
                split,
                tune_recall,
                items,
                max_bytes,
                seed,
                max_prompt_tokens,
                ngram_order,
                ngram_max_tokens: ngram_tokens,
                progress,
                ..EvalOptions::new(&bundle, &data)
            };
            let report = evaluate_bundle(&opts).with_context(|| {
                format!(
                    "evaluating {} on the {split} split of {}",
                    bundle.display(),
                    data.display()
                )
            })?;
            if let Some(out) = &out {
                let json =
                    serde_json::to_string_pretty(&report).context("serialising the report")?;
                std::fs::write(out, json + "\n")
                    .with_context(|| format!("writing the eval report {}", out.display()))?;
            }
            print!("{}", report.table());
            if let Some(out) = &out {
                println!("report {}", out.display());
            }
        }
        Command::Report { run_dir, out } => {
            let (summary, svg) = m31r_train::report::report(&run_dir, out.as_deref())
                .with_context(|| format!("reporting on run {}", run_dir.display()))?;
            print!("{}", summary.table());
            println!("curves {}", svg.display());
        }
        Command::Quickstart { dirs, out, work, force, config, minutes, steps, eval_items } => {
            let builtin_tiny = config == "tiny";
            let mut config = load_config(&config)?;
            let budget = match (minutes, steps) {
                (Some(m), _) => Some(m),
                (None, Some(n)) => {
                    config.train.steps = n;
                    None
                }
                (None, None) if builtin_tiny => Some(DEFAULT_QUICKSTART_MINUTES),
                (None, None) => None,
            };
            let data_dir = m31r_model::bundle::m31r_data_dir();
            let no_home = || anyhow::anyhow!("no home directory: pass --out and --work");
            let inputs = if dirs.is_empty() {
                let registry = default_registry_src().filter(|d| d.is_dir()).context(
                    "no Cargo registry sources to learn from: pass directories of Rust code",
                )?;
                vec![registry]
            } else {
                dirs
            };
            install_interrupt_handler();
            let opts = QuickstartOptions {
                inputs,
                work: match work {
                    Some(w) => w,
                    None => data_dir.clone().ok_or_else(no_home)?.join("quickstart"),
                },
                out: match out {
                    Some(o) => o,
                    None => m31r_model::bundle::default_bundle_dir().ok_or_else(no_home)?,
                },
                force,
                config,
                budget: budget.map(TimeBudget::minutes),
                eval_items,
                eval_max_bytes: 256 * 1024,
                progress,
                log: true,
            };
            let report = quickstart(&opts)?;
            println!();
            if let Some(plan) = &report.plan {
                println!("{}", plan.summary());
            }
            print!("{}", report.eval.table());
            let stages: Vec<String> =
                report.stages.iter().map(|(name, s)| format!("{name} {s:.0}s")).collect();
            println!("stages: {}", stages.join(" · "));
            println!("bundle {}", report.bundle.display());
            println!(
                "serve it: m31rd{}",
                if Some(&report.bundle) == m31r_model::bundle::default_bundle_dir().as_ref() {
                    String::new()
                } else {
                    format!(" --bundle {}", report.bundle.display())
                }
            );
        }
        Command::Params { preset, target_params, vocab } => {
            let query = match (preset, target_params) {
                (Some(name), _) => ParamsQuery::Preset { name, vocab },
                (None, Some(n)) => ParamsQuery::target(n, vocab.unwrap_or(16_384)),
                (None, None) => anyhow::bail!("give --preset NAME or --target-params N"),
            };
            print!("{}", params_report(&query).context("parameter table")?);
        }
    }
    println!("wall time {:.2}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Ctrl-C sets a flag the training loop checks between steps: it checkpoints, then stops.
fn install_interrupt_handler() {
    extern "C" fn on_interrupt(_: libc::c_int) {
        m31r_train::train::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t) };
}

/// `--minutes`: a positive, finite number.
fn positive_minutes(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(m) if m.is_finite() && m > 0.0 => Ok(m),
        _ => Err(format!("{text:?} is not a positive number of minutes")),
    }
}

fn load_config(spec: &str) -> Result<DataConfig> {
    DataConfig::load(spec).with_context(|| format!("loading training config {spec}"))
}
