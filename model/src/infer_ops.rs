//! Fused CPU kernels of the inference forward for the few rows a decode step or a keystroke feeds
//! (issue 10): matrix–vector products over f32, f16, Q8_0 and Q4_0 weights, and attention of a few
//! new queries over the KV cache.
//!
//! A decode step is memory-bound: every weight is read once per token, and the only work that must
//! be done is the dot product of each weight row with the current activation. candle's general
//! paths spend most of that step elsewhere: its f32 matmul packs operands for a GEMM and runs one
//! row single-threaded, its f16 matmul converts through f16 arithmetic, and its CPU flash-attention
//! decode rescales its accumulator at every cached position. These kernels read each weight row once
//! for all the input rows (up to [`MAX_ROWS`]), keep the activation in L1, and split the output rows
//! over candle's own thread pool, so they share its threads instead of competing with them. Each
//! output element is computed by one thread in a fixed order, so results do not depend on the thread
//! count or on scheduling.
//!
//! With AVX2, FMA and F16C enabled at compile time (the default build, see `.cargo/config.toml`)
//! the inner products use those instructions; elsewhere they run as portable loops that the tests
//! hold the vector code to. Quantized weights use GGML's block layouts, which are candle's: Q8_0 is
//! an f16 scale and 32 `i8`s (34 bytes per 32 weights), Q4_0 an f16 scale and 16 bytes of 4-bit
//! values (the first 16 weights in the low nibbles, the next 16 in the high ones, each minus 8).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::f16;

use crate::train_ops::{Out, data};

/// The most input rows the matrix–vector kernels take; longer inputs (prefill) go to candle's GEMM.
pub const MAX_ROWS: usize = 8;

/// The most new queries [`attention`] takes; longer chunks go to candle's flash attention.
pub const MAX_QUERIES: usize = 16;

