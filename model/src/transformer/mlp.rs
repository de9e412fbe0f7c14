//! The SwiGLU feed-forward.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use m31r_kernels::train;

use super::{Path, Result, load_projection};
use crate::config::ModelConfig;
use crate::quant::{QLinear, QuantizedWeights};
use crate::weights::layer;

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub(super) struct Mlp {
    pub(super) gate_proj: QLinear,
    pub(super) up_proj: QLinear,
    pub(super) down_proj: QLinear,
}

impl Mlp {
    /// Loads the three projections from `vb`, a block's prefix.
    pub(super) fn load(
        vb: VarBuilder,
        config: &ModelConfig,
        quantized: &QuantizedWeights,
    ) -> Result<Self> {
        let linear = |i: usize| load_projection(&vb, i, config, quantized);
        Ok(Self {
            gate_proj: linear(layer::GATE)?,
            up_proj: linear(layer::UP)?,
            down_proj: linear(layer::DOWN)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, path: Path) -> Result<Tensor> {
        let [gate, up] = path.project_all([&self.gate_proj, &self.up_proj], x)?;
        let gated = train::swiglu(&gate, &up)?;
        path.project(&self.down_proj, &gated)
    }
}
