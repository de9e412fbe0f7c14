//! The CPU forward of a decode step or a keystroke's few new tokens (at most
//! [`gemv::MAX_ROWS`]) as a [`Program`] of the kernels' pool: per block five phases (q/k/v
//! projections; RoPE and attention per head; output projection and residual; gate/up projections
//! and SwiGLU; down projection and residual), then the final norm and LM head of the last row.
//!
//! A greedy decode run ([`Model::decode`]) chains several such steps in one program, each
//! followed by a pick phase that chooses the next token from the step's logits ([`Pick`]) and
//! embeds it as the next step's input. The caller takes each pick as soon as it is committed
//! ([`Decode::next_pick`]) while the pool's threads go on with the next step: a step never waits
//! for the caller's thread to be given a core, only for any one of the run's threads.
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
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

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
use crate::quant::{QLinear, TokenEmbedding};

/// Phases per block.
const BLOCK_PHASES: usize = 5;
/// Most steps of one decode run: enough that starting a run (views of every weight, buffers)
/// costs little per token, few enough that a run's buffers stay small.
pub const MAX_DECODE_STEPS: usize = 16;
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

/// What a decode run does with each step's logits: the greedy pick of the daemon (its recall
/// mixture, then the best token) as a pure function of the run's tokens so far, so that any of
/// the run's threads can make it and computing it twice gives the same token.
pub trait Pick: Send + Sync + 'static {
    /// The token after `inputs` (the run's input tokens so far, its first one included, the
    /// last being the one whose logits these are), from `logits`, which it may rewrite into the
    /// distribution it picked from (the caller reads them back with the pick).
    fn pick(&self, inputs: &[u32], logits: &mut [f32]) -> u32;

    /// Whether decoding ends at `token` (end of text): the run computes no step after it.
    fn stops(&self, token: u32) -> bool;
}

/// One step's buffers.
struct StepBuffers {
    /// The embedded input rows `(rows, d_model)`: filled before the run (the first step) or by
    /// the previous step's pick.
    input: Buf,
    blocks: Vec<BlockBuffers>,
    /// The last row's logits.
    logits: Buf,
    /// The logits as the pick rewrote them (decode runs).
    mixed: Buf,
    /// The token the pick chose (decode runs).
    picked: AtomicU32,
}

/// The program: the model's weights and the cache as read-only views, the run's buffers.
struct Step {
    /// Rows of the first step; later steps have one (decode runs start from one token).
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
    /// RoPE tables of the run's new rows: `(rows + steps − 1, head_dim / 2)` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
    blocks: Vec<BlockWeights>,
    final_norm: &'static [f32],
    head: Rows,
    /// Per layer, the cache's keys and values (of `capacity` positions per head).
    cache: Vec<(CacheRows<'static>, CacheRows<'static>)>,
    capacity: usize,
    cache_f16: bool,
    /// The first step's input tokens.
    ids: Vec<u32>,
    steps: Vec<StepBuffers>,
    /// Decode runs: the pick after each step, and the table that embeds it.
    pick: Option<(Arc<dyn Pick>, TokenEmbedding)>,
    /// The first step whose pick ends the run (`usize::MAX`: none yet); later steps are skipped.
    stopped: AtomicUsize,
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
    /// Pick: the run's tokens so far, the token picked and its embedding.
    tokens: Vec<u32>,
    token: u32,
    embedded: Vec<f32>,
}

