//! The CPU forward of a decode step or a keystroke's few new tokens (at most
//! [`gemv::MAX_ROWS`]) as a [`Program`] of the kernels' pool: per block five phases (q/k/v
//! projections; RoPE and attention per head; output projection and residual; gate/up projections
//! and SwiGLU; down projection and residual), then the final norm and LM head of the last row.
//!
//! Every pool thread runs the phases in order and claims their chunks; a chunk whose claimant the
//! OS has descheduled is computed again by a thread that would otherwise wait for it. No thread
//! hands out the work, so the forward advances whenever any of its threads runs: on a machine
//! whose cores are busy with other work that keeps the step near the fair share of two threads,
//! where a caller that handed out each section held everything up while it waited for a core.
//!
//! Each phase writes its own buffers, which later phases only read, and the small per-row work
//! (norms, Q8_0 quantization of an activation, RoPE of a head) is done by each thread for itself,
//! so a chunk's inputs are complete and fixed once its phase starts: computing it twice gives the
//! same bits, and the results do not depend on the thread count. The new keys and values go into
//! the cache after the program, by the caller; within it, attention reads them from the q/k/v
//! buffers. The arithmetic, in order, is the one the slice-based decode step always did, so a
//! forward gives the same logits on one thread or several.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Module, Tensor};
use half::f16;
use m31r_kernels::attention::{self, CacheRows};
use m31r_kernels::gemv;
use m31r_kernels::pool::{self, Program};
use m31r_kernels::quant::{Q8Row, WeightRows};

use super::block::rms_norm_row;
use super::cache::KvCache;
use super::rope::rope_rows;
use super::{Model, ModelError, Result};
use crate::quant::QLinear;

/// Phases per block.
const BLOCK_PHASES: usize = 5;
/// The phases of a block, in order.
const QKV: usize = 0;
const ATTENTION: usize = 1;
const OUTPUT: usize = 2;
const GATE_UP: usize = 3;
const DOWN: usize = 4;
/// Chunks a projection phase is cut into (about): enough that a stalled thread's chunk is a small
/// part of the phase, few enough that claiming and committing cost little next to the work.
const CHUNKS_PER_PHASE: usize = 16;
/// The fewest output rows in a chunk.
const MIN_CHUNK_ROWS: usize = 16;

/// A buffer that one phase writes (each part in one chunk's commit) and later phases read.
struct Buf(Box<[UnsafeCell<f32>]>);

// SAFETY: parts are written only in commits, which the runner serialises per chunk and whose
// chunks write disjoint parts; reads happen only in later phases, after the writing phase has
// committed in full (the runner's acquire of the phase's count orders them after the writes).
unsafe impl Sync for Buf {}

impl Buf {
    fn new(len: usize) -> Self {
        Self((0..len).map(|_| UnsafeCell::new(0.0)).collect())
    }

    fn filled(values: &[f32]) -> Self {
        Self(values.iter().map(|&v| UnsafeCell::new(v)).collect())
    }

    /// The whole buffer, to read.
    ///
    /// # Safety
    /// The phase that writes it has committed in full (or it was filled before the run).
    unsafe fn read(&self) -> &[f32] {
        // SAFETY: `UnsafeCell<f32>` has `f32`'s layout; no write is in flight (the contract).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<f32>(), self.0.len()) }
    }

    /// Writes `values` at `at`.
    ///
    /// # Safety
    /// Called from the commit of the one chunk that owns `at..at + values.len()`.
    unsafe fn write(&self, at: usize, values: &[f32]) {
        let cells = &self.0[at..at + values.len()];
        for (cell, v) in cells.iter().zip(values) {
            // SAFETY: this commit is the only access to these cells now (the contract).
            unsafe { *cell.get() = *v };
        }
    }
}

/// A weight view that the run's owners keep alive (see `Step::_keep`).
type Rows = WeightRows<'static>;

/// One block's weights as the step reads them.
struct BlockWeights {
    attn_norm: &'static [f32],
    ffn_norm: &'static [f32],
    /// q, k, v, o, gate, up, down.
    linears: [Rows; 7],
}

