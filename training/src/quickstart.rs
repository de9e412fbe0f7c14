//! `m31r-train quickstart`: the whole pipeline in one command for a first model.
//!
//! corpus → tokenizer → prepare → train → eval → export, in a work directory, ending with a
//! release bundle in the default model directory (where `m31rd` looks when no bundle is
//! configured) whose metadata carries the eval results. The bundle is built beside its final
//! place and moved in only when everything succeeded, so a failed or interrupted quickstart never
//! leaves a half-written model behind nor loses the previous one.
//!
//! With a time budget the train stage first sizes the model ([`crate::budget`]): it measures the
//! training speed of candidate shapes on this machine and trains the one, for the number of steps,
//! with the lowest predicted loss in the time left.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::budget::{BudgetError, Plan, TimeBudget, plan};
use crate::config::DataConfig;
use crate::corpus::{CorpusOptions, build_corpus};
use crate::eval::{EvalOptions, EvalReport, evaluate_bundle};
use crate::export::{ExportOptions, export_with};
use crate::progress::Progress;
use crate::shards::{PrepareOptions, prepare};
use crate::tok::{TokenizerOptions, train_tokenizer};
use crate::train::{TrainOptions, TrainSummary, train};

/// What [`quickstart`] runs on and where it writes.
#[derive(Debug, Clone)]
pub struct QuickstartOptions {
    /// Directories of Rust code for the corpus.
    pub inputs: Vec<PathBuf>,
    /// Work directory: `data/` (corpus, tokenizer, shards), `run/` (checkpoints, metrics),
    /// `eval.json`. Replaced on every quickstart.
    pub work: PathBuf,
    /// Bundle directory to create.
    pub out: PathBuf,
    /// Replace an existing bundle at `out` (only once the new one is complete).
    pub force: bool,
    /// Corpus, tokenizer and training settings.
    pub config: DataConfig,
    /// Size the model and its steps for this training-time budget (measuring included) instead
    /// of training the config's preset for `config.train.steps`.
    pub budget: Option<TimeBudget>,
    /// Masked lines in the completion benchmark of the eval.
    pub eval_items: usize,
    /// Test bytes scored for bits per byte.
    pub eval_max_bytes: u64,
    /// Progress bars.
    pub progress: Progress,
    /// Print a header and a result line per stage on stderr.
    pub log: bool,
}