/// Weights per GGML Q8_0/Q4_0 block.
const BLOCK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale and 32 `i8`s.
const Q8_0_BYTES: usize = 34;
/// Bytes per Q4_0 block: an f16 scale and 16 bytes of nibbles.
const Q4_0_BYTES: usize = 18;

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

    /// Bytes of weights.
    fn bytes(&self) -> usize {
        match self {
            WeightRows::F32(w) => 4 * w.len(),
            WeightRows::F16(w) => 2 * w.len(),
            WeightRows::Q8_0(w) | WeightRows::Q4_0(w) => w.len(),
        }
    }

    /// Whether the storage matches a `(rows, cols)` matrix.
    fn fits(&self, rows: usize, cols: usize) -> bool {
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

/// `y = x Wᵀ` for `x` of shape `(.., in)` with at most [`MAX_ROWS`] rows and `W` of shape
/// `(out, in)`; `None` when the kernels do not apply (not a CPU f32 input, too many rows, or a
/// weight whose storage does not match the shape), so the caller takes candle's path.
pub fn linear(x: &Tensor, weight: WeightRows<'_>, out: usize) -> Result<Option<Tensor>> {
    Ok(linear_many(x, &[(weight, out)])?.and_then(|mut ys| ys.pop()))
}

/// [`linear`] for several weights applied to the same input (a block's q/k/v projections, its
/// gate and up projections): the input is read and quantized once, and all the output rows are
/// shared out over the thread pool in one dispatch. Outputs come back in the order of `weights`.
pub fn linear_many(x: &Tensor, weights: &[(WeightRows<'_>, usize)]) -> Result<Option<Vec<Tensor>>> {
    let cols = x.dim(candle_core::D::Minus1)?;
    if !x.device().is_cpu()
        || x.dtype() != DType::F32
        || x.elem_count() / cols.max(1) > MAX_ROWS
        || !weights.iter().all(|(w, out)| w.fits(*out, cols))
    {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let rows = x.elem_count() / cols.max(1);
    let mut ys: Vec<Vec<f32>> = weights.iter().map(|(_, out)| vec![0f32; rows * out]).collect();
    {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { return Ok(None) };
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
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Below this many bytes of operands a kernel runs on the calling thread: waking the pool's other
/// threads and waiting for the slowest costs more than the work (the `tiny` preset's matrices).
const INLINE_BYTES: usize = 96 << 10;

/// Runs `f` over `0..items` on candle's thread pool, or on this thread when the work reads fewer
/// than [`INLINE_BYTES`].
fn par_or_inline(items: usize, bytes: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if bytes < INLINE_BYTES {
        f(0..items);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, f);
    }
}

/// Output rows of `W` per work item: a few KiB of weights, enough to amortise scheduling.
const ROWS_PER_ITEM: usize = 16;

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
    let quantized: Vec<Q8Row> =
        if parts.iter().any(|(w, _)| matches!(w, WeightRows::Q8_0(_) | WeightRows::Q4_0(_))) {
            x.chunks(cols).map(Q8Row::quantize).collect()
        } else {
            Vec::new()
        };
    // Work items are blocks of output rows, numbered across the parts in order.
    let outs: Vec<usize> = parts.iter().map(|(_, y)| y.len() / rows).collect();
    let mut first_item = Vec::with_capacity(parts.len() + 1);
    first_item.push(0);
    for out in &outs {
        first_item.push(first_item.last().copied().unwrap_or(0) + out.div_ceil(ROWS_PER_ITEM));
    }
    let weights: Vec<WeightRows<'_>> = parts.iter().map(|(w, _)| *w).collect();
    let ys: Vec<Out> = parts.iter_mut().map(|(_, y)| Out::new(y)).collect();
    let items = first_item.last().copied().unwrap_or(0);
    let bytes: usize = weights.iter().map(WeightRows::bytes).sum();
    par_or_inline(items, bytes * rows, |range| {
        let mut tile = [0f32; MAX_ROWS * ROWS_PER_ITEM];
        for item in range {
            let part = first_item.partition_point(|&f| f <= item) - 1;
            let (weight, out) = (weights[part], outs[part]);
            let first = (item - first_item[part]) * ROWS_PER_ITEM;
            let last = out.min(first + ROWS_PER_ITEM);
            let width = last - first;
            for o in first..last {
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
                    tile[r * width + o - first] = *d;
                }
            }
            for r in 0..rows {
                // SAFETY: each item writes its own output rows `first..last` of its part.
                let y = unsafe { ys[part].part(r * out + first..r * out + last) };
                y.copy_from_slice(&tile[r * width..(r + 1) * width]);
            }
        }
    });
}

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
    candle_core::utils::barrier_pool().execute_chunked(blocks.div_ceil(64), |range| {
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

/// Portable reference kernels (and the fallback where AVX2/FMA/F16C are not compiled in).
pub mod portable {
    use super::*;

    /// `a · b` over f32.
    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        crate::train_ops::dot(a, b)
    }

    /// `w · x` with f16 weights.
    pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let (cw, cx) = (w.chunks_exact(8), x.chunks_exact(8));
        let tail: f32 =
            cw.remainder().iter().zip(cx.remainder()).map(|(a, b)| a.to_f32() * b).sum();
        for (a, b) in cw.zip(cx) {
            for k in 0..8 {
                acc[k] += a[k].to_f32() * b[k];
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    /// `acc += p · x`.
    pub fn axpy_f32(p: f32, x: &[f32], acc: &mut [f32]) {
        acc.iter_mut().zip(x).for_each(|(a, x)| *a += p * x);
    }

    /// `acc += p · x` with f16 `x`.
    pub fn axpy_f16(p: f32, x: &[f16], acc: &mut [f32]) {
        acc.iter_mut().zip(x).for_each(|(a, x)| *a += p * x.to_f32());
    }

    /// `x[i] = exp(x[i] - shift)` for all `i`; returns their sum.
    pub fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        x.iter_mut().fold(0f32, |total, v| {
            *v = (*v - shift).exp();
            total + *v
        })
    }

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

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod avx2 {
    //! The kernels with AVX2 / FMA / F16C intrinsics (compiled in by `target-cpu=x86-64-v3`).

    use std::arch::x86_64::*;

    use super::{BLOCK, Q4_0_BYTES, Q8_0_BYTES, Q8Row, f16};

    #[inline]
    fn hsum(v: __m256) -> f32 {
        // SAFETY: the intrinsics need AVX, compiled in (cfg of this module).
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// `a · b` over f32, 32 lanes at a time in four accumulators.
    #[inline(always)]
    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let body = n / 32 * 32;
        // SAFETY: every load reads 8 floats at an index below `body` ≤ both lengths.
        let sum = unsafe {
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < body {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let j = i + 8 * k;
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(j)),
                        _mm256_loadu_ps(pb.add(j)),
                        *acc,
                    );
                }
                i += 32;
            }
            hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
        };
        sum + a[body..n].iter().zip(&b[body..n]).map(|(x, y)| x * y).sum::<f32>()
    }

    /// `w · x` with f16 weights converted by `vcvtph2ps`, 32 lanes at a time.
    #[inline(always)]
    pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let body = n / 32 * 32;
        // SAFETY: every load reads 8 values at an index below `body` ≤ both lengths.
        let sum = unsafe {
            let (pw, px) = (w.as_ptr().cast::<__m128i>(), x.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < body {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let j = i + 8 * k;
                    let wv = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(j / 8)));
                    *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(j)), *acc);
                }
                i += 32;
            }
            hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
        };
        sum + w[body..n].iter().zip(&x[body..n]).map(|(a, b)| a.to_f32() * b).sum::<f32>()
    }

    /// `acc += p · x`, eight lanes at a time.
    #[inline(always)]
    pub fn axpy_f32(p: f32, x: &[f32], acc: &mut [f32]) {
        let n = x.len().min(acc.len());
        let body = n / 8 * 8;
        // SAFETY: every access touches 8 floats at an index below `body` ≤ both lengths.
        unsafe {
            let pv = _mm256_set1_ps(p);
            for i in (0..body).step_by(8) {
                let a = acc.as_mut_ptr().add(i);
                _mm256_storeu_ps(
                    a,
                    _mm256_fmadd_ps(pv, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(a)),
                );
            }
        }
        acc[body..n].iter_mut().zip(&x[body..n]).for_each(|(a, x)| *a += p * x);
    }

    /// `acc += p · x` with f16 `x`, eight lanes at a time.
    #[inline(always)]
    pub fn axpy_f16(p: f32, x: &[f16], acc: &mut [f32]) {
        let n = x.len().min(acc.len());
        let body = n / 8 * 8;
        // SAFETY: every access touches 8 values at an index below `body` ≤ both lengths.
        unsafe {
            let pv = _mm256_set1_ps(p);
            for i in (0..body).step_by(8) {
                let a = acc.as_mut_ptr().add(i);
                let xv = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i).cast()));
                _mm256_storeu_ps(a, _mm256_fmadd_ps(pv, xv, _mm256_loadu_ps(a)));
            }
        }
        acc[body..n].iter_mut().zip(&x[body..n]).for_each(|(a, x)| *a += p * x.to_f32());
    }

    /// `exp` of eight lanes (inputs at most 88; below -87 gives 0): `2^n · p(r)` with
    /// `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, and `p` the degree-6 Taylor polynomial (relative error
    /// below 2e-7).
    #[inline(always)]
    fn exp8(x: __m256) -> __m256 {
        // SAFETY: AVX2/FMA intrinsics on registers, compiled in.
        unsafe {
            let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            // ln 2 split in two so that n·ln2_hi is exact.
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
            let mut p = _mm256_set1_ps(1.0 / 720.0);
            for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let scale = _mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            );
            _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
        }
    }

    /// `x[i] = exp(x[i] - shift)` for all `i`, eight lanes at a time; returns their sum.
    pub fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let body = x.len() / 8 * 8;
        // SAFETY: every access touches 8 floats at an index below `body` ≤ the length.
        let mut total = unsafe {
            let (s, mut acc) = (_mm256_set1_ps(shift), _mm256_setzero_ps());
            for i in (0..body).step_by(8) {
                let p = x.as_mut_ptr().add(i);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), s));
                _mm256_storeu_ps(p, e);
                acc = _mm256_add_ps(acc, e);
            }
            hsum(acc)
        };
        for v in &mut x[body..] {
            *v = (*v - shift).exp();
            total += *v;
        }
        total
    }

    /// Eight i32 sums of products of signed bytes `a` and `b` (pairs of four), as f32.
    #[inline]
    fn mul_sum_i8(a: __m256i, b: __m256i) -> __m256 {
        // SAFETY: AVX2 intrinsics, compiled in. maddubs takes unsigned × signed: move a's sign
        // onto b.
        unsafe {
            let ax = _mm256_sign_epi8(a, a);
            let sy = _mm256_sign_epi8(b, a);
            let pairs = _mm256_maddubs_epi16(ax, sy);
            _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }

    /// Block `b` of a Q8_0 row times block `b` of `x`, as eight partial sums, scaled.
    ///
    /// # Safety
    /// `w` must hold at least `b + 1` Q8_0 blocks and `x` at least `b + 1` blocks.
    #[inline(always)]
    unsafe fn q8_0_block(w: &[u8], x: &Q8Row, b: usize) -> (__m256, __m256) {
        // SAFETY: in bounds by the caller's contract.
        unsafe {
            let block = w.as_ptr().add(b * Q8_0_BYTES);
            let wq = _mm256_loadu_si256(block.add(2).cast());
            let xq = _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK).cast());
            let d =
                f16::from_le_bytes([*block, *block.add(1)]).to_f32() * x.scales.get_unchecked(b);
            (_mm256_set1_ps(d), mul_sum_i8(wq, xq))
        }
    }

    /// Block `b` of a Q4_0 row times block `b` of `x`, as eight partial sums, with its scale.
    ///
    /// # Safety
    /// `w` must hold at least `b + 1` Q4_0 blocks and `x` at least `b + 1` blocks.
    #[inline(always)]
    unsafe fn q4_0_block(w: &[u8], x: &Q8Row, b: usize) -> (__m256, __m256) {
        // SAFETY: in bounds by the caller's contract.
        unsafe {
            let block = w.as_ptr().add(b * Q4_0_BYTES);
            let packed = _mm_loadu_si128(block.add(2).cast());
            // Weights 0..16 are the low nibbles, 16..32 the high ones, each offset by 8: the raw
            // nibbles are unsigned, so they go straight into maddubs, and 8 · Σx comes off after.
            let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
            let nibbles = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
            let xq = _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK).cast());
            let pairs = _mm256_maddubs_epi16(nibbles, xq);
            let sums = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
            let eights = _mm256_loadu_si256(x.eights.as_ptr().add(b * 8).cast());
            let centred = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, eights));
            let d =
                f16::from_le_bytes([*block, *block.add(1)]).to_f32() * x.scales.get_unchecked(b);
            (_mm256_set1_ps(d), centred)
        }
    }

    /// Sums `blocks` scaled block products in two register accumulators (two blocks per
    /// iteration, so consecutive FMAs do not wait on each other).
    #[inline(always)]
    fn sum_blocks(blocks: usize, block: impl Fn(usize) -> (__m256, __m256)) -> f32 {
        // SAFETY: AVX/FMA intrinsics on registers, compiled in.
        unsafe {
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut b = 0;
            while b + 1 < blocks {
                let (d0, p0) = block(b);
                let (d1, p1) = block(b + 1);
                acc0 = _mm256_fmadd_ps(d0, p0, acc0);
                acc1 = _mm256_fmadd_ps(d1, p1, acc1);
                b += 2;
            }
            if b < blocks {
                let (d0, p0) = block(b);
                acc0 = _mm256_fmadd_ps(d0, p0, acc0);
            }
            hsum(_mm256_add_ps(acc0, acc1))
        }
    }

    /// One row of Q8_0 weight blocks times a Q8_0 activation row.
    pub fn dot_q8_0(w: &[u8], x: &Q8Row) -> f32 {
        let blocks = (w.len() / Q8_0_BYTES).min(x.scales.len());
        // SAFETY: b < blocks, which both `w` and `x` hold.
        sum_blocks(blocks, |b| unsafe { q8_0_block(w, x, b) })
    }

    /// One row of Q4_0 weight blocks times a Q8_0 activation row.
    pub fn dot_q4_0(w: &[u8], x: &Q8Row) -> f32 {
        let blocks = (w.len() / Q4_0_BYTES).min(x.scales.len());
        // SAFETY: b < blocks, which both `w` and `x` hold.
        sum_blocks(blocks, |b| unsafe { q4_0_block(w, x, b) })
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
use avx2::{axpy_f16, axpy_f32, dot_f16, dot_f32, dot_q4_0, dot_q8_0, exp_shifted};
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
)))]
use portable::{axpy_f16, axpy_f32, dot_f16, dot_f32, dot_q4_0, dot_q8_0, exp_shifted};

