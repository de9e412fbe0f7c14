//! Non-interleaved ("rotate half") rotary embedding; its backward pass is the opposite rotation.

use candle_core::{CpuStorage, CustomOp3, D, Layout, Result, Shape, Tensor};

use super::fused;
use crate::pool::{self, Out};
use crate::storage::data;

/// Non-interleaved ("rotate half") rotary embedding of `x` `(batch, seq, heads, head_dim)` with
/// tables `cos`, `sin` `(seq, head_dim / 2)` (already cut to the positions of `x`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        let (_, seq, _, dim) = x.dims4()?;
        // The tables may be f32 under a bf16 `x` (mixed precision): rotate in `x`'s dtype.
        let (cos, sin) = (&cos.to_dtype(x.dtype())?, &sin.to_dtype(x.dtype())?);
        let cos = Tensor::cat(&[cos, cos], D::Minus1)?.reshape((1, seq, 1, dim))?;
        let sin = Tensor::cat(&[sin, sin], D::Minus1)?.reshape((1, seq, 1, dim))?;
        let first = x.narrow(D::Minus1, 0, dim / 2)?;
        let second = x.narrow(D::Minus1, dim / 2, dim / 2)?;
        let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
        return x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?;
    }
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { inverse: false })
}

struct Rope {
    /// Rotate by the negative angle (the backward pass of the forward rotation).
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "m31r-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, cos, sin) = (data(s1, l1, name)?, data(s2, l2, name)?, data(s3, l3, name)?);
        let (batch, seq, heads, dim) = l1.shape().dims4()?;
        let half = dim / 2;
        if cos.len() != seq * half || sin.len() != seq * half {
            candle_core::bail!("rope: tables of {} values for {seq} positions × {half}", cos.len());
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let row = heads * dim;
        let mut y = vec![0f32; x.len()];
        let out = Out::new(&mut y);
        pool::row_blocks(batch * seq, |_, rows| {
            // SAFETY: blocks are disjoint (batch, position) rows.
            let y = unsafe { out.part(rows.start * row..rows.end * row) };
            for (r, yr) in rows.clone().zip(y.chunks_exact_mut(row)) {
                let pos = r % seq;
                let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                for (xh, yh) in x[r * row..][..row].chunks_exact(dim).zip(yr.chunks_exact_mut(dim))
                {
                    let (x1, x2) = xh.split_at(half);
                    let (y1, y2) = yh.split_at_mut(half);
                    for i in 0..half {
                        let s = sign * s[i];
                        y1[i] = x1[i] * c[i] - x2[i] * s;
                        y2[i] = x2[i] * c[i] + x1[i] * s;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // A rotation's adjoint is the rotation by the opposite angle.
        let dx = g.contiguous()?.apply_op3_no_bwd(cos, sin, &Rope { inverse: !self.inverse })?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    //! The kernel against the composed candle ops, and its inverse.

    use super::*;
    use crate::testing::{check, max_diff, random};
    use candle_core::Device;

    #[test]
    fn rope_matches_composed_and_inverts() {
        let x = random(&[2, 19, 3, 16], 3, 1.0);
        let angles: Vec<f32> = (0..19 * 8).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let a = Tensor::from_vec(angles, (19, 8), &Device::Cpu).unwrap();
        let (cos, sin) = (a.cos().unwrap(), a.sin().unwrap());
        check(
            std::slice::from_ref(&x),
            |t| {
                let (c, s) =
                    (cos.to_dtype(t[0].dtype()).unwrap(), sin.to_dtype(t[0].dtype()).unwrap());
                rope(&t[0], &c, &s).unwrap()
            },
            2e-6,
        );
        let back = rope(&rope(&x, &cos, &sin).unwrap(), &cos, &sin.neg().unwrap()).unwrap();
        assert!(max_diff(&back, &x) < 1e-5);
    }
}
