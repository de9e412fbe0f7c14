//! Work shared out over candle's own thread pool (so the kernels share its threads instead of
//! competing with them), and the one output buffer its workers fill in disjoint parts.

use std::ops::Range;

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

/// Runs `f` over chunks of `0..items` on candle's thread pool, or over all of them on this thread
/// when `inline`.
pub(crate) fn run(items: usize, inline: bool, f: impl Fn(Range<usize>) + Sync) {
    if inline {
        f(0..items);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, f);
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
