//! Attention of at most [`MAX_QUERIES`] new queries: per (query, head), its scores, softmax and
//! weighted sum of values, reading the head's cached positions as one contiguous run.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{Attention, CacheRows, MAX_QUERIES};
use crate::pool::{self, Out};
use crate::storage::data;
use crate::vec::exp_shifted;

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
        pool::run(seq * heads, bytes < pool::INLINE_BYTES, |range| {
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

/// One head's attention for new positions whose keys and values are not in the cache yet (the
/// step program of `m31r_model`, which appends them once its run is over): the queries
/// (`queries`, rows of `dim` values) are the last of the new positions, whose keys and values
/// `new_keys`/`new_values` hold (rows of `dim`, in the cache's precision; earlier new positions
/// first, as a decode run's earlier steps give them). Query `i` of `n` sees the head's `cached`
/// positions of `keys`/`values` from element `base` on, then new positions up to its own,
/// `0..=new − n + i`. The arithmetic, in order, is [`attention`]'s once the new rows are cached,
/// so both give the same bits. `scores` is scratch; `out` takes the queries' rows.
#[allow(clippy::too_many_arguments)]
pub fn attend_new(
    (keys, values): (CacheRows<'_>, CacheRows<'_>),
    base: usize,
    cached: usize,
    (new_keys, new_values): (CacheRows<'_>, CacheRows<'_>),
    dim: usize,
    queries: &[f32],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let n = queries.len() / dim.max(1);
    let new = new_keys.len() / dim.max(1);
    assert_eq!(out.len(), queries.len(), "attend_new: {n} queries of {dim}");
    assert!(
        new >= n && new_values.len() == new_keys.len(),
        "attend_new: {new} new rows, {n} queries"
    );
    scores.resize(cached + new, 0.0);
    for (i, (query, acc)) in queries.chunks(dim).zip(out.chunks_mut(dim)).enumerate() {
        let visible = cached + new - n + i + 1;
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores[..visible].iter_mut().enumerate() {
            *s = if j < cached {
                keys.dot(base + j * dim, query)
            } else {
                new_keys.dot((j - cached) * dim, query)
            } * scale;
            max = max.max(*s);
        }
        let total = exp_shifted(&mut scores[..visible], max);
        acc.fill(0.0);
        for (j, p) in scores[..visible].iter().enumerate() {
            if j < cached {
                values.axpy(base + j * dim, *p, acc);
            } else {
                new_values.axpy((j - cached) * dim, *p, acc);
            }
        }
        let inv = 1.0 / total;
        acc.iter_mut().for_each(|a| *a *= inv);
    }
}
