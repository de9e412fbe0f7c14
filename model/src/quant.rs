//! Inference weight precisions (DESIGN §8, issue 10): the [`Precision`] names that bundles, the
//! daemon config and the CLI share, quantizing a model's named tensors with candle's GGML kernels,
//! and the projection and embedding types the inference forward runs on — dense candle tensors for
//! f32 and f16, `QMatMul` over GGML blocks for f16-gemv, Q8_0, Q4_0 and Q4_K.
//!
//! Only 2-D weights (the seven projections of each block and the token embedding, which the tied
//! LM head shares) are quantized; RMSNorm scales stay f32, as llama.cpp keeps them. A matrix whose
//! rows do not divide into the precision's blocks (the `tiny` preset's `d_ff` = 368 is not a
//! multiple of 32) falls back to f16 GGML storage, as llama.cpp's quantizer falls back per tensor. Activations of
//! a quantized model are f32: candle's quantized matmul quantizes them on the fly (to Q8_0 / Q8_K
//! blocks) for integer dot products.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::weights::weight_shapes;
use m31r_kernels::quant::{WeightRows, dequantize, q8_0_round_trip};
use m31r_kernels::{gemm, gemv};

/// How the weights of a model are stored in memory (and in a bundle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Precision {
    /// 32-bit floats: exact, what training produces.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// 16-bit floats in dense candle tensors (activations in f16 too).
    #[serde(rename = "f16")]
    F16,
    /// GGML Q8_0: blocks of 32 int8 values with one f16 scale (8.5 bits per weight).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// GGML Q4_0: blocks of 32 4-bit values with one f16 scale (4.5 bits per weight).
    #[serde(rename = "q4_0")]
    Q4_0,
    /// GGML Q4_K: super-blocks of 256 4-bit values with 6-bit sub-block scales and minimums
    /// (4.5 bits per weight); rows not divisible by 256 fall back to f16.
    #[serde(rename = "q4_k")]
    Q4K,
}

impl Precision {
    /// Every precision, widest first.
    pub const ALL: [Precision; 5] =
        [Precision::F32, Precision::F16, Precision::Q8_0, Precision::Q4_0, Precision::Q4K];

    /// The name used in configs, flags and bundle metadata.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Q8_0 => "q8_0",
            Precision::Q4_0 => "q4_0",
            Precision::Q4K => "q4_k",
        }
    }

    /// The GGML block type of the 2-D weights, or `None` for the dense float precisions.
    pub fn ggml_dtype(self) -> Option<GgmlDType> {
        match self {
            Precision::F32 | Precision::F16 => None,
            Precision::Q8_0 => Some(GgmlDType::Q8_0),
            Precision::Q4_0 => Some(GgmlDType::Q4_0),
            Precision::Q4K => Some(GgmlDType::Q4K),
        }
    }

    /// Dtype of the activations (and KV cache) when the model runs on `device`: f16 only for the
    /// f16 precision off the CPU (CPUs have no fast f16 arithmetic, so there f16 weights meet f32
    /// activations, as in llama.cpp), f32 otherwise.
    pub fn activation_dtype(self, device: &Device) -> DType {
        if self == Precision::F16 && !device.is_cpu() { DType::F16 } else { DType::F32 }
    }

    /// Whether the 2-D weights are GGML blocks.
    pub fn is_quantized(self) -> bool {
        self.ggml_dtype().is_some()
    }

    /// Dtype of the dense tensors a bundle of this precision stores (norm scales, and every weight
    /// for f32/f16).
    pub fn dense_dtype(self) -> DType {
        match self {
            Precision::F16 => DType::F16,
            _ => DType::F32,
        }
    }

    /// Bytes that `config`'s weights take in memory at this precision (tied head counted once).
    pub fn weight_bytes(self, config: &ModelConfig) -> u64 {
        weight_shapes(config)
            .iter()
            .map(|(_, shape)| {
                let n: usize = shape.iter().product();
                let bytes = match (shape.len(), self.ggml_dtype()) {
                    (2, Some(q)) if !fits_blocks(shape, q) => n * 2,
                    (2, Some(q)) => n / q.block_size() * q.type_size(),
                    (2, None) => n * self.dense_dtype().size_in_bytes(),
                    _ => n * 4,
                };
                bytes as u64
            })
            .sum()
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a `(rows, cols)` matrix's rows divide into `dtype`'s blocks (else it is stored f16).
pub fn fits_blocks(shape: &[usize], dtype: GgmlDType) -> bool {
    shape.last().is_some_and(|&cols| cols.is_multiple_of(dtype.block_size()))
}

/// A precision name that is not one of [`Precision::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision {0:?} (known: f32, f16, q8_0, q4_0, q4_k)")]
pub struct UnknownPrecision(pub String);

impl FromStr for Precision {
    type Err = UnknownPrecision;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == lower || (lower == "q4k" && *p == Precision::Q4K))
            .ok_or_else(|| UnknownPrecision(s.to_string()))
    }
}

