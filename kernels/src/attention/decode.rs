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

/// [`attention`] of one token's query `q` `(heads · dim)` into `y`, on slices: the decode step of
/// the model's single-token path (`m31r_model::transformer::Model`), which keeps activations out
/// of candle tensors.
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
