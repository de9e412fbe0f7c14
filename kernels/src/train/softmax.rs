//! Scaled causal softmax of attention scores, and its backward pass.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Tensor};

use super::fused;
use crate::pool::{self, Out};
use crate::storage::data;
use crate::vec::portable::dot_f32 as dot;

/// `softmax(scale · scores + causal mask)` over the last dimension of `scores`
/// `(..., seq, kv_len)`, where query `i` sits at position `kv_len − seq + i` and sees keys
/// `0..=kv_len − seq + i`. Masked probabilities are exactly zero.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let (seq, kv_len) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    if kv_len < seq {
        candle_core::bail!("causal_softmax: {seq} queries but only {kv_len} keys");
    }
    if matches!(scores.dtype(), DType::BF16 | DType::F16) {
        // Half-precision scores (mixed precision) are normalised in f32, as under an autocast:
        // exponentials of bf16 logits lose the small probabilities. On a CPU this is the kernel.
        return causal_softmax(&scores.to_dtype(DType::F32)?, scale)?.to_dtype(scores.dtype());
    }
    if !fused(scores) {
        let start = kv_len - seq;
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| {
                (0..kv_len).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect();
        let mask =
            Tensor::from_vec(mask, (seq, kv_len), scores.device())?.to_dtype(scores.dtype())?;
        return candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&mask)?, D::Minus1);
    }
    scores.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 })
}

struct CausalSoftmax {
    scale: f32,
}

/// Keys visible to row `r` of a `(…, seq, kv_len)` score tensor.
fn visible(r: usize, seq: usize, kv_len: usize) -> usize {
    kv_len - seq + r % seq + 1
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "m31r-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = data(storage, layout, self.name())?;
        let dims = layout.dims();
        let (seq, kv_len) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mut p = vec![0f32; s.len()];
        let out = Out::new(&mut p);
        pool::row_blocks(s.len() / kv_len, |_, rows| {
            // SAFETY: blocks are disjoint rows.
            let p = unsafe { out.part(rows.start * kv_len..rows.end * kv_len) };
            for (r, pr) in rows.clone().zip(p.chunks_exact_mut(kv_len)) {
                let n = visible(r, seq, kv_len);
                let (sr, pr) = (&s[r * kv_len..][..n], &mut pr[..n]);
                let max = sr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * self.scale;
                let mut sum = 0f32;
                for (pv, sv) in pr.iter_mut().zip(sr) {
                    *pv = (sv * self.scale - max).exp();
                    sum += *pv;
                }
                let inv = 1.0 / sum;
                pr.iter_mut().for_each(|v| *v *= inv);
            }
        });
        Ok((CpuStorage::F32(p), layout.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(&g.contiguous()?, &CausalSoftmaxBwd { scale: self.scale })?))
    }
}

struct CausalSoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "m31r-causal-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (p, g) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let dims = l1.dims();
        let (seq, kv_len) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mut ds = vec![0f32; p.len()];
        let out = Out::new(&mut ds);
        pool::row_blocks(p.len() / kv_len, |_, rows| {
            // SAFETY: blocks are disjoint rows.
            let ds = unsafe { out.part(rows.start * kv_len..rows.end * kv_len) };
            for (r, dr) in rows.clone().zip(ds.chunks_exact_mut(kv_len)) {
                let n = visible(r, seq, kv_len);
                let (pr, gr) = (&p[r * kv_len..][..n], &g[r * kv_len..][..n]);
                // dS = scale · P ⊙ (dP − Σ dP ⊙ P); masked entries have P = 0.
                let inner = dot(pr, gr);
                for ((d, pv), gv) in dr[..n].iter_mut().zip(pr).zip(gr) {
                    *d = self.scale * pv * (gv - inner);
                }
            }
        });
        Ok((CpuStorage::F32(ds), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    //! The kernel against the composed candle ops, masked entries exactly zero.

    use super::*;
    use crate::testing::{check, random};

    #[test]
    fn causal_softmax_matches_composed_with_and_without_offset() {
        for (seq, kv) in [(21, 21), (5, 33), (1, 9)] {
            let s = random(&[2, 3, seq, kv], 4, 3.0);
            check(std::slice::from_ref(&s), |t| causal_softmax(&t[0], 0.25).unwrap(), 2e-6);
            // Masked entries are exactly zero.
            let p =
                causal_softmax(&s, 0.25).unwrap().flatten_to(2).unwrap().to_vec2::<f32>().unwrap();
            for (r, row) in p.iter().enumerate() {
                let i = r % seq;
                assert!(row[kv - seq + i + 1..].iter().all(|&v| v == 0.0));
            }
        }
    }
}