/// Causal attention of the `seq` newest queries `q` `(1, seq, heads, dim)` over a layer's
/// head-major key and value buffers `(1, kv_heads, capacity, dim)` (f32 or f16), of which the first
/// `kv_len` positions are valid and the last `seq` of those are the queries' own; returns
/// `(1, seq, heads, dim)`. `None` when the kernel does not apply (not CPU, more than
/// [`MAX_QUERIES`] queries), so the caller takes candle's flash attention.
pub fn attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    kv_len: usize,
    scale: f32,
) -> Result<Option<Tensor>> {
    match Attention::checked(q, keys, values, kv_len, scale, MAX_QUERIES)? {
        Some(op) => q
            .contiguous()?
            .apply_op3_no_bwd(&keys.contiguous()?, &values.contiguous()?, &op)
            .map(Some),
        None => Ok(None),
    }
}

/// The custom op behind [`attention`], and the shape of an attention call.
#[derive(Debug, Clone, Copy)]
struct Attention {
    heads: usize,
    kv_heads: usize,
    dim: usize,
    capacity: usize,
    kv_len: usize,
    scale: f32,
}

impl Attention {
    /// The call's shape when the kernels apply to it (CPU f32 queries, at most `max_seq` of them,
    /// an f32 or f16 head-major cache holding `kv_len` ≥ `seq` positions), else `None`.
    fn checked(
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        kv_len: usize,
        scale: f32,
        max_seq: usize,
    ) -> Result<Option<Self>> {
        let (_, seq, heads, dim) = q.dims4()?;
        let (_, kv_heads, capacity, _) = keys.dims4()?;
        let on_cpu = [q, keys, values].iter().all(|t| t.device().is_cpu());
        let applies = seq <= max_seq
            && seq <= kv_len
            && kv_len <= capacity
            && kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && on_cpu
            && q.dtype() == DType::F32
            && matches!(keys.dtype(), DType::F32 | DType::F16)
            && keys.dtype() == values.dtype()
            && keys.dims() == values.dims();
        Ok(applies.then_some(Self { heads, kv_heads, dim, capacity, kv_len, scale }))
    }
}

