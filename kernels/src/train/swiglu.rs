//! SwiGLU's gate, `silu(gate) · up`, and its backward pass.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::fused;
use crate::pool::{self, Out};
use crate::storage::data;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `silu(gate) · up`, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !fused(gate) {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "m31r-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        if a.len() != b.len() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", l1.dims(), l2.dims());
        }
        let mut y = vec![0f32; a.len()];
        let out = Out::new(&mut y);
        pool::element_spans(a.len(), |_, span| {
            // SAFETY: blocks are disjoint spans.
            let y = unsafe { out.part(span.clone()) };
            for ((yv, av), bv) in y.iter_mut().zip(&a[span.clone()]).zip(&b[span]) {
                *yv = av * sigmoid(*av) * bv;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &g.contiguous()?, &SwiGluBwd)?;
        let d_gate = both.narrow(0, 0, 1)?.reshape(gate.shape())?;
        let d_up = both.narrow(0, 1, 1)?.reshape(up.shape())?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "m31r-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (a, b, g) = (data(s1, l1, name)?, data(s2, l2, name)?, data(s3, l3, name)?);
        let len = a.len();
        let mut both = vec![0f32; 2 * len];
        let out = Out::new(&mut both);
        pool::element_spans(len, |_, span| {
            // SAFETY: blocks are disjoint spans of each half.
            let da = unsafe { out.part(span.clone()) };
            let db = unsafe { out.part(len + span.start..len + span.end) };
            for i in 0..span.len() {
                let (av, bv, gv) = (a[span.start + i], b[span.start + i], g[span.start + i]);
                let sg = sigmoid(av);
                // silu'(a) = σ(a)·(1 + a·(1 − σ(a))).
                da[i] = gv * bv * sg * (1.0 + av * (1.0 - sg));
                db[i] = gv * av * sg;
            }
        });
        Ok((CpuStorage::F32(both), Shape::from((2, len))))
    }
}

#[cfg(test)]
mod tests {
    //! The kernel against the composed candle ops.

    use super::*;
    use crate::testing::{check, random};

    #[test]
    fn swiglu_matches_composed() {
        let a = random(&[7, 3000], 5, 2.0);
        let b = random(&[7, 3000], 6, 1.0);
        check(&[a, b], |t| swiglu(&t[0], &t[1]).unwrap(), 2e-6);
    }
}
