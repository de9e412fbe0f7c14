//! Attention of a chunk of any length (prefill): per (head, block of queries), the scores are
//! one GEMM against the head's keys, then a masked softmax, then one GEMM against its values.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{Attention, CacheRows};
use crate::pool::{self, Out};
use crate::storage::data;
use crate::vec::exp_shifted;

/// Queries per work item of [`attention_prefill`]: one GEMM tile of scores per (head, block).
pub(crate) const PREFILL_QUERIES: usize = 64;

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
            let (ko, vo) = (Out::new(&mut kf), Out::new(&mut vf));
            pool::run(2 * kv_heads, false, |range| {
                for item in range {
                    let (which, head) = (item / kv_heads, item % kv_heads);
                    let (rows, slots) = if which == 0 { (k, &ko) } else { (v, &vo) };
                    // SAFETY: each item fills its own slot.
                    unsafe {
                        slots.part(head..head + 1)[0] = rows.head_f32(head, capacity, kv_len, dim)
                    };
                }
            });
        }
        let mut y = vec![0f32; q.len()];
        let out = Out::new(&mut y);
        let blocks = seq.div_ceil(PREFILL_QUERIES);
        let row_stride = (heads * dim) as isize;
        pool::run(heads * blocks, false, |range| {
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
