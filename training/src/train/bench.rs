//! `m31r-train bench`: training throughput of the real training step (forward, loss, backward,
//! clip, AdamW) on preset shapes, stated against this machine's f32 matmul throughput measured in
//! the same run; [`bench_config`] measures any model shape (the quickstart sizes its model with it).
//! Token ids are random: speed does not depend on what the tokens say.

use std::time::{Duration, Instant};

use candle_core::Device;
use m31r_model::config::ModelConfig;
use m31r_model::machine::matmul_gflops;
use m31r_model::rng::Rng;
use m31r_model::transformer::Model;

use super::batch::{Objective, Sequence};
use super::micro_loss;
use super::optim::{Grads, Optimizer};
use crate::config::{OptimizerKind, TrainConfig};
use crate::error::Error;

/// One shape to measure.
#[derive(Debug, Clone)]
pub struct BenchShape {
    /// Model preset name (`tiny`, `small`, ...), or the row's name when `config` is given.
    pub preset: String,
    /// A model to measure instead of the preset's (e.g. a shape of the quickstart's sizing).
    pub config: Option<ModelConfig>,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Timed steps (after one warm-up step).
    pub steps: usize,
    /// The optimizer stepping the weights.
    pub optimizer: OptimizerKind,
}

impl BenchShape {
    /// The default shape for a preset: tiny as its training config runs it; larger presets with a
    /// batch that keeps one step to seconds on a CPU.
    pub fn default_for(preset: &str) -> Self {
        let (batch_size, seq_len, steps) = match preset {
            "tiny" => (8, 256, 5),
            _ => (2, 512, 2),
        };
        Self {
            preset: preset.to_string(),
            config: None,
            batch_size,
            seq_len,
            steps,
            optimizer: TrainConfig::default().optimizer,
        }
    }
}

/// What one shape measured.
#[derive(Debug, Clone)]
pub struct BenchResult {
    /// The shape.
    pub shape: BenchShape,
    /// Parameters of the model.
    pub params: u64,
    /// Model FLOPs per trained token: 6·(matmul parameters) + 12·layers·d_model·seq_len.
    pub flops_per_token: f64,
    /// Trained tokens per second (best step).
    pub tokens_per_s: f64,
    /// Mean time per step in forward + loss, backward, and gradient clip + optimizer step.
    pub phases: [Duration; 3],
}

impl BenchResult {
    /// Achieved model GFLOP/s.
    pub fn gflops(&self) -> f64 {
        self.tokens_per_s * self.flops_per_token / 1e9
    }
}

/// Model FLOPs per trained token (the PaLM accounting): every weight matrix costs 6 FLOPs per
/// token forward and backward (the LM head included, tied or not), attention scores and their
/// weighted sum 12·d_model·seq_len per layer.
pub fn flops_per_token(config: &ModelConfig, seq_len: usize) -> f64 {
    let (d, ff, kv) = (config.d_model(), config.d_ff(), config.n_kv_heads() * config.head_dim());
    let per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff;
    let matmul_params = config.n_layers() * per_layer + config.vocab_size() * d;
    6.0 * matmul_params as f64 + 12.0 * (config.n_layers() * d * seq_len) as f64
}

/// What one model measured at one batch shape (see [`bench_config`]).
#[derive(Debug, Clone)]
pub struct BenchMeasure {
    /// Parameters of the model.
    pub params: u64,
    /// Model FLOPs per trained token, as [`flops_per_token`] counts them.
    pub flops_per_token: f64,
    /// Trained tokens per second (best timed step).
    pub tokens_per_s: f64,
    /// Mean time per timed step in forward + loss, backward, and gradient clip + optimizer step.
    pub phases: [Duration; 3],
    /// Tokens per step.
    pub tokens_per_step: usize,
}

impl BenchMeasure {
    /// Trained tokens per second over the mean timed step (what a run of many steps sees).
    pub fn mean_tokens_per_s(&self) -> f64 {
        let step = self.phases.iter().sum::<Duration>().as_secs_f64();
        self.tokens_per_step as f64 / step.max(1e-9)
    }
}

/// Measures the training step at `shape`.
pub fn bench_shape(shape: &BenchShape) -> Result<BenchResult, Error> {
    let config = match &shape.config {
        Some(config) => config.clone(),
        None => ModelConfig::preset(&shape.preset).map_err(|e| Error::Invalid {
            path: shape.preset.clone().into(),
            reason: e.to_string(),
        })?,
    };
    let train = TrainConfig {
        batch_size: shape.batch_size,
        seq_len: shape.seq_len,
        optimizer: shape.optimizer,
        ..TrainConfig::default()
    };
    let m = bench_config(&config, &train, shape.steps)?;
    Ok(BenchResult {
        shape: shape.clone(),
        params: m.params,
        flops_per_token: m.flops_per_token,
        tokens_per_s: m.tokens_per_s,
        phases: m.phases,
    })
}

