//! Sizing a model for a training-time budget (`m31r-train quickstart --minutes M`): candidate
//! shapes on a ladder of parameter targets, their training speed measured on this machine with
//! the real training step, and the shape and step count with the lowest predicted loss for the
//! time that is left once measuring is paid for.
//!
//! Measuring ([`measure`]) and choosing ([`choose`]) are separate: the choice is a pure function
//! of the measured speeds, so it is tested on synthetic ones.

use std::fmt::Write as _;
use std::time::Instant;

use m31r_model::config::{ModelConfig, Preset, RawModelConfig};
use m31r_model::params::SolverSpec;
use m31r_model::tokenizer::Tokenizer;

use crate::config::TrainConfig;
use crate::error::{Error, require_stage};
use crate::tok::TOKENIZER_FILE;
use crate::train::TrainOptions;
use crate::train::bench::bench_config;

/// Parameter targets of the candidate shapes, smallest first; 2M solves to the `tiny` shape (see
/// [`candidates`]). On 2 cores a budget of minutes buys a few million tokens, which the loss fit
/// spends on 0.5–2M parameters; the larger rungs are for budgets of an hour or more. Measuring
/// all seven is expected to take ≈ 15–20 s on 2 cores at 8×256 tokens per step (three steps
/// each, the largest the slowest).
pub const DEFAULT_LADDER: [u64; 7] =
    [500_000, 1_000_000, 1_500_000, 2_000_000, 3_000_000, 4_000_000, 6_000_000];

/// Fewest training steps a plan may have: below this the learning-rate warm-up alone is most of
/// the run. A budget too short for this many steps of even the fastest shape is an error.
pub const MIN_STEPS: u64 = 50;

/// Share of the training seconds spent in training steps as [`measure`] times them; the rest
/// goes to what the loop does around them (drawing batches and their FIM and comment-first
/// transforms, validation passes, checkpoints, logs). Calibrated on the 10-minute quickstart of
/// a fresh clone (2026-11-29): its 1.0M-parameter run trained at 0.87 of the bench's best-step
/// speed overall and overran its 600 s by 34 s at the 0.92 used before; at 0.85 of the mean
/// timed step it ends within the budget. It is generous for long runs: the 2-hour CPU recipe
/// (3.0M parameters, 12452 steps) ran at 0.95 of the mean timed step with about 15 s of
/// validation and checkpoints, and ended 12 minutes inside its 120. A fixed reserve plus a
/// larger share would fit both budgets; it has not been measured on both yet. With the faster
/// of two measuring passes (2026-11-30), a fresh-clone quickstart's loop ran at 0.998 of the
/// speed planned and ended training 82 s inside its 600 s: the share may rise once more runs
/// are measured.
pub const STEP_TIME_SHARE: f64 = 0.85;

/// Timed steps per candidate in each of the two measuring passes, after one warm-up step.
pub const TIMED_STEPS: usize = 2;

/// A loss fit of the form L(N, D) = E + A/N^α + B/D^β, N parameters and D training tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossFit {
    /// Irreducible loss E (nats/token).
    pub e: f64,
    /// Model-size coefficient A.
    pub a: f64,
    /// Data coefficient B.
    pub b: f64,
    /// Model-size exponent α.
    pub alpha: f64,
    /// Data exponent β.
    pub beta: f64,
}

impl LossFit {
    /// L(N, D) for `params` parameters trained on `tokens` tokens (infinite for no tokens).
    pub fn predict(&self, params: f64, tokens: f64) -> f64 {
        self.e + self.a / params.powf(self.alpha) + self.b / tokens.powf(self.beta)
    }
}

/// The fit published by Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models",
/// approach 3: E = 1.69, A = 406.4, B = 410.7, α = 0.34, β = 0.28), fitted on their English text
/// with their tokenizer. It is used only for the argmin over shapes, which depends on how loss
/// trades parameters against tokens, not on its level: the values it gives are not a prediction
/// of the loss on this data, and the sizing table labels them as the fit's.
pub const CHINCHILLA: LossFit = LossFit { e: 1.69, a: 406.4, b: 410.7, alpha: 0.34, beta: 0.28 };

/// What to size for.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeBudget {
    /// Training budget in minutes, measuring included.
    pub minutes: f64,
    /// Parameter targets of the candidates (see [`DEFAULT_LADDER`]).
    pub ladder: Vec<u64>,
}

