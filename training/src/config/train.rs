//! The `[train]` table of a training config: the loop's hyper-parameters, every key checked.

use serde::{Deserialize, Serialize};

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Cosine decay from `lr` to `min_lr` over the remaining steps.
    Cosine,
    /// Warmup-stable-decay: `lr` until the last `decay_fraction` of the steps, then linear to
    /// `min_lr` (lets a run be extended without restarting the schedule).
    Wsd,
}

/// The rule that updates the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW for every tensor.
    Adamw,
    /// Muon (orthogonalised momentum) for the hidden matrices of the blocks, AdamW for the
    /// embedding and the norms.
    Muon,
}

/// Arithmetic of the training step (`train.precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainPrecision {
    /// f32 throughout (the CPU's: it has no fast bf16 arithmetic).
    #[default]
    F32,
    /// Mixed precision: bf16 matmuls, attention and SwiGLU over f32 master weights, f32
    /// optimizer moments, and an f32 residual stream, norms, softmax and loss
    /// ([`m31r_model::Model::forward_train_in`]). bf16 has f32's exponent range, so no loss
    /// scaling is needed. For GPUs; correct but slow on a CPU.
    Bf16,
}

impl TrainPrecision {
    /// The dtype the forward's matmuls run in.
    pub fn compute_dtype(self) -> candle_core::DType {
        match self {
            TrainPrecision::F32 => candle_core::DType::F32,
            TrainPrecision::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Default share of line-shaped FIM middles ([`TrainConfig::fim_line_share`]): none. Half of
/// them measured no better on `tiny` (FIM exact match 1.0 % against 0.8 % of 400 lines, edit
/// similarity 0.318 against 0.309, test bits/byte 1.492 against 1.483; docs/cpu-training.md).
pub const FIM_LINE_SHARE: f64 = 0.0;

/// Hyper-parameters of the training loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Seed of initialisation and of every batch (seed + step ⇒ batch).
    pub seed: u64,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Optimiser steps.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Schedule after warm-up.
    pub schedule: Schedule,
    /// Share of the steps spent decaying, for `wsd`.
    pub decay_fraction: f64,
    /// `muon` for the hidden matrices (AdamW for the rest; the default), or `adamw` for
    /// everything. (A run directory's `run.json` written before the key existed is read as
    /// `adamw`, which it trained with: see `train::read_run_spec`.)
    pub optimizer: OptimizerKind,
    /// Muon's peak learning rate (follows the schedule in proportion to `lr`).
    pub muon_lr: f64,
    /// Muon's momentum coefficient (Nesterov).
    pub muon_momentum: f64,
    /// AdamW weight decay, applied to the matrices AdamW updates (not norms; not Muon's).
    pub weight_decay: f64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// Share of next-token sequences turned into FIM sequences.
    pub fim_rate: f64,
    /// Share of FIM sequences in SPM (the rest PSM).
    pub spm_share: f64,
    /// Share of FIM sequences whose middle is the rest of one line (from its start or from inside
    /// it), as the editor asks; the others cut at two random characters. (A run's `run.json`
    /// written before the key existed is read as 0, as it trained: see `train::read_run_spec`.)
    pub fim_line_share: f64,
    /// Share of sequences built as chain-of-thought samples.
    pub cot_share: f64,
    /// α: weight of the FIM loss.
    pub fim_weight: f64,
    /// β: weight of the CoT loss.
    pub cot_weight: f64,
    /// Steps between metric lines.
    pub log_every: u64,
    /// Steps between validation passes (0 = only at the end).
    pub eval_every: u64,
    /// Validation micro-batches per pass (fixed positions, so passes compare).
    pub eval_batches: usize,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// Checkpoints kept; older ones are pruned after a newer one is complete.
    pub keep_checkpoints: usize,
    /// `cpu`, or `cuda[:N]` (a binary built with the `cuda` feature: scripts/cuda-build.sh).
    pub device: String,
    /// `f32`, or `bf16` mixed precision (see [`TrainPrecision`]).
    pub precision: TrainPrecision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 1234,
            seq_len: 256,
            batch_size: 8,
            grad_accum: 1,
            steps: 1000,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 50,
            schedule: Schedule::Cosine,
            decay_fraction: 0.2,
            optimizer: OptimizerKind::Muon,
            muon_lr: 0.02,
            muon_momentum: 0.95,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            fim_rate: 0.5,
            spm_share: 0.5,
            fim_line_share: FIM_LINE_SHARE,
            cot_share: 0.1,
            fim_weight: 0.3,
            cot_weight: 0.2,
            log_every: 10,
            eval_every: 200,
            eval_batches: 4,
            checkpoint_every: 200,
            keep_checkpoints: 3,
            device: "cpu".into(),
            precision: TrainPrecision::F32,
        }
    }
}

