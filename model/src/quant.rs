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

/// A bias-free projection `y = x Wᵀ`, its inference kernel chosen once, when the weight is loaded:
/// the variant says which code runs it, so a call only matches on it (and on its input's shape).
#[derive(Debug, Clone)]
pub enum QLinear {
    /// A dense f32 weight in CPU memory: [`m31r_kernels`]' matrix–vector kernels and GEMM on the
    /// inference path, candle-nn's linear layer on the differentiable one. The kernels read the
    /// tensor's storage on every call, since training updates it in place.
    CpuF32(Linear),
    /// GGML F16, Q8_0 or Q4_0 blocks in CPU memory, whose rows the kernels read.
    CpuBlocks(Arc<QTensor>),
    /// A dense weight the kernels cannot read (another dtype or device): candle-nn's linear layer.
    Dense(Linear),
    /// Blocks the kernels cannot read (Q4_K, another device): candle's quantized matmul.
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
            Some(q) => Self::blocks(q),
            None => Ok(Self::dense(vb.get(shape, "weight")?)),
        }
    }

    /// The projection over a dense `(out, in)` weight.
    pub(crate) fn dense(weight: Tensor) -> Self {
        if weight.dtype() == DType::F32 && weight.device().is_cpu() {
            QLinear::CpuF32(Linear::new(weight, None))
        } else {
            QLinear::Dense(Linear::new(weight, None))
        }
    }

    /// The projection over GGML blocks: the kernels' when they can view them (on the CPU, F16,
    /// Q8_0 or Q4_0, f16 values aligned), candle's quantized matmul otherwise.
    pub(crate) fn blocks(q: Arc<QTensor>) -> candle_core::Result<Self> {
        let readable = q.device().is_cpu()
            && matches!(q.dtype(), GgmlDType::F16 | GgmlDType::Q8_0 | GgmlDType::Q4_0)
            && WeightRows::of_qtensor(&q, &q.data()?).is_some();
        Ok(if readable { QLinear::CpuBlocks(q) } else { QLinear::Quantized(QMatMul::QTensor(q)) })
    }

    /// The weight as a dense tensor: the layer's own for a dense layer, dequantized to f32 for a
    /// quantized one.
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        match self {
            QLinear::CpuF32(l) | QLinear::Dense(l) => Ok(l.weight().clone()),
            QLinear::CpuBlocks(q) | QLinear::Quantized(QMatMul::QTensor(q)) => {
                q.dequantize(&q.device())
            }
            QLinear::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => Ok(w.clone()),
        }
    }

    /// Whether [`m31r_kernels`] run this projection (the variant fixed at load).
    pub(crate) fn on_kernels(&self) -> bool {
        matches!(self, QLinear::CpuF32(_) | QLinear::CpuBlocks(_))
    }
}

