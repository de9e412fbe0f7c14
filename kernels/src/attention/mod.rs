//! Causal attention of new queries over a layer's head-major KV cache `(1, kv_heads, capacity,
//! dim)` (f32 or f16): [`decode`] for the few queries of a decode step or a keystroke (one pass
//! over the cache per query and head), [`prefill`] for a chunk of any length (two GEMMs per head
//! and block of queries). Both read the cache in place and accumulate in f32.

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};
use half::f16;

use crate::vec::{axpy_f16, axpy_f32, dot_f16, dot_f32};

pub mod decode;
pub mod prefill;

pub use decode::{attend_new, attention};
#[cfg(test)]
use prefill::PREFILL_QUERIES;
pub use prefill::attention_prefill;

/// The most new queries [`attention`] takes; longer chunks go to candle's flash attention.
pub const MAX_QUERIES: usize = 16;

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

/// One layer's cached keys or values as the attention kernel reads them (or new rows in the
/// cache's precision).
#[derive(Debug, Clone, Copy)]
pub enum CacheRows<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// f16 values.
    F16(&'a [f16]),
}

impl<'a> CacheRows<'a> {
    /// The values of a contiguous f32 or f16 CPU buffer; another dtype or layout is an error.
    pub fn of(storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("attention: non-contiguous cache".into()))?;
        match storage {
            CpuStorage::F32(v) => Ok(CacheRows::F32(&v[start..end])),
            CpuStorage::F16(v) => Ok(CacheRows::F16(&v[start..end])),
            _ => candle_core::bail!("attention: the cache must be f32 or f16"),
        }
    }

    /// Values held.
    pub fn len(self) -> usize {
        match self {
            CacheRows::F32(t) => t.len(),
            CacheRows::F16(t) => t.len(),
        }
    }

    /// Whether it holds no value.
    pub fn is_empty(self) -> bool {
        self.len() == 0
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

#[cfg(test)]
mod tests {
    //! The kernels against a plain softmax over the values the cache holds.

    use candle_core::Device;

    use super::*;
    use crate::testing::{close, values};

    type AttendFn = fn(&Tensor, &Tensor, &Tensor, usize, f32) -> Result<Option<Tensor>>;

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
