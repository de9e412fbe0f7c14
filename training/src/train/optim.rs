//! The optimiser: AdamW with decoupled weight decay on matrices only, optionally Muon for the
//! hidden matrices of the transformer blocks (AdamW keeping the embedding and the norms, as
//! nanochat and modded-nanogpt split them); global-norm clipping and gradient accumulation by name.
//! Its state (moments, momentum buffers, step) is plain named tensors, so checkpoints can save and
//! restore it exactly — candle-nn's optimiser keeps its state private.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;
use m31r_kernels::train::{self as train_ops, AdamWStep, MuonStep};

use crate::config::{OptimizerKind, TrainConfig};

/// What updates one tensor, with its state.
enum Rule {
    /// AdamW moments.
    AdamW { m: Tensor, v: Tensor },
    /// Muon momentum buffer.
    Muon { momentum: Tensor },
}

/// One trainable tensor and its state.
struct Param {
    var: Var,
    rule: Rule,
    decay: bool,
}

/// Muon's settings, when it updates the hidden matrices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MuonSettings {
    /// Muon's peak learning rate; at each step it is scaled by the schedule as AdamW's is.
    pub lr: f64,
    /// AdamW's peak learning rate, the schedule's reference (Muon's rate at a step is
    /// `lr × adamw_lr_now / base_lr`).
    pub base_lr: f64,
    /// Momentum coefficient.
    pub momentum: f64,
}

/// Whether `name` is a hidden matrix of a transformer block (attention and feed-forward
/// projections): the tensors Muon updates. The embedding (tied to the LM head) and the norms are
/// not: an embedding row is a lookup, not a linear map, and norms are vectors.
pub fn is_hidden_matrix(name: &str, rank: usize) -> bool {
    rank == 2 && name.starts_with("model.layers.")
}

/// AdamW over the variables of a [`VarMap`], or Muon + AdamW (see the module docs).
pub struct Optimizer {
    params: BTreeMap<String, Param>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    muon: Option<MuonSettings>,
    step: u64,
}

impl Optimizer {
    /// AdamW for every variable of `vars`; rank ≥ 2 tensors get weight decay.
    pub fn new(vars: &VarMap, beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        Self::build(vars, beta1, beta2, eps, None)
    }

    /// The optimiser a training config asks for (`train.optimizer`).
    pub fn for_config(vars: &VarMap, cfg: &TrainConfig) -> Result<Self> {
        let muon = (cfg.optimizer == OptimizerKind::Muon).then_some(MuonSettings {
            lr: cfg.muon_lr,
            base_lr: cfg.lr,
            momentum: cfg.muon_momentum,
        });
        Self::build(vars, cfg.beta1, cfg.beta2, cfg.eps, muon)
    }

    fn build(
        vars: &VarMap,
        beta1: f64,
        beta2: f64,
        eps: f64,
        muon: Option<MuonSettings>,
    ) -> Result<Self> {
        let data =
            vars.data().lock().map_err(|_| candle_core::Error::Msg("varmap poisoned".into()))?;
        let mut params = BTreeMap::new();
        for (name, var) in data.iter() {
            let rule = if muon.is_some() && is_hidden_matrix(name, var.rank()) {
                Rule::Muon { momentum: var.as_tensor().zeros_like()? }
            } else {
                // Two allocations: the moments are updated in place, so they must not share storage.
                Rule::AdamW { m: var.as_tensor().zeros_like()?, v: var.as_tensor().zeros_like()? }
            };
            params.insert(name.clone(), Param { var: var.clone(), rule, decay: var.rank() >= 2 });
        }
        Ok(Self { params, beta1, beta2, eps, muon, step: 0 })
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Names of the tensors Muon updates (empty for AdamW alone), in name order.
    pub fn muon_params(&self) -> Vec<&str> {
        self.params
            .iter()
            .filter(|(_, p)| matches!(p.rule, Rule::Muon { .. }))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// One update with AdamW learning rate `lr` and weight decay `wd` (Muon's rate follows `lr`
    /// in proportion; Muon matrices are not decayed), from the gradients scaled by
    /// [`Grads::scale`] (AdamW in place on CPU: see [`train_ops::adamw`]).
    pub fn step(&mut self, grads: &Grads, lr: f64, wd: f64) -> Result<()> {
        self.step += 1;
        let corrections =
            (1.0 - self.beta1.powi(self.step as i32), 1.0 - self.beta2.powi(self.step as i32));
        for (name, p) in self.params.iter_mut() {
            let Some(g) = grads.get(name) else { continue };
            match &mut p.rule {
                Rule::AdamW { m, v } => {
                    let step = AdamWStep {
                        lr,
                        weight_decay: if p.decay { wd } else { 0.0 },
                        beta1: self.beta1,
                        beta2: self.beta2,
                        eps: self.eps,
                        corrections,
                        grad_scale: grads.scale,
                    };
                    if let Some((theta, new_m, new_v)) =
                        train_ops::adamw(p.var.as_tensor(), m, v, g, &step)?
                    {
                        p.var.set(&theta)?;
                        (*m, *v) = (new_m, new_v);
                    }
                }
                Rule::Muon { momentum } => {
                    let settings = self.muon.expect("Muon parameters imply Muon settings");
                    let step = MuonStep {
                        lr: settings.lr * lr / settings.base_lr,
                        momentum: settings.momentum,
                        weight_decay: 0.0,
                        grad_scale: grads.scale,
                    };
                    let (theta, buffer) = train_ops::muon(p.var.as_tensor(), momentum, g, &step)?;
                    p.var.set(&theta)?;
                    *momentum = buffer;
                }
            }
        }
        Ok(())
    }

    /// State as named tensors (`m.<name>`, `v.<name>` for AdamW, `momentum.<name>` for Muon),
    /// for checkpoints.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, p) in &self.params {
            match &p.rule {
                Rule::AdamW { m, v } => {
                    out.insert(format!("m.{name}"), m.clone());
                    out.insert(format!("v.{name}"), v.clone());
                }
                Rule::Muon { momentum } => {
                    out.insert(format!("momentum.{name}"), momentum.clone());
                }
            }
        }
        out
    }