impl TimeBudget {
    /// `minutes` over the [`DEFAULT_LADDER`].
    pub fn minutes(minutes: f64) -> Self {
        Self { minutes, ladder: DEFAULT_LADDER.to_vec() }
    }
}

/// Why no plan was made.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// The budget is not a positive number of minutes.
    #[error("training budget {0} min: must be a positive, finite number of minutes")]
    Minutes(f64),
    /// Sizing measures speed on the CPU; another device would be sized with the wrong speeds.
    #[error(
        "train.device = {0:?}: sizing for a time budget measures the CPU only; give a number of \
         steps instead"
    )]
    Device(String),
    /// No target of the ladder gives a valid shape.
    #[error("no candidate shape for the ladder {ladder:?} with vocabulary {vocab}: {reason}")]
    NoCandidates {
        /// The targets asked for.
        ladder: Vec<u64>,
        /// Vocabulary size.
        vocab: usize,
        /// Why the first target failed.
        reason: String,
    },
    /// A candidate's training step could not be measured.
    #[error("measuring the training step of the {target}-parameter candidate: {source}")]
    Measure {
        /// Its parameter target.
        target: u64,
        /// The error.
        source: Error,
    },
    /// The data directory's tokenizer, whose vocabulary the candidates take, cannot be read.
    #[error("sizing needs the tokenizer of the data directory: {0}")]
    Tokenizer(Error),
    /// Even the fastest candidate cannot run [`MIN_STEPS`] steps in the time left.
    #[error(
        "a training budget of {minutes} min is too short: after {measure_s:.1} s of measuring, \
         {train_s:.1} s are left, in which the fastest shape ({params} parameters at \
         {tokens_per_s:.0} tok/s) runs {steps} steps of {tokens_per_step} tokens, fewer than \
         {MIN_STEPS}; give at least {needed_minutes:.1} min"
    )]
    TooShort {
        /// The budget.
        minutes: f64,
        /// Seconds spent measuring.
        measure_s: f64,
        /// Seconds left to train.
        train_s: f64,
        /// Parameters of the fastest candidate.
        params: u64,
        /// Its measured speed.
        tokens_per_s: f64,
        /// Steps it would run.
        steps: u64,
        /// Tokens per training step.
        tokens_per_step: u64,
        /// The budget that would give it [`MIN_STEPS`] steps.
        needed_minutes: f64,
    },
}

/// One shape to measure: the `tiny` preset's solver settings at a parameter target.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The ladder's target.
    pub target_params: u64,
    /// The solved shape.
    pub config: ModelConfig,
}

/// The candidates of `ladder` with vocabulary `vocab_size`, each solved and built as
/// [`Preset::config`] builds `tiny`, with its GLU expansion, head size, tied head and context.
///
/// The embedding ratio is [`embedding_ratio`]'s, not `tiny`'s fixed 0.15: that one sets the width
/// proportional to the target, so above 2M the solver widens and can only fit fewer layers
/// (6M would be 448 wide and 2 deep). Targets the solver or the config checks reject are
/// skipped, and so is a target that solves to the shape of an earlier one; the order is the
/// ladder's.
pub fn candidates(ladder: &[u64], vocab_size: usize) -> Result<Vec<Candidate>, BudgetError> {
    let tiny = Preset::ALL[0];
    let mut out: Vec<Candidate> = Vec::new();
    let mut first_error = None;
    for &target_params in ladder {
        let preset = Preset {
            name: "budget",
            spec: SolverSpec {
                target_params,
                vocab_size,
                embedding_ratio: embedding_ratio(target_params, vocab_size),
                ..tiny.spec
            },
            context_length: tiny.context_length,
        };
        match preset.config() {
            Ok(config) if out.iter().all(|c| c.config != config) => {
                out.push(Candidate { target_params, config });
            }
            Ok(_) => {}
            Err(e) => {
                first_error.get_or_insert_with(|| format!("target {target_params}: {e}"));
            }
        }
    }
    if out.is_empty() {
        return Err(BudgetError::NoCandidates {
            ladder: ladder.to_vec(),
            vocab: vocab_size,
            reason: first_error.unwrap_or_else(|| "the ladder is empty".into()),
        });
    }
    Ok(out)
}

