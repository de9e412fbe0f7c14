//! Measurements of this machine that performance claims are stated against (DESIGN §8): candle's
//! f32 matmul throughput and memory read bandwidth. Used by every bench, so they measure alike.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

/// candle's f32 matmul on 1024×1024 by 1024×1024, best of `reps` (after a warm-up), in GFLOP/s.
pub fn matmul_gflops(reps: usize) -> candle_core::Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    black_box(a.matmul(&b)?); // warm-up: spin up the thread pool
    let mut best = Duration::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        black_box(a.matmul(&b)?);
        best = best.min(t.elapsed());
    }
    Ok(2.0 * (n * n * n) as f64 / best.as_secs_f64() / 1e9)
}

/// Sequential read bandwidth over 512 MiB (far beyond the caches), one reader per core as decode
/// uses every core, best of `reps` (after a warm-up), in GB/s.
pub fn memory_bandwidth_gbs(reps: usize) -> f64 {
    let words: usize = 64 << 20;
    let buffer: Vec<u64> = (0..words as u64).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) + 1 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for part in buffer.chunks(words.div_ceil(threads)) {
                s.spawn(move || {
                    // Eight independent lanes so the loop vectorises and is bound by memory.
                    let mut acc = [0u64; 8];
                    for chunk in part.chunks_exact(8) {
                        for (a, &x) in acc.iter_mut().zip(chunk) {
                            *a = a.wrapping_add(x);
                        }
                    }
                    black_box(acc);
                });
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best / 1e9
}

/// Spin iterations after which candle's own thread-pool workers park, where the environment does
/// not set `CANDLE_BARRIER_POOL_SPIN_LIMIT` (see [`park_idle_candle_threads`]).
pub const CANDLE_SPIN_LIMIT: u32 = 100;

/// Makes candle's own thread-pool workers (`candle-bp-*`, which run its parallel elementwise ops)
/// park right after each op instead of spinning for candle's default 25 000 iterations (about a
/// millisecond here) in case another op follows. Between candle's ops the kernels' own threads
/// run, and that spinning took their cores: in a `tiny`-sized training step on 2 cores the idle
/// candle worker used 12 % of the CPU time, and parking it made the step ≈ 10 % faster; a cold
/// prefill of `small` also got ≈ 5 % faster, keystrokes and decode stayed the same. A value
/// set in the environment is kept.
///
/// # Safety
/// Sets an environment variable: call it first thing in `main`, before any thread exists
/// (candle reads the variable when it starts its pool).
pub unsafe fn park_idle_candle_threads() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // SAFETY: by the caller's contract, no other thread reads or writes the environment.
        unsafe { std::env::set_var(VAR, CANDLE_SPIN_LIMIT.to_string()) };
    }
}

/// Keeps freed tensor memory in the process instead of returning it to the kernel.
///
/// glibc serves every allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a
/// fresh `mmap` and unmaps it on free, so each large activation of a training step or a prefill
/// costs page faults and page zeroing again (≈ a fifth of a `tiny` training step here). Raising
/// the threshold to its maximum and never trimming lets the allocator reuse those pages. Call once,
/// before the first large allocation; returns whether glibc accepted both settings (always false
/// on other C libraries, where it does nothing).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc refuses thresholds above HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit targets.
        const MAX_MMAP_THRESHOLD: libc::c_int = 32 << 20;
        // SAFETY: mallopt only changes allocator parameters; it is called with valid options.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
