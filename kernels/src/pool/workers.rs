//! The kernels' own worker threads: one parallel section at a time, its items claimed in small
//! chunks from a shared cursor, and waits that spin briefly, then yield, then park.
//!
//! A thread the OS has descheduled can hold up only the one chunk it claimed: everything else is
//! taken by whoever runs. The caller waits only for claimed chunks to finish, never for a worker
//! to turn up, and a worker that turns up late finds nothing left to claim. Neither the caller nor
//! an idle worker spins for longer than [`SPIN`]; after that they park (a futex on Linux), so a
//! busy machine's cores go to whoever has work instead of to our waiting.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::adapt::Policy;
use super::program::{Participant, Program, Run};

/// How long a waiting thread spins before it yields.
pub(crate) const SPIN: Duration = Duration::from_micros(30);
/// How long a waiting thread yields (after spinning) before it parks.
pub(crate) const YIELD: Duration = Duration::from_micros(50);
/// Chunks per participating thread: small enough that a thread descheduled mid-chunk holds up
/// little, large enough that claiming costs nothing next to the work.
const CHUNKS_PER_THREAD: usize = 8;
/// The most chunks of one section (they are counted in 16 bits of the cursor word).
const MAX_CHUNKS: usize = u16::MAX as usize;

thread_local! {
    /// Set on the pool's own threads: a section started from inside one runs inline.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// The state word: generation (32 bits), chunks of the section (16), next chunk to claim (16).
/// One word, so a claim can only succeed on a chunk of the section it read the count of.
fn pack(generation: u32, chunks: usize, next: usize) -> u64 {
    (u64::from(generation) << 32) | ((chunks as u64) << 16) | next as u64
}

fn generation(state: u64) -> u32 {
    (state >> 32) as u32
}

/// `(chunks, next)` of a state word.
fn cursor(state: u64) -> (usize, usize) {
    (((state >> 16) & 0xffff) as usize, (state & 0xffff) as usize)
}

/// Claims the next chunk of the current section: its index, or `None` when all are claimed.
fn claim(state: &AtomicU64) -> Option<usize> {
    let mut s = state.load(Ordering::Acquire);
    loop {
        let (chunks, next) = cursor(s);
        if next >= chunks {
            return None;
        }
        match state.compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(next),
            Err(now) => s = now,
        }
    }
}

/// The section being run: written by the caller before it publishes the state word, read by a
/// thread only while it holds a claimed, unfinished chunk (so the caller cannot rewrite it).
struct Job {
    /// Calls the section's closure on a range of items.
    call: unsafe fn(*const (), Range<usize>),
    /// The closure.
    data: *const (),
    items: usize,
    chunk: usize,
    chunks: usize,
    /// The caller, parked or not, to wake when the last chunk finishes.
    caller: Option<Thread>,
}

/// # Safety
/// `data` must point to a live `F`.
unsafe fn call<F: Fn(Range<usize>) + Sync>(data: *const (), range: Range<usize>) {
    // SAFETY: by the caller's contract.
    unsafe { (*data.cast::<F>())(range) }
}

/// One worker's wake-up flag, on its own cache line.
#[repr(align(64))]
struct Slot {
    /// Set by the worker just before it parks (and re-checks the state word).
    sleeping: AtomicBool,
    thread: OnceLock<Thread>,
}