/// Why weights could not be quantized or loaded quantized; names the tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A tensor cannot be stored in the requested block type (its rows do not divide into blocks).
    #[error("tensor {name} with shape {shape:?} cannot be quantized to {precision}: {reason}")]
    Shape {
        /// The tensor.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The requested precision.
        precision: Precision,
        /// What candle reported.
        reason: String,
    },
    /// A candle operation failed.
    #[error("tensor {name}: {source}")]
    Candle {
        /// The tensor being processed.
        name: String,
        /// The underlying error.
        source: candle_core::Error,
    },
}

/// One stored weight: a dense tensor, or GGML blocks.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A dense f32/f16/bf16 tensor.
    Dense(Tensor),
    /// A quantized matrix `(out, in)`.
    Quantized(Arc<QTensor>),
}

impl Weight {
    /// The logical shape.
    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Dense(t) => t.dims(),
            Weight::Quantized(q) => q.shape().dims(),
        }
    }

    /// The values as a dense f32 tensor (dequantized where quantized).
    pub fn dequantize(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(t) => t.to_device(device)?.to_dtype(DType::F32),
            Weight::Quantized(q) => q.dequantize(device),
        }
    }

    /// Bytes in memory.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quantized(q) => q.storage_size_in_bytes(),
        }
    }
}

/// Converts a model's named tensors to `precision`: 2-D weights to its block type (or dense
/// dtype), 1-D norm scales to f32. The order of `tensors` is kept.
pub fn quantize(
    tensors: &[(String, Tensor)],
    precision: Precision,
) -> Result<Vec<(String, Weight)>, QuantError> {
    tensors
        .iter()
        .map(|(name, tensor)| {
            let candle = |source| QuantError::Candle { name: name.clone(), source };
            let weight = match (tensor.rank(), precision.ggml_dtype()) {
                (2, Some(dtype)) if !fits_blocks(tensor.dims(), dtype) => {
                    let f32 = tensor.to_dtype(DType::F32).map_err(candle)?;
                    Weight::Quantized(Arc::new(
                        QTensor::quantize(&f32, GgmlDType::F16).map_err(candle)?,
                    ))
                }
                (2, Some(dtype)) => {
                    let q = QTensor::quantize(&tensor.to_dtype(DType::F32).map_err(candle)?, dtype)
                        .map_err(|e| QuantError::Shape {
                            name: name.clone(),
                            shape: tensor.dims().to_vec(),
                            precision,
                            reason: e.to_string(),
                        })?;
                    Weight::Quantized(Arc::new(q))
                }
                (2, None) => {
                    Weight::Dense(tensor.to_dtype(precision.dense_dtype()).map_err(candle)?)
                }
                _ => Weight::Dense(tensor.to_dtype(DType::F32).map_err(candle)?),
            };
            Ok((name.clone(), weight))
        })
        .collect()
}

