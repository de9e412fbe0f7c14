//! The training path's projections, `y = x Wᵀ`, and their backward pass (`dx = dy W`,
//! `dW = dyᵀ x`), and the batched products of attention (`q kᵀ`, `p v` per sequence and head),
//! on the kernels' thread pool.
//!
//! candle's matmul runs the `gemm` crate on rayon's threads while every other kernel of the
//! training step runs on this crate's pool, so the two sets of threads took turns spinning
//! against each other; and its backward transposes `W` and `x` into fresh copies first. Here all
//! three products read their operands in place through `gemm`'s strides: blocks of the output
//! are shared out over the pool, each one a single-threaded GEMM. The blocking depends only on
//! the shapes and the pool's size, never on the load, so results are bit-identical run to run.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::fused;
use crate::gemm::gemm_into;
use crate::pool::{self, Out};
use crate::storage::data;

/// `x Wᵀ` for `x` `(.., k)` and `w` `(n, k)`: a linear layer without bias, differentiable in both.
/// Composed candle ops off the CPU or for other dtypes (the reference of the tests).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !(fused(x) && fused(w)) {
        return x.broadcast_matmul(&w.t()?);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

/// A row-major matrix operand of [`gemm_pool`], read through strides: element (i, j) is at
/// `ptr + i·row + j·col`.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    row: usize,
    col: usize,
}

/// `c = a · b` for `a` (m × k) and `b` (k × n), `c` m × n row-major: blocks of `c`'s rows (or
/// columns, when it is wider than tall) over the pool, each a single-threaded GEMM.
fn gemm_pool(m: usize, n: usize, k: usize, a: Operand, b: Operand, c: &mut [f32]) {
    debug_assert_eq!(c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    let out = Out::new(c);
    // Blocks of a multiple of 16 along the split side (the micro-kernels' width), two per thread
    // so a slow thread is absorbed; small products run on this thread.
    let by_rows = m >= n;
    let side = if by_rows { m } else { n };
    let blocks = pool::max_threads() * 2;
    let width = side.div_ceil(blocks).div_ceil(16) * 16;
    let inline = m * n * k < 1 << 16;
    // Addresses and strides as plain numbers: the closure runs on the pool's threads.
    let (a_ptr, b_ptr) = (a.ptr as usize, b.ptr as usize);
    let (a_row, a_col, b_row, b_col) = (a.row, a.col, b.row, b.col);
    pool::run(side.div_ceil(width), inline, |range| {
        for block in range {
            let first = block * width;
            let len = width.min(side - first);
            let (rows, cols) = if by_rows { (len, n) } else { (m, len) };
            // SAFETY: `c` is m × n row-major and this block owns rows (or columns) first..first +
            // len of it; `a` and `b` are read within the extents their strides describe, which
            // the callers derive from contiguous tensors of the matching shapes.
            unsafe {
                let (a_ptr, b_ptr) = (a_ptr as *const f32, b_ptr as *const f32);
                let (a_at, b_at, c_at) = if by_rows {
                    (a_ptr.add(first * a_row), b_ptr, out.as_mut_ptr().add(first * n))
                } else {
                    (a_ptr, b_ptr.add(first * b_col), out.as_mut_ptr().add(first))
                };
                gemm_into(
                    (rows, cols, k),
                    c_at,
                    n,
                    a_at,
                    (a_row, a_col),
                    b_at,
                    (b_row, b_col),
                    1.0,
                );
            }
        }
    });
}

/// Rows and width of a contiguous `(.., k)` input.
fn rows_of(layout: &Layout) -> Result<(usize, usize)> {
    let k =
        *layout.dims().last().ok_or_else(|| candle_core::Error::Msg("linear: a scalar".into()))?;
    Ok((layout.shape().elem_count() / k.max(1), k))
}

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "m31r-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let (m, k) = rows_of(l1)?;
        let (n, wk) = l2.shape().dims2()?;
        if wk != k {
            candle_core::bail!("linear: input {:?} against weight {:?}", l1.dims(), l2.dims());
        }
        let mut y = vec![0f32; m * n];
        // x (m × k) row-major; Wᵀ (k × n): element (i, j) is W[j][i].
        let a = Operand { ptr: x.as_ptr(), row: k, col: 1 };
        let b = Operand { ptr: w.as_ptr(), row: 1, col: k };
        gemm_pool(m, n, k, a, b, &mut y);
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("rows_of checked the rank") = n;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = dy.apply_op2_no_bwd(w, &InputGrad)?;
        let dw = dy.apply_op2_no_bwd(x, &WeightGrad)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `dx = dy W`: `(.., n)` times `(n, k)`.
struct InputGrad;

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "m31r-linear-dx"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dy, w) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let (m, n) = rows_of(l1)?;
        let (wn, k) = l2.shape().dims2()?;
        if wn != n {
            candle_core::bail!(
                "linear dx: gradient {:?} against weight {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let mut dx = vec![0f32; m * k];
        let a = Operand { ptr: dy.as_ptr(), row: n, col: 1 };
        let b = Operand { ptr: w.as_ptr(), row: k, col: 1 };
        gemm_pool(m, k, n, a, b, &mut dx);
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("rows_of checked the rank") = k;
        Ok((CpuStorage::F32(dx), Shape::from(dims)))
    }
}