/// What a phase of the program does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    /// Phase `kind` (one of [`QKV`]..=[`DOWN`]) of block `layer`.
    Block { layer: usize, kind: usize },
    /// The final norm and LM head of the step's last row.
    Head,
    /// The pick of the next token (decode runs).
    Pick,
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

    /// Phases of one step.
    fn step_phases(&self) -> usize {
        self.layers() * BLOCK_PHASES + 1 + usize::from(self.pick.is_some())
    }

    /// The step and part of `phase`.
    fn part(&self, phase: usize) -> (usize, Part) {
        let (step, rest) = (phase / self.step_phases(), phase % self.step_phases());
        let blocks = self.layers() * BLOCK_PHASES;
        let part = match rest {
            r if r < blocks => Part::Block { layer: r / BLOCK_PHASES, kind: r % BLOCK_PHASES },
            r if r == blocks => Part::Head,
            _ => Part::Pick,
        };
        (step, part)
    }

    /// Rows of step `step`.
    fn rows_of(&self, step: usize) -> usize {
        if step == 0 { self.rows } else { 1 }
    }

    /// Index among the run's new rows of step `step`'s first row.
    fn first_row(&self, step: usize) -> usize {
        if step == 0 { 0 } else { self.rows + step - 1 }
    }

    /// Whether step `step` comes after a pick that ended the run: its chunks do nothing.
    fn skipped(&self, step: usize) -> bool {
        step > self.stopped.load(Ordering::Acquire)
    }

    /// The input of block `layer` of step `step`: the embedded rows, or the previous block's
    /// output.
    ///
    /// # Safety
    /// Read only in phases after the one that writes it.
    unsafe fn block_input(&self, step: usize, layer: usize) -> &[f32] {
        let buffers = &self.steps[step];
        match layer {
            // SAFETY: filled before the run or by the previous step's pick (the contract).
            0 => unsafe { buffers.input.read() },
            // SAFETY: the previous block's down phase has committed (the contract).
            l => unsafe { buffers.blocks[l - 1].out.read() },
        }
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

    /// RoPE, then attention over the cache and the run's new rows up to step `step`'s, of head
    /// `head` in `layer`.
    fn attend(&self, step: usize, layer: usize, head: usize, local: &mut Local) {
        let (dim, half) = (self.head_dim, self.head_dim / 2);
        let group = self.heads / self.kv_heads;
        let kv_head = head / group;
        let rows = self.rows_of(step);
        // SAFETY: the q/k/v phase of this step's layer has committed.
        let qkv = unsafe { self.steps[step].blocks[layer].qkv.read() };
        let (q_out, kv_out) = (self.q_out(), self.kv_out());
        let (q, rest) = qkv.split_at(rows * q_out);
        let (k, v) = rest.split_at(rows * kv_out);
        local.queries.clear();
        local.new_keys.clear();
        local.new_values.clear();
        // Earlier steps' new rows, as their attention phases committed them (after RoPE).
        for earlier in &self.steps[..step] {
            // SAFETY: every phase of an earlier step has committed.
            let (keys, values) =
                unsafe { (earlier.blocks[layer].keys.read(), earlier.blocks[layer].values.read()) };
            for (k, v) in keys.chunks(kv_out).zip(values.chunks(kv_out)) {
                local.new_keys.extend_from_slice(&k[kv_head * dim..][..dim]);
                local.new_values.extend_from_slice(&v[kv_head * dim..][..dim]);
            }
        }
        let own = local.new_keys.len();
        let first = self.first_row(step);
        for i in 0..rows {
            let at = (first + i) * half;
            let (cos, sin) = (&self.cos[at..][..half], &self.sin[at..][..half]);
            let at = i * q_out + head * dim;
            local.queries.extend_from_slice(&q[at..at + dim]);
            let at = i * kv_out + kv_head * dim;
            local.new_keys.extend_from_slice(&k[at..at + dim]);
            local.new_values.extend_from_slice(&v[at..at + dim]);
            rope_rows(&mut local.queries[i * dim..], cos, sin);
            rope_rows(&mut local.new_keys[own + i * dim..], cos, sin);
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
        local.out.resize(rows * dim, 0.0);
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

    /// The pick after step `step`: the next token, the logits it was picked from in
    /// `local.out`, and (when a step follows) its embedding in `local.embedded`.
    fn pick(&self, step: usize, local: &mut Local) {
        let Some((pick, embedding)) = &self.pick else { return };
        // SAFETY: this step's head phase has committed.
        let logits = unsafe { self.steps[step].logits.read() };
        local.out.clear();
        local.out.extend_from_slice(logits);
        local.tokens.clear();
        local.tokens.extend_from_slice(&self.ids);
        local.tokens.extend(self.steps[..step].iter().map(|s| s.picked.load(Ordering::Relaxed)));
        local.token = pick.pick(&local.tokens, &mut local.out);
        local.embedded.clear();
        if step + 1 < self.steps.len() && !pick.stops(local.token) {
            let embed = || -> candle_core::Result<Vec<f32>> {
                let id = Tensor::new(&[[local.token]], &candle_core::Device::Cpu)?;
                embedding.forward(&id)?.flatten_all()?.to_vec1::<f32>()
            };
            // A table the run could read at its start cannot fail on a row of the vocabulary.
            local.embedded = embed().expect("embedding a picked token");
        }
    }
}

impl Program for Step {
    type Local = Local;

    fn phases(&self) -> usize {
        self.steps.len() * self.step_phases()
    }

    fn chunks(&self, phase: usize) -> usize {
        match self.part(phase).1 {
            Part::Head => self.head_cuts.len(),
            Part::Pick => 1,
            Part::Block { kind: QKV, .. } => self.qkv_cuts.len(),
            Part::Block { kind: ATTENTION, .. } => self.heads,
            Part::Block { kind: OUTPUT | DOWN, .. } => self.output_cuts.len(),
            Part::Block { .. } => self.gate_cuts.len(),
        }
    }

    fn enter(&self, phase: usize, local: &mut Local) {
        let (step, part) = self.part(phase);
        if self.skipped(step) {
            return;
        }
        let buffers = &self.steps[step];
        let (layer, kind) = match part {
            Part::Pick => return,
            Part::Head => {
                // SAFETY: the last block's down phase has committed.
                let x = unsafe { buffers.blocks[self.layers() - 1].out.read() };
                let last = &x[(self.rows_of(step) - 1) * self.d_model..];
                self.norm_into(last, self.final_norm, self.head.is_blocks(), local);
                return;
            }
            Part::Block { layer, kind } => (layer, kind),
        };
        let weights = &self.blocks[layer];
        let block = &buffers.blocks[layer];
        match kind {
            QKV => {
                let blocks = weights.linears[..3].iter().any(WeightRows::is_blocks);
                // SAFETY: the phases that write the block's input have committed.
                let x = unsafe { self.block_input(step, layer) };
                self.norm_into(x, weights.attn_norm, blocks, local);
            }
            OUTPUT => {
                local.input.clear();
                // SAFETY: the attention phase has committed.
                local.input.extend_from_slice(unsafe { block.attended.read() });
                self.quantize(weights.linears[3].is_blocks(), self.q_out(), local);
            }
            GATE_UP => {
                let blocks = weights.linears[4..6].iter().any(WeightRows::is_blocks);
                // SAFETY: the output phase has committed.
                self.norm_into(unsafe { block.mid.read() }, weights.ffn_norm, blocks, local);
            }
            DOWN => {
                local.input.clear();
                // SAFETY: the gate/up phase has committed.
                local.input.extend_from_slice(unsafe { block.gated.read() });
                self.quantize(weights.linears[6].is_blocks(), self.d_ff, local);
            }
            _ => {}
        }
    }

    fn compute(&self, phase: usize, chunk: usize, local: &mut Local) {
        let (step, part) = self.part(phase);
        if self.skipped(step) {
            return;
        }
        let (layer, kind) = match part {
            Part::Pick => return self.pick(step, local),
            Part::Head => {
                let (_, rows) = self.head_cuts[chunk].clone();
                let input = std::mem::take(&mut local.input);
                self.project(self.head, &input, self.d_model, rows, local);
                local.input = input;
                return;
            }
            Part::Block { layer, kind } => (layer, kind),
        };
        let linears = &self.blocks[layer].linears;
        let input = std::mem::take(&mut local.input);
        match kind {
            QKV => {
                let (w, rows) = self.qkv_cuts[chunk].clone();
                self.project(linears[w], &input, self.d_model, rows, local);
            }
            ATTENTION => self.attend(step, layer, chunk, local),
            OUTPUT | DOWN => {
                let (_, rows) = self.output_cuts[chunk].clone();
                let (weight, cols, residual) = if kind == OUTPUT {
                    // SAFETY: the phases that write the block's input have committed.
                    (linears[3], self.q_out(), unsafe { self.block_input(step, layer) })
                } else {
                    // SAFETY: the output phase has committed.
                    (linears[6], self.d_ff, unsafe { self.steps[step].blocks[layer].mid.read() })
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
        let (step, part) = self.part(phase);
        if self.skipped(step) {
            return;
        }
        let buffers = &self.steps[step];
        // Writes `local.out`, `(rows, range.len())`, into `buf` of rows of `width` at `range`.
        let scatter = |buf: &Buf, width: usize, range: Range<usize>| {
            for (i, out) in local.out.chunks(range.len()).enumerate() {
                // SAFETY: this chunk's commit owns `range` of each row (the runner's contract).
                unsafe { buf.write(i * width + range.start, out) };
            }
        };
        let (layer, kind) = match part {
            Part::Head => {
                let (_, rows) = self.head_cuts[chunk].clone();
                scatter(&buffers.logits, rows.len(), rows);
                return;
            }
            Part::Pick => {
                // SAFETY: the pick phase has one chunk: this commit is its only writer.
                unsafe { buffers.mixed.write(0, &local.out) };
                buffers.picked.store(local.token, Ordering::Relaxed);
                if let Some(next) = self.steps.get(step + 1) {
                    if local.embedded.is_empty() {
                        // A token that ends the run (see `Step::pick`).
                        self.stopped.fetch_min(step, Ordering::AcqRel);
                    } else {
                        // SAFETY: as above; the next step reads its input only in later phases.
                        unsafe { next.input.write(0, &local.embedded) };
                    }
                }
                return;
            }
            Part::Block { layer, kind } => (layer, kind),
        };
        let block = &buffers.blocks[layer];
        let rows = self.rows_of(step);
        match kind {
            QKV => {
                let (w, cut) = self.qkv_cuts[chunk].clone();
                let (q, kv) = (rows * self.q_out(), rows * self.kv_out());
                // q, k, v follow each other in the buffer, each `(rows, out)`.
                let (start, width) = match w {
                    0 => (0, self.q_out()),
                    1 => (q, self.kv_out()),
                    _ => (q + kv, self.kv_out()),
                };
                for (i, out) in local.out.chunks(cut.len()).enumerate() {
                    // SAFETY: as in `scatter`.
                    unsafe { block.qkv.write(start + i * width + cut.start, out) };
                }
            }
            ATTENTION => {
                let (head, dim) = (chunk, self.head_dim);
                scatter(&block.attended, self.q_out(), head * dim..(head + 1) * dim);
                let group = self.heads / self.kv_heads;
                if head.is_multiple_of(group) {
                    // The group's first head writes its key/value head's new rows (this step's,
                    // the last in `local.new_keys`).
                    let at = (head / group) * dim;
                    let own = local.new_keys.len() - rows * dim;
                    for i in 0..rows {
                        let (k, v) = (
                            &local.new_keys[own + i * dim..][..dim],
                            &local.new_values[own + i * dim..][..dim],
                        );
                        // SAFETY: one head per group writes this key/value head's columns.
                        unsafe {
                            block.keys.write(i * self.kv_out() + at, k);
                            block.values.write(i * self.kv_out() + at, v);
                        }
                    }
                }
            }
            OUTPUT => {
                let (_, cut) = self.output_cuts[chunk].clone();
                scatter(&block.mid, self.d_model, cut);
            }
            DOWN => {
                let (_, cut) = self.output_cuts[chunk].clone();
                scatter(&block.out, self.d_model, cut);
            }
            _ => {
                let (_, cut) = self.gate_cuts[chunk].clone();
                scatter(&block.gated, self.d_ff, cut);
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
    /// The step program for `ids` (`(1, rows)`, rows at most [`gemv::MAX_ROWS`]) continuing
    /// `cache`, then `steps − 1` more steps of one token each when `pick` chooses them; the
    /// cache has room for all of them. `None`, having done nothing, where the program does not
    /// apply (see `Model::forward_last`).
    fn step_program(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        steps: usize,
        pick: Option<Arc<dyn Pick>>,
    ) -> Result<Option<Step>> {
        let rows = ids.dims().get(1).copied().unwrap_or(0);
        if !self.token_step
            || ids.dims().len() != 2
            || ids.dims()[0] != 1
            || rows == 0
            || rows > gemv::MAX_ROWS
            || steps == 0
            || (steps > 1 && (rows != 1 || pick.is_none()))
            || self.kernel != super::AttentionKernel::Fused
            || cache.keys.len() != self.layers.len()
        {
            return Ok(None);
        }
        let new_rows = rows + steps - 1;
        cache.reserve(new_rows)?;
        let config = &self.config;
        let cached = cache.len();
        let (cos, sin) = self.rope.tables(cached, new_rows)?;
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
        let vocab = config.vocab_size();
        let decoding = pick.is_some();
        let step_buffers = |step: usize| {
            let rows = if step == 0 { rows } else { 1 };
            StepBuffers {
                input: if step == 0 { Buf::filled(&input) } else { Buf::new(d) },
                blocks: (0..self.layers.len())
                    .map(|_| BlockBuffers {
                        qkv: Buf::new(rows * (q_out + 2 * kv_out)),
                        attended: Buf::new(rows * q_out),
                        mid: Buf::new(rows * d),
                        gated: Buf::new(rows * d_ff),
                        out: Buf::new(rows * d),
                        keys: Buf::new(rows * kv_out),
                        values: Buf::new(rows * kv_out),
                    })
                    .collect(),
                logits: Buf::new(vocab),
                mixed: Buf::new(if decoding { vocab } else { 0 }),
                picked: AtomicU32::new(0),
            }
        };
        Ok(Some(Step {
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
            ids: ids.flatten_all()?.to_vec1::<u32>()?,
            steps: (0..steps).map(step_buffers).collect(),
            pick: pick.map(|p| (p, self.embed_tokens.clone())),
            stopped: AtomicUsize::new(usize::MAX),
            qkv_cuts: cut(&[q_out, kv_out, kv_out]),
            output_cuts: cut(&[d]),
            gate_cuts: cut(&[d_ff]),
            head_cuts: cut(&[vocab]),
            _keep: keep,
        }))
    }

    /// The forward of `ids` (at most [`gemv::MAX_ROWS`] tokens) continuing `cache`, as the step
    /// program on the kernels' pool: appends them to the cache and returns the last one's logits
    /// `(1, 1, vocab)`. `None`, having done nothing, where it does not apply (see
    /// `Model::forward_last`).
    pub(super) fn forward_step(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Option<Tensor>> {
        let Some(step) = self.step_program(ids, cache, 1, None)? else {
            return Ok(None);
        };
        let logits = pool::run_program(step, true, |step| {
            // SAFETY: the program has committed every phase.
            let logits = unsafe { step.steps[0].logits.read() }.to_vec();
            // SAFETY: as above.
            unsafe { append_steps(step, 1, cache) }.map(|()| logits)
        })?;
        let vocab = logits.len();
        Ok(Some(Tensor::from_vec(logits, (1, 1, vocab), self.device())?))
    }

    /// Announces a forward within `within` (a request about to be prefilled): on a CPU the
    /// kernels' parked threads wake now and wait for it awake ([`pool::warm`]), so that on busy
    /// cores their wake-up overlaps what the caller does first rather than the forward.
    pub fn expect_forward(&self, within: std::time::Duration) {
        if self.device().is_cpu() {
            pool::warm(within);
        }
    }

    /// Starts a greedy decode run on the kernels' pool: `first` (the token just chosen)
    /// continues `cache`, and each of up to `steps` steps (at most [`MAX_DECODE_STEPS`]) runs
    /// the forward of its input token and then `pick` to choose the next one, which is the
    /// next step's input. The caller takes the picks one by one ([`Decode::next_pick`]), stops
    /// whenever it likes, and hands the run back to [`Decode::finish`] with the same cache,
    /// untouched in between, which then holds the inputs of the steps whose picks it took.
    ///
    /// `None`, having done nothing, where the step program does not apply (not on the CPU
    /// kernels, another attention kernel): the caller then decodes with
    /// [`Model::forward_last`]. An error when the cache cannot hold `steps` more positions.
    pub fn decode(
        &self,
        first: u32,
        cache: &mut KvCache,
        steps: usize,
        pick: Arc<dyn Pick>,
    ) -> Result<Option<Decode>> {
        let steps = steps.clamp(1, MAX_DECODE_STEPS);
        let ids = Tensor::new(&[[first]], self.device())?;
        let Some(step) = self.step_program(&ids, cache, steps, Some(pick))? else {
            return Ok(None);
        };
        let step_phases = step.step_phases();
        Ok(Some(Decode {
            running: pool::start_program(step, true),
            step_phases,
            taken: 0,
            cached: cache.len(),
        }))
    }
}

/// Appends the new rows of the program's first `steps` steps to `cache`.
///
/// # Safety
/// Every phase of those steps has committed.
unsafe fn append_steps(step: &Step, steps: usize, cache: &mut KvCache) -> Result<()> {
    let kv_out = step.kv_out();
    for (s, buffers) in step.steps[..steps].iter().enumerate() {
        for (layer, block) in buffers.blocks.iter().enumerate() {
            // SAFETY: the step has committed (the contract).
            let (k, v) = unsafe { (block.keys.read(), block.values.read()) };
            for i in 0..step.rows_of(s) {
                let pos = step.cached + step.first_row(s) + i;
                cache.write_row(
                    layer,
                    pos,
                    &k[i * kv_out..][..kv_out],
                    &v[i * kv_out..][..kv_out],
                )?;
            }
        }
    }
    cache.len = step.cached + step.first_row(steps);
    Ok(())
}

/// A greedy decode run on the kernels' pool ([`Model::decode`]): its threads compute step after
/// step, picking each next token themselves, while the caller takes the picks as they come.
/// Dropped without [`Decode::finish`], it stops and leaves the cache as it was.
pub struct Decode {
    running: pool::Running<'static, Step>,
    step_phases: usize,
    /// Picks the caller has taken.
    taken: usize,
    /// The cache's length when the run started.
    cached: usize,
}

impl Decode {
    /// Steps the run has.
    pub fn steps(&self) -> usize {
        self.running.program().steps.len()
    }

    /// Picks taken so far: the inputs of that many steps go to the cache on
    /// [`Decode::finish`].
    pub fn taken(&self) -> usize {
        self.taken
    }

    /// The next step's pick, once it is made (this thread helps compute it): the token and the
    /// logits it was picked from, as [`Pick::pick`] rewrote them. `None` when the steps are
    /// used up or the last pick ended the run ([`Pick::stops`]). A panic in the run is resumed
    /// here.
    pub fn next_pick(&mut self) -> Option<(u32, &[f32])> {
        let step = self.taken;
        if step >= self.steps() || self.running.program().skipped(step) {
            return None;
        }
        let program = self.running.until((step + 1) * self.step_phases);
        self.taken += 1;
        let buffers = &program.steps[step];
        // SAFETY: the step's pick phase, which writes both, has committed.
        Some((buffers.picked.load(Ordering::Relaxed), unsafe { buffers.mixed.read() }))
    }

    /// Stops the run and appends to `cache` (the one the run started from, untouched since)
    /// the inputs of the steps whose picks were taken: the first token, then every pick but
    /// the last. Returns those tokens.
    pub fn finish(self, cache: &mut KvCache) -> Result<Vec<u32>> {
        if cache.len() != self.cached || cache.keys.len() != self.running.program().layers() {
            return Err(ModelError::Usage(format!(
                "a decode run started at position {} was finished on a cache of {} positions",
                self.cached,
                cache.len()
            )));
        }
        let step = self.running.program();
        // SAFETY: every phase of the steps whose picks were taken has committed.
        unsafe { append_steps(step, self.taken, cache)? };
        let mut tokens = step.ids.clone();
        tokens.extend(
            step.steps[..self.taken.saturating_sub(1)]
                .iter()
                .map(|s| s.picked.load(Ordering::Relaxed)),
        );
        tokens.truncate(self.taken);
        Ok(tokens)
    }
}
