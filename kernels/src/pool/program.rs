//! Programs: a computation written as a fixed sequence of phases, each split into chunks, that
//! every thread of the pool runs from its first phase to its last. Nobody hands the work out, so
//! whichever threads the OS lets run carry it forward, and one that is descheduled holds nothing
//! up: once the others have claimed every chunk of a phase, a chunk whose claimant has not
//! finished it is computed again by a thread that is waiting for it, and the first result to
//! arrive is the one written.
//!
//! That is sound because a chunk is computed into the computing thread's own memory
//! ([`Program::Local`]) and only then committed: the one thread that wins the chunk's state word
//! writes it to the program's outputs, exactly once. A chunk reads only its phase's inputs, which
//! earlier phases committed in full, so every computation of it gives the same bits; results do
//! not depend on which thread computed what, or how many there were.
//!
//! Each run is its own allocation, shared with the threads that join it: a thread that wakes up
//! in the middle of a chunk after the run has finished (its caller already gone on) finishes its
//! arithmetic on memory the run keeps alive, loses the commit, and leaves.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A computation in phases of chunks that any number of threads run together (see the module
/// documentation). Phase `p` may read what phases before it committed; a chunk's computation
/// must depend on nothing else, so that computing it twice gives the same result.
pub trait Program: Send + Sync + 'static {
    /// A participating thread's own working memory: what [`Program::enter`] prepares and
    /// [`Program::compute`] writes a chunk's result to.
    type Local: Default;

    /// Phases, run in order.
    fn phases(&self) -> usize;

    /// Chunks of `phase` (at least one).
    fn chunks(&self, phase: usize) -> usize;

    /// Prepares `local` for the chunks of `phase` (called once per thread and phase, before its
    /// first chunk there), from the outputs of earlier phases.
    fn enter(&self, phase: usize, local: &mut Self::Local);

    /// Computes `chunk` of `phase` into `local`, from `local` and earlier phases' outputs.
    fn compute(&self, phase: usize, chunk: usize, local: &mut Self::Local);

    /// Writes the result of `chunk` of `phase`, which `local` holds, to the program's outputs.
    ///
    /// # Safety
    /// The runner calls it exactly once per chunk, after [`Program::compute`] of that chunk on
    /// the same `local`; different chunks of a phase may commit at the same time, so they must
    /// write disjoint outputs.
    unsafe fn commit(&self, phase: usize, chunk: usize, local: &Self::Local);
}

/// The chunk's result is not written yet (it may or may not have been claimed).
const OPEN: u8 = 0;
/// A thread is writing the chunk's result.
const COMMITTING: u8 = 1;
/// The chunk's result is written.
const DONE: u8 = 2;

/// The least a thread waits for another's chunk before computing it itself; longer for longer
/// chunks ([`redo_after`]).
const REDO_MIN: Duration = Duration::from_micros(20);

/// How long to wait for a chunk another thread claimed before computing it too: twice what this
/// thread's own last chunk of the phase took (the chunks of a phase are about the same size), and
/// at least [`REDO_MIN`]. On an idle machine the claimant nearly always finishes first.
fn redo_after(own: Duration) -> Duration {
    (2 * own).max(REDO_MIN)
}

/// One run of a program: its chunks' states and the threads' shared progress.
pub(crate) struct Run<P: Program> {
    program: P,
    /// Index in `states` of each phase's first chunk, and the total at the end.
    first: Box<[usize]>,
    states: Box<[AtomicU8]>,
    /// Per phase, the next chunk to claim.
    next: Box<[AtomicUsize]>,
    /// Per phase, chunks committed.
    done: Box<[AtomicUsize]>,
    /// Set when a participant panicked: the others stop.
    failed: AtomicBool,
    /// Set when the caller no longer wants the rest ([`Run::cancel`]): everyone stops.
    cancelled: AtomicBool,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Chunks computed by a second thread because their claimant had not finished them.
    redone: AtomicUsize,
}

/// A run as the pool's workers see it, whatever its program.
pub(crate) trait Participant: Send + Sync {
    /// Works on the run until every phase is committed (or a participant panicked).
    fn participate(&self);
}

impl<P: Program> Participant for Run<P> {
    fn participate(&self) {
        self.participate_until(&mut P::Local::default(), self.program.phases());
    }
}

/// What is left of a phase once every chunk has been claimed.
enum Left {
    /// Every chunk is committed.
    Nothing,
    /// Chunks are being written by the threads that won them.
    Committing,
    /// This chunk's result is not written and nobody is writing it.
    Open(usize),
}