impl QLinear {
    /// The projection on the inference path: [`m31r_kernels::gemv`]' matrix–vector kernels for the
    /// few rows of a decode step or keystroke; for longer inputs (prefill) candle's f32 GEMM, with
    /// f16, Q8_0 and Q4_0 weights dequantized for it first (other block types take candle's
    /// quantized matmul).
    pub fn forward_infer(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !self.on_kernels() || !x.device().is_cpu() || x.dtype() != DType::F32 {
            return self.forward(x);
        }
        let cols = x.dim(candle_core::D::Minus1)?;
        if x.elem_count() / cols.max(1) <= gemv::MAX_ROWS {
            let mut ys = Self::with_rows(&[self], |views| gemv::linear_many(x, views))??;
            return ys
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("gemv returned no output".into()));
        }
        // A long input (prefill): one GEMM over the weight widened to f32, which beats the
        // per-row dot products once there are more than a few rows.
        Self::with_rows(&[self], |views| {
            let (view, rows) = views[0];
            let x = match view {
                // The integer kernels see the activation quantized to Q8_0: so does the GEMM.
                WeightRows::Q8_0(_) | WeightRows::Q4_0(_) => q8_0_round_trip(x)?,
                _ => x.clone(),
            };
            match view {
                WeightRows::F32(w) => gemm::matmul_t(&x, w, rows),
                _ => match dequantize(view, rows, cols) {
                    Some(dense) => gemm::matmul_t(&x, &dense, rows),
                    None => candle_core::bail!(
                        "weight blocks of {rows} rows do not hold rows of the input's {cols} columns"
                    ),
                },
            }
        })?
    }

    /// Several projections of the same input on the inference path (a block's q/k/v, its gate and
    /// up): one dispatch of the matrix–vector kernels for all of them where they apply, else each
    /// by [`QLinear::forward_infer`]. Outputs come back in the order of `linears`.
    pub fn forward_infer_many(
        linears: &[&QLinear],
        x: &Tensor,
    ) -> candle_core::Result<Vec<Tensor>> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
        if rows <= gemv::MAX_ROWS
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && linears.iter().all(|l| l.on_kernels())
        {
            return Self::with_rows(linears, |views| gemv::linear_many(x, views))?;
        }
        linears.iter().map(|l| l.forward_infer(x)).collect()
    }

    /// Runs `f` on the kernel views of `linears`' weights with their output sizes, holding their
    /// storage meanwhile; an error when one of them does not run on the kernels (see
    /// [`QLinear::on_kernels`]), which callers rule out first.
    pub(crate) fn with_rows<R>(
        linears: &[&QLinear],
        f: impl FnOnce(&[(WeightRows<'_>, usize)]) -> R,
    ) -> candle_core::Result<R> {
        let not_on_kernels =
            || candle_core::Error::Msg("a projection the kernels cannot read".into());
        let mut dense = Vec::with_capacity(linears.len());
        let mut blocks = Vec::with_capacity(linears.len());
        for linear in linears {
            match linear {
                QLinear::CpuF32(l) => {
                    dense.push(Some(l.weight().contiguous()?));
                    blocks.push(None);
                }
                QLinear::CpuBlocks(q) => {
                    dense.push(None);
                    blocks.push(Some(q.data()?));
                }
                QLinear::Dense(_) | QLinear::Quantized(_) => return Err(not_on_kernels()),
            }
        }
        let storages: Vec<_> =
            dense.iter().map(|w| w.as_ref().map(Tensor::storage_and_layout)).collect();
        let mut views = Vec::with_capacity(linears.len());
        for ((linear, storage), bytes) in linears.iter().zip(&storages).zip(&blocks) {
            let view = match (linear, storage, bytes) {
                (QLinear::CpuF32(l), Some((storage, layout)), _) => {
                    let candle_core::Storage::Cpu(cpu) = &**storage else {
                        return Err(not_on_kernels());
                    };
                    let Some((start, end)) = layout.contiguous_offsets() else {
                        return Err(not_on_kernels());
                    };
                    let rows = &cpu.as_slice::<f32>()?[start..end];
                    (WeightRows::F32(rows), l.weight().dim(0)?)
                }
                (QLinear::CpuBlocks(q), _, Some(bytes)) => match WeightRows::of_qtensor(q, bytes) {
                    Some(view) => (view, q.shape().dims()[0]),
                    None => return Err(not_on_kernels()),
                },
                _ => return Err(not_on_kernels()),
            };
            views.push(view);
        }
        Ok(f(&views))
    }
}

impl QLinear {
    /// The training path's projection: on dense f32 CPU weights the kernels' [`linear`]
    /// (GEMMs on their thread pool, backward included, no transposed copies), else [`Module::forward`].
    ///
    /// [`linear`]: m31r_kernels::train::linear
    pub fn forward_train(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_train_in(x, x.dtype())
    }

    /// [`QLinear::forward_train`] computed in `compute`: `x` and the weight are cast to it (a
    /// no-op where they are in it already), so the weight's gradient comes back in its own dtype.
    pub fn forward_train_in(&self, x: &Tensor, compute: DType) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(compute)?;
        match self {
            QLinear::CpuF32(l) | QLinear::Dense(l) if l.bias().is_none() => {
                m31r_kernels::train::linear(&x, &l.weight().to_dtype(compute)?)
            }
            _ => self.forward(&x),
        }
    }
}

impl Module for QLinear {
    /// The generic projection: candle's matmul.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            QLinear::CpuF32(l) | QLinear::Dense(l) => l.forward(x),
            // The quantized kernel reads its input as one contiguous buffer.
            QLinear::CpuBlocks(q) => QMatMul::QTensor(q.clone()).forward(&x.contiguous()?),
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
    pub(crate) fn tied_head(&self) -> candle_core::Result<QLinear> {
        match self {
            TokenEmbedding::Dense(e) => Ok(QLinear::dense(e.embeddings().clone())),
            TokenEmbedding::Quantized(q) => QLinear::blocks(q.clone()),
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
