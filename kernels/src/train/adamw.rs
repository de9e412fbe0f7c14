//! The AdamW update in place (two moment passes and one parameter pass), and the fixed-order sum of squares behind gradient clipping.

use std::ops::Range;

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

use super::fused;
use crate::pool::{self, BLOCK_ROWS, ELEMENT_ROW, Out};
use crate::storage::{data, data_mut};
use crate::vec::portable::dot_f32 as dot;

/// Hyper-parameters of one AdamW update.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight decay (already zero for tensors that are not decayed).
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
    /// 1 − β₁ᵗ and 1 − β₂ᵗ, the bias corrections of step t.
    pub corrections: (f64, f64),
    /// Factor applied to the gradient first (global-norm clipping).
    pub grad_scale: f64,
}

/// One AdamW update of `theta` with moments `m`, `v` from gradient `g`, all in place: three
/// elementwise passes with no allocation on CPU (the composed form takes a dozen ops, each
/// allocating a parameter-sized tensor). Returns the new tensors on other devices, where it runs
/// the composed ops; the caller stores them.
pub fn adamw(
    theta: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    step: &AdamWStep,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let in_place = [theta, m, v, g].iter().all(|t| fused(t) && t.is_contiguous());
    if !in_place {
        let g = (g * step.grad_scale)?;
        let m = ((m * step.beta1)? + (&g * (1.0 - step.beta1))?)?;
        let v = ((v * step.beta2)? + (g.sqr()? * (1.0 - step.beta2))?)?;
        let update =
            ((&m / step.corrections.0)? / ((&v / step.corrections.1)?.sqrt()? + step.eps)?)?;
        let decayed = (theta * (1.0 - step.lr * step.weight_decay))?;
        return Ok(Some(((decayed - (update * step.lr)?)?, m, v)));
    }
    m.inplace_op2(
        g,
        &Moment { beta: step.beta1 as f32, scale: step.grad_scale as f32, square: false },
    )?;
    v.inplace_op2(
        g,
        &Moment { beta: step.beta2 as f32, scale: step.grad_scale as f32, square: true },
    )?;
    theta.inplace_op3(m, v, &AdamWUpdate(*step))?;
    Ok(None)
}

/// Runs `f(span, dst part)` over the element spans of `dst`, in parallel.
fn par_spans_mut(dst: &mut [f32], f: impl Fn(Range<usize>, &mut [f32]) + Sync) {
    let len = dst.len();
    let out = Out::new(dst);
    pool::element_spans(len, |_, span| {
        // SAFETY: spans are disjoint.
        f(span.clone(), unsafe { out.part(span) });
    });
}

/// `m ← β·m + (1 − β)·(s·g)` (or `(s·g)²` for the second moment).
struct Moment {
    beta: f32,
    scale: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "m31r-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = data(s2, l2, self.name())?;
        let m = data_mut(s1, l1, self.name())?;
        if m.len() != g.len() {
            candle_core::bail!("adamw: moment {:?} and gradient {:?} differ", l1.dims(), l2.dims());
        }
        par_spans_mut(m, |span, m| {
            for (mv, gv) in m.iter_mut().zip(&g[span]) {
                let x = gv * self.scale;
                let x = if self.square { x * x } else { x };
                *mv = self.beta * *mv + (1.0 - self.beta) * x;
            }
        });
        Ok(())
    }
}

/// `θ ← θ·(1 − lr·wd) − lr·m̂ / (√v̂ + ε)`.
struct AdamWUpdate(AdamWStep);

impl InplaceOp3 for AdamWUpdate {
    fn name(&self) -> &'static str {
        "m31r-adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let name = self.name();
        let (m, v) = (data(s2, l2, name)?, data(s3, l3, name)?);
        let theta = data_mut(s1, l1, name)?;
        if theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("adamw: parameter {:?} and moments differ", l1.dims());
        }
        let s = &self.0;
        let decay = (1.0 - s.lr * s.weight_decay) as f32;
        let (c1, c2) = (1.0 / s.corrections.0 as f32, 1.0 / s.corrections.1 as f32);
        let (lr, eps) = (s.lr as f32, s.eps as f32);
        par_spans_mut(theta, |span, theta| {
            for ((t, mv), vv) in theta.iter_mut().zip(&m[span.clone()]).zip(&v[span]) {
                *t = *t * decay - lr * (mv * c1) / ((vv * c2).sqrt() + eps);
            }
        });
        Ok(())
    }
}

/// Σ x² of a tensor, in f64, in a fixed order (fused on CPU f32).
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    if !(fused(t) && t.is_contiguous()) {
        return t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>();
    }
    let (storage, layout) = t.storage_and_layout();
    let values = match &*storage {
        candle_core::Storage::Cpu(cpu) => data(cpu, layout, "sum_squares")?,
        _ => candle_core::bail!("sum_squares: expects a CPU tensor"),
    };
    let blocks = values.len().div_ceil(ELEMENT_ROW * BLOCK_ROWS);
    let mut partial = vec![0f32; blocks];
    let out = Out::new(&mut partial);
    pool::element_spans(values.len(), |block, span| {
        let chunk = &values[span];
        // SAFETY: one partial per block.
        let slot = unsafe { out.part(block..block + 1) };
        slot[0] = dot(chunk, chunk);
    });
    Ok(partial.iter().map(|&p| f64::from(p)).sum())
}

#[cfg(test)]
mod tests {
    //! The in-place kernels against the composed candle ops.

    use super::*;
    use crate::testing::{max_diff, random};

    #[test]
    fn adamw_in_place_matches_composed() {
        let theta = random(&[33, 70], 10, 1.0);
        let (m, v) = (random(&[33, 70], 11, 0.1), random(&[33, 70], 12, 0.1).sqr().unwrap());
        let g = random(&[33, 70], 13, 1.0);
        let step = AdamWStep {
            lr: 0.01,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            corrections: (0.19, 0.0975),
            grad_scale: 0.5,
        };
        // The composed path, taken for f64 tensors.
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let (t2, m2, v2) =
            adamw(&f64s(&theta), &f64s(&m), &f64s(&v), &f64s(&g), &step).unwrap().unwrap();
        let (t1, m1, v1) = (theta.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
        assert!(adamw(&t1, &m1, &v1, &g, &step).unwrap().is_none(), "CPU f32 runs in place");
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert!(max_diff(&m1, &f32s(&m2)) < 1e-6);
        assert!(max_diff(&v1, &f32s(&v2)) < 1e-6);
        assert!(max_diff(&t1, &f32s(&t2)) < 1e-5);
        assert!(max_diff(&t1, &theta) > 1e-3, "the parameter moved");
    }

    #[test]
    fn sum_squares_matches_composed() {
        let t = random(&[300, 1000], 14, 1.0);
        let expect: f64 =
            t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        let got = sum_squares(&t).unwrap();
        assert!((got - expect).abs() / expect < 1e-6, "{got} vs {expect}");
    }
}