/// One layer's cached keys or values as the attention kernel reads them.
#[derive(Clone, Copy)]
enum CacheRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> CacheRows<'a> {
    fn of(storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("attention: non-contiguous cache".into()))?;
        match storage {
            CpuStorage::F32(v) => Ok(CacheRows::F32(&v[start..end])),
            CpuStorage::F16(v) => Ok(CacheRows::F16(&v[start..end])),
            _ => candle_core::bail!("attention: the cache must be f32 or f16"),
        }
    }

    /// Bytes per element.
    fn elem_bytes(self) -> usize {
        match self {
            CacheRows::F32(_) => 4,
            CacheRows::F16(_) => 2,
        }
    }

    /// `x · row` of the row starting at `at`.
    #[inline(always)]
    fn dot(self, at: usize, x: &[f32]) -> f32 {
        match self {
            CacheRows::F32(t) => dot_f32(&t[at..at + x.len()], x),
            CacheRows::F16(t) => dot_f16(&t[at..at + x.len()], x),
        }
    }

    /// `acc += p · row` of the row starting at `at`.
    #[inline(always)]
    fn axpy(self, at: usize, p: f32, acc: &mut [f32]) {
        match self {
            CacheRows::F32(t) => axpy_f32(p, &t[at..at + acc.len()], acc),
            CacheRows::F16(t) => axpy_f16(p, &t[at..at + acc.len()], acc),
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "m31r-decode-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = data(s1, l1, self.name())?;
        let (k, v) = (CacheRows::of(s2, l2)?, CacheRows::of(s3, l3)?);
        let mut y = vec![0f32; q.len()];
        self.attend(q, k, v, &mut y);
        Ok((CpuStorage::F32(y), Shape::from(l1.dims())))
    }
}

