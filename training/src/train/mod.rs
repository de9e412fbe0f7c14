//! `m31r-train train`: the training loop. Reads top to bottom in the order it runs: batch,
//! forward, loss, backward, step, schedule, eval, log, checkpoint (log first, so that the metrics
//! of every checkpointed step are on disk before the checkpoint is).
//!
//! Loss: L = L_next + α·L_fim + β·L_cot, each term the mean token cross-entropy over its
//! objective's sequences in the micro-batch. Batches are a pure function of (seed, step), so a
//! checkpoint's step is its whole data position and a resumed run repeats the uninterrupted one.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod optim;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use m31r_model::config::{ModelConfig, RawModelConfig};
use m31r_model::tokenizer::Tokenizer;
use m31r_model::transformer::Model;
use serde::{Deserialize, Serialize};

pub use crate::config::{OptimizerKind, Schedule, TrainConfig, TrainPrecision};
use crate::corpus::Corpus;
use crate::error::{Error, invalid};
use crate::fsutil::read_json;
use crate::progress::Progress;
use crate::shards::ShardSet;
use crate::split::Split;
use crate::tok::load_tokenizer;
use batch::{BatchSampler, Objective, Sequence};
use checkpoint::LoopState;
use optim::{Grads, Optimizer};

/// What identifies a run: a run directory holding a different one is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Model shape (the preset with the tokenizer's vocabulary).
    pub model: RawModelConfig,
    /// Loop hyper-parameters.
    pub train: TrainConfig,
    /// Dataset the shards come from.
    pub dataset_id: String,
    /// Tokenizer the shards were written with.
    pub tokenizer_id: String,
}

/// The resolved run, written as `run.json` in the run directory.
pub const RUN_FILE: &str = "run.json";
/// One JSON object per log step and per validation pass.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Inputs of [`train`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Data directory (corpus, tokenizer, shards).
    pub data: PathBuf,
    /// Run directory.
    pub run_dir: PathBuf,
    /// Model preset name (ignored when `shape` is given).
    pub model: String,
    /// A model shape to train instead of the preset's, e.g. one chosen for a time budget; its
    /// vocabulary size is replaced by the tokenizer's.
    pub shape: Option<RawModelConfig>,
    /// Loop settings (ignored on resume: the run's own are used).
    pub train: TrainConfig,
    /// Continue the run in `run_dir` from its newest checkpoint.
    pub resume: bool,
    /// Replace a run directory holding another run.
    pub force: bool,
    /// Progress display.
    pub progress: Progress,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Steps completed.
    pub steps: u64,
    /// Training tokens consumed.
    pub tokens_seen: u64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Last validation loss (nats/token) and bits per byte.
    pub validation: Option<(f64, f64)>,
    /// Training tokens per second in this invocation.
    pub tokens_per_s: f64,
    /// Whether Ctrl-C stopped it (after a checkpoint).
    pub interrupted: bool,
}

