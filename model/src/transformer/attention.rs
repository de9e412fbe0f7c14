//! Causal self-attention with RoPE and grouped-query key/value heads, and the reference and fused
//! attention the inference forward chooses between.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_nn::attention::AttnMask;
use m31r_kernels::{attention, train};

use super::cache::KvCache;
use super::rope::Rope;
use super::{AttentionKernel, Path, Result, load_projection};
use crate::config::ModelConfig;
use crate::quant::{QLinear, QuantizedWeights};
use crate::weights::layer;

/// Causal self-attention with RoPE and optional grouped-query key/value heads.
#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) q_proj: QLinear,
    pub(super) k_proj: QLinear,
    pub(super) v_proj: QLinear,
    pub(super) o_proj: QLinear,
    pub(super) n_heads: usize,
    pub(super) n_kv_heads: usize,
    pub(super) head_dim: usize,
}

impl Attention {
    /// Loads the four projections from `vb`, a block's prefix.
    pub(super) fn load(
        vb: VarBuilder,
        config: &ModelConfig,
        quantized: &QuantizedWeights,
    ) -> Result<Self> {
        let linear = |i: usize| load_projection(&vb, i, config, quantized);
        Ok(Self {
            q_proj: linear(layer::Q)?,
            k_proj: linear(layer::K)?,
            v_proj: linear(layer::V)?,
            o_proj: linear(layer::O)?,
            n_heads: config.n_heads(),
            n_kv_heads: config.n_kv_heads(),
            head_dim: config.head_dim(),
        })
    }

    /// Attends `x` (`(batch, seq, d_model)`, at positions `start..`) to itself and, on the inference
    /// path, to the `cache`d positions before it.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        path: Path,
        cache: Option<(&KvCache, usize)>,
    ) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        let start = cache.map_or(0, |(c, _)| c.len());
        let [q, k, v] = path.project_all([&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let q = q.reshape((batch, seq, self.n_heads, self.head_dim))?;
        let k = k.reshape((batch, seq, self.n_kv_heads, self.head_dim))?;
        let v = v.reshape((batch, seq, self.n_kv_heads, self.head_dim))?;
        let (q, k) = match path {
            Path::Train(_) => (rope.apply_train(&q, start)?, rope.apply_train(&k, start)?),
            Path::Infer(_) => (rope.apply_fused(&q, start)?, rope.apply_fused(&k, start)?),
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (k, v) = match cache {
            Some((cache, layer)) => {
                let (keys, values) = cache.append(layer, &k, &v)?;
                let kv_len = start + seq;
                if path == Path::Infer(AttentionKernel::Fused) {
                    // A decode step or a keystroke's few new tokens: one pass over the cache per
                    // query and head; a longer chunk (prefill): two GEMMs per head and block of
                    // queries. Both read the head-major buffers in place.
                    let attend = if seq <= attention::MAX_QUERIES {
                        attention::attention
                    } else {
                        attention::attention_prefill
                    };
                    if let Some(y) = attend(&q, keys, values, kv_len, scale as f32)? {
                        let y = y.reshape((batch, seq, self.n_heads * self.head_dim))?;
                        return path.project(&self.o_proj, &y);
                    }
                }
                // Other kernels take position-major `(1, kv_len, kv_heads, head_dim)` in the
                // activation dtype.
                let position_major = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.narrow(2, 0, kv_len)?
                        .transpose(1, 2)?
                        .contiguous()?
                        .to_dtype(q.dtype())?)
                };
                (position_major(keys)?, position_major(values)?)
            }
            None => (k, v),
        };
        let y = match path {
            Path::Infer(AttentionKernel::Fused) => match fused_attention(&q, &k, &v, scale)? {
                Some(y) => y,
                None => plain_attention(&q, &k, &v, scale, start, false)?,
            },
            Path::Infer(AttentionKernel::Plain) => {
                plain_attention(&q, &k, &v, scale, start, false)?
            }
            Path::Train(_) => plain_attention(&q, &k, &v, scale, start, true)?,
        };
        path.project(&self.o_proj, &y.reshape((batch, seq, self.n_heads * self.head_dim))?)
    }
}

