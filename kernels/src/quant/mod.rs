//! GGML's Q8_0 and Q4_0 blocks, which are candle's: Q8_0 is an f16 scale and 32 `i8`s (34 bytes
//! per 32 weights), Q4_0 an f16 scale and 16 bytes of 4-bit values (the first 16 weights in the
//! low nibbles, the next 16 in the high ones, each minus 8). The weight view the kernels read, the
//! activation row quantized to Q8_0, the block dot products (portable reference here, AVX2 in
//! [`avx2`]), and dequantization for the long inputs that go to GEMM.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Result, Tensor};
use half::f16;

use crate::pool::{self, Out};

/// Weights per GGML Q8_0/Q4_0 block.
pub(crate) const BLOCK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale and 32 `i8`s.
pub(crate) const Q8_0_BYTES: usize = 34;
/// Bytes per Q4_0 block: an f16 scale and 16 bytes of nibbles.
pub(crate) const Q4_0_BYTES: usize = 18;

/// A `(out, in)` weight matrix as the kernels read it: row-major, one row per output feature.
#[derive(Debug, Clone, Copy)]
pub enum WeightRows<'a> {
    /// Dense f32 rows.
    F32(&'a [f32]),
    /// Dense f16 rows.
    F16(&'a [f16]),
    /// GGML Q8_0 blocks.
    Q8_0(&'a [u8]),
    /// GGML Q4_0 blocks.
    Q4_0(&'a [u8]),
}

impl<'a> WeightRows<'a> {
    /// The view of a CPU quantized tensor whose block type the kernels know, else `None`.
    pub fn of_qtensor(q: &'a QTensor, bytes: &'a [u8]) -> Option<Self> {
        match q.dtype() {
            GgmlDType::Q8_0 => Some(WeightRows::Q8_0(bytes)),
            GgmlDType::Q4_0 => Some(WeightRows::Q4_0(bytes)),
            GgmlDType::F16 => {
                if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f16>()) {
                    return None;
                }
                // SAFETY: the bytes are the tensor's f16 values (GgmlDType::F16 storage), aligned
                // (checked above), and borrowed for 'a.
                Some(WeightRows::F16(unsafe {
                    std::slice::from_raw_parts(bytes.as_ptr().cast::<f16>(), bytes.len() / 2)
                }))
            }
            _ => None,
        }
    }

    /// Whether the rows are GGML blocks, whose kernels take the activation quantized to Q8_0.
    pub fn is_blocks(&self) -> bool {
        matches!(self, WeightRows::Q8_0(_) | WeightRows::Q4_0(_))
    }

    /// Bytes of weights.
    pub fn bytes(&self) -> usize {
        match self {
            WeightRows::F32(w) => 4 * w.len(),
            WeightRows::F16(w) => 2 * w.len(),
            WeightRows::Q8_0(w) | WeightRows::Q4_0(w) => w.len(),
        }
    }

    /// Whether the storage matches a `(rows, cols)` matrix.
    pub(crate) fn fits(&self, rows: usize, cols: usize) -> bool {
        match self {
            WeightRows::F32(w) => w.len() == rows * cols,
            WeightRows::F16(w) => w.len() == rows * cols,
            WeightRows::Q8_0(w) => {
                cols.is_multiple_of(BLOCK) && w.len() == rows * cols / BLOCK * Q8_0_BYTES
            }
            WeightRows::Q4_0(w) => {
                cols.is_multiple_of(BLOCK) && w.len() == rows * cols / BLOCK * Q4_0_BYTES
            }
        }
    }
}

/// Weight rows per work item of [`dequantize`]: a few KiB of weights, enough to amortise scheduling.
const ROWS_PER_ITEM: usize = 16;

/// One activation row quantized to Q8_0: per block of 32, a scale and 32 `i8`s.
#[derive(Debug, Clone)]
pub struct Q8Row {
    scales: Vec<f32>,
    quants: Vec<i8>,
    /// Per block, 8 × the sum of each group of four quants (eight `i32`s): what the Q4_0 kernel
    /// subtracts after multiplying the raw nibbles (0..16), instead of re-centring every nibble.
    eights: Vec<i32>,
}

impl Q8Row {
    /// Quantizes `x` (its length a multiple of 32) as GGML's `quantize_row_q8_0` does: each block
    /// scaled so its largest magnitude maps to 127, values rounded half away from zero. The scale
    /// is kept at f16 precision, as GGML stores it.
    pub fn quantize(x: &[f32]) -> Self {
        let mut scales = Vec::with_capacity(x.len() / BLOCK);
        let mut quants = Vec::with_capacity(x.len());
        for block in x.chunks(BLOCK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            scales.push(f16::from_f32(d).to_f32());
            quants.extend(block.iter().map(|v| (v * id).round() as i8));
        }
        let eights = quants
            .chunks(4)
            .map(|group| 8 * group.iter().map(|&q| i32::from(q)).sum::<i32>())
            .collect();
        Self { scales, quants, eights }
    }
}

/// `x` (rows of a length that is a multiple of 32) with every value replaced by its Q8_0
/// quantization, dequantized: what the integer kernels see of an activation. A long input's GEMM
/// over dequantized Q8_0/Q4_0 weights takes its activation through this, so that prefill computes
/// the same products as the per-token kernels (up to summation order), and a prompt gives the same
/// logits whether or not its prefix was cached.
pub fn q8_0_round_trip(x: &Tensor) -> Result<Tensor> {
    let cols = x.dim(candle_core::D::Minus1)?;
    if !cols.is_multiple_of(BLOCK) {
        candle_core::bail!(
            "q8_0_round_trip: rows of {cols} values do not divide into blocks of {BLOCK}"
        );
    }
    let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; values.len()];
    let dst = Out::new(&mut out);
    let blocks = values.len() / BLOCK;
    pool::run(blocks.div_ceil(64), false, |range| {
        let (first, last) = (range.start * 64 * BLOCK, values.len().min(range.end * 64 * BLOCK));
        let q = Q8Row::quantize(&values[first..last]);
        // SAFETY: items cover disjoint ranges of whole blocks.
        let y = unsafe { dst.part(first..last) };
        for ((y, quants), d) in y.chunks_mut(BLOCK).zip(q.quants.chunks(BLOCK)).zip(&q.scales) {
            y.iter_mut().zip(quants).for_each(|(y, &v)| *y = f32::from(v) * d);
        }
    });
    Tensor::from_vec(out, x.shape(), x.device())
}

fn scale(block: &[u8]) -> f32 {
    f16::from_le_bytes([block[0], block[1]]).to_f32()
}

/// The `(rows, cols)` matrix as dense f32, dequantized in parallel (what a long input's GEMM
/// reads: the quantized kernels only pay off for a few rows).
pub fn dequantize(weight: WeightRows<'_>, rows: usize, cols: usize) -> Option<Vec<f32>> {
    if !weight.fits(rows, cols) {
        return None;
    }
    let mut out = vec![0f32; rows * cols];
    let dst = Out::new(&mut out);
    let items = rows.div_ceil(ROWS_PER_ITEM);
    pool::run(items, false, |range| {
        let (first, last) = (range.start * ROWS_PER_ITEM, rows.min(range.end * ROWS_PER_ITEM));
        // SAFETY: items cover disjoint row ranges.
        let y = unsafe { dst.part(first * cols..last * cols) };
        match weight {
            WeightRows::F32(w) => y.copy_from_slice(&w[first * cols..last * cols]),
            WeightRows::F16(w) => half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                &w[first * cols..last * cols],
                y,
            ),
            WeightRows::Q8_0(w) => {
                let blocks = w[first * cols / BLOCK * Q8_0_BYTES..last * cols / BLOCK * Q8_0_BYTES]
                    .chunks_exact(Q8_0_BYTES);
                for (block, y) in blocks.zip(y.chunks_exact_mut(BLOCK)) {
                    let d = scale(block);
                    for (y, &q) in y.iter_mut().zip(&block[2..]) {
                        *y = d * f32::from(q as i8);
                    }
                }
            }
            WeightRows::Q4_0(w) => {
                let blocks = w[first * cols / BLOCK * Q4_0_BYTES..last * cols / BLOCK * Q4_0_BYTES]
                    .chunks_exact(Q4_0_BYTES);
                for (block, y) in blocks.zip(y.chunks_exact_mut(BLOCK)) {
                    let d = scale(block);
                    for (i, &b) in block[2..].iter().enumerate() {
                        y[i] = d * f32::from(i16::from(b & 0x0F) - 8);
                        y[i + 16] = d * f32::from(i16::from(b >> 4) - 8);
                    }
                }
            }
        }
    });
    Some(out)
}