/// `dW = dyᵀ x`: `(.., n)` and `(.., k)` with the same rows, giving `(n, k)`.
struct WeightGrad;

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "m31r-linear-dw"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dy, x) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let ((m, n), (xm, k)) = (rows_of(l1)?, rows_of(l2)?);
        if xm != m {
            candle_core::bail!("linear dW: gradient {:?} against input {:?}", l1.dims(), l2.dims());
        }
        let mut dw = vec![0f32; n * k];
        // dyᵀ (n × m): element (i, j) is dy[j][i].
        let a = Operand { ptr: dy.as_ptr(), row: 1, col: n };
        let b = Operand { ptr: x.as_ptr(), row: k, col: 1 };
        gemm_pool(n, k, m, a, b, &mut dw);
        Ok((CpuStorage::F32(dw), Shape::from((n, k))))
    }
}

/// `a · b` (or `a · bᵀ` when `transpose_b`) for every matrix of a batch: `a` `(.., m, k)`, `b`
/// `(.., k, n)` (or `(.., n, k)`), the leading dimensions equal; differentiable in both. The
/// batch is shared out over the pool, one single-threaded GEMM per matrix. Composed candle ops
/// off the CPU or for other dtypes.
pub fn batched_matmul(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Tensor> {
    if !(fused(a) && fused(b)) {
        return if transpose_b { a.matmul(&b.t()?) } else { a.matmul(b) };
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Batched { ta: false, tb: transpose_b })
}

/// `op(a) · op(b)` per batch matrix, where `op` transposes when its flag is set.
struct Batched {
    ta: bool,
    tb: bool,
}

/// Batch size and the last two dimensions of a contiguous tensor of rank ≥ 2.
fn matrices(layout: &Layout) -> Result<(usize, usize, usize)> {
    let dims = layout.dims();
    if dims.len() < 2 {
        candle_core::bail!("batched matmul: {dims:?} is not a batch of matrices");
    }
    let (r, c) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    Ok((dims[..dims.len() - 2].iter().product(), r, c))
}

impl CustomOp2 for Batched {
    fn name(&self) -> &'static str {
        "m31r-batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let ((batch, ar, ac), (b_batch, br, bc)) = (matrices(l1)?, matrices(l2)?);
        let (m, k) = if self.ta { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if self.tb { (bc, br) } else { (br, bc) };
        if batch != b_batch
            || k != kb
            || l1.dims()[..l1.dims().len() - 2] != l2.dims()[..l2.dims().len() - 2]
        {
            candle_core::bail!(
                "batched matmul: {:?}{} against {:?}{}",
                l1.dims(),
                if self.ta { "ᵀ" } else { "" },
                l2.dims(),
                if self.tb { "ᵀ" } else { "" }
            );
        }
        // Row-major (r × c) storage read as op(·): element (i, j) at i·row + j·col.
        let strides = |t: bool, c: usize| if t { (1, c) } else { (c, 1) };
        let ((a_row, a_col), (b_row, b_col)) = (strides(self.ta, ac), strides(self.tb, bc));
        let mut y = vec![0f32; batch * m * n];
        let out = Out::new(&mut y);
        let (a_ptr, b_ptr) = (a.as_ptr() as usize, b.as_ptr() as usize);
        let inline = batch * m * n * k < 1 << 16;
        // Items are (matrix, block of output rows): whole matrices when the batch alone keeps
        // every thread busy, else row blocks (a multiple of 16) so that a lone matrix (Muon's
        // Newton–Schulz products) is shared out too.
        let wanted = pool::max_threads() * 2;
        let block = if batch >= wanted {
            m
        } else {
            m.div_ceil(wanted.div_ceil(batch)).div_ceil(16).max(1) * 16
        }
        .min(m.max(1));
        let per_matrix = m.div_ceil(block).max(1);
        pool::run(batch * per_matrix, inline, |range| {
            for item in range {
                let (i, first) = (item / per_matrix, (item % per_matrix) * block);
                let rows = block.min(m - first);
                if rows == 0 {
                    continue;
                }
                // SAFETY: matrix i of each operand is the i-th block of ar·ac (bc·br) values,
                // read within its extent (rows first.. of op(a) start first·a_row in); this item
                // alone writes rows first..first + rows of matrix i of the output.
                unsafe {
                    gemm_into(
                        (rows, n, k),
                        out.as_mut_ptr().add(i * m * n + first * n),
                        n,
                        (a_ptr as *const f32).add(i * ar * ac + first * a_row),
                        (a_row, a_col),
                        (b_ptr as *const f32).add(i * br * bc),
                        (b_row, b_col),
                        1.0,
                    );
                }
            }
        });
        let mut dims = l1.dims().to_vec();
        let rank = dims.len();
        (dims[rank - 2], dims[rank - 1]) = (m, n);
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        dc: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // C = op(A)·op(B): dop(A) = dC·op(B)ᵀ and dop(B) = op(A)ᵀ·dC, each transposed back when
        // the operand was read transposed.
        let dc = dc.contiguous()?;
        let (ta, tb) = (self.ta, self.tb);
        let da = if ta {
            b.apply_op2_no_bwd(&dc, &Batched { ta: tb, tb: true })?
        } else {
            dc.apply_op2_no_bwd(b, &Batched { ta: false, tb: !tb })?
        };
        let db = if tb {
            dc.apply_op2_no_bwd(a, &Batched { ta: true, tb: ta })?
        } else {
            a.apply_op2_no_bwd(&dc, &Batched { ta: !ta, tb: false })?
        };
        Ok((Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    //! The kernel against candle's matmul in f64.

    use super::*;
    use crate::testing::{check, random};

    #[test]
    fn linear_matches_composed_in_value_and_gradients() {
        // A batch of sequences (split by rows), a wide output (split by columns), odd sizes, and
        // one too small for the pool.
        for (x_shape, n) in [(vec![4, 70, 48], 40), (vec![9, 33], 200), (vec![3, 5], 7)] {
            let k = *x_shape.last().unwrap();
            let x = random(&x_shape, 1, 1.0);
            let w = random(&[n, k], 2, 0.3);
            check(&[x, w], |t| linear(&t[0], &t[1]).unwrap(), 2e-5);
        }
    }

    #[test]
    fn batched_matmul_matches_composed_in_value_and_gradients() {
        for transpose_b in [false, true] {
            let a = random(&[2, 3, 37, 16], 5, 1.0);
            let b = if transpose_b {
                random(&[2, 3, 29, 16], 6, 1.0)
            } else {
                random(&[2, 3, 16, 29], 6, 1.0)
            };
            check(&[a, b], |t| batched_matmul(&t[0], &t[1], transpose_b).unwrap(), 2e-5);
        }
        // The backward of a transposed first operand, through the op's own backward rules.
        let a = random(&[4, 16, 9], 7, 1.0);
        let b = random(&[4, 16, 11], 8, 1.0);
        check(
            &[a, b],
            |t| {
                if crate::train::fused(&t[0]) {
                    t[0].apply_op2(&t[1], Batched { ta: true, tb: false }).unwrap()
                } else {
                    t[0].transpose(1, 2).unwrap().matmul(&t[1]).unwrap()
                }
            },
            2e-5,
        );
        // A lone matrix, shared out by row blocks.
        let a = random(&[70, 24], 9, 1.0);
        let b = random(&[24, 33], 10, 1.0);
        check(&[a, b], |t| batched_matmul(&t[0], &t[1], false).unwrap(), 2e-5);
        let err = batched_matmul(&random(&[2, 4, 5], 1, 1.0), &random(&[3, 5, 4], 2, 1.0), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 4, 5]") && err.contains("[3, 5, 4]"), "{err}");
    }

    #[test]
    fn results_do_not_depend_on_the_run() {
        let x = random(&[2, 300, 64], 3, 1.0);
        let w = random(&[96, 64], 4, 0.2);
        let a = linear(&x, &w).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = linear(&x, &w).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
    }
}