/// Prefix of a bench row naming a sizing candidate instead of a preset: `sized:1500000` is the
/// candidate for 1.5M parameters with `tiny`'s vocabulary (`m31r-train bench --presets`).
pub const SIZED_PREFIX: &str = "sized:";

/// The model a `sized:N` name stands for, or `None` when `name` lacks [`SIZED_PREFIX`]; the error
/// names the value at fault.
pub fn sized_config(name: &str) -> Option<Result<ModelConfig, String>> {
    let target = name.strip_prefix(SIZED_PREFIX)?;
    let Ok(params) = target.parse::<u64>() else {
        return Some(Err(format!("{name}: {target:?} is not a parameter count")));
    };
    let vocab = Preset::ALL[0].spec.vocab_size;
    Some(
        candidates(&[params], vocab)
            .map(|c| c[0].config.clone())
            .map_err(|e| format!("{name}: {e}")),
    )
}

/// The embedding share of the candidate with `target_params` parameters and a vocabulary of
/// `vocab_size`: `tiny`'s 0.15 at its 2M and 2048, scaled by (2M / target)^(2/3) so that width
/// and depth both grow as the cube root of the parameters and the candidates keep `tiny`'s
/// proportions (`d_model / n_layers` 24–40), and by vocab / 2048 so that the width the solver
/// starts from does not depend on the vocabulary.
pub fn embedding_ratio(target_params: u64, vocab_size: usize) -> f64 {
    let tiny = Preset::ALL[0].spec;
    let scaled = tiny.embedding_ratio
        * (tiny.target_params as f64 / target_params.max(1) as f64).powf(2.0 / 3.0)
        * (vocab_size as f64 / tiny.vocab_size as f64);
    scaled.clamp(0.01, 0.9)
}

/// A candidate with its measured speed: what [`choose`] decides on.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// The ladder's target.
    pub target_params: u64,
    /// The shape.
    pub model: RawModelConfig,
    /// Its parameters.
    pub params: u64,
    /// Trained tokens per second at the run's batch shape.
    pub tokens_per_s: f64,
}

/// Measures each candidate's training step as `train` runs it (its batch size, sequence length
/// and optimizer), in two passes: smallest to largest, then largest to smallest, each one warm-up
/// and [`TIMED_STEPS`] timed steps per candidate. A candidate's speed is that of its faster pass
/// (the mean of that pass's timed steps): something else keeping the machine busy can only slow
/// a measurement, never speed it up. On 2026-11-30 the first pass of two fresh-clone
/// quickstarts measured the smallest shapes 30–50 % slower than the second pass did (1.0M:
/// 8545 against 12773 tok/s), and a single pass had chosen 3.0M parameters for 0.8 tokens each.
/// [`STEP_TIME_SHARE`] covers the rest of the loop. `each` is called after each measurement,
/// with that pass's speed.
pub fn measure(
    candidates: &[Candidate],
    train: &TrainConfig,
    mut each: impl FnMut(&Measured),
) -> Result<Vec<Measured>, BudgetError> {
    // Per candidate, the shortest mean timed step of a pass.
    let mut best_step = vec![f64::INFINITY; candidates.len()];
    let mut params = vec![(0u64, 0usize); candidates.len()];
    let order: Vec<usize> = (0..candidates.len()).chain((0..candidates.len()).rev()).collect();
    for i in order {
        let c = &candidates[i];
        let m = bench_config(&c.config, train, TIMED_STEPS)
            .map_err(|source| BudgetError::Measure { target: c.target_params, source })?;
        let speed = m.mean_tokens_per_s();
        let step = m.phases.iter().sum::<std::time::Duration>().as_secs_f64();
        best_step[i] = best_step[i].min(step);
        params[i] = (m.params, m.tokens_per_step);
        each(&Measured {
            target_params: c.target_params,
            model: c.config.to_raw(),
            params: m.params,
            tokens_per_s: speed,
        });
    }
    Ok(candidates
        .iter()
        .zip(best_step.iter().zip(&params))
        .map(|(c, (&step, &(params, tokens_per_step)))| Measured {
            target_params: c.target_params,
            model: c.config.to_raw(),
            params,
            tokens_per_s: tokens_per_step as f64 / step.max(1e-9),
        })
        .collect())
}

