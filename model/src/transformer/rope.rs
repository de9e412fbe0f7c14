//! Rotary position embedding: the tables, the fused and differentiable rotations, and the
//! rotation of one position's row on a slice (the single-token decode step).

use candle_core::{DType, Device, Tensor};
use m31r_kernels::train;

use super::Result;
use crate::config::ModelConfig;

/// Precomputed rotary-embedding tables, `(context_length, head_dim / 2)`, non-interleaved
/// ("rotate half") as in Hugging Face LLaMA.
#[derive(Debug, Clone)]
pub(super) struct Rope {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

impl Rope {
    pub(super) fn new(config: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let half = config.head_dim() / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| config.rope_theta().powf(-(2.0 * i as f64) / config.head_dim() as f64))
            .collect();
        let n = config.context_length() * half;
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for pos in 0..config.context_length() {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = (config.context_length(), half);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
    }

    pub(super) fn tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        Ok((self.cos.narrow(0, start, len)?, self.sin.narrow(0, start, len)?))
    }

    /// Fused rotation of `(batch, seq, heads, head_dim)` tensors at positions `start..`: on a CPU
    /// in f32 the kernel of [`m31r_kernels::train`] (candle's thread pool; candle-nn's runs on rayon's
    /// threads, which then compete with the pool's), elsewhere candle-nn's.
    pub(super) fn apply_fused(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables(start, x.dim(1)?)?;
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return Ok(train::rope(x, &cos, &sin)?);
        }
        Ok(candle_nn::rotary_emb::rope_thd(&x.contiguous()?, &cos, &sin)?)
    }

    /// The same rotation, differentiable (fused with a hand-written backward on CPU, composed
    /// elsewhere): candle's fused rope has no backward pass.
    pub(super) fn apply_train(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables(start, x.dim(1)?)?;
        Ok(train::rope(x, &cos, &sin)?)
    }
}

/// Rotates every head of one position's `(heads · head_dim)` row in place, rotate-half style,
/// with that position's `cos` and `sin` (`head_dim / 2` each).
pub(super) fn rope_rows(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_mut(2 * half) {
        let (first, second) = head.split_at_mut(half);
        for (((a, b), c), s) in first.iter_mut().zip(second).zip(cos).zip(sin) {
            let (x1, x2) = (*a, *b);
            *a = x1 * c - x2 * s;
            *b = x1 * s + x2 * c;
        }
    }
}
