//! The block dot products with AVX2 / FMA intrinsics (compiled in by `target-cpu=x86-64-v3`).

use std::arch::x86_64::*;

use super::{BLOCK, Q4_0_BYTES, Q8_0_BYTES, Q8Row, f16};
use crate::vec::avx2::hsum;

/// Eight i32 sums of products of signed bytes `a` and `b` (pairs of four), as f32.
#[inline]
fn mul_sum_i8(a: __m256i, b: __m256i) -> __m256 {
    // SAFETY: AVX2 intrinsics, compiled in. maddubs takes unsigned × signed: move a's sign
    // onto b.
    unsafe {
        let ax = _mm256_sign_epi8(a, a);
        let sy = _mm256_sign_epi8(b, a);
        let pairs = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// Block `b` of a Q8_0 row times block `b` of `x`, as eight partial sums, scaled.
///
/// # Safety
/// `w` must hold at least `b + 1` Q8_0 blocks and `x` at least `b + 1` blocks.
#[inline(always)]
unsafe fn q8_0_block(w: &[u8], x: &Q8Row, b: usize) -> (__m256, __m256) {
    // SAFETY: in bounds by the caller's contract.
    unsafe {
        let block = w.as_ptr().add(b * Q8_0_BYTES);
        let wq = _mm256_loadu_si256(block.add(2).cast());
        let xq = _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK).cast());
        let d = f16::from_le_bytes([*block, *block.add(1)]).to_f32() * x.scales.get_unchecked(b);
        (_mm256_set1_ps(d), mul_sum_i8(wq, xq))
    }
}

/// Block `b` of a Q4_0 row times block `b` of `x`, as eight partial sums, with its scale.
///
/// # Safety
/// `w` must hold at least `b + 1` Q4_0 blocks and `x` at least `b + 1` blocks.
#[inline(always)]
unsafe fn q4_0_block(w: &[u8], x: &Q8Row, b: usize) -> (__m256, __m256) {
    // SAFETY: in bounds by the caller's contract.
    unsafe {
        let block = w.as_ptr().add(b * Q4_0_BYTES);
        let packed = _mm_loadu_si128(block.add(2).cast());
        // Weights 0..16 are the low nibbles, 16..32 the high ones, each offset by 8: the raw
        // nibbles are unsigned, so they go straight into maddubs, and 8 · Σx comes off after.
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        let nibbles = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
        let xq = _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK).cast());
        let pairs = _mm256_maddubs_epi16(nibbles, xq);
        let sums = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
        let eights = _mm256_loadu_si256(x.eights.as_ptr().add(b * 8).cast());
        let centred = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, eights));
        let d = f16::from_le_bytes([*block, *block.add(1)]).to_f32() * x.scales.get_unchecked(b);
        (_mm256_set1_ps(d), centred)
    }
}

/// Sums `blocks` scaled block products in two register accumulators (two blocks per
/// iteration, so consecutive FMAs do not wait on each other).
#[inline(always)]
fn sum_blocks(blocks: usize, block: impl Fn(usize) -> (__m256, __m256)) -> f32 {
    // SAFETY: AVX/FMA intrinsics on registers, compiled in.
    unsafe {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut b = 0;
        while b + 1 < blocks {
            let (d0, p0) = block(b);
            let (d1, p1) = block(b + 1);
            acc0 = _mm256_fmadd_ps(d0, p0, acc0);
            acc1 = _mm256_fmadd_ps(d1, p1, acc1);
            b += 2;
        }
        if b < blocks {
            let (d0, p0) = block(b);
            acc0 = _mm256_fmadd_ps(d0, p0, acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }
}

/// One row of Q8_0 weight blocks times a Q8_0 activation row.
pub fn dot_q8_0(w: &[u8], x: &Q8Row) -> f32 {
    let blocks = (w.len() / Q8_0_BYTES).min(x.scales.len());
    // SAFETY: b < blocks, which both `w` and `x` hold.
    sum_blocks(blocks, |b| unsafe { q8_0_block(w, x, b) })
}

/// One row of Q4_0 weight blocks times a Q8_0 activation row.
pub fn dot_q4_0(w: &[u8], x: &Q8Row) -> f32 {
    let blocks = (w.len() / Q4_0_BYTES).min(x.scales.len());
    // SAFETY: b < blocks, which both `w` and `x` hold.
    sum_blocks(blocks, |b| unsafe { q4_0_block(w, x, b) })
}