    /// Restores state saved by [`Optimizer::state`] and the step count; each tensor moves to its
    /// parameter's device (checkpoints are read on the CPU).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (name, p) in self.params.iter_mut() {
            let device = p.var.device().clone();
            let get = |k: String| {
                state
                    .get(&k)
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks {k}")))?
                    .to_device(&device)
            };
            match &mut p.rule {
                Rule::AdamW { m, v } => {
                    *m = get(format!("m.{name}"))?;
                    *v = get(format!("v.{name}"))?;
                }
                Rule::Muon { momentum } => *momentum = get(format!("momentum.{name}"))?,
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Gradients by variable name, summed over micro-batches, with a pending scale factor (clipping
/// records it here and the optimiser applies it inside its update, saving a pass over memory).
pub struct Grads {
    by_name: HashMap<String, Tensor>,
    scale: f64,
}

impl Default for Grads {
    fn default() -> Self {
        Self { by_name: HashMap::new(), scale: 1.0 }
    }
}

impl Grads {
    /// Adds the gradients of one backward pass.
    pub fn accumulate(
        &mut self,
        vars: &VarMap,
        store: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        let data =
            vars.data().lock().map_err(|_| candle_core::Error::Msg("varmap poisoned".into()))?;
        for (name, var) in data.iter() {
            if let Some(g) = store.get(var.as_tensor()) {
                let sum = match self.by_name.remove(name) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                self.by_name.insert(name.clone(), sum);
            }
        }
        Ok(())
    }

    /// The gradient of `name`, before [`Grads::scale`] is applied.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.by_name.get(name)
    }

    /// The factor every gradient is to be multiplied by.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Number of tensors with a gradient.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no gradient was accumulated.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Global L2 norm (of the scaled gradients), summed in name order so it is reproducible.
    pub fn norm(&self) -> Result<f64> {
        let mut names: Vec<&String> = self.by_name.keys().collect();
        names.sort();
        let mut total = 0f64;
        for name in names {
            total += train_ops::sum_squares(&self.by_name[name])?;
        }
        Ok(total.sqrt() * self.scale.abs())
    }

    /// Multiplies every gradient by `factor` (lazily: see [`Grads::scale`]).
    pub fn rescale(&mut self, factor: f64) {
        self.scale *= factor;
    }

    /// Clips to global norm `max` (0 = off); returns the norm before clipping and whether it clipped.
    pub fn clip(&mut self, max: f64) -> Result<(f64, bool)> {
        let norm = self.norm()?;
        if max > 0.0 && norm > max {
            self.rescale(max / norm);
            return Ok((norm, true));
        }
        Ok((norm, false))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn adamw_minimises_a_quadratic_and_decays_only_matrices() {
        let vars = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let w = vb.get_with_hints((2, 2), "w", candle_nn::Init::Const(1.0)).unwrap();
        let b = vb.get_with_hints(2, "b", candle_nn::Init::Const(1.0)).unwrap();
        let mut opt = Optimizer::new(&vars, 0.9, 0.95, 1e-8).unwrap();
        for _ in 0..300 {
            let loss = (w.sqr().unwrap().sum_all().unwrap() + b.sqr().unwrap().sum_all().unwrap())
                .unwrap();
            let mut grads = Grads::default();
            grads.accumulate(&vars, &loss.backward().unwrap()).unwrap();
            assert_eq!(grads.len(), 2);
            opt.step(&grads, 0.05, 0.0).unwrap();
        }
        let w_norm: f32 = w.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(w_norm < 0.05, "{w_norm}");

        // Pure decay: with exactly zero gradients, only the matrix shrinks (by lr·wd).
        let vars2 = VarMap::new();
        let vb2 = candle_nn::VarBuilder::from_varmap(&vars2, DType::F32, &Device::Cpu);
        let w2 = vb2.get_with_hints((2, 2), "w", candle_nn::Init::Const(1.0)).unwrap();
        let b2 = vb2.get_with_hints(2, "b", candle_nn::Init::Const(1.0)).unwrap();
        let zero = ((&w2 * w2.zeros_like().unwrap()).unwrap().sum_all().unwrap()
            + (&b2 * b2.zeros_like().unwrap()).unwrap().sum_all().unwrap())
        .unwrap();
        let mut grads = Grads::default();
        grads.accumulate(&vars2, &zero.backward().unwrap()).unwrap();
        assert_eq!(grads.len(), 2);
        let mut fresh = Optimizer::new(&vars2, 0.9, 0.95, 1e-8).unwrap();
        fresh.step(&grads, 0.1, 0.5).unwrap();
        assert_eq!(b2.to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
        assert_eq!(w2.to_vec2::<f32>().unwrap(), vec![vec![0.95f32; 2]; 2]);

        // State round trip.
        let mut restored = Optimizer::new(&vars, 0.9, 0.95, 1e-8).unwrap();
        restored.load_state(&opt.state(), opt.steps()).unwrap();
        assert_eq!(restored.steps(), 300);
    }

    #[test]
    fn muon_updates_block_matrices_and_adamw_the_rest_and_its_state_round_trips() {
        let vars = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let init = candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 };
        let w = vb.get_with_hints((6, 4), "model.layers.0.mlp.up_proj.weight", init).unwrap();
        let e = vb.get_with_hints((5, 4), "model.embed_tokens.weight", init).unwrap();
        let n = vb.get_with_hints(4, "model.layers.0.input_layernorm.weight", init).unwrap();
        let cfg = TrainConfig {
            optimizer: OptimizerKind::Muon,
            muon_lr: 0.05,
            lr: 0.05,
            ..TrainConfig::default()
        };
        let mut opt = Optimizer::for_config(&vars, &cfg).unwrap();
        assert_eq!(opt.muon_params(), vec!["model.layers.0.mlp.up_proj.weight"]);
        let total = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let before = total(&w);
        for _ in 0..100 {
            let loss = (w.sqr().unwrap().sum_all().unwrap()
                + e.sqr().unwrap().sum_all().unwrap()
                + n.sqr().unwrap().sum_all().unwrap())
            .unwrap();
            let mut grads = Grads::default();
            grads.accumulate(&vars, &loss.backward().unwrap()).unwrap();
            opt.step(&grads, 0.05, 0.0).unwrap();
        }
        // Orthogonalised steps of fixed size lr·√1.5 walk the matrix down to that scale.
        assert!(total(&w) < 0.05 * before, "{} of {before}", total(&w));
        assert!(total(&e) < 1.0 && total(&n) < 1.0);

        let state = opt.state();
        assert!(state.contains_key("momentum.model.layers.0.mlp.up_proj.weight"));
        assert!(state.contains_key("m.model.embed_tokens.weight"));
        assert!(!state.contains_key("m.model.layers.0.mlp.up_proj.weight"));
        let mut restored = Optimizer::for_config(&vars, &cfg).unwrap();
        restored.load_state(&state, opt.steps()).unwrap();
        assert_eq!(restored.steps(), 100);
        // AdamW state cannot stand in for Muon's: the error names the missing tensor.
        let adamw_state = Optimizer::new(&vars, 0.9, 0.95, 1e-8).unwrap().state();
        let err = restored.load_state(&adamw_state, 1).unwrap_err().to_string();
        assert!(err.contains("momentum.model.layers.0.mlp.up_proj.weight"), "{err}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let vars = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let w = vb.get_with_hints(4, "w", candle_nn::Init::Const(3.0)).unwrap();
        let loss = (w.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap(); // grad = w = 3 each → norm 6
        let mut grads = Grads::default();
        grads.accumulate(&vars, &loss.backward().unwrap()).unwrap();
        let (norm, clipped) = grads.clip(1.5).unwrap();
        assert!((norm - 6.0).abs() < 1e-5 && clipped);
        assert!((grads.norm().unwrap() - 1.5).abs() < 1e-5);
    }
}