/// One candidate of a plan, as planned.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRow {
    /// The ladder's target.
    pub target_params: u64,
    /// The shape.
    pub model: RawModelConfig,
    /// Its parameters.
    pub params: u64,
    /// Its measured training speed.
    pub tokens_per_s: f64,
    /// Steps it would train in the time left.
    pub steps: u64,
    /// Tokens those steps train on.
    pub tokens: u64,
    /// `tokens / params`.
    pub tokens_per_param: f64,
    /// [`CHINCHILLA`] at (params, tokens): for ranking the rows only.
    pub predicted_loss: f64,
}

impl PlanRow {
    /// Whether it runs at least [`MIN_STEPS`] steps.
    pub fn feasible(&self) -> bool {
        self.steps >= MIN_STEPS
    }
}

/// The shape and length chosen for a budget, with every candidate's row.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The budget, minutes.
    pub minutes: f64,
    /// Seconds spent measuring (part of the budget).
    pub measure_s: f64,
    /// Seconds left to train.
    pub train_s: f64,
    /// Tokens per training step (batch × accumulation × sequence length).
    pub tokens_per_step: u64,
    /// The candidates, fewest parameters first.
    pub rows: Vec<PlanRow>,
    /// Index of the chosen row.
    pub chosen: usize,
    /// The chosen shape (its vocabulary is the tokenizer's).
    pub model: RawModelConfig,
    /// Training steps for it.
    pub steps: u64,
}

/// Plans `tokens_per_step`-token steps for a budget of `minutes`, of which `measure_s` seconds
/// went to measuring: each candidate trains on D = tok/s × seconds left × [`STEP_TIME_SHARE`]
/// tokens, rounded down to whole steps, and the row with the lowest [`CHINCHILLA`] loss among
/// those with at least [`MIN_STEPS`] steps wins (the smaller one on a tie). Rows are ordered by
/// parameters, then target, whatever order `measured` is in.
pub fn choose(
    minutes: f64,
    measure_s: f64,
    tokens_per_step: u64,
    measured: &[Measured],
) -> Result<Plan, BudgetError> {
    if !(minutes.is_finite() && minutes > 0.0) {
        return Err(BudgetError::Minutes(minutes));
    }
    let train_s = (minutes * 60.0 - measure_s).max(0.0);
    let tokens_per_step = tokens_per_step.max(1);
    let mut rows: Vec<PlanRow> = measured
        .iter()
        .map(|m| {
            let speed = if m.tokens_per_s.is_finite() { m.tokens_per_s.max(0.0) } else { 0.0 };
            let budget_tokens = speed * train_s * STEP_TIME_SHARE;
            let steps = (budget_tokens / tokens_per_step as f64).floor() as u64;
            let tokens = steps * tokens_per_step;
            PlanRow {
                target_params: m.target_params,
                model: m.model.clone(),
                params: m.params,
                tokens_per_s: speed,
                steps,
                tokens,
                tokens_per_param: tokens as f64 / m.params.max(1) as f64,
                predicted_loss: CHINCHILLA.predict(m.params as f64, tokens as f64),
            }
        })
        .collect();
    rows.sort_by_key(|r| (r.params, r.target_params));
    let chosen = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.feasible())
        .min_by(|(_, a), (_, b)| a.predicted_loss.total_cmp(&b.predicted_loss))
        .map(|(i, _)| i);
    let Some(chosen) = chosen else {
        let fastest = rows
            .iter()
            .max_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s))
            .ok_or_else(|| BudgetError::NoCandidates {
                ladder: Vec::new(),
                vocab: 0,
                reason: "nothing was measured".into(),
            })?;
        let needed_s = measure_s
            + MIN_STEPS as f64 * tokens_per_step as f64
                / (fastest.tokens_per_s * STEP_TIME_SHARE).max(f64::MIN_POSITIVE);
        return Err(BudgetError::TooShort {
            minutes,
            measure_s,
            train_s,
            params: fastest.params,
            tokens_per_s: fastest.tokens_per_s,
            steps: fastest.steps,
            tokens_per_step,
            // Rounded up to the tenth the message prints.
            needed_minutes: (needed_s / 6.0).ceil() / 10.0,
        });
    };
    let (model, steps) = (rows[chosen].model.clone(), rows[chosen].steps);
    Ok(Plan { minutes, measure_s, train_s, tokens_per_step, rows, chosen, model, steps })
}

