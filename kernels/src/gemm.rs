//! Long inputs (prefill) times a dense weight: blocks of output columns shared out over the
//! kernels' thread pool, each one a single-threaded GEMM of the `gemm` crate candle itself runs on.

use candle_core::{DType, Result, Tensor};

use crate::pool::{self, Out};

/// Column blocks per thread in [`matmul_t`]: each block re-packs the input for its GEMM, so few
/// large blocks, but more than one per thread to absorb a slow thread.
const GEMM_BLOCKS_PER_THREAD: usize = 2;

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