/// Set by the Ctrl-C handler; the loop checkpoints and stops at the next step boundary.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Runs (or resumes) training.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary, Error> {
    let corpus_info = Corpus::open(&opts.data)?.info().clone();
    let (tokenizer, tokenizer_id) = load_tokenizer(&opts.data, &corpus_info.dataset_id)?;
    let shards = ShardSet::open(&opts.data, Split::Train)?;
    let val = ShardSet::open(&opts.data, Split::Validation).ok().filter(|s| !s.is_empty());
    if shards.tokenizer_id() != tokenizer_id {
        return Err(invalid(
            opts.data.join("shards"),
            format!(
                "shards were written with tokenizer {} but tokenizer.json is {tokenizer_id}; rerun `prepare`",
                shards.tokenizer_id()
            ),
        ));
    }
    let spec = resolve_run(opts, &tokenizer, &corpus_info.dataset_id, &tokenizer_id)?;
    let cfg = &spec.train;
    let model_config = ModelConfig::new(&spec.model)
        .map_err(|e| invalid(opts.run_dir.join(RUN_FILE), e.to_string()))?;
    if cfg.seq_len > model_config.context_length() {
        return Err(invalid(
            opts.run_dir.join(RUN_FILE),
            format!(
                "train.seq_len = {} exceeds the model's context {}",
                cfg.seq_len,
                model_config.context_length()
            ),
        ));
    }
    let device = device(&cfg.device)?;
    let (model, mut vars) = Model::init(&model_config, cfg.seed, &device)?;
    let mut optimizer = Optimizer::for_config(&vars, cfg)?;
    let mut state = LoopState { step: 0, tokens_seen: 0, clipped_steps: 0 };
    if opts.resume
        && let Some((_, dir)) = checkpoint::list(&opts.run_dir)?.pop()
    {
        state = checkpoint::load(&dir, &mut vars, &mut optimizer)?;
    }
    truncate_metrics(&opts.run_dir.join(METRICS_FILE), state.step)?;

    let sampler = BatchSampler::new(&shards, &tokenizer, cfg);
    let val_sampler = val.as_ref().map(|v| BatchSampler::new(v, &tokenizer, cfg));
    let mut metrics = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.run_dir.join(METRICS_FILE))
        .map_err(|source| Error::Io { path: opts.run_dir.join(METRICS_FILE), source })?;
    let bar = opts.progress.bar(cfg.steps, "train");
    let mut ticker = opts.progress.ticker("train step");
    bar.set_position(state.step);
    let started = Instant::now();
    let first_step = state.step;
    let tokens_per_step = (cfg.batch_size * cfg.grad_accum * cfg.seq_len) as u64;
    let mut summary = TrainSummary {
        steps: state.step,
        tokens_seen: state.tokens_seen,
        final_loss: f64::NAN,
        validation: None,
        tokens_per_s: 0.0,
        interrupted: false,
    };

    while state.step < cfg.steps {
        let step = state.step;
        // Batch, forward, loss, backward — over the micro-batches of this step.
        let mut grads = Grads::default();
        let mut totals = LossTotals::default();
        for micro in 0..cfg.grad_accum {
            let sequences = sampler.micro_batch(step, micro);
            let (loss, parts) = micro_loss(&model, &sequences, cfg, &device)?;
            let loss = (loss / cfg.grad_accum as f64)?;
            grads.accumulate(&vars, &loss.backward()?)?;
            totals.add(&parts);
        }
        // Clip, step, schedule.
        let (grad_norm, clipped) = grads.clip(cfg.grad_clip)?;
        let lr = cfg.lr_at(step);
        optimizer.step(&grads, lr, cfg.weight_decay)?;
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        state.clipped_steps += u64::from(clipped);
        let loss = totals.loss(cfg);
        summary.final_loss = loss;
        if !loss.is_finite() {
            return Err(invalid(
                &opts.run_dir,
                format!("loss became {loss} at step {step}; lower train.lr"),
            ));
        }

        // Eval.
        let last = state.step == cfg.steps;
        if let Some(vs) = &val_sampler
            && ((cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every)) || last)
        {
            let (val_loss, bpb) = evaluate(&model, vs, &tokenizer, cfg, &device)?;
            summary.validation = Some((val_loss, bpb));
            log_line(
                &mut metrics,
                &opts.run_dir,
                serde_json::json!({
                    "step": state.step, "val_loss": val_loss, "val_bits_per_byte": bpb,
                }),
            )?;
        }
        // Log.
        let elapsed = started.elapsed().as_secs_f64();
        let tokens_per_s =
            (state.step - first_step) as f64 * tokens_per_step as f64 / elapsed.max(1e-9);
        summary.tokens_per_s = tokens_per_s;
        if state.step.is_multiple_of(cfg.log_every) || last {
            let mut line = serde_json::json!({
                "step": state.step, "lr": lr, "loss": loss, "grad_norm": grad_norm,
                "clipped": clipped, "clipped_steps": state.clipped_steps,
                "tokens_seen": state.tokens_seen, "tokens_per_s": tokens_per_s,
            });
            for (objective, value) in totals.means() {
                line[format!("loss_{}", objective.name())] = serde_json::json!(value);
            }
            log_line(&mut metrics, &opts.run_dir, line)?;
        }
        // Checkpoint, after the step's metrics are on disk: a run killed right after a checkpoint
        // then has every metric line up to it, and a resume rewrites nothing twice.
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        if state.step.is_multiple_of(cfg.checkpoint_every) || last || interrupted {
            checkpoint::save(&opts.run_dir, &vars, &optimizer, &state, cfg.keep_checkpoints)?;
        }
        bar.set_position(state.step);
        let message = format!("loss {loss:.3} · {tokens_per_s:.0} tok/s");
        ticker.tick(state.step, first_step, cfg.steps, &message);
        bar.set_message(message);
        if interrupted {
            summary.interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    summary.steps = state.step;
    summary.tokens_seen = state.tokens_seen;
    Ok(summary)
}

