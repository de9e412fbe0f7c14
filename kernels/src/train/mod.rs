//! Fused CPU kernels with hand-written backward passes for the training path, as candle custom
//! ops: RMSNorm, RoPE, causal softmax, SwiGLU, token cross-entropy, the in-place AdamW step, and Muon's orthogonalised update (composed from
//! candle matmuls: its cost is in them).
//!
//! candle's fused CPU ops (`rms_norm`, `rope_thd`, `softmax_last_dim`) have no backward pass, so a
//! differentiable forward would otherwise compose each of them from 4–8 elementwise and broadcast
//! ops, every one a full pass over memory and a fresh allocation, with as many again in backward.
//! Each op here is one pass forward and one pass backward, run on the kernels' thread pool, on
//! contiguous f32 tensors. Work is split into fixed row blocks and reductions across rows are summed
//! in block order, so results do not depend on the thread count or on scheduling (bit-identical
//! runs). On other devices and dtypes every function falls back to the composed candle ops, which
//! are also the reference the tests hold these kernels to.

use candle_core::{DType, Tensor};

mod adamw;
mod attention;
mod cross_entropy;
mod linear;
mod muon;
mod norm;
mod rope;
mod softmax;
mod swiglu;

pub use adamw::{AdamWStep, adamw, sum_squares};
pub use attention::causal_attention;
pub use cross_entropy::cross_entropy;
pub use linear::{batched_matmul, linear};
pub use muon::{MuonStep, NEWTON_SCHULZ, NEWTON_SCHULZ_STEPS, muon, orthogonalize};
pub use norm::rms_norm;
pub use rope::rope;
pub use softmax::causal_softmax;
pub use swiglu::swiglu;

/// Whether the fused kernels apply to `t`.
pub(crate) fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}