/// The weights the inference forward runs `precision` on, on `device`, from a model's named f32 (or
/// f16) tensors: [`f16_rows`] for f16 on a CPU, [`quantize`] otherwise. Build the model from them
/// with [`Precision::activation_dtype`].
pub fn inference_weights(
    tensors: &[(String, Tensor)],
    precision: Precision,
    device: &Device,
) -> Result<Vec<(String, Weight)>, QuantError> {
    if precision == Precision::F16 && device.is_cpu() {
        f16_rows(tensors)
    } else {
        quantize(tensors, precision)
    }
}

/// The f16 precision as the CPU inference forward runs it: 2-D weights as GGML f16 rows (read by
/// the f16 matrix–vector kernel, or candle's quantized matmul for longer inputs), 1-D norm scales
/// f32; the model built from them keeps f32 activations.
pub fn f16_rows(tensors: &[(String, Tensor)]) -> Result<Vec<(String, Weight)>, QuantError> {
    tensors
        .iter()
        .map(|(name, tensor)| {
            let candle = |source| QuantError::Candle { name: name.clone(), source };
            let f32 = tensor.to_dtype(DType::F32).map_err(candle)?;
            let weight = if tensor.rank() == 2 {
                Weight::Quantized(Arc::new(
                    QTensor::quantize(&f32, GgmlDType::F16).map_err(candle)?,
                ))
            } else {
                Weight::Dense(f32)
            };
            Ok((name.clone(), weight))
        })
        .collect()
}

/// The quantized weights a model is built from, by Hugging Face name (empty for a dense model).
pub type QuantizedWeights = HashMap<String, Arc<QTensor>>;

/// A bias-free projection `y = x Wᵀ` over a dense weight or GGML blocks.
#[derive(Debug, Clone)]
pub enum QLinear {
    /// candle-nn's dense linear layer (differentiable; what training uses).
    Dense(Linear),
    /// candle's quantized matmul (inference only; input f32 or f16).
    Quantized(QMatMul),
}

impl QLinear {
    /// Loads `{vb prefix}.weight` of shape `(out, in)`: from `quantized` when present there
    /// (its shape checked), else densely from `vb`.
    pub(crate) fn load(
        vb: candle_nn::VarBuilder,
        shape: (usize, usize),
        quantized: &QuantizedWeights,
    ) -> candle_core::Result<Self> {
        match stored_blocks(&vb, shape, quantized)? {
            Some(q) => Ok(QLinear::Quantized(QMatMul::QTensor(q))),
            None => Ok(QLinear::Dense(Linear::new(vb.get(shape, "weight")?, None))),
        }
    }

    /// The weight as a dense tensor: the layer's own for a dense layer, dequantized to f32 for a
    /// quantized one.
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        match self {
            QLinear::Dense(l) => Ok(l.weight().clone()),
            QLinear::Quantized(QMatMul::QTensor(q)) => q.dequantize(&q.device()),
            QLinear::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => Ok(w.clone()),
        }
    }
}

impl QLinear {
    /// The projection on the inference path: [`m31r_kernels::gemv`]' matrix–vector kernels for the
    /// few rows of a decode step or keystroke; for longer inputs (prefill) candle's f32 GEMM, with
    /// f16, Q8_0 and Q4_0 weights dequantized for it first (other block types take candle's
    /// quantized matmul).
    pub fn forward_infer(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = Self::forward_gemv(&[self], x)?.and_then(|mut ys| ys.pop()) {
            return Ok(y);
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            // A long input (prefill): one GEMM over the weight widened to f32, which beats the
            // per-row dot products once there are more than a few rows.
            let cols = x.dim(candle_core::D::Minus1)?;
            let gemm = Self::with_rows(&[self], |views| -> candle_core::Result<Option<Tensor>> {
                let (view, rows) = views[0];
                let x = match view {
                    // The integer kernels see the activation quantized to Q8_0: so does the GEMM.
                    WeightRows::Q8_0(_) | WeightRows::Q4_0(_) => q8_0_round_trip(x)?,
                    _ => x.clone(),
                };
                match view {
                    WeightRows::F32(w) => gemm::matmul_t(&x, w, rows).map(Some),
                    _ => dequantize(view, rows, cols)
                        .map(|dense| gemm::matmul_t(&x, &dense, rows))
                        .transpose(),
                }
            })?;
            if let Some(y) = gemm.transpose()?.flatten() {
                return Ok(y);
            }
        }
        self.forward(x)
    }

