//! The vector kernels with AVX2 / FMA / F16C intrinsics (compiled in by `target-cpu=x86-64-v3`).

use std::arch::x86_64::*;

use half::f16;

#[inline]
pub(crate) fn hsum(v: __m256) -> f32 {
    // SAFETY: the intrinsics need AVX, compiled in (cfg of this module).
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// `a · b` over f32, 32 lanes at a time in four accumulators.
#[inline(always)]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let body = n / 32 * 32;
    // SAFETY: every load reads 8 floats at an index below `body` ≤ both lengths.
    let sum = unsafe {
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < body {
            for (k, acc) in acc.iter_mut().enumerate() {
                let j = i + 8 * k;
                *acc =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(j)), _mm256_loadu_ps(pb.add(j)), *acc);
            }
            i += 32;
        }
        hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
    };
    sum + a[body..n].iter().zip(&b[body..n]).map(|(x, y)| x * y).sum::<f32>()
}

/// `w · x` with f16 weights converted by `vcvtph2ps`, 32 lanes at a time.
#[inline(always)]
pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let body = n / 32 * 32;
    // SAFETY: every load reads 8 values at an index below `body` ≤ both lengths.
    let sum = unsafe {
        let (pw, px) = (w.as_ptr().cast::<__m128i>(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < body {
            for (k, acc) in acc.iter_mut().enumerate() {
                let j = i + 8 * k;
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(j / 8)));
                *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(j)), *acc);
            }
            i += 32;
        }
        hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
    };
    sum + w[body..n].iter().zip(&x[body..n]).map(|(a, b)| a.to_f32() * b).sum::<f32>()
}

/// `acc += p · x`, eight lanes at a time.
#[inline(always)]
pub fn axpy_f32(p: f32, x: &[f32], acc: &mut [f32]) {
    let n = x.len().min(acc.len());
    let body = n / 8 * 8;
    // SAFETY: every access touches 8 floats at an index below `body` ≤ both lengths.
    unsafe {
        let pv = _mm256_set1_ps(p);
        for i in (0..body).step_by(8) {
            let a = acc.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                a,
                _mm256_fmadd_ps(pv, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(a)),
            );
        }
    }
    acc[body..n].iter_mut().zip(&x[body..n]).for_each(|(a, x)| *a += p * x);
}

/// `acc += p · x` with f16 `x`, eight lanes at a time.
#[inline(always)]
pub fn axpy_f16(p: f32, x: &[f16], acc: &mut [f32]) {
    let n = x.len().min(acc.len());
    let body = n / 8 * 8;
    // SAFETY: every access touches 8 values at an index below `body` ≤ both lengths.
    unsafe {
        let pv = _mm256_set1_ps(p);
        for i in (0..body).step_by(8) {
            let a = acc.as_mut_ptr().add(i);
            let xv = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i).cast()));
            _mm256_storeu_ps(a, _mm256_fmadd_ps(pv, xv, _mm256_loadu_ps(a)));
        }
    }
    acc[body..n].iter_mut().zip(&x[body..n]).for_each(|(a, x)| *a += p * x.to_f32());
}

/// `exp` of eight lanes (inputs at most 88; below -87 gives 0): `2^n · p(r)` with
/// `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, and `p` the degree-6 Taylor polynomial (relative error
/// below 2e-7).
#[inline(always)]
fn exp8(x: __m256) -> __m256 {
    // SAFETY: AVX2/FMA intrinsics on registers, compiled in.
    unsafe {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        // ln 2 split in two so that n·ln2_hi is exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let scale =
            _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
    }
}

/// `x[i] = exp(x[i] - shift)` for all `i`, eight lanes at a time; returns their sum.
pub fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
    let body = x.len() / 8 * 8;
    // SAFETY: every access touches 8 floats at an index below `body` ≤ the length.
    let mut total = unsafe {
        let (s, mut acc) = (_mm256_set1_ps(shift), _mm256_setzero_ps());
        for i in (0..body).step_by(8) {
            let p = x.as_mut_ptr().add(i);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), s));
            _mm256_storeu_ps(p, e);
            acc = _mm256_add_ps(acc, e);
        }
        hsum(acc)
    };
    for v in &mut x[body..] {
        *v = (*v - shift).exp();
        total += *v;
    }
    total
}
