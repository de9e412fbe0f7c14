//! The kernels' thread pool: one set of threads for every parallel kernel, work claimed in small
//! chunks, waits that spin briefly and then park (so a machine busy with other work slows the
//! kernels by about its fair share instead of collapsing them), and a thread count that adapts
//! to that load. Also the one output buffer the threads fill in disjoint parts.
//!
//! The thread count is `RAYON_NUM_THREADS`, else the physical cores, as for candle's rayon
//! threads (`CANDLE_NUM_THREADS` sizes only candle's own barrier pool, which its large
//! elementwise ops and Q4_K matmul still use); [`set_thread_cap`] lowers it, and
//! `M31R_ADAPTIVE_THREADS=0` (or [`set_adaptive`]) turns adaptation off. Results never depend on
//! either.

mod adapt;
mod program;
mod workers;

use std::ops::Range;
use std::sync::OnceLock;

pub use adapt::Policy;
pub use program::Program;
use workers::Pool;
pub use workers::{Running, Stats};

/// The process's pool, started on first use.
fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let pool = Pool::new(candle_core::utils::get_num_threads());
        let off = std::env::var("M31R_ADAPTIVE_THREADS")
            .is_ok_and(|v| v == "0" || v.eq_ignore_ascii_case("false"));
        pool.policy().set_adaptive(!off);
        pool
    })
}

/// Threads the pool has (the calling thread included): the most a parallel kernel uses.
pub fn max_threads() -> usize {
    pool().threads()
}

/// Threads the pool uses now: the cap, or fewer while the cores are busy with other work.
pub fn threads() -> usize {
    pool().policy().threads()
}

/// Caps the threads the kernels use at `cap` (0 or more than [`max_threads`]: all of them).
pub fn set_thread_cap(cap: usize) {
    let all = max_threads();
    pool().policy().set_cap(if cap == 0 { all } else { cap.min(all) });
}

/// Turns the adaptive thread count on (the default) or off (always the cap).
pub fn set_adaptive(adaptive: bool) {
    pool().policy().set_adaptive(adaptive);
}

/// A copy of the pool's policy state: its cap, whether it adapts, the count now, its drops.
pub fn policy() -> Policy {
    pool().policy().clone()
}

/// Announces parallel work within `within` (a request about to run the model): the pool's
/// parked threads wake now and wait for it without parking again, so that on a machine whose
/// cores are busy their wake-up overlaps what the caller does first. Nothing happens if no work
/// comes; they park again once `within` has passed.
pub fn warm(within: std::time::Duration) {
    pool().warm(within);
}

/// Timings of the parallel sections so far (for benches).
pub fn stats() -> Stats {
    pool().stats()
}

/// Runs `program` ([`Program`]: phases of chunks that every participating thread runs through,
/// none waiting for a stalled one) on the pool when `parallel`, else on this thread; then returns
/// what `finish` reads from it. Its results are the same either way.
pub fn run_program<P: Program, R>(program: P, parallel: bool, finish: impl FnOnce(&P) -> R) -> R {
    pool().run_program(program, parallel, finish)
}

/// Starts `program` on the pool (when `parallel`, else it runs only where the caller joins it)
/// and hands it to the caller, who joins it a phase at a time with [`Running::until`] and may
/// drop it before its end, cancelling the rest: a decode run that yields each token as soon as
/// it is picked while the pool goes on with the next.
pub fn start_program<P: Program>(program: P, parallel: bool) -> Running<'static, P> {
    pool().start_program(program, parallel)
}

/// An output buffer that parallel workers fill in disjoint parts: rows of values, or slots of a
/// vector that one worker each replaces.
pub(crate) struct Out<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: workers only reach the buffer through `Out::part` (or the raw pointer, with the same
// contract), whose callers guarantee the parts they take are disjoint; the buffer outlives the
// parallel section (it is borrowed for its duration), and `T: Send` lets each part move to the
// worker that writes it.
unsafe impl<T: Send> Sync for Out<T> {}

impl<T> Out<T> {
    pub(crate) fn new(buffer: &mut [T]) -> Self {
        Self { ptr: buffer.as_mut_ptr(), len: buffer.len() }
    }

    /// The start of the buffer, for writers that address it with strides (each must keep to
    /// elements no other worker writes).
    pub(crate) fn as_mut_ptr(&self) -> *mut T {
        self.ptr
    }

    /// Elements `range` of the buffer.
    ///
    /// # Safety
    /// No two live parts may overlap.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn part(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len, "part out of bounds");
        // SAFETY: in bounds (checked above) and, by the caller's contract, not aliased.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

/// Below this many bytes of operands a kernel runs on the calling thread: waking the pool's other
/// threads and waiting for the slowest costs more than the work (the `tiny` preset's matrices).
pub(crate) const INLINE_BYTES: usize = 96 << 10;

/// Runs `f` over chunks of `0..items` on the pool, or over all of them on this thread when
/// `inline`. Each item is in exactly one chunk; which thread runs it varies.
pub(crate) fn run(items: usize, inline: bool, f: impl Fn(Range<usize>) + Sync) {
    if inline {
        f(0..items);
    } else {
        pool().run(items, f);
    }
}

/// Rows per work item of [`row_blocks`]: large enough to amortise scheduling, small enough to
/// balance two cores.
pub(crate) const BLOCK_ROWS: usize = 16;

/// Calls `f(block, rows)` for every block of [`BLOCK_ROWS`] rows out of `n_rows`, in parallel.
/// Each block index is handed out exactly once, so per-block partial results can be summed in
/// block order, whatever the thread count.
pub(crate) fn row_blocks(n_rows: usize, f: impl Fn(usize, Range<usize>) + Sync) {
    let blocks = n_rows.div_ceil(BLOCK_ROWS);
    if blocks <= 1 {
        // One block (a decode step's row): waking the pool would cost more than the work.
        f(0, 0..n_rows);
        return;
    }
    run(blocks, false, |range| {
        for block in range {
            let start = block * BLOCK_ROWS;
            f(block, start..n_rows.min(start + BLOCK_ROWS));
        }
    });
}

/// Elements per row of [`element_spans`]: the parallel work unit of the elementwise kernels.
pub(crate) const ELEMENT_ROW: usize = 4096;

/// Calls `f(block, span)` for the spans of `0..len` that the [`row_blocks`] of rows of
/// [`ELEMENT_ROW`] elements cover, in parallel.
pub(crate) fn element_spans(len: usize, f: impl Fn(usize, Range<usize>) + Sync) {
    row_blocks(len.div_ceil(ELEMENT_ROW), |block, rows| {
        f(block, rows.start * ELEMENT_ROW..(rows.end * ELEMENT_ROW).min(len));
    });
}