/// One block's buffers: each written by one phase.
struct BlockBuffers {
    /// q, then k, then v: `(rows, out)` each, before RoPE.
    qkv: Buf,
    /// Attention output `(rows, heads · head_dim)`.
    attended: Buf,
    /// After the attention residual.
    mid: Buf,
    /// SwiGLU of the gate and up projections `(rows, d_ff)`.
    gated: Buf,
    /// After the feed-forward residual: the next block's input.
    out: Buf,
    /// The new rows' keys (after RoPE) and values, `(rows, kv_heads · head_dim)` each: what the
    /// caller appends to the cache.
    keys: Buf,
    values: Buf,
}

/// Output rows of a projection phase, cut into chunks: `(weight, rows)` per chunk.
type Cuts = Vec<(usize, Range<usize>)>;

/// Cuts the outputs of weights with `outs` rows into chunks of about equal rows, each within one
/// weight.
fn cut(outs: &[usize]) -> Cuts {
    let total: usize = outs.iter().sum();
    let rows = total.div_ceil(CHUNKS_PER_PHASE).max(MIN_CHUNK_ROWS);
    outs.iter()
        .enumerate()
        .flat_map(|(w, &out)| {
            (0..out.div_ceil(rows)).map(move |c| (w, c * rows..out.min((c + 1) * rows)))
        })
        .collect()
}

/// The program: the model's weights and the cache as read-only views, the run's buffers.
struct Step {
    rows: usize,
    d_model: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    d_ff: usize,
    eps: f32,
    scale: f32,
    /// Positions already cached (the first new row's position).
    cached: usize,
    /// RoPE tables of the new rows: `(rows, head_dim / 2)` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
    blocks: Vec<BlockWeights>,
    final_norm: &'static [f32],
    head: Rows,
    /// Per layer, the cache's keys and values (of `capacity` positions per head).
    cache: Vec<(CacheRows<'static>, CacheRows<'static>)>,
    capacity: usize,
    cache_f16: bool,
    /// The embedded input rows.
    input: Buf,
    buffers: Vec<BlockBuffers>,
    /// The last row's logits.
    logits: Buf,
    qkv_cuts: Cuts,
    output_cuts: Cuts,
    gate_cuts: Cuts,
    head_cuts: Cuts,
    /// Owners of the memory the views above point into. A thread may still be finishing a chunk
    /// after the caller has returned (it then loses the commit), so the run, and this with it,
    /// lives until the last thread leaves it: the weights and the cache buffers cannot be freed
    /// under it. (A later request may rewrite cache positions it reads; what it computes from
    /// them is never committed.)
    _keep: (Vec<Tensor>, Vec<Arc<QTensor>>),
}

/// A participating thread's own memory.
#[derive(Default)]
struct Local {
    /// The phase's input rows, when the thread computes them itself (normed rows).
    input: Vec<f32>,
    /// The phase's input quantized to Q8_0, for weights made of blocks.
    quantized: Vec<Q8Row>,
    /// A chunk's results.
    out: Vec<f32>,
    /// Attention: the head's queries, new keys and values, scores.
    queries: Vec<f32>,
    new_keys: Vec<f32>,
    new_values: Vec<f32>,
    new_keys16: Vec<f16>,
    new_values16: Vec<f16>,
    scores: Vec<f32>,
    /// Gate/up: the gate rows.
    gate: Vec<f32>,
}

impl Step {
    fn layers(&self) -> usize {
        self.blocks.len()
    }

