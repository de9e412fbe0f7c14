//! Matrix–vector products for the few rows a decode step or a keystroke feeds: f32, f16, Q8_0 and
//! Q4_0 weights, each weight row read once for all the input rows (up to [`MAX_ROWS`]) with the
//! activation kept in L1, the output rows split over the kernels' thread pool. Each output element is
//! computed by one thread in a fixed order, so results do not depend on the thread count or on
//! scheduling.

use std::ops::Range;

use candle_core::{DType, Result, Tensor};

use crate::pool::{self, Out};
use crate::quant::{BLOCK, Q4_0_BYTES, Q8_0_BYTES, Q8Row, WeightRows, dot_q4_0, dot_q8_0};
use crate::storage::data;
use crate::vec::{dot_f16, dot_f32};

/// The most input rows the matrix–vector kernels take; longer inputs (prefill) go to candle's GEMM.
pub const MAX_ROWS: usize = 8;

/// Output rows of `W` per work item: a few KiB of weights, enough to amortise scheduling.
const ROWS_PER_ITEM: usize = 16;

/// `y = x Wᵀ` for `x` of shape `(.., in)` with at most [`MAX_ROWS`] rows and `W` of shape
/// `(out, in)`. The caller picks this path (a CPU f32 input of few rows, a weight the kernels
/// read); an input or weight outside it is an error naming what does not fit.
pub fn linear(x: &Tensor, weight: WeightRows<'_>, out: usize) -> Result<Tensor> {
    let mut ys = linear_many(x, &[(weight, out)])?;
    ys.pop().ok_or_else(|| candle_core::Error::Msg("m31r-gemv: no output for one weight".into()))
}

