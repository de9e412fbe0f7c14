//! The LLaMA-shaped decoder (DESIGN §2), read top-down: KV cache → RoPE → attention → MLP → block →
//! model. One set of weights serves two forwards: a differentiable training forward (fused CPU
//! kernels with hand-written backward passes from [`m31r_kernels::train`], composed candle ops on other
//! devices), and an inference forward with candle-nn's fused kernels and a truncatable KV cache.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::config::ModelConfig;
use crate::quant::{QLinear, QuantizedWeights, TokenEmbedding, Weight};
use crate::rng::Rng;
use crate::weights;
pub use crate::weights::weight_shapes;

/// Standard deviation of the initial weights.
const INIT_STD: f64 = 0.02;

/// Failures of the transformer; candle's errors carry the shapes and ops involved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The sequence would not fit the model's context window.
    #[error("sequence of {requested} tokens exceeds the context length {context_length}")]
    ContextOverflow {
        /// Tokens the cache would hold after this call.
        requested: usize,
        /// The model's limit.
        context_length: usize,
    },
    /// A caller broke an API precondition.
    #[error("{0}")]
    Usage(String),
}

type Result<T> = std::result::Result<T, ModelError>;

mod attention;
mod block;
mod cache;
mod mlp;
mod rope;
mod step;

#[cfg(test)]
use attention::{fused_attention, plain_attention};
use block::{Block, RmsNorm};
pub use cache::KvCache;
use rope::Rope;
pub use step::{Decode, MAX_DECODE_STEPS, Pick};

/// Which attention implementation the inference forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// Matmul + softmax + matmul: the reference the fused kernels are tested against.
    Plain,
    /// candle-nn's CPU flash attention, or the CUDA flash-attention crate with the `flash-attn`
    /// feature on a GPU in f16/bf16; falls back to `Plain` where neither applies.
    #[default]
    Fused,
}

/// Whether the ops on a path must be differentiable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The differentiable forward, its projections, attention and SwiGLU computed in this dtype
    /// (the weights' own, or bf16 for mixed precision: see [`Model::forward_train_in`]).
    Train(DType),
    Infer(AttentionKernel),
}

impl Path {
    /// `x Wᵀ` by `linear`: candle's differentiable matmul on the training path, the inference
    /// kernels ([`QLinear::forward_infer`]) otherwise.
    fn project(self, linear: &QLinear, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Path::Train(compute) => linear.forward_train_in(x, compute)?,
            Path::Infer(_) => linear.forward_infer(x)?,
        })
    }

    /// Several projections of the same `x` (on the inference path in one kernel dispatch).
    fn project_all<const N: usize>(
        self,
        linears: [&QLinear; N],
        x: &Tensor,
    ) -> Result<[Tensor; N]> {
        let ys = match self {
            Path::Train(compute) => {
                // One cast of the shared input, not one per projection.
                let x = x.to_dtype(compute)?;
                linears
                    .iter()
                    .map(|l| l.forward_train_in(&x, compute))
                    .collect::<candle_core::Result<_>>()?
            }
            Path::Infer(_) => QLinear::forward_infer_many(&linears, x)?,
        };
        ys.try_into().map_err(|_| ModelError::Usage("projection count mismatch".into()))
    }
}

/// Loads projection `i` of [`weights::LAYER`] from `vb`, a block's prefix: its module path and
/// shape come from the weights table.
fn load_projection(
    vb: &VarBuilder,
    i: usize,
    config: &ModelConfig,
    quantized: &QuantizedWeights,
) -> Result<QLinear> {
    let w = &weights::LAYER[i];
    Ok(QLinear::load(vb.pp(w.module()), w.matrix(config), quantized)?)
}

/// The decoder: embedding → blocks → final norm → LM head (tied to the embedding by default).
#[derive(Debug, Clone)]
pub struct Model {
    config: ModelConfig,
    embed_tokens: TokenEmbedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: QLinear,
    rope: Rope,
    kernel: AttentionKernel,
    /// Whether a decode step or a keystroke's few tokens can run as the step program
    /// ([`step`]): a CPU f32 model whose every projection runs on the kernels. Decided at load,
    /// as the projections' kernels are.
    token_step: bool,
}