/// Portable reference kernels (and the fallback where AVX2/FMA/F16C are not compiled in).
pub mod portable {
    use super::*;

    /// One row of Q8_0 weight blocks times a Q8_0 activation row.
    pub fn dot_q8_0(w: &[u8], x: &Q8Row) -> f32 {
        w.chunks_exact(Q8_0_BYTES)
            .zip(x.quants.chunks_exact(BLOCK))
            .zip(&x.scales)
            .map(|((block, xq), xd)| {
                let sum: i32 = block[2..]
                    .iter()
                    .zip(xq)
                    .map(|(&wq, &xq)| i32::from(wq as i8) * i32::from(xq))
                    .sum();
                sum as f32 * scale(block) * xd
            })
            .sum()
    }

    /// One row of Q4_0 weight blocks times a Q8_0 activation row.
    pub fn dot_q4_0(w: &[u8], x: &Q8Row) -> f32 {
        w.chunks_exact(Q4_0_BYTES)
            .zip(x.quants.chunks_exact(BLOCK))
            .zip(&x.scales)
            .map(|((block, xq), xd)| {
                let nibbles = &block[2..];
                let sum: i32 = (0..16)
                    .map(|i| {
                        let lo = i32::from(nibbles[i] & 0x0F) - 8;
                        let hi = i32::from(nibbles[i] >> 4) - 8;
                        lo * i32::from(xq[i]) + hi * i32::from(xq[i + 16])
                    })
                    .sum();
                sum as f32 * scale(block) * xd
            })
            .sum()
    }
}

simd_or_portable! {
    simd: {
        mod avx2;
        pub use avx2::{dot_q4_0, dot_q8_0};
    }
    portable: {
        pub use portable::{dot_q4_0, dot_q8_0};
    }
}

#[cfg(test)]
mod tests {
    //! The block kernels against the portable ones.

    use candle_core::Device;

    use super::*;
    use crate::testing::{close, values};

    #[test]
    fn block_dots_match_the_portable_ones() {
        let (w, x) = (values(320, 3), values(320, 4));
        let xq = Q8Row::quantize(&x);
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let t = Tensor::from_vec(w.clone(), (1, 320), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&t, dtype).unwrap();
            let bytes = q.data().unwrap();
            let (fast, slow) = match WeightRows::of_qtensor(&q, &bytes).unwrap() {
                WeightRows::Q8_0(b) => (dot_q8_0(b, &xq), portable::dot_q8_0(b, &xq)),
                WeightRows::Q4_0(b) => (dot_q4_0(b, &xq), portable::dot_q4_0(b, &xq)),
                other => panic!("unexpected view {other:?}"),
            };
            assert!(close(fast, slow, 1e-5), "{dtype:?}: {fast} vs {slow}");
        }
    }
}
