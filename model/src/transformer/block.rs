//! The pre-norm block and its RMSNorm.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use m31r_kernels::train;

use super::attention::Attention;
use super::cache::KvCache;
use super::mlp::Mlp;
use super::rope::Rope;
use super::{Path, Result};
use crate::config::ModelConfig;
use crate::quant::{QLinear, QuantizedWeights};
use crate::weights::{LAYER, layer};

/// Root-mean-square layer norm with a learned scale and no bias.
#[derive(Debug, Clone)]
pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f64,
}

impl RmsNorm {
    pub(super) fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, eps })
    }

    /// The inference norm: on a CPU in f32 the pool kernel of [`m31r_kernels::train`] (see
    /// [`Rope::apply_fused`]), elsewhere candle-nn's.
    pub(super) fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return self.forward_train(x);
        }
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?)
    }

    /// Differentiable RMSNorm (see [`train::rms_norm`]).
    pub(super) fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        Ok(train::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// RMSNorm of one row `x` with scale `weight` into `out` (the step program's norm).
pub(super) fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let inv = 1.0 / (m31r_kernels::vec::portable::dot_f32(x, x) / x.len() as f32 + eps).sqrt();
    for ((o, x), w) in out.iter_mut().zip(x).zip(weight) {
        *o = x * inv * w;
    }
}

/// Pre-norm transformer block: `x + attn(norm(x))`, then `h + mlp(norm(h))`.
#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) input_layernorm: RmsNorm,
    pub(super) self_attn: Attention,
    pub(super) post_attention_layernorm: RmsNorm,
    pub(super) mlp: Mlp,
}

impl Block {
    pub(super) fn load(
        vb: VarBuilder,
        config: &ModelConfig,
        quantized: &QuantizedWeights,
    ) -> Result<Self> {
        let (d, eps) = (config.d_model(), config.norm_eps());
        let norm = |i: usize| RmsNorm::load(vb.pp(LAYER[i].module()), d, eps);
        Ok(Self {
            input_layernorm: norm(layer::ATTN_NORM)?,
            self_attn: Attention::load(vb.clone(), config, quantized)?,
            post_attention_layernorm: norm(layer::FFN_NORM)?,
            mlp: Mlp::load(vb, config, quantized)?,
        })
    }

    /// This block's weights in the order of [`LAYER`] (quantized ones dequantized).
    pub(super) fn weights(&self) -> [candle_core::Result<Tensor>; 9] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            Ok(self.input_layernorm.weight.clone()),
            a.q_proj.weight(),
            a.k_proj.weight(),
            a.v_proj.weight(),
            a.o_proj.weight(),
            Ok(self.post_attention_layernorm.weight.clone()),
            m.gate_proj.weight(),
            m.up_proj.weight(),
            m.down_proj.weight(),
        ]
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        path: Path,
        cache: Option<(&KvCache, usize)>,
    ) -> Result<Tensor> {
        let norm = |n: &RmsNorm, x: &Tensor| match path {
            Path::Train(_) => n.forward_train(x),
            Path::Infer(_) => n.forward_fused(x),
        };
        // Under mixed precision the sublayers return the compute dtype; the residual stream
        // keeps the weights' (a no-op cast otherwise).
        let attn = self.self_attn.forward(&norm(&self.input_layernorm, x)?, rope, path, cache)?;
        let h = (x + attn.to_dtype(x.dtype())?)?;
        let mlp = self.mlp.forward(&norm(&self.post_attention_layernorm, &h)?, path)?;
        Ok((&h + mlp.to_dtype(h.dtype())?)?)
    }

    /// The block's projections, the ones the step program ([`super::step`]) reads.
    pub(super) fn linears(&self) -> [&QLinear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }
}