/// Sizes a run of `train` (its batch shape) with vocabulary `vocab_size` for `budget`: builds the
/// candidates, measures them (the clock starts here, so measuring is paid from the budget),
/// and [`choose`]s. With `log`, prints what it measures on stderr as it goes.
pub fn plan(
    budget: &TimeBudget,
    vocab_size: usize,
    train: &TrainConfig,
    log: bool,
) -> Result<Plan, BudgetError> {
    let started = Instant::now();
    if !(budget.minutes.is_finite() && budget.minutes > 0.0) {
        return Err(BudgetError::Minutes(budget.minutes));
    }
    if train.device != "cpu" {
        return Err(BudgetError::Device(train.device.clone()));
    }
    let candidates = candidates(&budget.ladder, vocab_size)?;
    if log {
        eprintln!(
            "sizing for {} min: measuring the training step of {} shapes at {}×{} tokens, \
             smallest first, then largest first",
            budget.minutes,
            candidates.len(),
            train.batch_size,
            train.seq_len
        );
    }
    let measured = measure(&candidates, train, |m| {
        if log {
            eprintln!("  {} parameters: {:.0} tok/s", m.params, m.tokens_per_s);
        }
    })?;
    let tokens_per_step = (train.batch_size * train.grad_accum * train.seq_len) as u64;
    choose(budget.minutes, started.elapsed().as_secs_f64(), tokens_per_step, &measured)
}

/// Sizes the run `opts` describes for `budget` (`m31r-train train --minutes`): measures the
/// candidates at the run's batch shape with the vocabulary of the tokenizer in its data
/// directory, then sets the run's shape and steps to the plan's, which it returns. Nothing else
/// of the run changes (its schedule's warm-up and decay are in steps of the new total).
pub fn size_run(
    opts: &mut TrainOptions,
    budget: &TimeBudget,
    log: bool,
) -> Result<Plan, BudgetError> {
    let path = opts.data.join(TOKENIZER_FILE);
    require_stage(&path, &opts.data, TOKENIZER_FILE, "tokenizer")
        .map_err(BudgetError::Tokenizer)?;
    let tokenizer =
        Tokenizer::from_file(&path).map_err(|e| BudgetError::Tokenizer(Error::from(e)))?;
    let plan = plan(budget, tokenizer.vocab_size(), &opts.train, log)?;
    opts.train.steps = plan.steps;
    opts.shape = Some(plan.model.clone());
    Ok(plan)
}

impl Plan {
    /// The chosen row.
    pub fn chosen_row(&self) -> &PlanRow {
        &self.rows[self.chosen]
    }

    /// One sentence: what was chosen and why.
    pub fn summary(&self) -> String {
        let row = self.chosen_row();
        format!(
            "chose {} params ({}×{}) for {} steps: lowest predicted loss for {} min at {:.0} tok/s",
            row.params,
            row.model.d_model,
            row.model.n_layers,
            row.steps,
            self.minutes,
            row.tokens_per_s
        )
    }

    /// Every candidate's row, the chosen one marked `*`, then the [`summary`](Self::summary).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:.1} s measuring, {:.1} s left to train ({:.0}% in steps) at {} tokens per step",
            self.measure_s,
            self.train_s,
            100.0 * STEP_TIME_SHARE,
            self.tokens_per_step
        );
        let _ = writeln!(
            out,
            "  {:>9} {:>10} {:>8} {:>7} {:>10} {:>10} {:>9}",
            "params", "d×layers", "tok/s", "steps", "tokens", "tok/param", "fit loss"
        );
        for (i, row) in self.rows.iter().enumerate() {
            let mark = if i == self.chosen { '*' } else { ' ' };
            let loss = if row.feasible() {
                format!("{:.3}", row.predicted_loss)
            } else {
                format!("< {MIN_STEPS} st")
            };
            let _ = writeln!(
                out,
                "{mark} {:>9} {:>10} {:>8.0} {:>7} {:>10} {:>10.2} {:>9}",
                row.params,
                format!("{}×{}", row.model.d_model, row.model.n_layers),
                row.tokens_per_s,
                row.steps,
                row.tokens,
                row.tokens_per_param,
                loss
            );
        }
        let _ = writeln!(
            out,
            "(fit loss: the Chinchilla fit L = {} + {}/N^{} + {}/D^{}, for ranking shapes only)",
            CHINCHILLA.e, CHINCHILLA.a, CHINCHILLA.alpha, CHINCHILLA.b, CHINCHILLA.beta
        );
        let _ = writeln!(out, "{}", self.summary());
        out
    }
}