/// Writes `run.json` for a new run, or checks the existing one.
fn resolve_run(
    opts: &TrainOptions,
    tokenizer: &Tokenizer,
    dataset_id: &str,
    tokenizer_id: &str,
) -> Result<RunSpec, Error> {
    let run_file = opts.run_dir.join(RUN_FILE);
    if opts.resume {
        let stored = read_run_spec(&run_file)?;
        if stored.tokenizer_id != tokenizer_id || stored.dataset_id != dataset_id {
            return Err(invalid(
                &run_file,
                format!(
                    "this run trained on dataset {} with tokenizer {}, but {} holds dataset {dataset_id} with tokenizer {tokenizer_id}",
                    stored.dataset_id,
                    stored.tokenizer_id,
                    opts.data.display()
                ),
            ));
        }
        return Ok(stored);
    }
    opts.train.validate().map_err(|e| invalid(&run_file, e))?;
    let mut model = match &opts.shape {
        Some(shape) => shape.clone(),
        None => ModelConfig::preset(&opts.model)
            .map_err(|e| invalid(&run_file, e.to_string()))?
            .to_raw(),
    };
    model.vocab_size = tokenizer.vocab_size();
    let spec = RunSpec {
        model,
        train: opts.train.clone(),
        dataset_id: dataset_id.into(),
        tokenizer_id: tokenizer_id.into(),
    };
    if run_file.exists() {
        let stored = read_run_spec(&run_file);
        let same = stored.as_ref().is_ok_and(|s| *s == spec);
        if !opts.force {
            return Err(invalid(
                &run_file,
                if same {
                    "this run directory already holds this run; pass --resume to continue it or --force to start over".into()
                } else {
                    "this run directory holds a different run (config, dataset or tokenizer); pass --force to replace it".to_string()
                },
            ));
        }
        fs::remove_dir_all(&opts.run_dir)
            .map_err(|source| Error::Io { path: opts.run_dir.clone(), source })?;
    }
    fs::create_dir_all(&opts.run_dir)
        .map_err(|source| Error::Io { path: opts.run_dir.clone(), source })?;
    let json = serde_json::to_vec_pretty(&spec).map_err(|e| invalid(&run_file, e.to_string()))?;
    crate::fsutil::write_atomic(&run_file, &json)?;
    Ok(spec)
}

/// Reads a run's `run.json`. One written before `train.optimizer` existed trained with AdamW, the
/// only optimizer then, so a missing key is read as `adamw` (not as today's default); one written
/// before `train.fim_line_share` cut every FIM middle at random characters, so that key is read
/// as 0. Such a run resumes as it began.
pub fn read_run_spec(path: &Path) -> Result<RunSpec, Error> {
    let mut value: serde_json::Value = read_json(path)?;
    if let Some(train) = value.get_mut("train").and_then(|t| t.as_object_mut()) {
        train.entry("optimizer").or_insert_with(|| serde_json::json!("adamw"));
        // Before `fim_line_share`, every FIM middle was cut at random characters.
        train.entry("fim_line_share").or_insert_with(|| serde_json::json!(0.0));
    }
    serde_json::from_value(value).map_err(|e| invalid(path, e.to_string()))
}

/// Opens `train.device` (validated with the config): an error says whether the binary lacks
/// CUDA or the machine lacks the GPU.
fn device(name: &str) -> Result<Device, Error> {
    Ok(name.parse::<m31r_model::DeviceSpec>()?.open()?)
}

/// Per-objective sums of token losses and counts.
#[derive(Debug, Default, Clone)]
pub(crate) struct LossTotals {
    nats: [f64; 3],
    tokens: [f64; 3],
}

impl LossTotals {
    fn add(&mut self, other: &LossTotals) {
        for i in 0..3 {
            self.nats[i] += other.nats[i];
            self.tokens[i] += other.tokens[i];
        }
    }