/// What a quickstart produced.
#[derive(Debug, Clone)]
pub struct QuickstartReport {
    /// The bundle directory.
    pub bundle: PathBuf,
    /// What the train stage chose for the budget, when there was one.
    pub plan: Option<Plan>,
    /// The training run.
    pub train: TrainSummary,
    /// The eval of the bundle's checkpoint (also in its metadata).
    pub eval: EvalReport,
    /// Wall time of each stage, seconds.
    pub stages: Vec<(&'static str, f64)>,
}

/// Why a quickstart stopped.
#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    /// The bundle directory exists and `force` was not given.
    #[error("{}: a model is already there; pass --force to replace it (or --out DIR)", .0.display())]
    Exists(PathBuf),
    /// There is nothing to build a corpus from.
    #[error("no Rust sources to learn from: pass one or more directories of Rust code")]
    NoInputs,
    /// A stage failed.
    #[error("quickstart stage `{stage}` failed: {source}")]
    Stage {
        /// The stage.
        stage: &'static str,
        /// Its error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The six stages, in order.
pub const STAGES: [&str; 6] = ["corpus", "tokenizer", "prepare", "train", "eval", "export"];

/// Runs the pipeline; see the module docs.
pub fn quickstart(opts: &QuickstartOptions) -> Result<QuickstartReport, QuickstartError> {
    if opts.out.exists() && !opts.force {
        return Err(QuickstartError::Exists(opts.out.clone()));
    }
    if opts.inputs.is_empty() {
        return Err(QuickstartError::NoInputs);
    }
    // Refused before the data stages spend minutes, not after.
    if let Some(budget) = &opts.budget
        && !(budget.minutes.is_finite() && budget.minutes > 0.0)
    {
        let source = Box::new(BudgetError::Minutes(budget.minutes));
        return Err(QuickstartError::Stage { stage: "train", source });
    }
    let data = opts.work.join("data");
    let run_dir = opts.work.join("run");
    let staging = opts.work.join("bundle-eval");
    let eval_json = opts.work.join("eval.json");
    let mut stages = Vec::new();
    let mut stage = Stages { log: opts.log, done: &mut stages };

    stage.run("corpus", || {
        let info = build_corpus(&CorpusOptions {
            inputs: opts.inputs.clone(),
            out: data.clone(),
            corpus: opts.config.corpus.clone(),
            split: opts.config.split.clone(),
            force: true,
            progress: opts.progress,
        })?;
        Ok((info.table(), ()))
    })?;
    let vocab_size = stage.run("tokenizer", || {
        let report = train_tokenizer(&TokenizerOptions {
            data: data.clone(),
            vocab_size: opts.config.vocab_size()?,
            max_train_bytes: opts.config.tokenizer.max_train_bytes,
            progress: opts.progress,
        })?;
        Ok((report.table(), report.vocab_size))
    })?;
    stage.run("prepare", || {
        let index = prepare(&PrepareOptions {
            data: data.clone(),
            shard_tokens: opts.config.shards.shard_tokens,
            progress: opts.progress,
        })?;
        Ok((index.table(), ()))
    })?;
    let (plan, summary) = stage.run("train", || {
        let plan = match &opts.budget {
            Some(budget) => {
                let plan = plan(budget, vocab_size, &opts.config.train, opts.log)?;
                if opts.log {
                    eprint!("{}", plan.table());
                }
                Some(plan)
            }
            None => None,
        };
        let mut train_config = opts.config.train.clone();
        if let Some(plan) = &plan {
            train_config.steps = plan.steps;
        }
        let s = train(&TrainOptions {
            data: data.clone(),
            run_dir: run_dir.clone(),
            model: opts.config.model.clone(),
            shape: plan.as_ref().map(|p| p.model.clone()),
            train: train_config,
            resume: false,
            force: true,
            progress: opts.progress,
        })?;
        if s.interrupted {
            return Err(format!(
                "interrupted at step {} (checkpoint in {}; `m31r-train train --resume --run-dir \
                 {}` continues it)",
                s.steps,
                run_dir.display(),
                run_dir.display()
            )
            .into());
        }
        let line = format!(
            "steps {} · tokens {} · loss {:.4} · {:.0} tok/s\n",
            s.steps, s.tokens_seen, s.final_loss, s.tokens_per_s
        );
        Ok((line, (plan, s)))
    })?;
    let report = stage.run("eval", || {
        remove_if_exists(&staging)?;
        export_with(&run_dir, &data, &staging, &ExportOptions::default())?;
        let report = evaluate_bundle(&EvalOptions {
            items: opts.eval_items,
            max_bytes: opts.eval_max_bytes,
            progress: opts.progress,
            ..EvalOptions::new(&staging, &data)
        })?;
        let json = serde_json::to_string_pretty(&report)? + "\n";
        std::fs::write(&eval_json, json).map_err(|e| format!("{}: {e}", eval_json.display()))?;
        remove_if_exists(&staging)?;
        Ok((String::new(), report))
    })?;
    stage.run("export", || {
        let fresh = sibling(&opts.out, "new");
        remove_if_exists(&fresh)?;
        if let Some(parent) = opts.out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let options =
            ExportOptions { eval: Some((eval_json.clone(), report.clone())), ..Default::default() };
        export_with(&run_dir, &data, &fresh, &options)?;
        replace_dir(&fresh, &opts.out)?;
        Ok((format!("bundle {}\n", opts.out.display()), ()))
    })?;
    Ok(QuickstartReport { bundle: opts.out.clone(), plan, train: summary, eval: report, stages })
}

type StageResult<T> = Result<(String, T), Box<dyn std::error::Error + Send + Sync>>;

/// Runs stages in order, timing and (optionally) announcing each.
struct Stages<'a> {
    log: bool,
    done: &'a mut Vec<(&'static str, f64)>,
}

impl Stages<'_> {
    fn run<T>(
        &mut self,
        name: &'static str,
        body: impl FnOnce() -> StageResult<T>,
    ) -> Result<T, QuickstartError> {
        let n = STAGES.iter().position(|s| *s == name).map_or(0, |i| i + 1);
        if self.log {
            eprintln!("\n==> [{n}/{}] {name}", STAGES.len());
        }
        let started = Instant::now();
        let (summary, value) =
            body().map_err(|source| QuickstartError::Stage { stage: name, source })?;
        let seconds = started.elapsed().as_secs_f64();
        if self.log {
            eprint!("{summary}");
            eprintln!("{name} done in {seconds:.1}s");
        }
        self.done.push((name, seconds));
        Ok(value)
    }
}

/// `dir` with `.suffix` appended to its last component.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

fn remove_if_exists(dir: &Path) -> Result<(), String> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("cannot remove {}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Moves the complete bundle `fresh` to `out`, replacing what is there only after the new one is
/// in place (the old one is parked beside it, then deleted).
fn replace_dir(fresh: &Path, out: &Path) -> Result<(), String> {
    let old = sibling(out, "old");
    remove_if_exists(&old)?;
    let had_old = out.exists();
    if had_old {
        std::fs::rename(out, &old)
            .map_err(|e| format!("cannot move {} aside: {e}", out.display()))?;
    }
    if let Err(e) = std::fs::rename(fresh, out) {
        if had_old {
            let _ = std::fs::rename(&old, out);
        }
        return Err(format!("cannot move {} to {}: {e}", fresh.display(), out.display()));
    }
    remove_if_exists(&old)
}
