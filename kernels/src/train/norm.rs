//! RMSNorm over the last dimension, and its backward pass (dx, and dw summed over row blocks in block order).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, Layout, Result, Shape, Tensor};

use super::fused;
use crate::pool::{self, BLOCK_ROWS, Out};
use crate::storage::data;
use crate::vec::portable::dot_f32 as dot;

/// `x / sqrt(mean(x²) + eps) * weight` over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused(x) {
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        return x.broadcast_div(&(mean_square + eps)?.sqrt()?)?.broadcast_mul(weight);
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (dot(row, row) / row.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "m31r-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let n = w.len();
        if l1.dims().last() != Some(&n) {
            candle_core::bail!("rms_norm: weight {n} does not match input {:?}", l1.dims());
        }
        let mut y = vec![0f32; x.len()];
        let out = Out::new(&mut y);
        pool::row_blocks(x.len() / n, |_, rows| {
            // SAFETY: blocks are disjoint row ranges.
            let y = unsafe { out.part(rows.start * n..rows.end * n) };
            for (xr, yr) in
                x[rows.start * n..rows.end * n].chunks_exact(n).zip(y.chunks_exact_mut(n))
            {
                let r = inv_rms(xr, self.eps);
                for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                    *yv = xv * r * wv;
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        let rows = x.elem_count() / n;
        // One output: rows of dx, then one partial dw row per block (summed below, in order).
        let both = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows, rows.div_ceil(BLOCK_ROWS))?.sum(0)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "m31r-rms-norm-bwd"
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
        let (x, w, g) = (data(s1, l1, name)?, data(s2, l2, name)?, data(s3, l3, name)?);
        let n = w.len();
        let rows = x.len() / n;
        let blocks = rows.div_ceil(BLOCK_ROWS);
        let mut out_buf = vec![0f32; (rows + blocks) * n];
        let out = Out::new(&mut out_buf);
        pool::row_blocks(rows, |block, range| {
            // SAFETY: the dx rows of a block and its dw partial row are disjoint from every other
            // block's.
            let dx = unsafe { out.part(range.start * n..range.end * n) };
            let dw = unsafe { out.part((rows + block) * n..(rows + block + 1) * n) };
            let mut gw = vec![0f32; n];
            for ((xr, gr), dxr) in x[range.start * n..range.end * n]
                .chunks_exact(n)
                .zip(g[range.start * n..range.end * n].chunks_exact(n))
                .zip(dx.chunks_exact_mut(n))
            {
                let r = inv_rms(xr, self.eps);
                for ((gwv, gv), wv) in gw.iter_mut().zip(gr).zip(w) {
                    *gwv = gv * wv;
                }
                // y = w·x·r, r = (mean x² + eps)^-½  ⇒  dx = r·(g·w) − x·r³·mean(g·w·x).
                let c = dot(&gw, xr) * r * r * r / n as f32;
                for ((d, gwv), xv) in dxr.iter_mut().zip(&gw).zip(xr) {
                    *d = r * gwv - c * xv;
                }
                for ((acc, gv), xv) in dw.iter_mut().zip(gr).zip(xr) {
                    *acc += gv * xv * r;
                }
            }
        });
        Ok((CpuStorage::F32(out_buf), Shape::from((rows + blocks, n))))
    }
}

#[cfg(test)]
mod tests {
    //! The kernel against the composed candle ops: values, gradients, repeatability.

    use super::*;
    use crate::testing::{check, random};
    use candle_core::Var;

    #[test]
    fn rms_norm_matches_composed() {
        let x = random(&[3, 37, 24], 1, 1.5);
        let w = (random(&[24], 2, 0.3) + 1.0).unwrap();
        check(&[x, w], |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(), 2e-5);
    }

    #[test]
    fn kernels_are_deterministic() {
        let x = random(&[64, 48], 8, 1.0);
        let w = random(&[48], 9, 1.0);
        let run = || {
            let v = Var::from_tensor(&x).unwrap();
            let y = rms_norm(v.as_tensor(), &w, 1e-5).unwrap();
            let g = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
            g.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
        };
        assert_eq!(run(), run());
    }
}