impl Model {
    /// Builds the model from weights named as in [`weight_shapes`]; a missing tensor or a shape
    /// mismatch is an error naming the tensor.
    pub fn load(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::load_with(config, vb, &QuantizedWeights::new())
    }

    /// [`Model::load`], taking the 2-D weights named in `quantized` from there (GGML blocks run
    /// by candle's quantized matmul) and the others from `vb`.
    fn load_with(
        config: &ModelConfig,
        vb: VarBuilder,
        quantized: &QuantizedWeights,
    ) -> Result<Self> {
        let table = (config.vocab_size(), config.d_model());
        let embed_tokens =
            TokenEmbedding::load(vb.pp(weights::module(weights::EMBEDDING)), table, quantized)?;
        let layers = (0..config.n_layers())
            .map(|i| Block::load(vb.pp(weights::layer_module(i)), config, quantized))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(
            vb.pp(weights::module(weights::FINAL_NORM)),
            config.d_model(),
            config.norm_eps(),
        )?;
        let lm_head = if config.tie_embeddings() {
            embed_tokens.tied_head()?
        } else {
            QLinear::load(vb.pp(weights::module(weights::LM_HEAD)), table, quantized)?
        };
        let rope = Rope::new(config, vb.dtype(), vb.device())?;
        let token_step = rope.cos.device().is_cpu()
            && embed_tokens.dtype() == DType::F32
            && layers.iter().flat_map(Block::linears).chain([&lm_head]).all(QLinear::on_kernels);
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            kernel: AttentionKernel::default(),
            token_step,
        })
    }

    /// A freshly initialised model whose weights are trainable variables in the returned map.
    ///
    /// Weights are normal(0, 0.02) (output projections of each block scaled by 1/sqrt(2·n_layers)),
    /// norms are one; each tensor draws from its own stream of `seed`, so the same seed gives
    /// bit-identical weights on every machine.
    pub fn init(config: &ModelConfig, seed: u64, device: &Device) -> Result<(Self, VarMap)> {
        let varmap = VarMap::new();
        {
            let mut vars = varmap
                .data()
                .lock()
                .map_err(|_| ModelError::Usage("variable map lock poisoned".into()))?;
            for (name, shape) in weight_shapes(config) {
                let count = shape.iter().product();
                let values = if name.ends_with("norm.weight") {
                    vec![1f32; count]
                } else {
                    let mut std = INIT_STD;
                    if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                        std /= (2.0 * config.n_layers() as f64).sqrt();
                    }
                    let mut values = vec![0f32; count];
                    Rng::for_stream(seed, &name).fill_normal(&mut values, std);
                    values
                };
                let tensor = Tensor::from_vec(values, shape, device)?;
                vars.insert(name, Var::from_tensor(&tensor)?);
            }
        }
        let model = Self::load(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        Ok((model, varmap))
    }

    /// Builds the model from named tensors, converting them to `dtype`.
    pub fn from_tensors(
        config: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load(config, VarBuilder::from_tensors(tensors, dtype, device))
    }

    /// Builds the model from stored weights of any precision (see [`crate::quant`]): quantized
    /// ones run through candle's quantized matmul, dense ones are converted to `dtype` (f32 for a
    /// quantized model, whose activations are f32).
    pub fn from_weights(
        config: &ModelConfig,
        weights: HashMap<String, Weight>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut dense = HashMap::new();
        let mut quantized = QuantizedWeights::new();
        for (name, weight) in weights {
            match weight {
                Weight::Dense(t) => {
                    dense.insert(name, t);
                }
                Weight::Quantized(q) => {
                    quantized.insert(name, q);
                }
            }
        }
        Self::load_with(config, VarBuilder::from_tensors(dense, dtype, device), &quantized)
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Selects the attention implementation of the inference forward.
    pub fn set_attention_kernel(&mut self, kernel: AttentionKernel) {
        self.kernel = kernel;
    }

    /// Dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        self.rope.cos.device()
    }

    /// Every weight with its Hugging Face LLaMA name (the tied head appears once, as the embedding).
    /// Quantized weights come back dequantized to f32 (see [`crate::quant`]).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        // Dense weights are returned as they are; dequantizing a CPU block tensor whose shape was
        // validated at load cannot fail.
        #[allow(clippy::expect_used)]
        let dense = |w: candle_core::Result<Tensor>| w.expect("dequantizing a loaded weight");
        let mut out = vec![(weights::EMBEDDING.into(), dense(self.embed_tokens.weight()))];
        for (i, block) in self.layers.iter().enumerate() {
            out.extend(
                weights::LAYER.iter().zip(block.weights()).map(|(w, t)| (w.name(i), dense(t))),
            );
        }
        out.push((weights::FINAL_NORM.into(), self.norm.weight.clone()));
        if !self.config.tie_embeddings() {
            out.push((weights::LM_HEAD.into(), dense(self.lm_head.weight())));
        }
        out
    }

    /// Differentiable forward over a batch `(batch, seq)` of token ids from position 0; returns
    /// logits `(batch, seq, vocab)`. Uses only ops with a backward pass.
    pub fn forward_train(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_train_in(ids, self.dtype())
    }

    /// [`Model::forward_train`] in mixed precision: the projections (LM head included), attention
    /// and SwiGLU run in `compute` (bf16 on a GPU), on copies of the weights cast per call, while
    /// the weights themselves, the residual stream, the norms, the softmax and the returned logits
    /// stay in the weights' dtype (f32), as under an autocast. Gradients flow back through the
    /// casts, so they arrive in the weights' dtype and an f32 optimizer keeps f32 master weights
    /// and moments. `compute` equal to the weights' dtype is [`Model::forward_train`].
    pub fn forward_train_in(&self, ids: &Tensor, compute: DType) -> Result<Tensor> {
        let (_, seq) = ids.dims2()?;
        self.check_len(seq)?;
        let path = Path::Train(compute);
        let mut x = self.embed_tokens.forward(ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, &self.rope, path, None)?;
        }
        let logits = path.project(&self.lm_head, &self.norm.forward_train(&x)?)?;
        Ok(logits.to_dtype(x.dtype())?)
    }

    /// Inference forward of one chunk `(1, seq)` of ids that continue the sequence in `cache`;
    /// appends the chunk to the cache and returns logits `(1, seq, vocab)` for every position of it
    /// (all of them, so a draft can be verified in one call).
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, cache)?;
        self.logits(&hidden)
    }

    /// [`Model::forward`] returning the logits of the chunk's last position only, `(1, 1, vocab)`:
    /// all that prefill and decoding need. The LM head of the other positions (a sixth of a
    /// `small` model's prefill work) is skipped.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if let Some(logits) = self.forward_step(ids, cache)? {
            return Ok(logits);
        }
        let hidden = self.forward_hidden(ids, cache)?;
        let seq = hidden.dim(1)?;
        self.logits(&hidden.narrow(1, seq - 1, 1)?)
    }

    /// The blocks of the inference forward: hidden states `(1, seq, d_model)` before the final
    /// norm, with the chunk appended to `cache`.
    fn forward_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        if batch != 1 || seq == 0 {
            return Err(ModelError::Usage(format!(
                "the inference forward takes one non-empty sequence, got shape {:?}",
                ids.dims()
            )));
        }
        if cache.keys.len() != self.layers.len() {
            return Err(ModelError::Usage(format!(
                "cache has {} layers, model has {}",
                cache.keys.len(),
                self.layers.len()
            )));
        }
        cache.reserve(seq)?;
        let mut x = self.embed_tokens.forward(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &self.rope, Path::Infer(self.kernel), Some((cache, i)))?;
        }
        cache.len += seq;
        Ok(x)
    }

    /// Final norm and LM head of hidden states `(1, n, d_model)`.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Path::Infer(self.kernel).project(&self.lm_head, &self.norm.forward_fused(hidden)?)
    }

    /// A cache sized for this model, with room for `capacity` tokens before it grows. On a CPU
    /// the keys and values are stored f16 (as llama.cpp stores them): a decode step reads the
    /// whole cache, which at a few hundred tokens of context weighs as much as the weights, and
    /// f16 halves that read; the attention kernel accumulates in f32. Elsewhere the cache takes
    /// the model's dtype.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let dtype = if self.device().is_cpu() { DType::F16 } else { self.dtype() };
        KvCache::new(&self.config, capacity, dtype, self.device())
    }

    fn check_len(&self, seq: usize) -> Result<()> {
        if seq > self.config.context_length() {
            return Err(ModelError::ContextOverflow {
                requested: seq,
                context_length: self.config.context_length(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
