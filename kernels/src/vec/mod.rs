//! Vector kernels over f32 rows: dot products (f32, f16 weights), `acc += p · x`, and the shifted
//! exponential of a softmax. Each has its portable reference in [`portable`], the fallback where
//! AVX2/FMA/F16C are not compiled in; `avx2` holds the versions with those instructions.

use half::f16;

/// Portable reference kernels (and the fallback where AVX2/FMA/F16C are not compiled in).
pub mod portable {
    use super::*;

    /// `a · b` over f32 with eight independent accumulators, so it vectorises (the order is fixed,
    /// so the result is the same on every run). The training kernels use this one on every CPU.
    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
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

    /// `w · x` with f16 weights.
    pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let (cw, cx) = (w.chunks_exact(8), x.chunks_exact(8));
        let tail: f32 =
            cw.remainder().iter().zip(cx.remainder()).map(|(a, b)| a.to_f32() * b).sum();
        for (a, b) in cw.zip(cx) {
            for k in 0..8 {
                acc[k] += a[k].to_f32() * b[k];
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    /// `acc += p · x`.
    pub fn axpy_f32(p: f32, x: &[f32], acc: &mut [f32]) {
        acc.iter_mut().zip(x).for_each(|(a, x)| *a += p * x);
    }

    /// `acc += p · x` with f16 `x`.
    pub fn axpy_f16(p: f32, x: &[f16], acc: &mut [f32]) {
        acc.iter_mut().zip(x).for_each(|(a, x)| *a += p * x.to_f32());
    }

    /// `x[i] = exp(x[i] - shift)` for all `i`; returns their sum.
    pub fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        x.iter_mut().fold(0f32, |total, v| {
            *v = (*v - shift).exp();
            total + *v
        })
    }
}

simd_or_portable! {
    simd: {
        pub(crate) mod avx2;
        pub use avx2::{axpy_f16, axpy_f32, dot_f16, dot_f32, exp_shifted};
    }
    portable: {
        pub use portable::{axpy_f16, axpy_f32, dot_f16, dot_f32, exp_shifted};
    }
}

#[cfg(test)]
mod tests {
    //! The vector kernels against the portable ones.

    use super::*;
    use crate::testing::{close, values};

    #[test]
    fn vector_dots_match_the_portable_ones() {
        for n in [1, 31, 32, 96, 577] {
            let (a, b) = (values(n, 1), values(n, 2));
            assert!(close(dot_f32(&a, &b), portable::dot_f32(&a, &b), 1e-5), "f32 {n}");
            let h: Vec<f16> = a.iter().map(|&x| f16::from_f32(x)).collect();
            assert!(close(dot_f16(&h, &b), portable::dot_f16(&h, &b), 1e-5), "f16 {n}");
        }
    }

    #[test]
    fn vector_exp_matches_the_portable_one() {
        let mut xs: Vec<f32> = (0..203).map(|i| -100.0 + i as f32 * 0.5).collect();
        let mut ys = xs.clone();
        let (a, b) = (exp_shifted(&mut xs, 1.5), portable::exp_shifted(&mut ys, 1.5));
        assert!(close(a, b, 1e-6), "sums {a} vs {b}");
        for (x, y) in xs.iter().zip(&ys) {
            assert!((x - y).abs() <= 1e-6 * y.abs() + 1e-37, "{x} vs {y}");
        }
    }
}