impl Attention {
    /// The kernel on slices: queries `(seq, heads, dim)` into `y` of the same shape.
    fn attend(&self, q: &[f32], k: CacheRows<'_>, v: CacheRows<'_>, y: &mut [f32]) {
        let (heads, dim, kv_len) = (self.heads, self.dim, self.kv_len);
        let seq = q.len() / (heads * dim);
        let group = heads / self.kv_heads;
        let out = Out::new(y);
        // One work item per (query, head): its scores, softmax and weighted sum of values, reading
        // the head's cached positions as one contiguous run.
        let bytes = seq * heads / group * kv_len * dim * 2 * k.elem_bytes();
        par_or_inline(seq * heads, bytes, |range| {
            let mut scores = vec![0f32; kv_len];
            for item in range {
                let (i, h) = (item / heads, item % heads);
                // Query i sits at position kv_len - seq + i and sees keys up to it.
                let visible = kv_len - seq + i + 1;
                let base = (h / group) * self.capacity * dim;
                let query = &q[item * dim..(item + 1) * dim];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores[..visible].iter_mut().enumerate() {
                    *s = k.dot(base + j * dim, query) * self.scale;
                    max = max.max(*s);
                }
                let total = exp_shifted(&mut scores[..visible], max);
                // SAFETY: each item writes its own (query, head) row.
                let acc = unsafe { out.part(item * dim..(item + 1) * dim) };
                acc.fill(0.0);
                for (j, p) in scores[..visible].iter().enumerate() {
                    v.axpy(base + j * dim, *p, acc);
                }
                let inv = 1.0 / total;
                acc.iter_mut().for_each(|a| *a *= inv);
            }
        });
    }
}