/// Reference attention over `(batch, seq, heads, dim)` queries and `(batch, kv_len, kv_heads, dim)`
/// keys/values; returns `(batch, seq, heads, dim)`. Query `i` sits at absolute position `start + i`
/// and sees keys `0..=start + i`. The differentiable variant masks and normalises with
/// [`train::causal_softmax`] (which takes `start` from the shapes).
pub(super) fn plain_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    start: usize,
    differentiable: bool,
) -> Result<Tensor> {
    let (_, seq, n_heads, _) = q.dims4()?;
    let (_, kv_len, n_kv_heads, _) = k.dims4()?;
    let q = q.transpose(1, 2)?.contiguous()?;
    let k = repeat_kv(&k.transpose(1, 2)?, n_heads / n_kv_heads)?;
    let v = repeat_kv(&v.transpose(1, 2)?, n_heads / n_kv_heads)?;
    if differentiable {
        // Training: one (sequence, head) at a time on the kernels' pool, no score tensors.
        if start == 0 && kv_len == seq {
            return Ok(train::causal_attention(&q, &k, &v, scale)?.transpose(1, 2)?);
        }
        let probs = train::causal_softmax(&train::batched_matmul(&q, &k, true)?, scale)?;
        return Ok(train::batched_matmul(&probs, &v, false)?.transpose(1, 2)?);
    }
    let scores = q.matmul(&k.t()?)?;
    let probs = {
        let scores = (scores * scale)?;
        let mask = causal_mask(seq, kv_len, start, q.dtype(), q.device())?;
        candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?
    };
    Ok(probs.matmul(&v)?.transpose(1, 2)?)
}

/// The fused kernel for this device and dtype, or `None` where there is none.
pub(super) fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    let (_, seq, _, _) = q.dims4()?;
    let offset = k.dim(1)? - seq;
    if q.device().is_cpu() {
        let mask = AttnMask::causal_with_offset(offset);
        let run = match q.dtype() {
            DType::F32 => candle_nn::attention::flash_attn::<f32>,
            DType::F16 => candle_nn::attention::flash_attn::<half::f16>,
            DType::BF16 => candle_nn::attention::flash_attn::<half::bf16>,
            _ => return Ok(None),
        };
        // The CPU kernel accumulates in f32 and returns f32 (batch, heads, seq, dim).
        let y = run(
            &q.contiguous()?,
            &k.contiguous()?,
            &v.contiguous()?,
            scale as f32,
            mask,
            None,
            None,
        )?;
        return Ok(Some(y.to_dtype(q.dtype())?.transpose(1, 2)?));
    }
    #[cfg(feature = "flash-attn")]
    if q.device().is_cuda() && matches!(q.dtype(), DType::F16 | DType::BF16) {
        // flash-attn v2 aligns the causal mask bottom-right, which is exactly the KV-cache case.
        let y = candle_flash_attn::flash_attn(q, k, v, scale as f32, true)?;
        return Ok(Some(y));
    }
    Ok(None)
}

/// Shares each key/value head among `n_rep` consecutive query heads (LLaMA's GQA layout).
pub(super) fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.contiguous()?);
    }
    let (batch, heads, seq, dim) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((batch, heads, n_rep, seq, dim))?.reshape((
        batch,
        heads * n_rep,
        seq,
        dim,
    ))?)
}

/// Additive mask `(seq, kv_len)`: query `i` (position `start + i`) may see keys `0..=start + i`.
pub(super) fn causal_mask(
    seq: usize,
    kv_len: usize,
    start: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..kv_len).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (seq, kv_len), device)?.to_dtype(dtype)?)
}