impl TrainConfig {
    /// Checks ranges; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("seq_len", self.seq_len as f64),
            ("batch_size", self.batch_size as f64),
            ("grad_accum", self.grad_accum as f64),
            ("steps", self.steps as f64),
            ("lr", self.lr),
            ("muon_lr", self.muon_lr),
            ("log_every", self.log_every as f64),
            ("checkpoint_every", self.checkpoint_every as f64),
            ("keep_checkpoints", self.keep_checkpoints as f64),
        ];
        for (key, v) in positive {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("train.{key} = {v} must be positive"));
            }
        }
        let fractions = [
            ("fim_rate", self.fim_rate),
            ("spm_share", self.spm_share),
            ("fim_line_share", self.fim_line_share),
            ("cot_share", self.cot_share),
            ("decay_fraction", self.decay_fraction),
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("muon_momentum", self.muon_momentum),
        ];
        for (key, v) in fractions {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("train.{key} = {v} must be in [0, 1]"));
            }
        }
        if !(0.0..=self.lr).contains(&self.min_lr) {
            return Err(format!("train.min_lr = {} must be in [0, lr]", self.min_lr));
        }
        for (key, v) in [
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
            ("fim_weight", self.fim_weight),
            ("cot_weight", self.cot_weight),
            ("eps", self.eps),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("train.{key} = {v} must be ≥ 0"));
            }
        }
        if let Err(e) = self.device.parse::<m31r_model::DeviceSpec>() {
            return Err(format!("train.{e}"));
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let after = (step - self.warmup_steps) as f64;
        let span = (self.steps.saturating_sub(self.warmup_steps)).max(1) as f64;
        match self.schedule {
            Schedule::Cosine => {
                let progress = (after / span).min(1.0);
                self.min_lr
                    + 0.5
                        * (self.lr - self.min_lr)
                        * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Schedule::Wsd => {
                let decay_steps = (self.decay_fraction * self.steps as f64).max(1.0);
                let decay_start = self.steps as f64 - decay_steps;
                let s = step as f64;
                if s < decay_start {
                    self.lr
                } else {
                    // +1 so the last step lands exactly on `min_lr`.
                    let t = ((s + 1.0 - decay_start) / decay_steps).min(1.0);
                    self.lr + (self.min_lr - self.lr) * t
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay_to_min() {
        for schedule in [Schedule::Cosine, Schedule::Wsd] {
            let c =
                TrainConfig { steps: 100, warmup_steps: 10, schedule, ..TrainConfig::default() };
            assert!(c.lr_at(0) < c.lr_at(9));
            assert!((c.lr_at(9) - c.lr).abs() < 1e-12);
            assert!((c.lr_at(99) - c.min_lr).abs() < 0.02 * c.lr);
            assert!((1..100).all(|s| c.lr_at(s) <= c.lr + 1e-12 && c.lr_at(s) >= c.min_lr - 1e-12));
        }
    }

    #[test]
    fn validation_names_the_key() {
        let c = TrainConfig { fim_rate: 1.5, ..TrainConfig::default() };
        assert!(c.validate().unwrap_err().contains("fim_rate"));
        let c = TrainConfig { device: "tpu".into(), ..TrainConfig::default() };
        assert!(c.validate().unwrap_err().contains("device"));
        assert!(TrainConfig::default().validate().is_ok());
    }
}
