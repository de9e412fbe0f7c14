//! Fused CPU kernels with hand-written backward passes for the training path: RMSNorm, RoPE,
//! causal softmax, SwiGLU and token cross-entropy.
//!
//! candle's fused CPU ops (`rms_norm`, `rope_thd`, `softmax_last_dim`) have no backward pass, so a
//! differentiable forward would otherwise compose each of them from 4–8 elementwise and broadcast
//! ops, every one a full pass over memory and a fresh allocation, with as many again in backward.
//! Each op here is one pass forward and one pass backward, run on candle's own thread pool, on
//! contiguous f32 tensors. Work is split into fixed row blocks and reductions across rows are summed
//! in block order, so results do not depend on the thread count or on scheduling (bit-identical
//! runs). On other devices and dtypes every function falls back to the composed candle ops, which
//! are also the reference the tests hold these kernels to.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, InplaceOp2, InplaceOp3, Layout, Result,
    Shape, Tensor,
};

/// Whether the fused kernels apply to `t`.
fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The contiguous f32 data of an op input.
pub(crate) fn data<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let all = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => candle_core::bail!(
            "{op}: expects a contiguous input, got strides {:?}",
            layout.stride()
        ),
    }
}

/// An output buffer that parallel workers fill in disjoint parts.
pub(crate) struct Out {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: workers only reach the buffer through `Out::part`, whose callers guarantee the parts they
// take are disjoint; the buffer outlives the parallel section (it is borrowed for its duration).
unsafe impl Sync for Out {}

impl Out {
    pub(crate) fn new(buffer: &mut [f32]) -> Self {
        Self { ptr: buffer.as_mut_ptr(), len: buffer.len() }
    }

    /// The start of the buffer, for writers that address it with strides (each must keep to
    /// elements no other worker writes).
    pub(crate) fn as_mut_ptr(&self) -> *mut f32 {
        self.ptr
    }