    /// Several projections of the same input on the inference path (a block's q/k/v, its gate and
    /// up): one dispatch of the matrix–vector kernels for all of them where they apply, else each
    /// by [`QLinear::forward_infer`]. Outputs come back in the order of `linears`.
    pub fn forward_infer_many(
        linears: &[&QLinear],
        x: &Tensor,
    ) -> candle_core::Result<Vec<Tensor>> {
        match Self::forward_gemv(linears, x)? {
            Some(ys) => Ok(ys),
            None => linears.iter().map(|l| l.forward_infer(x)).collect(),
        }
    }

    /// The projections by the matrix–vector kernels where they apply to all of them (a CPU f32
    /// input of at most [`gemv::MAX_ROWS`] rows, every weight f32, f16, Q8_0 or Q4_0).
    fn forward_gemv(linears: &[&QLinear], x: &Tensor) -> candle_core::Result<Option<Vec<Tensor>>> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
        if rows > gemv::MAX_ROWS || !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        Self::with_rows(linears, |views| gemv::linear_many(x, views))?.unwrap_or(Ok(None))
    }

    /// Whether the matrix–vector kernels can read this weight (on the CPU, f32, f16, Q8_0 or Q4_0).
    pub(crate) fn has_rows(&self) -> bool {
        match self {
            QLinear::Dense(l) => l.weight().dtype() == DType::F32 && l.weight().device().is_cpu(),
            QLinear::Quantized(QMatMul::QTensor(q)) => {
                q.device().is_cpu()
                    && matches!(q.dtype(), GgmlDType::F16 | GgmlDType::Q8_0 | GgmlDType::Q4_0)
            }
            QLinear::Quantized(_) => false,
        }
    }

    /// Runs `f` on the kernel views of `linears`' weights with their output sizes, holding their
    /// storage meanwhile; `None` when one of them has no view (see [`QLinear::has_rows`]).
    pub(crate) fn with_rows<R>(
        linears: &[&QLinear],
        f: impl FnOnce(&[(WeightRows<'_>, usize)]) -> R,
    ) -> candle_core::Result<Option<R>> {
        if !linears.iter().all(|l| l.has_rows()) {
            return Ok(None);
        }
        let mut dense = Vec::with_capacity(linears.len());
        let mut blocks = Vec::with_capacity(linears.len());
        for linear in linears {
            match linear {
                QLinear::Dense(l) => {
                    dense.push(Some(l.weight().contiguous()?));
                    blocks.push(None);
                }
                QLinear::Quantized(QMatMul::QTensor(q)) => {
                    dense.push(None);
                    blocks.push(Some(q.data()?));
                }
                QLinear::Quantized(_) => return Ok(None),
            }
        }
        let storages: Vec<_> =
            dense.iter().map(|w| w.as_ref().map(Tensor::storage_and_layout)).collect();
        let mut views = Vec::with_capacity(linears.len());
        for ((linear, storage), bytes) in linears.iter().zip(&storages).zip(&blocks) {
            let view = match (linear, storage, bytes) {
                (QLinear::Dense(l), Some((storage, layout)), _) => {
                    let candle_core::Storage::Cpu(cpu) = &**storage else { return Ok(None) };
                    let Some((start, end)) = layout.contiguous_offsets() else { return Ok(None) };
                    let rows = &cpu.as_slice::<f32>()?[start..end];
                    (WeightRows::F32(rows), l.weight().dim(0)?)
                }
                (QLinear::Quantized(QMatMul::QTensor(q)), _, Some(bytes)) => {
                    match WeightRows::of_qtensor(q, bytes) {
                        Some(view) => (view, q.shape().dims()[0]),
                        None => return Ok(None),
                    }
                }
                _ => return Ok(None),
            };
            views.push(view);
        }
        Ok(Some(f(&views)))
    }
}

impl Module for QLinear {
    /// The differentiable projection (training) and the generic one: candle's matmul.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            QLinear::Dense(l) => l.forward(x),
            // The quantized kernel reads its input as one contiguous buffer.
            QLinear::Quantized(q) => q.forward(&x.contiguous()?),
        }
    }
}