/// What the threads share.
struct Shared {
    state: AtomicU64,
    /// Chunks of the current section finished.
    done: AtomicUsize,
    /// Workers (by index) that may join the current section: the adaptive thread count less one.
    helpers: AtomicUsize,
    /// Set by the caller just before it parks waiting for the last chunks.
    caller_sleeping: AtomicBool,
    job: UnsafeCell<Job>,
    /// The program being run, if any: a worker woken for a new generation joins it.
    program: Mutex<Option<Arc<dyn Participant>>>,
    /// Until when (nanoseconds after `epoch`) idle workers spin rather than park: work is
    /// about to come ([`Pool::warm`]).
    warm_until: AtomicU64,
    epoch: Instant,
    slots: Box<[Slot]>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` is written only by the one caller (under `Pool::caller`) while no chunk of a
// section is claimed and unfinished, and read only by threads holding such a chunk; everything
// else is atomics, a mutex and `Thread` handles. `data` points to a `Sync` closure.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer in `job` is only dereferenced under that protocol.
unsafe impl Send for Shared {}

impl Shared {
    /// Whether work was announced and is still expected ([`Pool::warm`]).
    fn warm(&self) -> bool {
        (self.epoch.elapsed().as_nanos() as u64) < self.warm_until.load(Ordering::Relaxed)
    }

    /// Unparks the first `helpers` workers that are parked, after a new section or program has
    /// been published.
    fn wake(&self, helpers: usize) {
        for slot in &self.slots[..helpers] {
            if slot.sleeping.load(Ordering::SeqCst)
                && let Some(thread) = slot.thread.get()
            {
                thread.unpark();
            }
        }
    }
}

/// Timings of the parallel sections, summed since the pool started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sections run on more than one thread.
    pub sections: u64,
    /// Wall time of those sections, in nanoseconds.
    pub section_ns: u64,
    /// Of which the caller spent waiting for chunks other threads had claimed, in nanoseconds.
    pub wait_ns: u64,
    /// Sections run inline: too small, nested, on one thread, or while another caller ran one.
    pub inline_sections: u64,
    /// Programs run ([`super::program`]), on the pool or inline.
    pub programs: u64,
    /// Chunks of programs that a second thread computed because their claimant had stalled.
    pub redone_chunks: u64,
}

/// The pool: `threads - 1` workers plus whichever thread calls [`Pool::run`].
pub(crate) struct Pool {
    shared: Arc<Shared>,
    /// One section at a time; the generation of the last one.
    caller: Mutex<u32>,
    policy: Mutex<Policy>,
    stats: Mutex<Stats>,
    started: Instant,
}

impl Pool {
    /// A pool of `threads` (the caller included), its workers started now.
    pub(crate) fn new(threads: usize) -> Self {
        let workers = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            state: AtomicU64::new(pack(0, 0, 0)),
            done: AtomicUsize::new(0),
            helpers: AtomicUsize::new(0),
            caller_sleeping: AtomicBool::new(false),
            job: UnsafeCell::new(Job {
                call: call::<fn(Range<usize>)>,
                data: std::ptr::null(),
                items: 0,
                chunk: 1,
                chunks: 0,
                caller: None,
            }),
            program: Mutex::new(None),
            warm_until: AtomicU64::new(0),
            epoch: Instant::now(),
            slots: (0..workers)
                .map(|_| Slot { sleeping: AtomicBool::new(false), thread: OnceLock::new() })
                .collect(),
            panic: Mutex::new(None),
        });
        for index in 0..workers {
            let shared = Arc::clone(&shared);
            // Without this worker the pool runs on fewer threads: nobody waits for a worker that
            // never claims a chunk.
            let _ = std::thread::Builder::new()
                .name(format!("m31r-kernel-{index}"))
                .spawn(move || worker(&shared, index));
        }
        Self {
            shared,
            caller: Mutex::new(0),
            policy: Mutex::new(Policy::new(threads.max(1))),
            stats: Mutex::new(Stats::default()),
            started: Instant::now(),
        }
    }

    /// Threads the pool has, the caller included.
    pub(crate) fn threads(&self) -> usize {
        self.shared.slots.len() + 1
    }

    /// The adaptive policy (its cap and current thread count).
    pub(crate) fn policy(&self) -> std::sync::MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Announces work within `within`: parked workers wake and wait for it spinning (yielding
    /// their core to anyone who wants it), so that the next section or program finds them
    /// running rather than asleep. On a busy machine a parked thread can wait milliseconds for
    /// a core once it is woken; the caller hides that behind what it does first (a request's
    /// prompt building).
    pub(crate) fn warm(&self, within: Duration) {
        let shared = &*self.shared;
        let until = (shared.epoch.elapsed() + within).as_nanos() as u64;
        shared.warm_until.fetch_max(until, Ordering::Relaxed);
        let threads = self.policy().cap().min(self.threads());
        shared.wake(threads - 1);
    }

    /// The section timings so far.
    pub(crate) fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count_inline(&self) {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner).inline_sections += 1;
    }

    /// Runs `f` over ranges that cover `0..items` exactly once, on as many threads as the policy
    /// allows; returns when every range has run. A panic in `f` is resumed here, after every
    /// claimed range has finished.
    pub(crate) fn run<F: Fn(Range<usize>) + Sync>(&self, items: usize, f: F) {
        if items == 0 {
            return;
        }
        let threads = self.policy().threads_at(self.started.elapsed()).min(self.threads());
        if threads <= 1 || items == 1 || IN_POOL.with(Cell::get) {
            self.count_inline();
            f(0..items);
            return;
        }
        // Another thread's section is running (tests, a second engine): run this one here
        // rather than wait for it.
        let Ok(mut generation) = self.caller.try_lock() else {
            self.count_inline();
            f(0..items);
            return;
        };
        let start = Instant::now();
        let shared = &*self.shared;
        let chunks = items.min(threads * CHUNKS_PER_THREAD).min(MAX_CHUNKS);
        let chunk = items.div_ceil(chunks);
        let chunks = items.div_ceil(chunk);
        // SAFETY: no chunk of the previous section is claimed and unfinished (the previous call
        // returned only once all were done), so no other thread reads the job now.
        unsafe {
            *shared.job.get() = Job {
                call: call::<F>,
                data: std::ptr::from_ref(&f).cast(),
                items,
                chunk,
                chunks,
                caller: Some(std::thread::current()),
            };
        }
        shared.done.store(0, Ordering::Relaxed);
        shared.helpers.store(threads - 1, Ordering::Relaxed);
        *generation = generation.wrapping_add(1);
        shared.state.store(pack(*generation, chunks, 0), Ordering::SeqCst);
        shared.wake(threads - 1);

        let own = catch_unwind(AssertUnwindSafe(|| {
            while let Some(index) = claim(&shared.state) {
                run_chunk(shared, index);
            }
        }));
        let waiting = Instant::now();
        let done = || shared.done.load(Ordering::SeqCst) >= chunks;
        wait(done, &shared.caller_sleeping, true, || false);
        let end = Instant::now();
        drop(generation);

        let section = end - start;
        let waited = end - waiting;
        {
            let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            stats.sections += 1;
            stats.section_ns += section.as_nanos() as u64;
            stats.wait_ns += waited.as_nanos() as u64;
        }
        self.policy().record(threads, section, waited, end - self.started);

        if let Err(payload) = own {
            resume_unwind(payload);
        }
        let payload = shared.panic.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(payload) = payload {
            resume_unwind(payload);
        }
    }
}

impl Pool {
    /// Runs `program` to its end on the calling thread and, when `parallel` (and the pool has
    /// threads to spare), on the workers too; then `finish` reads its outputs. Returns as soon as
    /// every phase is committed, whoever committed it: a worker still inside a chunk finishes on
    /// its own (see [`super::program`]). A panic in the program is resumed here.
    pub(crate) fn run_program<P: Program, R>(
        &self,
        program: P,
        parallel: bool,
        finish: impl FnOnce(&P) -> R,
    ) -> R {
        let mut running = self.start_program(program, parallel);
        let phases = running.program().phases();
        finish(running.until(phases))
    }

    /// Publishes `program` to the workers (when `parallel` and the pool has threads to spare)
    /// and returns it to the caller, who joins it phase by phase ([`Running::until`]) while the
    /// workers carry it on: a decode run whose caller hands out each token as it comes.
    pub(crate) fn start_program<P: Program>(&self, program: P, parallel: bool) -> Running<'_, P> {
        let run = Arc::new(Run::new(program));
        // Programs keep the cap's threads while the machine is busy: their chunks do not wait
        // for a stalled thread (it is overtaken), which is what the adaptive count guards.
        let threads = self.policy().cap().min(self.threads());
        let mut generation = if parallel && threads > 1 && !IN_POOL.with(Cell::get) {
            self.caller.try_lock().ok()
        } else {
            None
        };
        if let Some(generation) = generation.as_mut() {
            let shared = &*self.shared;
            *shared.program.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(Arc::clone(&run) as Arc<dyn Participant>);
            shared.helpers.store(threads - 1, Ordering::Relaxed);
            **generation = generation.wrapping_add(1);
            // No chunks of a section to claim: workers that wake find the program instead.
            shared.state.store(pack(**generation, 0, 0), Ordering::SeqCst);
            shared.wake(threads - 1);
        }
        Running { pool: self, run, local: P::Local::default(), generation }
    }
}

/// A program published on the pool ([`Pool::start_program`]), which its caller joins a phase
/// at a time. Dropping it cancels what is left of the run and takes it off the pool.
pub struct Running<'a, P: Program> {
    pool: &'a Pool,
    run: Arc<Run<P>>,
    /// The caller's working memory in the run.
    local: P::Local,
    /// Held while the run is published: no section or other program can take the workers.
    generation: Option<MutexGuard<'a, u32>>,
}

impl<P: Program> Running<'_, P> {
    /// The program, to read what its committed phases wrote.
    pub fn program(&self) -> &P {
        self.run.program()
    }

    /// Works on the run on this thread until its phases before `until` are committed (by
    /// whichever threads), then returns the program to read them. A panic in any participant
    /// is resumed here.
    pub fn until(&mut self, until: usize) -> &P {
        // Phases already committed are passed over at once.
        self.run.participate_until(&mut self.local, until);
        self.run.finish();
        self.run.program()
    }
}

impl<P: Program> Drop for Running<'_, P> {
    fn drop(&mut self) {
        self.run.cancel();
        if self.generation.is_some() {
            *self.pool.shared.program.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        let mut stats = self.pool.stats.lock().unwrap_or_else(PoisonError::into_inner);
        stats.programs += 1;
        stats.redone_chunks += self.run.redone() as u64;
    }
}

/// Runs claimed chunk `index` of the current section and counts it done, waking the caller if
/// it was the last.
fn run_chunk(shared: &Shared, index: usize) {
    // SAFETY: this thread holds chunk `index`, claimed and not yet counted done, so the caller
    // is still inside `Pool::run` and has not rewritten the job.
    let job = unsafe { &*shared.job.get() };
    let first = index * job.chunk;
    let range = first..job.items.min(first + job.chunk);
    let (chunks, caller) = (job.chunks, job.caller.clone());
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `data` is the caller's closure, alive until every chunk is done.
        unsafe { (job.call)(job.data, range) }
    }));
    if let Err(payload) = result {
        let mut slot = shared.panic.lock().unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(payload);
    }
    // The job may be rewritten from here on: only the copies above are used.
    if shared.done.fetch_add(1, Ordering::SeqCst) + 1 == chunks
        && shared.caller_sleeping.load(Ordering::SeqCst)
        && let Some(caller) = caller
    {
        caller.unpark();
    }
}

/// Waits until `ready()`: spins for [`SPIN`] and yields for [`YIELD`] if `spin`, then parks with
/// `sleeping` set (whoever makes it ready unparks this thread when it sees the flag); while
/// `warm()` holds (work was announced), it waits yielding instead of parking.
fn wait(ready: impl Fn() -> bool, sleeping: &AtomicBool, spin: bool, warm: impl Fn() -> bool) {
    if spin && spin_until(&ready) {
        return;
    }
    loop {
        if linger(&ready, &warm) {
            return;
        }
        sleeping.store(true, Ordering::SeqCst);
        if ready() {
            sleeping.store(false, Ordering::SeqCst);
            return;
        }
        // An unpark between the check and here leaves a token: park returns at once.
        std::thread::park_timeout(Duration::from_secs(1));
        sleeping.store(false, Ordering::SeqCst);
        if ready() {
            return;
        }
    }
}

/// While `warm()` holds, waits for `ready()`, yielding the core between short spins; whether it
/// became ready.
fn linger(ready: &impl Fn() -> bool, warm: &impl Fn() -> bool) -> bool {
    while warm() {
        for _ in 0..64 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        std::thread::yield_now();
    }
    ready()
}

/// Spins for [`SPIN`], then yields for [`YIELD`], until `ready()`; whether it became ready.
fn spin_until(ready: &impl Fn() -> bool) -> bool {
    let mut spins = 0u32;
    let start = Instant::now();
    loop {
        if ready() {
            return true;
        }
        spins += 1;
        if !spins.is_multiple_of(64) {
            std::hint::spin_loop();
            continue;
        }
        let elapsed = start.elapsed();
        if elapsed < SPIN {
            std::hint::spin_loop();
        } else if elapsed < SPIN + YIELD {
            std::thread::yield_now();
        } else {
            return false;
        }
    }
}

/// A worker's loop: wait for a new section, join it if the thread count allows, claim chunks
/// until none is left.
fn worker(shared: &Shared, index: usize) {
    IN_POOL.with(|f| f.set(true));
    let slot = &shared.slots[index];
    // Set before this worker ever parks, so whoever sees it sleeping can wake it.
    let _ = slot.thread.set(std::thread::current());
    let mut seen = generation(shared.state.load(Ordering::Acquire));
    // Left out of the last section (fewer threads while the cores are busy): park at once
    // rather than spin for sections this worker will not join; the caller wakes it when it may.
    let mut left_out = false;
    loop {
        let new_section = || generation(shared.state.load(Ordering::SeqCst)) != seen;
        wait(new_section, &slot.sleeping, !left_out, || shared.warm());
        seen = generation(shared.state.load(Ordering::Acquire));
        left_out = index >= shared.helpers.load(Ordering::Relaxed);
        if left_out {
            continue;
        }
        let program = shared.program.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(program) = program {
            program.participate();
            continue;
        }
        while let Some(chunk) = claim(&shared.state) {
            run_chunk(shared, chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    #[test]
    fn state_word_round_trips() {
        let s = pack(7, 300, 12);
        assert_eq!((generation(s), cursor(s)), (7, (300, 12)));
        let state = AtomicU64::new(pack(1, 2, 0));
        assert_eq!((claim(&state), claim(&state), claim(&state)), (Some(0), Some(1), None));
    }

    #[test]
    fn every_item_runs_once_for_every_thread_count() {
        for threads in 1..=4 {
            let pool = Pool::new(threads);
            for items in [1, 2, 3, 7, 64, 1000, 70_000] {
                let counts: Vec<AtomicU32> = (0..items).map(|_| AtomicU32::new(0)).collect();
                pool.run(items, |range| {
                    for i in range {
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(
                    counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                    "{threads} threads, {items} items"
                );
            }
        }
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_pool_carries_on() {
        let pool = Pool::new(3);
        let caught = catch_unwind(AssertUnwindSafe(|| {
            pool.run(100, |range| assert!(!range.contains(&57), "item 57"));
        }));
        assert!(caught.is_err());
        let sum = AtomicUsize::new(0);
        pool.run(100, |range| {
            sum.fetch_add(range.sum::<usize>(), Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }

    /// Polls `what` for up to ten seconds; whether it came true.
    fn eventually(what: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn a_warmed_pool_waits_awake_until_the_time_announced_and_then_parks() {
        let pool = Pool::new(2);
        let sleeping = || pool.shared.slots[0].sleeping.load(Ordering::SeqCst);
        assert!(eventually(sleeping), "the idle worker never parked");
        assert!(!pool.shared.warm());
        pool.warm(Duration::from_secs(1));
        assert!(pool.shared.warm());
        assert!(eventually(|| !sleeping()), "the warmed worker stayed asleep");
        // Awake (lingering) while the announcement holds, parked again after it.
        std::thread::sleep(Duration::from_millis(20));
        assert!(!sleeping() || !pool.shared.warm(), "the worker parked while warm");
        assert!(eventually(|| sleeping() && !pool.shared.warm()), "the worker stayed awake");
    }

    #[test]
    fn a_program_goes_on_while_its_caller_is_stalled() {
        use std::thread::ThreadId;

        /// Six phases of four chunks, each writing its index; the caller's first chunk sleeps.
        struct Stalls {
            caller: ThreadId,
            stall: AtomicBool,
            /// Set while the caller is stalled: from just before its sleep until it wakes.
            stalled: AtomicBool,
            /// Set when the caller wakes up from its stall.
            woke: AtomicBool,
            values: Vec<AtomicU32>,
            /// Set when a thread other than the caller commits a chunk of the last phase while
            /// the caller is still stalled.
            worker_finished: AtomicBool,
        }
        impl Program for Stalls {
            type Local = u32;
            fn phases(&self) -> usize {
                6
            }
            fn chunks(&self, _: usize) -> usize {
                4
            }
            fn enter(&self, _: usize, _: &mut u32) {}
            fn compute(&self, phase: usize, chunk: usize, local: &mut u32) {
                if std::thread::current().id() == self.caller
                    && self.stall.swap(false, Ordering::SeqCst)
                {
                    self.stalled.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(100));
                    self.woke.store(true, Ordering::SeqCst);
                }
                *local = (phase * 4 + chunk) as u32;
            }
            unsafe fn commit(&self, phase: usize, chunk: usize, local: &u32) {
                self.values[phase * 4 + chunk].store(*local, Ordering::SeqCst);
                // Only while the caller is stalled: a worker that ran the whole program before
                // the caller claimed anything (it was kept off the cores) proves nothing.
                if phase == 5
                    && std::thread::current().id() != self.caller
                    && self.stalled.load(Ordering::SeqCst)
                    && !self.woke.load(Ordering::SeqCst)
                {
                    self.worker_finished.store(true, Ordering::SeqCst);
                }
            }
        }
        let pool = Pool::new(2);
        // A worker still starting when the program is published sits it out, and with tests
        // running side by side either thread may be kept off the cores: retry.
        let mut worker_finished = false;
        for _ in 0..10 {
            let program = Stalls {
                caller: std::thread::current().id(),
                stall: AtomicBool::new(true),
                stalled: AtomicBool::new(false),
                woke: AtomicBool::new(false),
                values: (0..24).map(|_| AtomicU32::new(u32::MAX)).collect(),
                worker_finished: AtomicBool::new(false),
            };
            let values;
            (values, worker_finished) = pool.run_program(program, true, |p| {
                let values: Vec<u32> = p.values.iter().map(|v| v.load(Ordering::SeqCst)).collect();
                (values, p.worker_finished.load(Ordering::SeqCst))
            });
            assert_eq!(values, (0..24).collect::<Vec<u32>>());
            if worker_finished {
                break;
            }
        }
        assert!(worker_finished, "the worker did not carry the program to its end");
        // It had to compute the caller's stalled chunk itself to get past that phase.
        assert!(pool.stats().redone_chunks >= 1, "the stalled chunk was not redone");
    }

    #[test]
    fn sections_after_a_long_idle_wake_the_parked_workers() {
        let pool = Pool::new(2);
        std::thread::sleep(SPIN + YIELD + Duration::from_millis(5));
        let ran_elsewhere = AtomicBool::new(false);
        let me = std::thread::current().id();
        for _ in 0..50 {
            pool.run(64, |_| {
                if std::thread::current().id() != me {
                    ran_elsewhere.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(200));
            });
        }
        assert!(ran_elsewhere.load(Ordering::Relaxed), "the worker never took a chunk");
        assert!(pool.stats().sections >= 1);
    }
}
