//! Long inputs (prefill) times a dense weight: blocks of output columns shared out over the
//! kernels' thread pool, each one a single-threaded GEMM of the `gemm` crate candle itself runs on.

use candle_core::{DType, Result, Tensor};

use crate::pool::{self, Out};

/// Column blocks per thread in [`matmul_t`]: each block re-packs the input for its GEMM, so few
/// large blocks, but more than one per thread to absorb a slow thread.
const GEMM_BLOCKS_PER_THREAD: usize = 2;

/// `c = alpha · a · b`, single-threaded, overwriting `c` (m × n, rows `c_row` apart): `a` (m × k)
/// and `b` (k × n) are read through (row, column) strides, so transposed operands need no copy.
/// The one call into the `gemm` crate that the training kernels and [`matmul_t`] share.
///
/// # Safety
/// The operands must hold every element their strides reach, and `c` every element of its m
/// rows of n; no other thread may write those elements of `c` meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    c_row: usize,
    a: *const f32,
    (a_row, a_col): (usize, usize),
    b: *const f32,
    (b_row, b_col): (usize, usize),
    alpha: f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_row as isize,
            false,
            a,
            a_col as isize,
            a_row as isize,
            b,
            b_col as isize,
            b_row as isize,
            0.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `y = x Wᵀ` for a CPU f32 input `(.., k)` of any length and a dense f32 weight `w` `(n, k)`
/// given as rows: blocks of output columns are shared out over the kernels' thread pool, each one
/// a single-threaded GEMM. (candle's own matmul runs GEMM on rayon's threads, which would compete
/// for the cores with the pool's.) The blocks follow the pool's size, not the adaptive count, so
/// the result is the same whatever the load.
pub fn matmul_t(x: &Tensor, w: &[f32], n: usize) -> Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    if w.len() != n * k {
        candle_core::bail!("matmul_t: weight of {} values is not ({n}, {k})", w.len());
    }
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let m = xs.len() / k.max(1);
    let mut y = vec![0f32; m * n];
    let out = Out::new(&mut y);
    let blocks = pool::max_threads() * GEMM_BLOCKS_PER_THREAD;
    // Block widths a multiple of 16 columns, the micro-kernels' width.
    let width = n.div_ceil(blocks).div_ceil(16) * 16;
    pool::run(n.div_ceil(width.max(1)), false, |range| {
        for block in range {
            let first = block * width;
            let cols = width.min(n - first);
            // SAFETY: y is m × n row-major and this item owns columns first..first + cols; x is
            // m × k row-major; rows first.. of w are the columns of Wᵀ (k × cols, read with
            // column stride k). All in bounds.
            unsafe {
                gemm_into(
                    (m, cols, k),
                    out.as_mut_ptr().add(first),
                    n,
                    xs.as_ptr(),
                    (k, 1),
                    w.as_ptr().add(first * k),
                    (1, k),
                    1.0,
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