impl<P: Program> Run<P> {
    pub(crate) fn new(program: P) -> Self {
        let phases = program.phases();
        let mut first = Vec::with_capacity(phases + 1);
        first.push(0);
        for phase in 0..phases {
            let chunks = program.chunks(phase);
            assert!(chunks > 0, "phase {phase} of a program has no chunks");
            first.push(first[phase] + chunks);
        }
        let total = first[phases];
        Self {
            program,
            first: first.into(),
            states: (0..total).map(|_| AtomicU8::new(OPEN)).collect(),
            next: (0..phases).map(|_| AtomicUsize::new(0)).collect(),
            done: (0..phases).map(|_| AtomicUsize::new(0)).collect(),
            failed: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            panic: Mutex::new(None),
            redone: AtomicUsize::new(0),
        }
    }

    /// The program, for its outputs once [`Run::finish`] has returned.
    pub(crate) fn program(&self) -> &P {
        &self.program
    }

    /// Chunks a second thread computed (and perhaps committed) because their claimant stalled.
    pub(crate) fn redone(&self) -> usize {
        self.redone.load(Ordering::Relaxed)
    }

    /// Works on the run with `local` until its phases before `until` are committed, or a
    /// participant panicked, or the run was cancelled. A panic here stops the run and is kept
    /// for [`Run::finish`].
    pub(crate) fn participate_until(&self, local: &mut P::Local, until: usize) {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.work(local, until))) {
            self.failed.store(true, Ordering::SeqCst);
            self.panic.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(payload);
        }
    }

    /// Stops the run: threads in it leave at their next chunk, and what is not committed yet
    /// never will be.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// After the caller's [`Participant::participate`]: resumes a participant's panic, if any.
    pub(crate) fn finish(&self) {
        if self.failed.load(Ordering::SeqCst) {
            let payload = self.panic.lock().unwrap_or_else(PoisonError::into_inner).take();
            resume_unwind(payload.unwrap_or_else(|| Box::new("a program's participant panicked")));
        }
    }

    fn chunks(&self, phase: usize) -> usize {
        self.first[phase + 1] - self.first[phase]
    }

    fn complete(&self, phase: usize) -> bool {
        self.done[phase].load(Ordering::Acquire) == self.chunks(phase)
    }

    fn work(&self, local: &mut P::Local, until: usize) {
        for phase in 0..until.min(self.program.phases()) {
            if self.complete(phase) {
                continue;
            }
            self.program.enter(phase, local);
            let chunks = self.chunks(phase);
            // What this thread's last chunk of the phase took, and since when it has waited.
            let mut own = Duration::ZERO;
            let mut waiting: Option<(Instant, u32)> = None;
            loop {
                if self.failed.load(Ordering::Relaxed) || self.cancelled.load(Ordering::Relaxed) {
                    return;
                }
                if self.next[phase].load(Ordering::Relaxed) < chunks {
                    let chunk = self.next[phase].fetch_add(1, Ordering::Relaxed);
                    if chunk < chunks {
                        let start = Instant::now();
                        self.program.compute(phase, chunk, local);
                        own = start.elapsed();
                        self.commit(phase, chunk, local);
                    }
                    continue;
                }
                match self.left(phase) {
                    Left::Nothing => break,
                    Left::Open(chunk)
                        if waiting.is_some_and(|(since, _)| since.elapsed() >= redo_after(own)) =>
                    {
                        self.redone.fetch_add(1, Ordering::Relaxed);
                        self.program.compute(phase, chunk, local);
                        self.commit(phase, chunk, local);
                        waiting = None;
                    }
                    Left::Open(_) | Left::Committing => {
                        let (since, spins) = waiting.get_or_insert_with(|| (Instant::now(), 0));
                        *spins += 1;
                        // A committer descheduled mid-write (rare: a write is a few hundred
                        // values) gets the core back sooner if we yield it.
                        if spins.is_multiple_of(256) && since.elapsed() > redo_after(own) {
                            std::thread::yield_now();
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                }
            }
        }
    }

    fn left(&self, phase: usize) -> Left {
        let states = &self.states[self.first[phase]..self.first[phase + 1]];
        let mut left = Left::Nothing;
        // From the end: the last chunks claimed are the likeliest to be still running.
        for (chunk, state) in states.iter().enumerate().rev() {
            match state.load(Ordering::Acquire) {
                OPEN => return Left::Open(chunk),
                COMMITTING => left = Left::Committing,
                _ => {}
            }
        }
        left
    }

    /// Writes `chunk`'s result from `local` unless another thread has written or is writing it.
    fn commit(&self, phase: usize, chunk: usize, local: &P::Local) {
        let state = &self.states[self.first[phase] + chunk];
        if state.compare_exchange(OPEN, COMMITTING, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            // SAFETY: this thread won the chunk's one transition out of OPEN, so this is its one
            // commit, and `local` holds its computation (made just before on this thread).
            unsafe { self.program.commit(phase, chunk, local) };
            state.store(DONE, Ordering::Release);
            self.done[phase].fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use super::*;

    /// Phase `p` chunk `c` writes `f(p, c) = sum of phase p − 1's outputs + p·c` (phase 0: `c`),
    /// optionally sleeping on some chunks to force redos.
    struct Sums {
        outputs: Vec<Vec<AtomicU64>>,
        writes: Vec<Vec<AtomicU64>>,
        slow: Option<(usize, usize)>,
    }

    #[derive(Default)]
    struct Local {
        input: u64,
        value: u64,
    }

    impl Program for Sums {
        type Local = Local;
        fn phases(&self) -> usize {
            self.outputs.len()
        }
        fn chunks(&self, phase: usize) -> usize {
            self.outputs[phase].len()
        }
        fn enter(&self, phase: usize, local: &mut Local) {
            local.input = match phase {
                0 => 0,
                p => self.outputs[p - 1].iter().map(|v| v.load(Ordering::Relaxed)).sum(),
            };
        }
        fn compute(&self, phase: usize, chunk: usize, local: &mut Local) {
            if self.slow == Some((phase, chunk)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            local.value = local.input + (phase * chunk) as u64 + chunk as u64;
        }
        unsafe fn commit(&self, phase: usize, chunk: usize, local: &Local) {
            self.outputs[phase][chunk].store(local.value, Ordering::Relaxed);
            self.writes[phase][chunk].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sums(shape: &[usize], slow: Option<(usize, usize)>) -> Sums {
        let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect();
        Sums {
            outputs: shape.iter().map(|&n| zeros(n)).collect(),
            writes: shape.iter().map(|&n| zeros(n)).collect(),
            slow,
        }
    }

    fn expected(shape: &[usize]) -> Vec<Vec<u64>> {
        let mut out: Vec<Vec<u64>> = Vec::new();
        for (p, &n) in shape.iter().enumerate() {
            let input: u64 = out.last().map_or(0, |o| o.iter().sum());
            out.push((0..n).map(|c| input + (p * c + c) as u64).collect());
        }
        out
    }

    #[test]
    fn every_chunk_commits_once_and_phases_see_whole_inputs() {
        let shape = [3, 16, 1, 7, 40];
        for threads in 1..=4 {
            let run = Arc::new(Run::new(sums(&shape, None)));
            let helpers: Vec<_> = (1..threads)
                .map(|_| {
                    let run = Arc::clone(&run);
                    std::thread::spawn(move || run.participate())
                })
                .collect();
            run.participate();
            run.finish();
            let got: Vec<Vec<u64>> = run
                .program()
                .outputs
                .iter()
                .map(|p| p.iter().map(|v| v.load(Ordering::Relaxed)).collect())
                .collect();
            assert_eq!(got, expected(&shape), "{threads} threads");
            let writes = &run.program().writes;
            assert!(writes.iter().flatten().all(|w| w.load(Ordering::Relaxed) == 1));
            helpers.into_iter().for_each(|h| h.join().unwrap());
        }
    }

    #[test]
    fn a_stalled_claimant_is_overtaken_and_its_late_result_is_dropped() {
        // The helper claims chunk 0 of phase 1 first and sleeps in it; the caller redoes it.
        let shape = [1, 2, 3];
        let run = Arc::new(Run::new(sums(&shape, Some((1, 0)))));
        run.next[0].store(1, Ordering::Relaxed);
        run.states[0].store(DONE, Ordering::Relaxed);
        run.done[0].store(1, Ordering::Relaxed);
        run.next[1].store(1, Ordering::Relaxed);
        let helper = {
            let run = Arc::clone(&run);
            std::thread::spawn(move || {
                let mut local = Local::default();
                run.program.enter(1, &mut local);
                run.program.compute(1, 0, &mut local);
                run.commit(1, 0, &local);
            })
        };
        run.participate();
        run.finish();
        assert!(run.redone() >= 1, "the stalled chunk was not redone");
        helper.join().unwrap();
        let writes = &run.program().writes;
        assert_eq!(writes[1][0].load(Ordering::Relaxed), 1, "committed twice");
        let got: Vec<u64> =
            run.program().outputs[2].iter().map(|v| v.load(Ordering::Relaxed)).collect();
        assert_eq!(&got[..], &expected(&shape)[2][..]);
    }

    #[test]
    fn a_panic_stops_the_run_and_reaches_the_caller() {
        struct Boom;
        impl Program for Boom {
            type Local = ();
            fn phases(&self) -> usize {
                2
            }
            fn chunks(&self, _: usize) -> usize {
                4
            }
            fn enter(&self, _: usize, _: &mut ()) {}
            fn compute(&self, phase: usize, chunk: usize, _: &mut ()) {
                assert!(!(phase == 1 && chunk == 2), "chunk 2");
            }
            unsafe fn commit(&self, _: usize, _: usize, _: &()) {}
        }
        let run = Run::new(Boom);
        run.participate();
        assert!(catch_unwind(AssertUnwindSafe(|| run.finish())).is_err());
    }
}
