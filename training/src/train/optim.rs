//! AdamW with decoupled weight decay on matrices only, global-norm clipping, and gradient
//! accumulation by name. Its state (moments, step) is plain named tensors, so checkpoints can save
//! and restore it exactly — candle-nn's optimiser keeps its state private.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;
use m31r_kernels::train::{self as train_ops, AdamWStep};

/// One trainable tensor and its moments.
struct Param {
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW over the variables of a [`VarMap`].
pub struct AdamW {
    params: BTreeMap<String, Param>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: u64,
}

impl AdamW {
    /// An optimiser for every variable of `vars`; rank ≥ 2 tensors get weight decay.
    pub fn new(vars: &VarMap, beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        let data =
            vars.data().lock().map_err(|_| candle_core::Error::Msg("varmap poisoned".into()))?;
        let mut params = BTreeMap::new();
        for (name, var) in data.iter() {
            // Two allocations: the moments are updated in place, so they must not share storage.
            let (m, v) = (var.as_tensor().zeros_like()?, var.as_tensor().zeros_like()?);
            params.insert(name.clone(), Param { var: var.clone(), m, v, decay: var.rank() >= 2 });
        }
        Ok(Self { params, beta1, beta2, eps, step: 0 })
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr` and weight decay `wd`, from the gradients scaled by
    /// [`Grads::scale`] (in place on CPU: see [`train_ops::adamw`]).
    pub fn step(&mut self, grads: &Grads, lr: f64, wd: f64) -> Result<()> {
        self.step += 1;
        let corrections =
            (1.0 - self.beta1.powi(self.step as i32), 1.0 - self.beta2.powi(self.step as i32));
        for (name, p) in self.params.iter_mut() {
            let Some(g) = grads.get(name) else { continue };
            let step = AdamWStep {
                lr,
                weight_decay: if p.decay { wd } else { 0.0 },
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                corrections,
                grad_scale: grads.scale,
            };
            if let Some((theta, m, v)) = train_ops::adamw(p.var.as_tensor(), &p.m, &p.v, g, &step)?
            {
                p.var.set(&theta)?;
                (p.m, p.v) = (m, v);
            }
        }
        Ok(())
    }

    /// Moments as named tensors (`m.<name>`, `v.<name>`), for checkpoints.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, p) in &self.params {
            out.insert(format!("m.{name}"), p.m.clone());
            out.insert(format!("v.{name}"), p.v.clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] and the step count.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (name, p) in self.params.iter_mut() {
            let get = |k: String| {
                state
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks {k}")))
            };
            p.m = get(format!("m.{name}"))?;
            p.v = get(format!("v.{name}"))?;
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
        let mut opt = AdamW::new(&vars, 0.9, 0.95, 1e-8).unwrap();
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
        let mut fresh = AdamW::new(&vars2, 0.9, 0.95, 1e-8).unwrap();
        fresh.step(&grads, 0.1, 0.5).unwrap();
        assert_eq!(b2.to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
        assert_eq!(w2.to_vec2::<f32>().unwrap(), vec![vec![0.95f32; 2]; 2]);

        // State round trip.
        let mut restored = AdamW::new(&vars, 0.9, 0.95, 1e-8).unwrap();
        restored.load_state(&opt.state(), opt.steps()).unwrap();
        assert_eq!(restored.steps(), 300);
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