/// [`attention`] of one token's query `q` `(heads · dim)` into `y`, on slices: the decode step of
/// [`crate::transformer::Model`]'s single-token path, which keeps activations out of candle
/// tensors.
pub fn attention_one(
    q: &[f32],
    keys: &Tensor,
    values: &Tensor,
    kv_len: usize,
    scale: f32,
    y: &mut [f32],
) -> Result<()> {
    let (_, kv_heads, capacity, dim) = keys.dims4()?;
    let heads = q.len() / dim.max(1);
    if kv_len > capacity || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || y.len() != q.len() {
        candle_core::bail!(
            "attention_one: query of {} values for a {:?} cache",
            q.len(),
            keys.dims()
        );
    }
    let (ks, kl) = keys.storage_and_layout();
    let (vs, vl) = values.storage_and_layout();
    let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*ks, &*vs) else {
        candle_core::bail!("attention_one: the cache is not on the CPU");
    };
    let op = Attention { heads, kv_heads, dim, capacity, kv_len, scale };
    op.attend(q, CacheRows::of(kc, kl)?, CacheRows::of(vc, vl)?, y);
    Ok(())
}

/// Queries per work item of [`attention_prefill`]: one GEMM tile of scores per (head, block).
const PREFILL_QUERIES: usize = 64;

/// Causal attention of a chunk of `seq` queries (any length) over the head-major caches, like
/// [`attention`]: per (head, block of queries), the scores are one GEMM against the head's keys,
/// then a masked softmax, then one GEMM against its values. `None` where it does not apply (not
/// CPU f32 queries, an f32/f16 cache).
pub fn attention_prefill(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    kv_len: usize,
    scale: f32,
) -> Result<Option<Tensor>> {
    match Attention::checked(q, keys, values, kv_len, scale, usize::MAX)? {
        Some(shape) => q
            .contiguous()?
            .apply_op3_no_bwd(&keys.contiguous()?, &values.contiguous()?, &PrefillAttention(shape))
            .map(Some),
        None => Ok(None),
    }
}

/// The custom op behind [`attention_prefill`].
struct PrefillAttention(Attention);

impl CacheRows<'_> {
    /// The first `len` rows of width `dim` of head `head` (of a `capacity`-row head-major
    /// buffer), as f32.
    fn head_f32(self, head: usize, capacity: usize, len: usize, dim: usize) -> Vec<f32> {
        let at = head * capacity * dim;
        match self {
            CacheRows::F32(t) => t[at..at + len * dim].to_vec(),
            CacheRows::F16(t) => {
                let mut out = vec![0f32; len * dim];
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                    &t[at..at + len * dim],
                    &mut out,
                );
                out
            }
        }
    }
}