/// [`linear`] for several weights applied to the same input (a block's q/k/v projections, its
/// gate and up projections): the input is read and quantized once, and all the output rows are
/// shared out over the thread pool in one dispatch. Outputs come back in the order of `weights`.
pub fn linear_many(x: &Tensor, weights: &[(WeightRows<'_>, usize)]) -> Result<Vec<Tensor>> {
    let cols = x.dim(candle_core::D::Minus1)?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.elem_count() / cols.max(1) > MAX_ROWS {
        candle_core::bail!(
            "m31r-gemv: input of shape {:?} ({:?} on {:?}) is not a CPU f32 input of at most {MAX_ROWS} rows",
            x.dims(),
            x.dtype(),
            x.device().location()
        );
    }
    if let Some((_, out)) = weights.iter().find(|(w, out)| !w.fits(*out, cols)) {
        candle_core::bail!("m31r-gemv: a weight's storage does not hold a ({out}, {cols}) matrix");
    }
    let x = x.contiguous()?;
    let rows = x.elem_count() / cols.max(1);
    let mut ys: Vec<Vec<f32>> = weights.iter().map(|(_, out)| vec![0f32; rows * out]).collect();
    {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("m31r-gemv: the input is not in CPU memory")
        };
        let xs = data(cpu, layout, "m31r-gemv")?;
        let mut parts: Vec<(WeightRows<'_>, &mut [f32])> =
            weights.iter().zip(&mut ys).map(|((w, _), y)| (*w, y.as_mut_slice())).collect();
        gemv_many(&mut parts, xs, cols);
    }
    let mut dims = x.dims().to_vec();
    weights
        .iter()
        .zip(ys)
        .map(|((_, out), y)| {
            if let Some(last) = dims.last_mut() {
                *last = *out;
            }
            Tensor::from_vec(y, dims.as_slice(), x.device())
        })
        .collect()
}

/// `y[r][o] = x[r] · W[o]` for the `x.len() / cols` rows of `x`; `y` is `(rows, out)`.
pub fn gemv(weight: WeightRows<'_>, x: &[f32], cols: usize, y: &mut [f32]) {
    gemv_many(&mut [(weight, y)], x, cols);
}

/// [`gemv`] for several `(W, y)` pairs over the same `x`, in one dispatch over all output rows.
pub fn gemv_many(parts: &mut [(WeightRows<'_>, &mut [f32])], x: &[f32], cols: usize) {
    let rows = x.len() / cols.max(1);
    if rows == 0 {
        return;
    }
    // Quantized weights take the activation quantized to Q8_0 once, as GGML does.
    let quantized =
        if parts.iter().any(|(w, _)| w.is_blocks()) { quantize_rows(x, cols) } else { Vec::new() };
    // Work items are blocks of output rows, numbered across the parts in order.
    let outs: Vec<usize> = parts.iter().map(|(_, y)| y.len() / rows).collect();
    let mut first_item = Vec::with_capacity(parts.len() + 1);
    first_item.push(0);
    for out in &outs {
        first_item.push(first_item.last().copied().unwrap_or(0) + out.div_ceil(ROWS_PER_ITEM));
    }
    let weights: Vec<WeightRows<'_>> = parts.iter().map(|(w, _)| *w).collect();
    let ys: Vec<Out<f32>> = parts.iter_mut().map(|(_, y)| Out::new(y)).collect();
    let items = first_item.last().copied().unwrap_or(0);
    let bytes: usize = weights.iter().map(WeightRows::bytes).sum();
    pool::run(items, bytes * rows < pool::INLINE_BYTES, |range| {
        let mut tile = [0f32; MAX_ROWS * ROWS_PER_ITEM];
        for item in range {
            let part = first_item.partition_point(|&f| f <= item) - 1;
            let (weight, out) = (weights[part], outs[part]);
            let first = (item - first_item[part]) * ROWS_PER_ITEM;
            let last = out.min(first + ROWS_PER_ITEM);
            let width = last - first;
            rows_times(weight, x, &quantized, cols, first..last, &mut tile[..rows * width]);
            for r in 0..rows {
                // SAFETY: each item writes its own output rows `first..last` of its part.
                let y = unsafe { ys[part].part(r * out + first..r * out + last) };
                y.copy_from_slice(&tile[r * width..(r + 1) * width]);
            }
        }
    });
}

/// `x`'s rows of `cols` values quantized to Q8_0, as the integer kernels take an activation for
/// weights made of blocks ([`WeightRows::is_blocks`]), as GGML does.
pub fn quantize_rows(x: &[f32], cols: usize) -> Vec<Q8Row> {
    x.chunks(cols).map(Q8Row::quantize).collect()
}

/// Output features `outs` of `W` for every row of `x` (`x.len() / cols` rows, at most
/// [`MAX_ROWS`]), on this thread: `tile[r · outs.len() + (o − outs.start)] = x[r] · W[o]`.
/// `quantized` is [`quantize_rows`] of `x` when `weight` is made of blocks. Each value is one
/// dot product in a fixed order, whichever thread computes it.
pub fn rows_times(
    weight: WeightRows<'_>,
    x: &[f32],
    quantized: &[Q8Row],
    cols: usize,
    outs: Range<usize>,
    tile: &mut [f32],
) {
    let rows = x.len() / cols.max(1);
    let width = outs.len();
    assert!(rows <= MAX_ROWS && tile.len() >= rows * width, "rows_times: {rows} rows of {width}");
    for o in outs.clone() {
        let mut dots = [0f32; MAX_ROWS];
        match weight {
            WeightRows::F32(w) => {
                let w = &w[o * cols..(o + 1) * cols];
                for (r, d) in dots[..rows].iter_mut().enumerate() {
                    *d = dot_f32(w, &x[r * cols..(r + 1) * cols]);
                }
            }
            WeightRows::F16(w) => {
                let w = &w[o * cols..(o + 1) * cols];
                for (r, d) in dots[..rows].iter_mut().enumerate() {
                    *d = dot_f16(w, &x[r * cols..(r + 1) * cols]);
                }
            }
            WeightRows::Q8_0(w) => {
                let n = cols / BLOCK * Q8_0_BYTES;
                let w = &w[o * n..(o + 1) * n];
                for (q, d) in quantized.iter().zip(&mut dots) {
                    *d = dot_q8_0(w, q);
                }
            }
            WeightRows::Q4_0(w) => {
                let n = cols / BLOCK * Q4_0_BYTES;
                let w = &w[o * n..(o + 1) * n];
                for (q, d) in quantized.iter().zip(&mut dots) {
                    *d = dot_q4_0(w, q);
                }
            }
        }
        for (r, d) in dots[..rows].iter().enumerate() {
            tile[r * width + o - outs.start] = *d;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The products against candle's reference paths.

    use candle_core::Device;
    use candle_core::quantized::{GgmlDType, QTensor};

    use super::*;
    use crate::quant::{dequantize, q8_0_round_trip};
    use crate::testing::{close, values};

    /// of the dequantized weight, the block kinds against candle's quantized matmul (which
    /// quantizes the activation to Q8_0 the same way), so only summation order may differ.
    #[test]
    fn linear_matches_candle() {
        use candle_core::Module;
        use candle_core::quantized::QMatMul;

        let (out, cols) = (70, 96);
        let w = Tensor::from_vec(values(out * cols, 5), (out, cols), &Device::Cpu).unwrap();
        for rows in [1, 3, MAX_ROWS] {
            let x =
                Tensor::from_vec(values(rows * cols, 6), (1, rows, cols), &Device::Cpu).unwrap();
            for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::Q8_0, GgmlDType::Q4_0] {
                let q = std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap());
                let dense = q.dequantize(&Device::Cpu).unwrap();
                let reference = match dtype {
                    GgmlDType::F32 | GgmlDType::F16 => x.broadcast_matmul(&dense.t().unwrap()),
                    _ => QMatMul::QTensor(q.clone()).forward(&x),
                }
                .unwrap();
                let dense = dense.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let bytes = q.data().unwrap();
                let view = match dtype {
                    GgmlDType::F32 => WeightRows::F32(&dense),
                    _ => WeightRows::of_qtensor(&q, &bytes).unwrap(),
                };
                let y = linear(&x, view, out).unwrap();
                assert_eq!(y.dims(), &[1, rows, out]);
                let err: f32 = (&y - &reference)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(err <= 1e-4, "{dtype:?} rows {rows}: max error {err}");
            }
        }
        let too_many = Tensor::zeros((MAX_ROWS + 1, cols), DType::F32, &Device::Cpu).unwrap();
        let dense = vec![0f32; out * cols];
        assert!(linear(&too_many, WeightRows::F32(&dense), out).is_err());
        let one = too_many.narrow(0, 0, 1).unwrap();
        assert!(linear(&one, WeightRows::F32(&dense), out + 1).is_err());
    }

    #[test]
    fn dequantize_matches_candle_and_round_trip_matches_the_integer_kernel() {
        let (rows, cols) = (37, 64);
        let w = Tensor::from_vec(values(rows * cols, 10), (rows, cols), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(values(cols, 11), (1, cols), &Device::Cpu).unwrap();
        let x_round = q8_0_round_trip(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for dtype in [GgmlDType::F16, GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let bytes = q.data().unwrap();
            let view = WeightRows::of_qtensor(&q, &bytes).unwrap();
            let ours = dequantize(view, rows, cols).unwrap();
            let theirs = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(ours, theirs, "{dtype:?}");
            if dtype != GgmlDType::F16 {
                // The dense product with the round-tripped activation is the integer dot product.
                let mut y = vec![0f32; rows];
                gemv(view, &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), cols, &mut y);
                for (o, got) in y.iter().enumerate() {
                    let want: f32 = ours[o * cols..(o + 1) * cols]
                        .iter()
                        .zip(&x_round)
                        .map(|(a, b)| a * b)
                        .sum();
                    assert!(close(*got, want, 1e-5), "{dtype:?} row {o}: {got} vs {want}");
                }
            }
        }
    }
}