    fn means(&self) -> Vec<(Objective, f64)> {
        Objective::ALL
            .iter()
            .enumerate()
            .filter(|(i, _)| self.tokens[*i] > 0.0)
            .map(|(i, o)| (*o, self.nats[i] / self.tokens[i]))
            .collect()
    }

    /// L = L_next + α·L_fim + β·L_cot over the objectives present.
    fn loss(&self, cfg: &TrainConfig) -> f64 {
        self.means().iter().map(|(o, mean)| weight(*o, cfg) * mean).sum()
    }
}

fn weight(objective: Objective, cfg: &TrainConfig) -> f64 {
    match objective {
        Objective::Next => 1.0,
        Objective::Fim => cfg.fim_weight,
        Objective::Cot => cfg.cot_weight,
    }
}

fn index(objective: Objective) -> usize {
    Objective::ALL.iter().position(|o| *o == objective).unwrap_or(0)
}

/// Forward and loss of one micro-batch: the weighted sum of per-objective mean token losses.
pub(crate) fn micro_loss(
    model: &Model,
    sequences: &[Sequence],
    cfg: &TrainConfig,
    device: &Device,
) -> Result<(Tensor, LossTotals), Error> {
    let (b, t) = (sequences.len(), cfg.seq_len);
    let mut inputs = Vec::with_capacity(b * t);
    let mut targets = Vec::with_capacity(b * t);
    let mut counts = [0f64; 3];
    for s in sequences {
        inputs.extend_from_slice(&s.ids[..t]);
        targets.extend_from_slice(&s.ids[1..]);
        counts[index(s.objective)] += s.mask.iter().filter(|m| **m).count() as f64;
    }
    let mut weights = Vec::with_capacity(b * t);
    for s in sequences {
        let i = index(s.objective);
        let w = weight(s.objective, cfg) / counts[i].max(1.0);
        weights.extend(s.mask.iter().map(|&m| if m { w as f32 } else { 0.0 }));
    }
    let input = Tensor::from_vec(inputs, (b, t), device)?;
    let logits = model.forward_train_in(&input, cfg.precision.compute_dtype())?;
    let vocab = logits.dim(D::Minus1)?;
    let nll = m31r_kernels::train::cross_entropy(&logits.reshape((b * t, vocab))?, &targets)?
        .reshape((b, t))?;
    let weights = Tensor::from_vec(weights, (b, t), device)?;
    let loss = (&nll * &weights)?.sum_all()?;

    let values = nll.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut totals = LossTotals::default();
    for (s, row) in sequences.iter().zip(&values) {
        let i = index(s.objective);
        for (&m, &v) in s.mask.iter().zip(row) {
            if m {
                totals.nats[i] += f64::from(v);
                totals.tokens[i] += 1.0;
            }
        }
    }
    Ok((loss, totals))
}

/// Validation loss (nats/token) and bits per byte over the fixed validation batches.
fn evaluate(
    model: &Model,
    sampler: &BatchSampler<'_>,
    tokenizer: &Tokenizer,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<(f64, f64), Error> {
    let (mut nats, mut tokens, mut bytes) = (0f64, 0f64, 0f64);
    for i in 0..cfg.eval_batches.max(1) {
        let sequences = sampler.eval_batch(i);
        let (_, totals) = micro_loss(model, &sequences, cfg, device)?;
        nats += totals.nats.iter().sum::<f64>();
        tokens += totals.tokens.iter().sum::<f64>();
        for s in &sequences {
            bytes += tokenizer.decode(&s.ids[1..]).map(|t| t.len()).unwrap_or(0) as f64;
        }
    }
    Ok((nats / tokens.max(1.0), nats / std::f64::consts::LN_2 / bytes.max(1.0)))
}

fn log_line(file: &mut fs::File, run_dir: &Path, line: serde_json::Value) -> Result<(), Error> {
    writeln!(file, "{line}")
        .map_err(|source| Error::Io { path: run_dir.join(METRICS_FILE), source })
}

/// Drops metric lines after `step` (written by a run that died before its next checkpoint).
fn truncate_metrics(path: &Path, step: u64) -> Result<(), Error> {
    let Ok(text) = fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::fsutil::write_atomic(path, kept.as_bytes())?;
    Ok(())
}