    /// Elements `range` of the buffer.
    ///
    /// # Safety
    /// No two live parts may overlap.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn part(&self, range: Range<usize>) -> &mut [f32] {
        assert!(range.start <= range.end && range.end <= self.len, "part out of bounds");
        // SAFETY: in bounds (checked above) and, by the caller's contract, not aliased.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

/// Rows per work item: large enough to amortise scheduling, small enough to balance two cores.
const BLOCK_ROWS: usize = 16;

/// Calls `f(block, rows)` for every block of `BLOCK_ROWS` rows out of `n_rows`, in parallel on
/// candle's thread pool. Each block index is handed out exactly once.
fn par_blocks(n_rows: usize, f: impl Fn(usize, Range<usize>) + Sync) {
    let blocks = n_rows.div_ceil(BLOCK_ROWS);
    if blocks <= 1 {
        // One block (a decode step's row): waking the pool would cost more than the work.
        f(0, 0..n_rows);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(blocks, |range| {
        for block in range {
            let start = block * BLOCK_ROWS;
            f(block, start..n_rows.min(start + BLOCK_ROWS));
        }
    });
}

/// Dot product with eight independent accumulators, so it vectorises (the order is fixed, so the
/// result is the same on every run).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `x / sqrt(mean(x²) + eps) * weight` over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused(x) {
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        return x.broadcast_div(&(mean_square + eps)?.sqrt()?)?.broadcast_mul(weight);
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (dot(row, row) / row.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "m31r-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let n = w.len();
        if l1.dims().last() != Some(&n) {
            candle_core::bail!("rms_norm: weight {n} does not match input {:?}", l1.dims());
        }
        let mut y = vec![0f32; x.len()];
        let out = Out::new(&mut y);
        par_blocks(x.len() / n, |_, rows| {
            // SAFETY: blocks are disjoint row ranges.
            let y = unsafe { out.part(rows.start * n..rows.end * n) };
            for (xr, yr) in
                x[rows.start * n..rows.end * n].chunks_exact(n).zip(y.chunks_exact_mut(n))
            {
                let r = inv_rms(xr, self.eps);
                for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                    *yv = xv * r * wv;
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        let rows = x.elem_count() / n;
        // One output: rows of dx, then one partial dw row per block (summed below, in order).
        let both = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows, rows.div_ceil(BLOCK_ROWS))?.sum(0)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "m31r-rms-norm-bwd"
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
        let name = self.name();
        let (x, w, g) = (data(s1, l1, name)?, data(s2, l2, name)?, data(s3, l3, name)?);
        let n = w.len();
        let rows = x.len() / n;
        let blocks = rows.div_ceil(BLOCK_ROWS);
        let mut out_buf = vec![0f32; (rows + blocks) * n];
        let out = Out::new(&mut out_buf);
        par_blocks(rows, |block, range| {
            // SAFETY: the dx rows of a block and its dw partial row are disjoint from every other
            // block's.
            let dx = unsafe { out.part(range.start * n..range.end * n) };
            let dw = unsafe { out.part((rows + block) * n..(rows + block + 1) * n) };
            let mut gw = vec![0f32; n];
            for ((xr, gr), dxr) in x[range.start * n..range.end * n]
                .chunks_exact(n)
                .zip(g[range.start * n..range.end * n].chunks_exact(n))
                .zip(dx.chunks_exact_mut(n))
            {
                let r = inv_rms(xr, self.eps);
                for ((gwv, gv), wv) in gw.iter_mut().zip(gr).zip(w) {
                    *gwv = gv * wv;
                }
                // y = w·x·r, r = (mean x² + eps)^-½  ⇒  dx = r·(g·w) − x·r³·mean(g·w·x).
                let c = dot(&gw, xr) * r * r * r / n as f32;
                for ((d, gwv), xv) in dxr.iter_mut().zip(&gw).zip(xr) {
                    *d = r * gwv - c * xv;
                }
                for ((acc, gv), xv) in dw.iter_mut().zip(gr).zip(xr) {
                    *acc += gv * xv * r;
                }
            }
        });
        Ok((CpuStorage::F32(out_buf), Shape::from((rows + blocks, n))))
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Non-interleaved ("rotate half") rotary embedding of `x` `(batch, seq, heads, head_dim)` with
/// tables `cos`, `sin` `(seq, head_dim / 2)` (already cut to the positions of `x`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        let (_, seq, _, dim) = x.dims4()?;
        let cos = Tensor::cat(&[cos, cos], D::Minus1)?.reshape((1, seq, 1, dim))?;
        let sin = Tensor::cat(&[sin, sin], D::Minus1)?.reshape((1, seq, 1, dim))?;
        let first = x.narrow(D::Minus1, 0, dim / 2)?;
        let second = x.narrow(D::Minus1, dim / 2, dim / 2)?;
        let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
        return x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?;
    }
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { inverse: false })
}

struct Rope {
    /// Rotate by the negative angle (the backward pass of the forward rotation).
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "m31r-rope"
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
        let name = self.name();
        let (x, cos, sin) = (data(s1, l1, name)?, data(s2, l2, name)?, data(s3, l3, name)?);
        let (batch, seq, heads, dim) = l1.shape().dims4()?;
        let half = dim / 2;
        if cos.len() != seq * half || sin.len() != seq * half {
            candle_core::bail!("rope: tables of {} values for {seq} positions × {half}", cos.len());
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let row = heads * dim;
        let mut y = vec![0f32; x.len()];
        let out = Out::new(&mut y);
        par_blocks(batch * seq, |_, rows| {
            // SAFETY: blocks are disjoint (batch, position) rows.
            let y = unsafe { out.part(rows.start * row..rows.end * row) };
            for (r, yr) in rows.clone().zip(y.chunks_exact_mut(row)) {
                let pos = r % seq;
                let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                for (xh, yh) in x[r * row..][..row].chunks_exact(dim).zip(yr.chunks_exact_mut(dim))
                {
                    let (x1, x2) = xh.split_at(half);
                    let (y1, y2) = yh.split_at_mut(half);
                    for i in 0..half {
                        let s = sign * s[i];
                        y1[i] = x1[i] * c[i] - x2[i] * s;
                        y2[i] = x2[i] * c[i] + x1[i] * s;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // A rotation's adjoint is the rotation by the opposite angle.
        let dx = g.contiguous()?.apply_op3_no_bwd(cos, sin, &Rope { inverse: !self.inverse })?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// Causal softmax

/// `softmax(scale · scores + causal mask)` over the last dimension of `scores`
/// `(..., seq, kv_len)`, where query `i` sits at position `kv_len − seq + i` and sees keys
/// `0..=kv_len − seq + i`. Masked probabilities are exactly zero.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let (seq, kv_len) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    if kv_len < seq {
        candle_core::bail!("causal_softmax: {seq} queries but only {kv_len} keys");
    }
    if !fused(scores) {
        let start = kv_len - seq;
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| {
                (0..kv_len).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect();
        let mask =
            Tensor::from_vec(mask, (seq, kv_len), scores.device())?.to_dtype(scores.dtype())?;
        return candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&mask)?, D::Minus1);
    }
    scores.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 })
}

struct CausalSoftmax {
    scale: f32,
}

/// Keys visible to row `r` of a `(…, seq, kv_len)` score tensor.
fn visible(r: usize, seq: usize, kv_len: usize) -> usize {
    kv_len - seq + r % seq + 1
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "m31r-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = data(storage, layout, self.name())?;
        let dims = layout.dims();
        let (seq, kv_len) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mut p = vec![0f32; s.len()];
        let out = Out::new(&mut p);
        par_blocks(s.len() / kv_len, |_, rows| {
            // SAFETY: blocks are disjoint rows.
            let p = unsafe { out.part(rows.start * kv_len..rows.end * kv_len) };
            for (r, pr) in rows.clone().zip(p.chunks_exact_mut(kv_len)) {
                let n = visible(r, seq, kv_len);
                let (sr, pr) = (&s[r * kv_len..][..n], &mut pr[..n]);
                let max = sr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * self.scale;
                let mut sum = 0f32;
                for (pv, sv) in pr.iter_mut().zip(sr) {
                    *pv = (sv * self.scale - max).exp();
                    sum += *pv;
                }
                let inv = 1.0 / sum;
                pr.iter_mut().for_each(|v| *v *= inv);
            }
        });
        Ok((CpuStorage::F32(p), layout.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(&g.contiguous()?, &CausalSoftmaxBwd { scale: self.scale })?))
    }
}

struct CausalSoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "m31r-causal-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (p, g) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let dims = l1.dims();
        let (seq, kv_len) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mut ds = vec![0f32; p.len()];
        let out = Out::new(&mut ds);
        par_blocks(p.len() / kv_len, |_, rows| {
            // SAFETY: blocks are disjoint rows.
            let ds = unsafe { out.part(rows.start * kv_len..rows.end * kv_len) };
            for (r, dr) in rows.clone().zip(ds.chunks_exact_mut(kv_len)) {
                let n = visible(r, seq, kv_len);
                let (pr, gr) = (&p[r * kv_len..][..n], &g[r * kv_len..][..n]);
                // dS = scale · P ⊙ (dP − Σ dP ⊙ P); masked entries have P = 0.
                let inner = dot(pr, gr);
                for ((d, pv), gv) in dr[..n].iter_mut().zip(pr).zip(gr) {
                    *d = self.scale * pv * (gv - inner);
                }
            }
        });
        Ok((CpuStorage::F32(ds), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) · up`, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !fused(gate) {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

/// Rows of this many elements are the parallel work unit of the elementwise kernels.
const ELEMENT_ROW: usize = 4096;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "m31r-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        if a.len() != b.len() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", l1.dims(), l2.dims());
        }
        let mut y = vec![0f32; a.len()];
        let out = Out::new(&mut y);
        par_blocks(a.len().div_ceil(ELEMENT_ROW), |_, rows| {
            let span = rows.start * ELEMENT_ROW..(rows.end * ELEMENT_ROW).min(a.len());
            // SAFETY: blocks are disjoint spans.
            let y = unsafe { out.part(span.clone()) };
            for ((yv, av), bv) in y.iter_mut().zip(&a[span.clone()]).zip(&b[span]) {
                *yv = av * sigmoid(*av) * bv;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &g.contiguous()?, &SwiGluBwd)?;
        let d_gate = both.narrow(0, 0, 1)?.reshape(gate.shape())?;
        let d_up = both.narrow(0, 1, 1)?.reshape(up.shape())?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "m31r-swiglu-bwd"
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
        let name = self.name();
        let (a, b, g) = (data(s1, l1, name)?, data(s2, l2, name)?, data(s3, l3, name)?);
        let len = a.len();
        let mut both = vec![0f32; 2 * len];
        let out = Out::new(&mut both);
        par_blocks(len.div_ceil(ELEMENT_ROW), |_, rows| {
            let span = rows.start * ELEMENT_ROW..(rows.end * ELEMENT_ROW).min(len);
            // SAFETY: blocks are disjoint spans of each half.
            let da = unsafe { out.part(span.clone()) };
            let db = unsafe { out.part(len + span.start..len + span.end) };
            for i in 0..span.len() {
                let (av, bv, gv) = (a[span.start + i], b[span.start + i], g[span.start + i]);
                let sg = sigmoid(av);
                // silu'(a) = σ(a)·(1 + a·(1 − σ(a))).
                da[i] = gv * bv * sg * (1.0 + av * (1.0 - sg));
                db[i] = gv * av * sg;
            }
        });
        Ok((CpuStorage::F32(both), Shape::from((2, len))))
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

/// Per-token negative log-likelihood `(n,)` of `targets` under `logits` `(n, vocab)`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross_entropy: {} targets for {n} rows of logits", targets.len());
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross_entropy: target id {t} outside the vocabulary of {vocab}");
    }
    if !fused(logits) {
        let target = Tensor::from_slice(targets, (n, 1), logits.device())?;
        return candle_nn::ops::log_softmax(logits, D::Minus1)?
            .gather(&target, D::Minus1)?
            .squeeze(D::Minus1)?
            .neg();
    }
    logits.contiguous()?.apply_op1(CrossEntropy { targets: Arc::new(targets.to_vec()) })
}

struct CrossEntropy {
    targets: Arc<Vec<u32>>,
}

/// `log Σ exp(row)`, computed stably.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "m31r-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = data(storage, layout, self.name())?;
        let n = self.targets.len();
        let vocab = logits.len() / n.max(1);
        let mut nll = vec![0f32; n];
        let out = Out::new(&mut nll);
        par_blocks(n, |_, rows| {
            // SAFETY: blocks are disjoint rows.
            let nll = unsafe { out.part(rows.clone()) };
            for (r, v) in rows.zip(nll) {
                let row = &logits[r * vocab..][..vocab];
                *v = log_sum_exp(row) - row[self.targets[r] as usize];
            }
        });
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, _nll: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = CrossEntropyBwd { targets: self.targets.clone() };
        Ok(Some(logits.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

struct CrossEntropyBwd {
    targets: Arc<Vec<u32>>,
}

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "m31r-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, g) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let n = self.targets.len();
        let vocab = logits.len() / n.max(1);
        let mut d = vec![0f32; logits.len()];
        let out = Out::new(&mut d);
        par_blocks(n, |_, rows| {
            // SAFETY: blocks are disjoint rows.
            let d = unsafe { out.part(rows.start * vocab..rows.end * vocab) };
            for (r, dr) in rows.clone().zip(d.chunks_exact_mut(vocab)) {
                // d nll / d logits = softmax − one_hot(target), scaled by the incoming gradient.
                let row = &logits[r * vocab..][..vocab];
                let lse = log_sum_exp(row);
                for (dv, lv) in dr.iter_mut().zip(row) {
                    *dv = g[r] * (lv - lse).exp();
                }
                dr[self.targets[r] as usize] -= g[r];
            }
        });
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW

/// Hyper-parameters of one AdamW update.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight decay (already zero for tensors that are not decayed).
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
    /// 1 − β₁ᵗ and 1 − β₂ᵗ, the bias corrections of step t.
    pub corrections: (f64, f64),
    /// Factor applied to the gradient first (global-norm clipping).
    pub grad_scale: f64,
}

/// One AdamW update of `theta` with moments `m`, `v` from gradient `g`, all in place: three
/// elementwise passes with no allocation on CPU (the composed form takes a dozen ops, each
/// allocating a parameter-sized tensor). Returns the new tensors on other devices, where it runs
/// the composed ops; the caller stores them.
pub fn adamw(
    theta: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    step: &AdamWStep,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let in_place = [theta, m, v, g].iter().all(|t| fused(t) && t.is_contiguous());
    if !in_place {
        let g = (g * step.grad_scale)?;
        let m = ((m * step.beta1)? + (&g * (1.0 - step.beta1))?)?;
        let v = ((v * step.beta2)? + (g.sqr()? * (1.0 - step.beta2))?)?;
        let update =
            ((&m / step.corrections.0)? / ((&v / step.corrections.1)?.sqrt()? + step.eps)?)?;
        let decayed = (theta * (1.0 - step.lr * step.weight_decay))?;
        return Ok(Some(((decayed - (update * step.lr)?)?, m, v)));
    }
    m.inplace_op2(
        g,
        &Moment { beta: step.beta1 as f32, scale: step.grad_scale as f32, square: false },
    )?;
    v.inplace_op2(
        g,
        &Moment { beta: step.beta2 as f32, scale: step.grad_scale as f32, square: true },
    )?;
    theta.inplace_op3(m, v, &AdamWUpdate(*step))?;
    Ok(None)
}

/// Splits `dst` into spans of [`ELEMENT_ROW`] and runs `f(span, dst part)` in parallel.
fn par_spans_mut(dst: &mut [f32], f: impl Fn(Range<usize>, &mut [f32]) + Sync) {
    let len = dst.len();
    let out = Out::new(dst);
    par_blocks(len.div_ceil(ELEMENT_ROW), |_, rows| {
        let span = rows.start * ELEMENT_ROW..(rows.end * ELEMENT_ROW).min(len);
        // SAFETY: blocks are disjoint spans.
        f(span.clone(), unsafe { out.part(span) });
    });
}

fn data_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let (start, end) = match layout.contiguous_offsets() {
        Some(offsets) => offsets,
        None => candle_core::bail!("{op}: expects a contiguous tensor"),
    };
    match storage {
        CpuStorage::F32(all) => Ok(&mut all[start..end]),
        _ => candle_core::bail!("{op}: expects an f32 tensor"),
    }
}

/// `m ← β·m + (1 − β)·(s·g)` (or `(s·g)²` for the second moment).
struct Moment {
    beta: f32,
    scale: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "m31r-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = data(s2, l2, self.name())?;
        let m = data_mut(s1, l1, self.name())?;
        if m.len() != g.len() {
            candle_core::bail!("adamw: moment {:?} and gradient {:?} differ", l1.dims(), l2.dims());
        }
        par_spans_mut(m, |span, m| {
            for (mv, gv) in m.iter_mut().zip(&g[span]) {
                let x = gv * self.scale;
                let x = if self.square { x * x } else { x };
                *mv = self.beta * *mv + (1.0 - self.beta) * x;
            }
        });
        Ok(())
    }
}

/// `θ ← θ·(1 − lr·wd) − lr·m̂ / (√v̂ + ε)`.
struct AdamWUpdate(AdamWStep);

impl InplaceOp3 for AdamWUpdate {
    fn name(&self) -> &'static str {
        "m31r-adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let name = self.name();
        let (m, v) = (data(s2, l2, name)?, data(s3, l3, name)?);
        let theta = data_mut(s1, l1, name)?;
        if theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("adamw: parameter {:?} and moments differ", l1.dims());
        }
        let s = &self.0;
        let decay = (1.0 - s.lr * s.weight_decay) as f32;
        let (c1, c2) = (1.0 / s.corrections.0 as f32, 1.0 / s.corrections.1 as f32);
        let (lr, eps) = (s.lr as f32, s.eps as f32);
        par_spans_mut(theta, |span, theta| {
            for ((t, mv), vv) in theta.iter_mut().zip(&m[span.clone()]).zip(&v[span]) {
                *t = *t * decay - lr * (mv * c1) / ((vv * c2).sqrt() + eps);
            }
        });
        Ok(())
    }
}

/// Σ x² of a tensor, in f64, in a fixed order (fused on CPU f32).
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    if !(fused(t) && t.is_contiguous()) {
        return t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>();
    }
    let (storage, layout) = t.storage_and_layout();
    let values = match &*storage {
        candle_core::Storage::Cpu(cpu) => data(cpu, layout, "sum_squares")?,
        _ => candle_core::bail!("sum_squares: expects a CPU tensor"),
    };
    let blocks = values.len().div_ceil(ELEMENT_ROW * BLOCK_ROWS);
    let mut partial = vec![0f32; blocks];
    let out = Out::new(&mut partial);
    par_blocks(values.len().div_ceil(ELEMENT_ROW), |block, rows| {
        let span = rows.start * ELEMENT_ROW..(rows.end * ELEMENT_ROW).min(values.len());
        let chunk = &values[span];
        // SAFETY: one partial per block.
        let slot = unsafe { out.part(block..block + 1) };
        slot[0] = dot(chunk, chunk);
    });
    Ok(partial.iter().map(|&p| f64::from(p)).sum())
}

#[cfg(test)]
mod tests {
    //! Each kernel against the composed candle ops it replaces: values and gradients.

    use candle_core::{Device, Var};

    use super::*;
    use crate::rng::Rng;

    fn random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut v = vec![0f32; n];
        Rng::new(seed).fill_normal(&mut v, scale);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Runs `f` on CPU f32 (fused) and on the same values in f64 (composed), with the same
    /// upstream gradient, and compares values and input gradients.
    fn check(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, tol: f32) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let vars64: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let ts64: Vec<Tensor> = vars64.iter().map(|v| v.as_tensor().clone()).collect();
        let (y, y64) = (f(&ts), f(&ts64));
        assert_eq!(y.dtype(), DType::F32);
        let diff = max_diff(&y, &y64.to_dtype(DType::F32).unwrap());
        assert!(diff < tol, "forward differs by {diff}");
        let up = random(y.dims(), 99, 1.0);
        let loss = (&y * &up).unwrap().sum_all().unwrap();
        let loss64 = (&y64 * &up.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap();
        let (g, g64) = (loss.backward().unwrap(), loss64.backward().unwrap());
        for (i, (v, v64)) in vars.iter().zip(&vars64).enumerate() {
            let a = g.get(v.as_tensor()).expect("gradient");
            let b = g64.get(v64.as_tensor()).expect("gradient").to_dtype(DType::F32).unwrap();
            let scale =
                b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let diff = max_diff(a, &b);
            assert!(
                diff <= tol * scale.max(1.0),
                "gradient of input {i} differs by {diff} (scale {scale})"
            );
        }
    }

    #[test]
    fn rms_norm_matches_composed() {
        let x = random(&[3, 37, 24], 1, 1.5);
        let w = (random(&[24], 2, 0.3) + 1.0).unwrap();
        check(&[x, w], |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(), 2e-5);
    }

    #[test]
    fn rope_matches_composed_and_inverts() {
        let x = random(&[2, 19, 3, 16], 3, 1.0);
        let angles: Vec<f32> = (0..19 * 8).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let a = Tensor::from_vec(angles, (19, 8), &Device::Cpu).unwrap();
        let (cos, sin) = (a.cos().unwrap(), a.sin().unwrap());
        check(
            std::slice::from_ref(&x),
            |t| {
                let (c, s) =
                    (cos.to_dtype(t[0].dtype()).unwrap(), sin.to_dtype(t[0].dtype()).unwrap());
                rope(&t[0], &c, &s).unwrap()
            },
            2e-6,
        );
        let back = rope(&rope(&x, &cos, &sin).unwrap(), &cos, &sin.neg().unwrap()).unwrap();
        assert!(max_diff(&back, &x) < 1e-5);
    }

    #[test]
    fn causal_softmax_matches_composed_with_and_without_offset() {
        for (seq, kv) in [(21, 21), (5, 33), (1, 9)] {
            let s = random(&[2, 3, seq, kv], 4, 3.0);
            check(std::slice::from_ref(&s), |t| causal_softmax(&t[0], 0.25).unwrap(), 2e-6);
            // Masked entries are exactly zero.
            let p =
                causal_softmax(&s, 0.25).unwrap().flatten_to(2).unwrap().to_vec2::<f32>().unwrap();
            for (r, row) in p.iter().enumerate() {
                let i = r % seq;
                assert!(row[kv - seq + i + 1..].iter().all(|&v| v == 0.0));
            }
        }
    }

    #[test]
    fn swiglu_matches_composed() {
        let a = random(&[7, 3000], 5, 2.0);
        let b = random(&[7, 3000], 6, 1.0);
        check(&[a, b], |t| swiglu(&t[0], &t[1]).unwrap(), 2e-6);
    }

    #[test]
    fn cross_entropy_matches_composed() {
        let logits = random(&[37, 50], 7, 4.0);
        let targets: Vec<u32> = (0..37).map(|i| (i * 7 % 50) as u32).collect();
        check(&[logits], |t| cross_entropy(&t[0], &targets).unwrap(), 2e-5);
        let bad = cross_entropy(&random(&[2, 5], 1, 1.0), &[0, 5]).unwrap_err().to_string();
        assert!(bad.contains("target id 5"), "{bad}");
    }

    #[test]
    fn adamw_in_place_matches_composed() {
        let theta = random(&[33, 70], 10, 1.0);
        let (m, v) = (random(&[33, 70], 11, 0.1), random(&[33, 70], 12, 0.1).sqr().unwrap());
        let g = random(&[33, 70], 13, 1.0);
        let step = AdamWStep {
            lr: 0.01,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            corrections: (0.19, 0.0975),
            grad_scale: 0.5,
        };
        // The composed path, taken for f64 tensors.
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let (t2, m2, v2) =
            adamw(&f64s(&theta), &f64s(&m), &f64s(&v), &f64s(&g), &step).unwrap().unwrap();
        let (t1, m1, v1) = (theta.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
        assert!(adamw(&t1, &m1, &v1, &g, &step).unwrap().is_none(), "CPU f32 runs in place");
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert!(max_diff(&m1, &f32s(&m2)) < 1e-6);
        assert!(max_diff(&v1, &f32s(&v2)) < 1e-6);
        assert!(max_diff(&t1, &f32s(&t2)) < 1e-5);
        assert!(max_diff(&t1, &theta) > 1e-3, "the parameter moved");
    }

    #[test]
    fn sum_squares_matches_composed() {
        let t = random(&[300, 1000], 14, 1.0);
        let expect: f64 =
            t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        let got = sum_squares(&t).unwrap();
        assert!((got - expect).abs() / expect < 1e-6, "{got} vs {expect}");
    }

    #[test]
    fn kernels_are_deterministic() {
        let x = random(&[64, 48], 8, 1.0);
        let w = random(&[48], 9, 1.0);
        let run = || {
            let v = Var::from_tensor(&x).unwrap();
            let y = rms_norm(v.as_tensor(), &w, 1e-5).unwrap();
            let g = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
            g.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
        };
        assert_eq!(run(), run());
    }
}
