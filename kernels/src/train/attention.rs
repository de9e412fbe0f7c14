//! Causal self-attention for training, forward and backward, one (sequence, head) at a time on
//! the kernels' pool: a thread holds one head's scores (`seq²` values) in a buffer of its own and
//! recomputes them in the backward pass, so no `(batch, heads, seq, seq)` tensor of scores,
//! probabilities or their gradients is ever allocated. (At 8 × 512 tokens with 5 heads each was
//! 42 MB: above glibc's largest `mmap` threshold, so every one of them was mapped, page-faulted
//! and zeroed anew at every layer of every step.)
//!
//! Per head, with S = q kᵀ·scale masked causally and P = softmax(S):
//! forward O = P v; backward dV = Pᵀ dO, dP = dO vᵀ, dS = P ∘ (dP − rowsum(P ∘ dP)),
//! dQ = dS k·scale, dK = dSᵀ q·scale. Products are single-threaded GEMMs of the `gemm` crate;
//! heads are shared out over the pool, each computed whole by one thread, so results do not
//! depend on the thread count.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::fused;
use crate::gemm::gemm_into;
use crate::pool::{self, Out};
use crate::storage::data;

/// Causal attention of head-major `q`, `k`, `v` `(batch, heads, seq, head_dim)`, query `i`
/// seeing keys `0..=i`, scores scaled by `scale`; returns `(batch, heads, seq, head_dim)`.
/// Differentiable in all three. Composed candle ops off the CPU or for other dtypes.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if !(fused(q) && fused(k) && fused(v)) {
        let scores = q.matmul(&k.t()?)?;
        return super::causal_softmax(&scores, scale)?.matmul(v);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if q.dims() != k.dims() || q.dims() != v.dims() || q.rank() != 4 {
        candle_core::bail!(
            "causal attention: q {:?}, k {:?} and v {:?} must be the same (batch, heads, seq, dim)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    q.apply_op3(&k, &v, Attention { scale: scale as f32 })
}

struct Attention {
    scale: f32,
}

/// Row `i` of the causal softmax of `scores` (`t × t`, row-major) in place: entries `0..=i` of
/// each row become probabilities, the rest 0.
fn causal_softmax_rows(scores: &mut [f32], t: usize) {
    for (i, row) in scores.chunks_exact_mut(t).enumerate() {
        let (seen, masked) = row.split_at_mut(i + 1);
        let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv = 1.0 / crate::vec::exp_shifted(seen, max);
        seen.iter_mut().for_each(|x| *x *= inv);
        masked.fill(0.0);
    }
}

/// `P` of head `h` into `p` (`t × t`): scaled scores, then the causal softmax.
///
/// # Safety
/// `q` and `k` must each hold `t · d` values.
unsafe fn probabilities(
    q: *const f32,
    k: *const f32,
    t: usize,
    d: usize,
    scale: f32,
    p: &mut [f32],
) {
    // SAFETY: S = q kᵀ reads q (t × d) and k (t × d) as kᵀ (d × t); p holds t · t values.
    unsafe { gemm_into((t, t, d), p.as_mut_ptr(), t, q, (d, 1), k, (1, d), scale) };
    causal_softmax_rows(p, t);
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "m31r-causal-attention"
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
        let (q, k, v) = (data(s1, l1, name)?, data(s2, l2, name)?, data(s3, l3, name)?);
        let (b, h, t, d) = l1.shape().dims4()?;
        let mut o = vec![0f32; q.len()];
        let out = Out::new(&mut o);
        let (qp, kp, vp) = (q.as_ptr() as usize, k.as_ptr() as usize, v.as_ptr() as usize);
        let scale = self.scale;
        pool::run(b * h, false, |range| {
            let mut p = vec![0f32; t * t];
            for head in range {
                let at = head * t * d;
                // SAFETY: head `head` is values at..at + t·d of each operand and of the output,
                // which this item alone writes.
                unsafe {
                    let (q, k, v) = (
                        (qp as *const f32).add(at),
                        (kp as *const f32).add(at),
                        (vp as *const f32).add(at),
                    );
                    probabilities(q, k, t, d, scale, &mut p);
                    gemm_into(
                        (t, d, t),
                        out.as_mut_ptr().add(at),
                        d,
                        p.as_ptr(),
                        (t, 1),
                        v,
                        (d, 1),
                        1.0,
                    );
                }
            }
        });
        Ok((CpuStorage::F32(o), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d_o = d_o.contiguous()?;
        // The three gradients side by side: (3, batch, heads, seq, dim).
        let grads = Tensor::stack(&[q, k, v], 0)?
            .apply_op2_no_bwd(&d_o, &AttentionBwd { scale: self.scale })?;
        let part = |i| grads.get(i);
        Ok((Some(part(0)?), Some(part(1)?), Some(part(2)?)))
    }
}

/// The backward pass: input `(3, b, h, t, d)` = q, k, v stacked, and dO; output the same
/// stacking of dQ, dK, dV.
struct AttentionBwd {
    scale: f32,
}

impl candle_core::CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "m31r-causal-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (qkv, d_o) = (data(s1, l1, name)?, data(s2, l2, name)?);
        let (b, h, t, d) = l2.shape().dims4()?;
        let n = b * h * t * d;
        if qkv.len() != 3 * n {
            candle_core::bail!("{name}: inputs {:?} against dO {:?}", l1.dims(), l2.dims());
        }
        let mut grads = vec![0f32; 3 * n];
        let out = Out::new(&mut grads);
        let (src, dop) = (qkv.as_ptr() as usize, d_o.as_ptr() as usize);
        let scale = self.scale;
        pool::run(b * h, false, |range| {
            let mut p = vec![0f32; t * t];
            let mut dp = vec![0f32; t * t];
            for head in range {
                let at = head * t * d;
                // SAFETY: head `head` of q, k, v, dO and of dQ, dK, dV is values at..at + t·d of
                // its block; this item alone writes those of the output.
                unsafe {
                    let base = src as *const f32;
                    let (q, k, v) = (base.add(at), base.add(n + at), base.add(2 * n + at));
                    let d_o = (dop as *const f32).add(at);
                    let (dq, dk, dv) = (
                        out.as_mut_ptr().add(at),
                        out.as_mut_ptr().add(n + at),
                        out.as_mut_ptr().add(2 * n + at),
                    );
                    probabilities(q, k, t, d, scale, &mut p);
                    // dV = Pᵀ dO.
                    gemm_into((t, d, t), dv, d, p.as_ptr(), (1, t), d_o, (d, 1), 1.0);
                    // dP = dO vᵀ.
                    gemm_into((t, t, d), dp.as_mut_ptr(), t, d_o, (d, 1), v, (1, d), 1.0);
                    // dS = P ∘ (dP − rowsum(P ∘ dP)), in place of dP (masked entries: P = 0).
                    for (prow, dprow) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
                        let dot: f32 = prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
                        for (x, pv) in dprow.iter_mut().zip(prow) {
                            *x = pv * (*x - dot);
                        }
                    }
                    // dQ = dS k·scale, dK = dSᵀ q·scale.
                    gemm_into((t, d, t), dq, d, dp.as_ptr(), (t, 1), k, (d, 1), scale);
                    gemm_into((t, d, t), dk, d, dp.as_ptr(), (1, t), q, (d, 1), scale);
                }
            }
        });
        Ok((CpuStorage::F32(grads), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    //! The kernel against the composed candle ops in f64.

    use super::*;
    use crate::testing::{check, random};

    #[test]
    fn causal_attention_matches_composed_in_value_and_gradients() {
        for (shape, scale) in [([2, 3, 17, 8], 0.35), ([1, 2, 40, 16], 0.25), ([3, 1, 1, 4], 0.5)] {
            let q = random(&shape, 1, 1.0);
            let k = random(&shape, 2, 1.0);
            let v = random(&shape, 3, 1.0);
            check(&[q, k, v], |t| causal_attention(&t[0], &t[1], &t[2], scale).unwrap(), 2e-5);
        }
    }

    #[test]
    fn mismatched_shapes_are_named() {
        let q = random(&[1, 2, 5, 4], 1, 1.0);
        let k = random(&[1, 2, 6, 4], 2, 1.0);
        let err = causal_attention(&q, &k, &q, 0.5).unwrap_err().to_string();
        assert!(err.contains("[1, 2, 5, 4]") && err.contains("[1, 2, 6, 4]"), "{err}");
    }
}
