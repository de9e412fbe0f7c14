//! Per-token cross-entropy of logits against target ids, and its backward pass.

use std::sync::Arc;

use super::fused;
use crate::pool::{self, Out};
use crate::storage::data;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, Layout, Result, Shape, Tensor};

/// Per-token negative log-likelihood `(n,)` of `targets` under `logits` `(n, vocab)`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross_entropy: {} targets for {n} rows of logits", targets.len());
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross_entropy: target id {t} outside the vocabulary of {vocab}");
    }
    if !fused(logits) {
        let target = Tensor::from_slice(targets, (n, 1), logits.device())?;
        return candle_nn::ops::log_softmax(logits, D::Minus1)?
            .gather(&target, D::Minus1)?
            .squeeze(D::Minus1)?
            .neg();
    }
    logits.contiguous()?.apply_op1(CrossEntropy { targets: Arc::new(targets.to_vec()) })
}

struct CrossEntropy {
    targets: Arc<Vec<u32>>,
}

/// `exp(row − max(row))` into `out` (the row's length), with the vector `exp`; returns the row's
/// max and the sum of `out`: `log Σ exp(row)` is `max + ln(sum)`, and `out / sum` its softmax.
fn exp_from_max(row: &[f32], out: &mut [f32]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    out.copy_from_slice(row);
    (max, crate::vec::exp_shifted(out, max))
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "m31r-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = data(storage, layout, self.name())?;
        let n = self.targets.len();
        let vocab = logits.len() / n.max(1);
        let mut nll = vec![0f32; n];
        let out = Out::new(&mut nll);
        pool::row_blocks(n, |_, rows| {
            // SAFETY: blocks are disjoint rows.
            let nll = unsafe { out.part(rows.clone()) };
            let mut scratch = vec![0f32; vocab];
            for (r, v) in rows.zip(nll) {
                let row = &logits[r * vocab..][..vocab];
                let (max, sum) = exp_from_max(row, &mut scratch);
                *v = max + sum.ln() - row[self.targets[r] as usize];
            }
        });
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, _nll: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = CrossEntropyBwd { targets: self.targets.clone() };
        Ok(Some(logits.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

struct CrossEntropyBwd {
    targets: Arc<Vec<u32>>,
}

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "m31r-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, g) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let n = self.targets.len();
        let vocab = logits.len() / n.max(1);
        let mut d = vec![0f32; logits.len()];
        let out = Out::new(&mut d);
        pool::row_blocks(n, |_, rows| {
            // SAFETY: blocks are disjoint rows.
            let d = unsafe { out.part(rows.start * vocab..rows.end * vocab) };
            for (r, dr) in rows.clone().zip(d.chunks_exact_mut(vocab)) {
                // d nll / d logits = softmax − one_hot(target), scaled by the incoming gradient.
                let row = &logits[r * vocab..][..vocab];
                let (_, sum) = exp_from_max(row, dr);
                let scale = g[r] / sum;
                dr.iter_mut().for_each(|dv| *dv *= scale);
                dr[self.targets[r] as usize] -= g[r];
            }
        });
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    //! The kernel against the composed candle ops, and a target outside the vocabulary.

    use super::*;
    use crate::testing::{check, random};

    #[test]
    fn cross_entropy_matches_composed() {
        let logits = random(&[37, 50], 7, 4.0);
        let targets: Vec<u32> = (0..37).map(|i| (i * 7 % 50) as u32).collect();
        check(&[logits], |t| cross_entropy(&t[0], &targets).unwrap(), 2e-5);
        let bad = cross_entropy(&random(&[2, 5], 1, 1.0), &[0, 5]).unwrap_err().to_string();
        assert!(bad.contains("target id 5"), "{bad}");
    }
}