/// The token embedding: a dense table, or GGML blocks dequantized row by row on lookup (so a
/// quantized model keeps one copy of the table, shared with the tied LM head).
#[derive(Debug, Clone)]
pub enum TokenEmbedding {
    /// candle-nn's embedding.
    Dense(Embedding),
    /// A quantized `(vocab, d_model)` table.
    Quantized(Arc<QTensor>),
}

impl TokenEmbedding {
    /// Loads `{vb prefix}.weight` of shape `(vocab, d_model)`, from `quantized` when present.
    pub(crate) fn load(
        vb: candle_nn::VarBuilder,
        shape: (usize, usize),
        quantized: &QuantizedWeights,
    ) -> candle_core::Result<Self> {
        match stored_blocks(&vb, shape, quantized)? {
            Some(q) => Ok(TokenEmbedding::Quantized(q)),
            None => Ok(TokenEmbedding::Dense(Embedding::new(vb.get(shape, "weight")?, shape.1))),
        }
    }

    /// The LM head tied to this table.
    pub(crate) fn tied_head(&self) -> QLinear {
        match self {
            TokenEmbedding::Dense(e) => QLinear::Dense(Linear::new(e.embeddings().clone(), None)),
            TokenEmbedding::Quantized(q) => QLinear::Quantized(QMatMul::QTensor(q.clone())),
        }
    }

    /// The table as a dense tensor (dequantized to f32 when quantized).
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        match self {
            TokenEmbedding::Dense(e) => Ok(e.embeddings().clone()),
            TokenEmbedding::Quantized(q) => q.dequantize(&q.device()),
        }
    }

    /// Dtype of the looked-up rows, which is the activation dtype of the model.
    pub fn dtype(&self) -> DType {
        match self {
            TokenEmbedding::Dense(e) => e.embeddings().dtype(),
            TokenEmbedding::Quantized(_) => DType::F32,
        }
    }

    /// Device of the table.
    pub fn device(&self) -> Device {
        match self {
            TokenEmbedding::Dense(e) => e.embeddings().device().clone(),
            TokenEmbedding::Quantized(q) => q.device(),
        }
    }
}

impl Module for TokenEmbedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            TokenEmbedding::Dense(e) => e.forward(ids),
            TokenEmbedding::Quantized(q) => q.embedding(ids),
        }
    }
}

/// The GGML blocks stored in `quantized` for `{vb prefix}.weight`, their shape checked against
/// `(rows, cols)`; `None` when the weight is dense (it is then read from `vb`).
fn stored_blocks(
    vb: &candle_nn::VarBuilder,
    (rows, cols): (usize, usize),
    quantized: &QuantizedWeights,
) -> candle_core::Result<Option<Arc<QTensor>>> {
    let name = format!("{}.weight", vb.prefix());
    let Some(q) = quantized.get(&name) else { return Ok(None) };
    if q.shape().dims() != [rows, cols] {
        candle_core::bail!(
            "quantized tensor {name} has shape {:?}, expected [{rows}, {cols}]",
            q.shape().dims()
        );
    }
    Ok(Some(q.clone()))
}