/// Measures the training step of any model `config` as `train` runs it (`batch_size` random
/// sequences of `seq_len` tokens, its optimizer): one warm-up step, then `steps` timed ones (at
/// least one).
pub fn bench_config(
    config: &ModelConfig,
    train: &TrainConfig,
    steps: usize,
) -> Result<BenchMeasure, Error> {
    let (batch_size, seq_len) = (train.batch_size, train.seq_len);
    if batch_size == 0 || seq_len == 0 || steps == 0 {
        return Err(Error::Invalid {
            path: "<bench>".into(),
            reason: format!(
                "batch size {batch_size}, sequence length {seq_len} and timed steps {steps} must \
                 all be positive"
            ),
        });
    }
    let device = Device::Cpu;
    let (model, vars) = Model::init(config, 7, &device)?;
    let mut optimizer = Optimizer::for_config(&vars, train)?;
    let mut rng = Rng::new(11);
    let vocab = config.vocab_size() as u64;
    let sequences: Vec<Sequence> = (0..batch_size)
        .map(|_| Sequence {
            ids: (0..=seq_len).map(|_| rng.below(vocab) as u32).collect(),
            mask: vec![true; seq_len],
            objective: Objective::Next,
        })
        .collect();

    let mut phases = [Duration::ZERO; 3];
    let mut best = Duration::MAX;
    for step in 0..=steps {
        let t0 = Instant::now();
        let (loss, _) = micro_loss(&model, &sequences, train, &device)?;
        let t1 = Instant::now();
        let store = loss.backward()?;
        let t2 = Instant::now();
        let mut grads = Grads::default();
        grads.accumulate(&vars, &store)?;
        grads.clip(1.0)?;
        optimizer.step(&grads, 1e-4, 0.1)?;
        let t3 = Instant::now();
        if step == 0 {
            continue; // warm-up: thread pools, allocator
        }
        for (p, d) in phases.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2]) {
            *p += d / steps as u32;
        }
        best = best.min(t3 - t0);
    }
    let tokens = (batch_size * seq_len) as f64;
    Ok(BenchMeasure {
        params: config.param_count(),
        flops_per_token: flops_per_token(config, seq_len),
        // A step below the clock's resolution still gives a finite speed.
        tokens_per_s: tokens / best.as_secs_f64().max(1e-9),
        phases,
        tokens_per_step: batch_size * seq_len,
    })
}

/// Runs every shape and renders a table against the matmul throughput measured first.
pub fn run(shapes: &[BenchShape]) -> Result<String, Error> {
    let matmul = matmul_gflops(5)?;
    let mut out = format!(
        "f32 matmul (1024³, candle): {matmul:.1} GFLOP/s · {} threads\n\n",
        candle_core::utils::get_num_threads()
    );
    out.push_str(&format!(
        "{:<7} {:>6} {:>8} {:>10} {:>9} {:>9} {:>8} {:>10} {:>10} {:>10}\n",
        "preset",
        "optim",
        "params",
        "batch×seq",
        "tok/s",
        "GFLOP/s",
        "matmul%",
        "fwd ms",
        "bwd ms",
        "optim ms"
    ));
    for shape in shapes {
        let r = bench_shape(shape)?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        out.push_str(&format!(
            "{:<7} {:>6} {:>7.1}M {:>10} {:>9.0} {:>9.1} {:>7.1}% {:>10.1} {:>10.1} {:>10.1}\n",
            shape.preset,
            match shape.optimizer {
                OptimizerKind::Adamw => "adamw",
                OptimizerKind::Muon => "muon",
            },
            r.params as f64 / 1e6,
            format!("{}×{}", shape.batch_size, shape.seq_len),
            r.tokens_per_s,
            r.gflops(),
            100.0 * r.gflops() / matmul,
            ms(r.phases[0]),
            ms(r.phases[1]),
            ms(r.phases[2]),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_count_matches_a_hand_count() {
        // tiny preset: count the matrices by hand from the config.
        let c = ModelConfig::preset("tiny").unwrap();
        let (d, ff, l, v) = (c.d_model(), c.d_ff(), c.n_layers(), c.vocab_size());
        let kv = c.n_kv_heads() * c.head_dim();
        let matrices = l * (d * d + kv * d + kv * d + d * d + 3 * d * ff) + v * d;
        let expect = 6.0 * matrices as f64 + 12.0 * (l * d * 100) as f64;
        assert_eq!(flops_per_token(&c, 100), expect);
        // Norm weights are the only parameters that are not matmul weights (tied head).
        let norms = (2 * l + 1) * d;
        assert_eq!(c.param_count() as usize, matrices + norms);
    }
}