#[cfg(test)]
mod sized_tests {
    use super::*;

    #[test]
    fn sized_names_are_the_sizing_candidates_and_bad_ones_are_named() {
        let c = sized_config("sized:1500000").unwrap().unwrap();
        assert_eq!(c, candidates(&[1_500_000], 2048).unwrap()[0].config);
        assert!(sized_config("tiny").is_none());
        let err = sized_config("sized:lots").unwrap().unwrap_err();
        assert!(err.contains("lots"), "{err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default ladder's candidates at the tiny vocabulary.
    fn ladder() -> Vec<Candidate> {
        candidates(&DEFAULT_LADDER, 2048).unwrap()
    }

    fn measured(speed: impl Fn(&Candidate) -> f64) -> Vec<Measured> {
        ladder()
            .iter()
            .map(|c| Measured {
                target_params: c.target_params,
                model: c.config.to_raw(),
                params: c.config.param_count(),
                tokens_per_s: speed(c),
            })
            .collect()
    }

    /// Speed of a step whose cost grows with the parameters plus a fixed part (attention,
    /// softmax, the loss), roughly as this machine's.
    fn realistic(c: &Candidate) -> f64 {
        3.5e3 * 2.4e6 / (c.config.param_count() as f64 + 4e5)
    }

    const STEP: u64 = 8 * 256;

    #[test]
    fn the_ladder_solves_to_growing_shapes_within_tolerance_and_2m_is_tiny() {
        let c = ladder();
        assert_eq!(c.len(), DEFAULT_LADDER.len(), "{c:?}");
        for pair in c.windows(2) {
            assert!(pair[0].config.param_count() < pair[1].config.param_count());
        }
        for cand in &c {
            let aspect = cand.config.d_model() as f64 / cand.config.n_layers() as f64;
            assert!((24.0..=40.0).contains(&aspect), "{cand:?}");
            let off = cand.config.param_count() as f64 / cand.target_params as f64 - 1.0;
            assert!(off.abs() <= m31r_model::params::SOLVER_TOLERANCE, "{cand:?}");
            assert_eq!(cand.config.context_length(), 512);
        }
        let tiny = ModelConfig::preset("tiny").unwrap();
        assert!(c.iter().any(|cand| cand.config == tiny));
    }

    #[test]
    fn unsolvable_targets_are_skipped_and_an_empty_ladder_is_named() {
        // 10k parameters cannot hold a 2048-token embedding of any width.
        let c = candidates(&[10_000, 1_000_000], 2048).unwrap();
        assert_eq!(c.iter().map(|c| c.target_params).collect::<Vec<_>>(), [1_000_000]);
        let err = candidates(&[10_000], 2048).unwrap_err().to_string();
        assert!(err.contains("10000") && err.contains("2048"), "{err}");
    }

    #[test]
    fn with_equal_speeds_the_largest_wins() {
        // Same tokens for every shape: more parameters only lower the fit.
        for minutes in [2.0, 6.0, 60.0] {
            let plan = choose(minutes, 20.0, STEP, &measured(|_| 3000.0)).unwrap();
            assert_eq!(plan.chosen, plan.rows.len() - 1, "{minutes} min\n{}", plan.table());
        }
    }

    #[test]
    fn a_short_budget_picks_a_smaller_faster_shape_and_a_long_one_a_larger() {
        let rows = measured(realistic);
        let short = choose(3.0, 20.0, STEP, &rows).unwrap();
        let long = choose(600.0, 20.0, STEP, &rows).unwrap();
        assert!(short.chosen < long.chosen, "{}\n{}", short.table(), long.table());
        let smallest = &short.rows[0];
        assert!(smallest.tokens_per_s > short.rows.last().unwrap().tokens_per_s);
        // The choice is the argmin over feasible rows, and the plan's shape and steps are its.
        let best = short
            .rows
            .iter()
            .filter(|r| r.feasible())
            .map(|r| r.predicted_loss)
            .fold(f64::INFINITY, f64::min);
        assert_eq!(short.chosen_row().predicted_loss, best);
        assert_eq!(
            (&short.model, short.steps),
            (&short.chosen_row().model, short.chosen_row().steps)
        );
    }

    #[test]
    fn steps_follow_from_the_time_left_and_the_step_share() {
        let rows = measured(|_| 1000.0);
        let plan = choose(2.0, 30.0, 1000, &rows).unwrap();
        // 90 s left × 85% × 1000 tok/s = 76 500 tokens: 76 whole steps.
        assert_eq!(plan.train_s, 90.0);
        for row in &plan.rows {
            assert_eq!((row.steps, row.tokens), (76, 76_000));
            assert_eq!(row.tokens_per_param, 76_000.0 / row.params as f64);
        }
        assert_eq!(plan.steps, 76);
    }

    #[test]
    fn a_budget_too_short_for_the_minimum_steps_names_itself() {
        let rows = measured(realistic);
        // The fastest shape runs about 8k tok/s: 50 steps of 2048 tokens need ≈ 14 s.
        let err = choose(0.5, 25.0, STEP, &rows).unwrap_err();
        assert!(matches!(err, BudgetError::TooShort { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("0.5 min") && text.contains("fewer than 50"), "{text}");
        // The budget it asks for is enough.
        let BudgetError::TooShort { needed_minutes, .. } = err else { unreachable!() };
        let plan = choose(needed_minutes, 25.0, STEP, &rows).unwrap();
        assert!(plan.steps >= MIN_STEPS);
        // Rows short of the minimum are never chosen, even when the fit prefers them.
        for row in plan.rows.iter().filter(|r| !r.feasible()) {
            assert!(row.steps < MIN_STEPS);
        }
        assert!(plan.chosen_row().feasible());
        // Measuring longer than the budget leaves nothing.
        assert!(choose(1.0, 90.0, STEP, &rows).is_err());
    }

    #[test]
    fn bad_budgets_are_refused_by_value() {
        for minutes in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = choose(minutes, 0.0, STEP, &measured(realistic)).unwrap_err();
            assert!(matches!(err, BudgetError::Minutes(_)), "{err}");
            assert!(err.to_string().contains(&format!("{minutes} min")), "{err}");
        }
        let train = TrainConfig { device: "cuda".into(), ..TrainConfig::default() };
        let err = plan(&TimeBudget::minutes(5.0), 2048, &train, false).unwrap_err();
        assert!(err.to_string().contains("\"cuda\""), "{err}");
    }

    #[test]
    fn the_plan_is_the_same_whatever_order_the_rows_come_in() {
        let rows = measured(realistic);
        let mut reversed = rows.clone();
        reversed.reverse();
        let a = choose(6.0, 20.0, STEP, &rows).unwrap();
        let b = choose(6.0, 20.0, STEP, &reversed).unwrap();
        assert_eq!(a, b);
        assert!(a.rows.windows(2).all(|w| w[0].params < w[1].params));
        // Ties go to the smaller shape.
        let twins = vec![rows[1].clone(), Measured { target_params: 1, ..rows[1].clone() }];
        let plan = choose(6.0, 20.0, STEP, &twins).unwrap();
        assert_eq!(plan.chosen_row().target_params, 1);
    }

    #[test]
    fn the_table_marks_the_choice_and_says_why() {
        let plan = choose(6.0, 20.0, STEP, &measured(realistic)).unwrap();
        let table = plan.table();
        assert_eq!(table.lines().filter(|l| l.starts_with('*')).count(), 1, "{table}");
        assert_eq!(table.lines().count(), plan.rows.len() + 4, "{table}");
        let row = plan.chosen_row();
        let summary = plan.summary();
        assert!(
            summary.starts_with(&format!(
                "chose {} params ({}×{}) for {} steps: lowest predicted loss for 6 min at",
                row.params, row.model.d_model, row.model.n_layers, row.steps
            )),
            "{summary}"
        );
        assert!(table.ends_with(&format!("{summary}\n")));
    }

    #[test]
    fn the_fit_is_hoffmann_et_al() {
        // Infinite model and data leave the irreducible loss; the terms fall with N and D.
        assert_eq!(CHINCHILLA.predict(f64::INFINITY, f64::INFINITY), 1.69);
        let l = CHINCHILLA.predict(1e6, 1e7);
        assert!(l > CHINCHILLA.predict(2e6, 1e7) && l > CHINCHILLA.predict(1e6, 2e7));
        assert_eq!(CHINCHILLA.predict(1e6, 0.0), f64::INFINITY);
    }
}
