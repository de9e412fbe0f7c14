//! `m31r-kernels`: every CPU kernel of M31R and the thread-pool helpers they share, laid out as
//! ggml's CPU backend is: each kernel beside its portable reference, architecture overrides in
//! their own modules (`vec::avx2`, `quant::avx2`). The one crate with `unsafe` SIMD code; every
//! `unsafe` block says why it holds.
//!
//! - [`vec`]: dot products, `acc += p · x`, the shifted exponential of a softmax.
//! - [`quant`]: GGML Q8_0/Q4_0 blocks, the weight view the kernels read, dequantization.
//! - [`gemv`]: matrix–vector products for the few rows of a decode step or a keystroke.
//! - [`gemm`]: long inputs (prefill) times a dense weight.
//! - [`attention`]: causal attention over the head-major KV cache (decode, prefill).
//! - [`train`]: the training forward's fused ops with hand-written backward passes, and AdamW.
//!
//! Work runs on the crate's own thread pool ([`pool`]): chunks claimed dynamically, waits that
//! park instead of spinning on, a thread count that adapts to a busy machine, and programs (a
//! decode step's phases, a greedy decode run's steps) that every thread runs through, so
//! whichever threads the OS lets run carry them forward. Each output element is computed in a fixed order from fixed inputs, so
//! results do not depend on the thread count or on scheduling. With AVX2, FMA and F16C enabled
//! at compile time (the default build, see `.cargo/config.toml`) the inner products use those
//! instructions; elsewhere they run as the portable loops the tests hold the vector code to.

/// Splits items between builds with the AVX2/FMA/F16C kernels (`target-cpu=x86-64-v3`) and
/// builds without them, so the feature set that picks an architecture override is named once.
macro_rules! simd_or_portable {
    (simd: { $($simd:item)* } portable: { $($portable:item)* }) => {
        $(
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma",
                target_feature = "f16c"
            ))]
            $simd
        )*
        $(
            #[cfg(not(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma",
                target_feature = "f16c"
            )))]
            $portable
        )*
    };
}

pub mod attention;
pub mod gemm;
pub mod gemv;
pub mod pool;
pub mod quant;
mod storage;
#[cfg(test)]
mod testing;
pub mod train;
pub mod vec;

pub use storage::data;

#[cfg(test)]
mod tests {
    use crate::quant::WeightRows;
    use crate::testing::{random, values};
    use crate::{gemm, gemv, pool, train};

    /// gemv, GEMM and RMSNorm outputs, as bits, under the current thread count.
    fn outputs() -> Vec<u32> {
        let (rows, cols) = (1024, 256);
        let w = values(rows * cols, 1);
        let x = values(3 * cols, 2);
        let mut y = vec![0f32; 3 * rows];
        gemv::gemv(WeightRows::F32(&w), &x, cols, &mut y);
        let xt = random(&[40, cols], 3, 1.0);
        let g = gemm::matmul_t(&xt, &w, rows).unwrap().flatten_all().unwrap();
        let norm = train::rms_norm(&xt, &random(&[cols], 4, 1.0), 1e-5).unwrap();
        let mut bits: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
        for t in [g, norm.flatten_all().unwrap()] {
            bits.extend(t.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()));
        }
        bits
    }

    #[test]
    fn outputs_are_bit_identical_for_every_thread_count() {
        pool::set_adaptive(false);
        let mut seen = Vec::new();
        for cap in 1..=pool::max_threads() {
            pool::set_thread_cap(cap);
            assert_eq!(pool::threads(), cap);
            seen.push(outputs());
        }
        pool::set_thread_cap(0);
        pool::set_adaptive(true);
        seen.push(outputs());
        assert!(seen.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(pool::policy().cap(), pool::max_threads());
    }
}