    fn q_out(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_out(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Norms each row of `x` into `local.input` and quantizes it if `blocks`.
    fn norm_into(&self, x: &[f32], weight: &[f32], blocks: bool, local: &mut Local) {
        local.input.resize(x.len(), 0.0);
        for (row, out) in x.chunks(self.d_model).zip(local.input.chunks_mut(self.d_model)) {
            rms_norm_row(row, weight, self.eps, out);
        }
        self.quantize(blocks, self.d_model, local);
    }

    /// Quantizes `local.input` (rows of `cols`) to Q8_0 if `blocks`.
    fn quantize(&self, blocks: bool, cols: usize, local: &mut Local) {
        local.quantized = if blocks { gemv::quantize_rows(&local.input, cols) } else { Vec::new() };
    }

    /// Output rows `rows` of `weight` for the phase's input (`x`, rows of `cols`) into
    /// `local.out`, `(x rows, rows.len())`.
    fn project(&self, weight: Rows, x: &[f32], cols: usize, rows: Range<usize>, local: &mut Local) {
        local.out.resize(x.len() / cols * rows.len(), 0.0);
        gemv::rows_times(weight, x, &local.quantized, cols, rows, &mut local.out);
    }

    /// RoPE, then attention over the cache and the new rows, of head `head` in `layer`.
    fn attend(&self, layer: usize, head: usize, local: &mut Local) {
        let (dim, half) = (self.head_dim, self.head_dim / 2);
        let group = self.heads / self.kv_heads;
        let kv_head = head / group;
        // SAFETY: the q/k/v phase of this layer has committed.
        let qkv = unsafe { self.buffers[layer].qkv.read() };
        let (q_out, kv_out) = (self.q_out(), self.kv_out());
        let (q, rest) = qkv.split_at(self.rows * q_out);
        let (k, v) = rest.split_at(self.rows * kv_out);
        local.queries.clear();
        local.new_keys.clear();
        local.new_values.clear();
        for i in 0..self.rows {
            let (cos, sin) = (&self.cos[i * half..][..half], &self.sin[i * half..][..half]);
            let at = i * q_out + head * dim;
            local.queries.extend_from_slice(&q[at..at + dim]);
            let at = i * kv_out + kv_head * dim;
            local.new_keys.extend_from_slice(&k[at..at + dim]);
            local.new_values.extend_from_slice(&v[at..at + dim]);
            rope_rows(&mut local.queries[i * dim..], cos, sin);
            rope_rows(&mut local.new_keys[i * dim..], cos, sin);
        }
        // The new rows in the cache's precision, as attention reads them once cached.
        let (new_keys, new_values) = if self.cache_f16 {
            local.new_keys16.clear();
            local.new_keys16.extend(local.new_keys.iter().map(|&x| f16::from_f32(x)));
            local.new_values16.clear();
            local.new_values16.extend(local.new_values.iter().map(|&x| f16::from_f32(x)));
            (CacheRows::F16(&local.new_keys16), CacheRows::F16(&local.new_values16))
        } else {
            (CacheRows::F32(&local.new_keys), CacheRows::F32(&local.new_values))
        };
        local.out.resize(self.rows * dim, 0.0);
        attention::attend_new(
            self.cache[layer],
            kv_head * self.capacity * dim,
            self.cached,
            (new_keys, new_values),
            dim,
            &local.queries,
            self.scale,
            &mut local.scores,
            &mut local.out,
        );
    }
}

impl Program for Step {
    type Local = Local;

    fn phases(&self) -> usize {
        self.layers() * BLOCK_PHASES + 1
    }

    fn chunks(&self, phase: usize) -> usize {
        if phase == self.layers() * BLOCK_PHASES {
            return self.head_cuts.len();
        }
        match phase % BLOCK_PHASES {
            QKV => self.qkv_cuts.len(),
            ATTENTION => self.heads,
            OUTPUT | DOWN => self.output_cuts.len(),
            _ => self.gate_cuts.len(),
        }
    }

    fn enter(&self, phase: usize, local: &mut Local) {
        let (layer, kind) = (phase / BLOCK_PHASES, phase % BLOCK_PHASES);
        if layer == self.layers() {
            // SAFETY: the last block's down phase has committed.
            let x = unsafe { self.buffers[layer - 1].out.read() };
            let last = &x[(self.rows - 1) * self.d_model..];
            self.norm_into(last, self.final_norm, self.head.is_blocks(), local);
            return;
        }
        let weights = &self.blocks[layer];
        let input = |layer: usize| match layer {
            // SAFETY: filled before the run.
            0 => unsafe { self.input.read() },
            // SAFETY: the previous block's down phase has committed.
            l => unsafe { self.buffers[l - 1].out.read() },
        };
        let buffers = &self.buffers[layer];
        match kind {
            QKV => {
                let blocks = weights.linears[..3].iter().any(WeightRows::is_blocks);
                self.norm_into(input(layer), weights.attn_norm, blocks, local);
            }
            OUTPUT => {
                local.input.clear();
                // SAFETY: the attention phase has committed.
                local.input.extend_from_slice(unsafe { buffers.attended.read() });
                self.quantize(weights.linears[3].is_blocks(), self.q_out(), local);
            }
            GATE_UP => {
                let blocks = weights.linears[4..6].iter().any(WeightRows::is_blocks);
                // SAFETY: the output phase has committed.
                self.norm_into(unsafe { buffers.mid.read() }, weights.ffn_norm, blocks, local);
            }
            DOWN => {
                local.input.clear();
                // SAFETY: the gate/up phase has committed.
                local.input.extend_from_slice(unsafe { buffers.gated.read() });
                self.quantize(weights.linears[6].is_blocks(), self.d_ff, local);
            }
            _ => {}
        }
    }

    fn compute(&self, phase: usize, chunk: usize, local: &mut Local) {
        let (layer, kind) = (phase / BLOCK_PHASES, phase % BLOCK_PHASES);
        if layer == self.layers() {
            let (_, rows) = self.head_cuts[chunk].clone();
            let input = std::mem::take(&mut local.input);
            self.project(self.head, &input, self.d_model, rows, local);
            local.input = input;
            return;
        }
        let linears = &self.blocks[layer].linears;
        let input = std::mem::take(&mut local.input);
        match kind {
            QKV => {
                let (w, rows) = self.qkv_cuts[chunk].clone();
                self.project(linears[w], &input, self.d_model, rows, local);
            }
            ATTENTION => self.attend(layer, chunk, local),
            OUTPUT | DOWN => {
                let (_, rows) = self.output_cuts[chunk].clone();
                let (weight, cols, residual) = if kind == OUTPUT {
                    // SAFETY: filled before the run, or the previous block's down phase has
                    // committed.
                    let x = if layer == 0 {
                        unsafe { self.input.read() }
                    } else {
                        unsafe { self.buffers[layer - 1].out.read() }
                    };
                    (linears[3], self.q_out(), x)
                } else {
                    // SAFETY: the output phase has committed.
                    (linears[6], self.d_ff, unsafe { self.buffers[layer].mid.read() })
                };
                self.project(weight, &input, cols, rows.clone(), local);
                let width = rows.len();
                for (i, out) in local.out.chunks_mut(width).enumerate() {
                    let x = &residual[i * self.d_model + rows.start..][..width];
                    out.iter_mut().zip(x).for_each(|(o, x)| *o += x);
                }
            }
            _ => {
                let (_, rows) = self.gate_cuts[chunk].clone();
                self.project(linears[4], &input, self.d_model, rows.clone(), local);
                std::mem::swap(&mut local.gate, &mut local.out);
                self.project(linears[5], &input, self.d_model, rows, local);
                for (u, g) in local.out.iter_mut().zip(&local.gate) {
                    *u *= g / (1.0 + (-g).exp());
                }
            }
        }
        local.input = input;
    }

    unsafe fn commit(&self, phase: usize, chunk: usize, local: &Local) {
        let (layer, kind) = (phase / BLOCK_PHASES, phase % BLOCK_PHASES);
        // Writes `local.out`, `(rows, range.len())`, into `buf` of rows of `width` at `range`.
        let scatter = |buf: &Buf, width: usize, range: Range<usize>| {
            for (i, out) in local.out.chunks(range.len()).enumerate() {
                // SAFETY: this chunk's commit owns `range` of each row (the runner's contract).
                unsafe { buf.write(i * width + range.start, out) };
            }
        };
        if layer == self.layers() {
            let (_, rows) = self.head_cuts[chunk].clone();
            scatter(&self.logits, rows.len(), rows);
            return;
        }
        let buffers = &self.buffers[layer];
        match kind {
            QKV => {
                let (w, rows) = self.qkv_cuts[chunk].clone();
                let (q, kv) = (self.rows * self.q_out(), self.rows * self.kv_out());
                // q, k, v follow each other in the buffer, each `(rows, out)`.
                let (start, width) = match w {
                    0 => (0, self.q_out()),
                    1 => (q, self.kv_out()),
                    _ => (q + kv, self.kv_out()),
                };
                for (i, out) in local.out.chunks(rows.len()).enumerate() {
                    // SAFETY: as in `scatter`.
                    unsafe { buffers.qkv.write(start + i * width + rows.start, out) };
                }
            }
            ATTENTION => {
                let (head, dim) = (chunk, self.head_dim);
                scatter(&buffers.attended, self.q_out(), head * dim..(head + 1) * dim);
                let group = self.heads / self.kv_heads;
                if head.is_multiple_of(group) {
                    // The group's first head writes its key/value head's new rows.
                    let at = (head / group) * dim;
                    for i in 0..self.rows {
                        let (k, v) = (
                            &local.new_keys[i * dim..][..dim],
                            &local.new_values[i * dim..][..dim],
                        );
                        // SAFETY: one head per group writes this key/value head's columns.
                        unsafe {
                            buffers.keys.write(i * self.kv_out() + at, k);
                            buffers.values.write(i * self.kv_out() + at, v);
                        }
                    }
                }
            }
            OUTPUT => {
                let (_, rows) = self.output_cuts[chunk].clone();
                scatter(&buffers.mid, self.d_model, rows);
            }
            DOWN => {
                let (_, rows) = self.output_cuts[chunk].clone();
                scatter(&buffers.out, self.d_model, rows);
            }
            _ => {
                let (_, rows) = self.gate_cuts[chunk].clone();
                scatter(&buffers.gated, self.d_ff, rows);
            }
        }
    }
}

/// A weight's view for the step, and what keeps it alive.
fn view(linear: &QLinear, keep: &mut (Vec<Tensor>, Vec<Arc<QTensor>>)) -> Result<Rows> {
    let not_on_kernels = || ModelError::Usage("a projection the kernels cannot read".into());
    match linear {
        QLinear::CpuF32(l) => {
            let w = l.weight().contiguous()?;
            let values = f32_values(&w)?;
            keep.0.push(w);
            Ok(WeightRows::F32(values))
        }
        QLinear::CpuBlocks(q) => {
            let bytes = q.data()?;
            let std::borrow::Cow::Borrowed(bytes) = bytes else {
                return Err(not_on_kernels());
            };
            let view = WeightRows::of_qtensor(q, bytes).ok_or_else(not_on_kernels)?;
            keep.1.push(Arc::clone(q));
            // SAFETY: the view borrows the QTensor's CPU storage (`data` borrowed it), which
            // `keep` keeps alive and which never moves.
            Ok(unsafe { std::mem::transmute::<WeightRows<'_>, Rows>(view) })
        }
        QLinear::Dense(_) | QLinear::Quantized(_) => Err(not_on_kernels()),
    }
}

/// The values of a contiguous f32 CPU tensor, for as long as the caller keeps the tensor.
fn f32_values(t: &Tensor) -> Result<&'static [f32]> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(ModelError::Usage("the step program runs on the CPU".into()));
    };
    let values = m31r_kernels::data(cpu, layout, "step")?;
    // SAFETY: a CPU tensor's buffer never moves while the tensor lives, and the caller keeps a
    // clone of it for as long as the slice is used; training updates weights in place, between
    // forwards.
    Ok(unsafe { std::mem::transmute::<&[f32], &[f32]>(values) })
}

/// A cache buffer's values, for as long as the caller keeps the tensor.
fn cache_rows(t: &Tensor) -> Result<CacheRows<'static>> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(ModelError::Usage("the step program runs on the CPU".into()));
    };
    let rows = CacheRows::of(cpu, layout)?;
    // SAFETY: as in `f32_values`; the caller writes the new rows only after the run, at
    // positions the run does not read.
    Ok(unsafe { std::mem::transmute::<CacheRows<'_>, CacheRows<'static>>(rows) })
}