impl CustomOp3 for PrefillAttention {
    fn name(&self) -> &'static str {
        "m31r-prefill-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = data(s1, l1, self.name())?;
        let (k, v) = (CacheRows::of(s2, l2)?, CacheRows::of(s3, l3)?);
        let Attention { heads, kv_heads, dim, capacity, kv_len, scale } = self.0;
        let seq = q.len() / (heads * dim);
        let group = heads / kv_heads;
        // Each KV head's positions as f32 rows, converted once for all its query blocks.
        let mut kf = vec![Vec::new(); kv_heads];
        let mut vf = vec![Vec::new(); kv_heads];
        {
            let (ko, vo) = (SlotOut::new(&mut kf), SlotOut::new(&mut vf));
            candle_core::utils::barrier_pool().execute_chunked(2 * kv_heads, |range| {
                for item in range {
                    let (which, head) = (item / kv_heads, item % kv_heads);
                    let (rows, slots) = if which == 0 { (k, &ko) } else { (v, &vo) };
                    // SAFETY: each item fills its own slot.
                    unsafe { slots.set(head, rows.head_f32(head, capacity, kv_len, dim)) };
                }
            });
        }
        let mut y = vec![0f32; q.len()];
        let out = Out::new(&mut y);
        let blocks = seq.div_ceil(PREFILL_QUERIES);
        let row_stride = (heads * dim) as isize;
        candle_core::utils::barrier_pool().execute_chunked(heads * blocks, |range| {
            for item in range {
                let (h, block) = (item % heads, item / heads);
                let first = block * PREFILL_QUERIES;
                let rows = PREFILL_QUERIES.min(seq - first);
                // Query i sits at position kv_len - seq + i and sees keys up to it.
                let visible = |i: usize| kv_len - seq + i + 1;
                let width = visible(first + rows - 1);
                let (kh, vh) = (&kf[h / group], &vf[h / group]);
                let mut scores = vec![0f32; rows * width];
                // SAFETY: scores is rows × width (row-major); the queries are rows of q at
                // stride heads·dim from (first, h); keys are width × dim row-major (read
                // transposed). All in bounds; single-threaded GEMM inside a pool item.
                unsafe {
                    gemm::gemm(
                        rows,
                        width,
                        dim,
                        scores.as_mut_ptr(),
                        1,
                        width as isize,
                        false,
                        q.as_ptr().add((first * heads + h) * dim),
                        1,
                        row_stride,
                        kh.as_ptr(),
                        dim as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                let mut totals = vec![0f32; rows];
                for (i, (row, total)) in scores.chunks_mut(width).zip(&mut totals).enumerate() {
                    let seen = visible(first + i);
                    let max = row[..seen].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    *total = exp_shifted(&mut row[..seen], max);
                    row[seen..].fill(0.0);
                }
                // SAFETY: this item owns rows first..first + rows of head h in the output, at
                // stride heads·dim; values are width × dim row-major.
                unsafe {
                    let dst = out.as_mut_ptr().add((first * heads + h) * dim);
                    gemm::gemm(
                        rows,
                        dim,
                        width,
                        dst,
                        1,
                        row_stride,
                        false,
                        scores.as_ptr(),
                        1,
                        width as isize,
                        vh.as_ptr(),
                        1,
                        dim as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    for (i, total) in totals.iter().enumerate() {
                        let row = std::slice::from_raw_parts_mut(dst.add(i * heads * dim), dim);
                        let inv = 1.0 / total;
                        row.iter_mut().for_each(|x| *x *= inv);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from(l1.dims())))
    }
}

/// Slots of a vector that parallel workers fill, one each.
struct SlotOut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: workers only reach the slots through `SlotOut::set`, whose callers guarantee each slot is
// set by one worker; the vector outlives the parallel section (it is borrowed for it).
unsafe impl<T: Send> Sync for SlotOut<T> {}

impl<T> SlotOut<T> {
    fn new(slots: &mut [T]) -> Self {
        Self { ptr: slots.as_mut_ptr(), len: slots.len() }
    }

    /// Replaces slot `i`.
    ///
    /// # Safety
    /// No other worker may touch slot `i` meanwhile.
    unsafe fn set(&self, i: usize, value: T) {
        assert!(i < self.len, "slot out of bounds");
        // SAFETY: in bounds (checked) and exclusive by the caller's contract.
        unsafe { *self.ptr.add(i) = value };
    }
}

/// Column blocks per thread in [`matmul_t`]: each block re-packs the input for its GEMM, so few
/// large blocks, but more than one per thread to absorb a slow thread.
const GEMM_BLOCKS_PER_THREAD: usize = 2;

/// `y = x Wᵀ` for a CPU f32 input `(.., k)` of any length and a dense f32 weight `w` `(n, k)`
/// given as rows: blocks of output columns are shared out over candle's thread pool, each one a
/// single-threaded GEMM. (candle's own matmul runs GEMM on rayon's threads, which then compete
/// for the cores with the pool's spinning worker.)
pub fn matmul_t(x: &Tensor, w: &[f32], n: usize) -> Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    if w.len() != n * k {
        candle_core::bail!("matmul_t: weight of {} values is not ({n}, {k})", w.len());
    }
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let m = xs.len() / k.max(1);
    let mut y = vec![0f32; m * n];
    let out = Out::new(&mut y);
    let pool = candle_core::utils::barrier_pool();
    let blocks = (pool.n_workers() + 1) * GEMM_BLOCKS_PER_THREAD;
    // Block widths a multiple of 16 columns, the micro-kernels' width.
    let width = n.div_ceil(blocks).div_ceil(16) * 16;
    pool.execute_chunked(n.div_ceil(width.max(1)), |range| {
        for block in range {
            let first = block * width;
            let cols = width.min(n - first);
            // SAFETY: y is m × n row-major and this item owns columns first..first + cols; x is
            // m × k row-major; rows first.. of w are the columns of Wᵀ (k × cols, read with
            // column stride k). All in bounds.
            unsafe {
                gemm::gemm(
                    m,
                    cols,
                    k,
                    out.as_mut_ptr().add(first),
                    1,
                    n as isize,
                    false,
                    xs.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr().add(first * k),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(y, dims, x.device())
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
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
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

#[cfg(test)]
mod tests {
    //! The vector kernels against the portable ones, and the ops against candle's reference paths.

    use candle_core::Device;
    use candle_core::quantized::QTensor;

    use super::*;
    use crate::rng::Rng;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut v = vec![0f32; n];
        Rng::for_stream(seed, "infer_ops").fill_normal(&mut v, 1.0);
        v
    }

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn vector_dots_match_the_portable_ones() {
        for n in [1, 31, 32, 96, 577] {
            let (a, b) = (values(n, 1), values(n, 2));
            assert!(close(dot_f32(&a, &b), portable::dot_f32(&a, &b), 1e-5), "f32 {n}");
            let h: Vec<f16> = a.iter().map(|&x| f16::from_f32(x)).collect();
            assert!(close(dot_f16(&h, &b), portable::dot_f16(&h, &b), 1e-5), "f16 {n}");
        }
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

    /// Every weight kind through [`linear`] against candle: the float kinds against the matmul
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
                let y = linear(&x, view, out).unwrap().unwrap();
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
        assert!(linear(&too_many, WeightRows::F32(&dense), out).unwrap().is_none());
        let one = too_many.narrow(0, 0, 1).unwrap();
        assert!(linear(&one, WeightRows::F32(&dense), out + 1).unwrap().is_none());
    }

    #[test]
    fn vector_exp_matches_the_portable_one() {
        let mut xs: Vec<f32> = (0..203).map(|i| -100.0 + i as f32 * 0.5).collect();
        let mut ys = xs.clone();
        let (a, b) = (exp_shifted(&mut xs, 1.5), portable::exp_shifted(&mut ys, 1.5));
        assert!(close(a, b, 1e-6), "sums {a} vs {b}");
        for (x, y) in xs.iter().zip(&ys) {
            assert!((x - y).abs() <= 1e-6 * y.abs() + 1e-37, "{x} vs {y}");
        }
    }

    type AttendFn = fn(&Tensor, &Tensor, &Tensor, usize, f32) -> Result<Option<Tensor>>;

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

    #[test]
    fn attention_matches_the_plain_softmax() {
        let (heads, kv_heads, dim, kv_len, capacity) = (4, 2, 16, 75, 80);
        let cache = |seed| {
            Tensor::from_vec(
                values(kv_heads * capacity * dim, seed),
                (1, kv_heads, capacity, dim),
                &Device::Cpu,
            )
            .unwrap()
        };
        let at = |h: usize, j: usize| (h * capacity + j) * dim;
        for dtype in [DType::F32, DType::F16] {
            // The reference reads the values the cache holds.
            let (k, v) = (cache(8).to_dtype(dtype).unwrap(), cache(9).to_dtype(dtype).unwrap());
            let flat = |t: &Tensor| {
                t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let (kv, vv) = (flat(&k), flat(&v));
            for (seq, kernel) in [
                (1, attention as AttendFn),
                (3, attention),
                (1, attention_prefill),
                (PREFILL_QUERIES + 6, attention_prefill),
            ] {
                let q = Tensor::from_vec(
                    values(seq * heads * dim, 7),
                    (1, seq, heads, dim),
                    &Device::Cpu,
                )
                .unwrap();
                let y = kernel(&q, &k, &v, kv_len, 0.25).unwrap().unwrap();
                assert_eq!(y.dims(), q.dims());
                let qv = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for i in 0..seq {
                    for h in 0..heads {
                        let kh = h / (heads / kv_heads);
                        let qrow = &qv[(i * heads + h) * dim..][..dim];
                        let visible = kv_len - seq + i + 1;
                        let scores: Vec<f32> = (0..visible)
                            .map(|j| {
                                qrow.iter()
                                    .zip(&kv[at(kh, j)..][..dim])
                                    .map(|(a, b)| a * b)
                                    .sum::<f32>()
                                    * 0.25
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                        let total: f32 = exps.iter().sum();
                        for t in 0..dim {
                            let want: f32 =
                                (0..visible).map(|j| exps[j] / total * vv[at(kh, j) + t]).sum();
                            let got = yv[(i * heads + h) * dim + t];
                            assert!(
                                close(got, want, 1e-4),
                                "{dtype:?} seq {seq} query {i} head {h}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