impl Model {
    /// The forward of `ids` (at most [`gemv::MAX_ROWS`] tokens) continuing `cache`, as the step
    /// program on the kernels' pool: appends them to the cache and returns the last one's logits
    /// `(1, 1, vocab)`. `None`, having done nothing, where it does not apply (see
    /// `Model::forward_last`).
    pub(super) fn forward_step(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Option<Tensor>> {
        let rows = ids.dims().get(1).copied().unwrap_or(0);
        if !self.token_step
            || ids.dims().len() != 2
            || ids.dims()[0] != 1
            || rows == 0
            || rows > gemv::MAX_ROWS
            || self.kernel != super::AttentionKernel::Fused
            || cache.keys.len() != self.layers.len()
        {
            return Ok(None);
        }
        cache.reserve(rows)?;
        let config = &self.config;
        let cached = cache.len();
        let (cos, sin) = self.rope.tables(cached, rows)?;
        let (cos, sin) =
            (cos.flatten_all()?.to_vec1::<f32>()?, sin.flatten_all()?.to_vec1::<f32>()?);
        let input = self.embed_tokens.forward(ids)?.flatten_all()?.to_vec1::<f32>()?;

        let mut keep = (Vec::new(), Vec::new());
        let mut norm = |n: &super::block::RmsNorm| -> Result<&'static [f32]> {
            let w = n.weight.contiguous()?.to_dtype(DType::F32)?;
            let values = f32_values(&w)?;
            keep.0.push(w);
            Ok(values)
        };
        let mut norms = Vec::with_capacity(self.layers.len());
        for block in &self.layers {
            norms.push((norm(&block.input_layernorm)?, norm(&block.post_attention_layernorm)?));
        }
        let final_norm = norm(&self.norm)?;
        let mut blocks = Vec::with_capacity(self.layers.len());
        for (block, (attn_norm, ffn_norm)) in self.layers.iter().zip(norms) {
            let mut linears = Vec::with_capacity(7);
            for linear in block.linears() {
                let rows = view(linear, &mut keep)?;
                linears.push(rows);
            }
            let linears =
                linears.try_into().map_err(|_| ModelError::Usage("7 projections".into()))?;
            blocks.push(BlockWeights { attn_norm, ffn_norm, linears });
        }
        let head = view(&self.lm_head, &mut keep)?;
        let mut views = Vec::with_capacity(cache.keys.len());
        for (k, v) in cache.keys.iter().zip(&cache.values) {
            views.push((cache_rows(k)?, cache_rows(v)?));
            keep.0.extend([k.clone(), v.clone()]);
        }
        let cache_f16 = cache.keys.first().is_some_and(|k| k.dtype() == DType::F16);

        let (d, heads, kv_heads, head_dim) =
            (config.d_model(), config.n_heads(), config.n_kv_heads(), config.head_dim());
        let d_ff = config.d_ff();
        let (q_out, kv_out) = (heads * head_dim, kv_heads * head_dim);
        let buffers = (0..self.layers.len())
            .map(|_| BlockBuffers {
                qkv: Buf::new(rows * (q_out + 2 * kv_out)),
                attended: Buf::new(rows * q_out),
                mid: Buf::new(rows * d),
                gated: Buf::new(rows * d_ff),
                out: Buf::new(rows * d),
                keys: Buf::new(rows * kv_out),
                values: Buf::new(rows * kv_out),
            })
            .collect();
        let vocab = config.vocab_size();
        let step = Step {
            rows,
            d_model: d,
            heads,
            kv_heads,
            head_dim,
            d_ff,
            eps: config.norm_eps() as f32,
            scale: 1.0 / (head_dim as f32).sqrt(),
            cached,
            cos,
            sin,
            blocks,
            final_norm,
            head,
            cache: views,
            capacity: cache.capacity(),
            cache_f16,
            input: Buf::filled(&input),
            buffers,
            logits: Buf::new(vocab),
            qkv_cuts: cut(&[q_out, kv_out, kv_out]),
            output_cuts: cut(&[d]),
            gate_cuts: cut(&[d_ff]),
            head_cuts: cut(&[vocab]),
            _keep: keep,
        };
        let (logits, new_rows) = pool::run_program(step, true, |step| {
            // SAFETY: the program has committed every phase.
            let logits = unsafe { step.logits.read() }.to_vec();
            let new_rows: Vec<(Vec<f32>, Vec<f32>)> = step
                .buffers
                .iter()
                .map(|b| unsafe { (b.keys.read().to_vec(), b.values.read().to_vec()) })
                .collect();
            (logits, new_rows)
        });
        for (layer, (k, v)) in new_rows.iter().enumerate() {
            for i in 0..rows {
                cache.write_row(
                    layer,
                    cached + i,
                    &k[i * kv_out..][..kv_out],
                    &v[i * kv_out..][..kv_out],
                )?;
            }
        }
        cache.len += rows;
        Ok(Some(Tensor::from_vec(logits, (1, 1, vocab), self.device())?))
    }
}
