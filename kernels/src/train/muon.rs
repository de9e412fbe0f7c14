//! Muon's update for one hidden matrix: Nesterov momentum, orthogonalised by a quintic
//! Newton–Schulz iteration (Keller Jordan's Muon, as modded-nanogpt and nanochat use it for the
//! 2-D weights of the transformer blocks), then scaled for the matrix's aspect ratio. Its cost is
//! the iteration's matrix products, run on the kernels' pool.

use candle_core::{Result, Tensor};

/// Coefficients (a, b, c) of the quintic Newton–Schulz step X ← aX + (b·A + c·A²)·X, A = X·Xᵀ.
/// Chosen (by Muon's authors) for the steepest slope at zero: five steps bring every singular
/// value of a normalised matrix into roughly [0.7, 1.2], which is all the update needs.
pub const NEWTON_SCHULZ: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// Newton–Schulz steps per update.
pub const NEWTON_SCHULZ_STEPS: usize = 5;

/// Hyper-parameters of one Muon update.
#[derive(Debug, Clone, Copy)]
pub struct MuonStep {
    /// Learning rate (before the aspect-ratio scale).
    pub lr: f64,
    /// Momentum coefficient μ.
    pub momentum: f64,
    /// Decoupled weight decay (θ ← θ·(1 − lr·wd)).
    pub weight_decay: f64,
    /// Factor applied to the gradient first (global-norm clipping).
    pub grad_scale: f64,
}

/// The nearest semi-orthogonal matrix to `g` (its zeroth power U·Vᵀ), approximately: `g` is
/// normalised by its Frobenius norm, then [`NEWTON_SCHULZ_STEPS`] quintic steps run on the wide
/// orientation (the Gram matrix is the smaller side). The result has `g`'s shape.
pub fn orthogonalize(g: &Tensor) -> Result<Tensor> {
    let (rows, cols) = g.dims2()?;
    let tall = rows > cols;
    let x = if tall { g.t()?.contiguous()? } else { g.contiguous()? };
    let norm = x.sqr()?.sum_all()?.sqrt()?;
    let mut x = x.broadcast_div(&(norm + 1e-7)?)?;
    let (a, b, c) = NEWTON_SCHULZ;
    for _ in 0..NEWTON_SCHULZ_STEPS {
        // The products on the kernels' pool (candle's matmul would run them on rayon's threads).
        let gram = super::linear(&x, &x)?;
        let poly = ((&gram * b)? + (super::batched_matmul(&gram, &gram, false)? * c)?)?;
        x = ((&x * a)? + super::batched_matmul(&poly, &x, false)?)?;
    }
    if tall { x.t()?.contiguous() } else { Ok(x) }
}

/// One Muon update of the matrix `theta` (rows × cols) from gradient `g`, with momentum buffer
/// `momentum`: μ-buffer ← μ·buffer + (1 − μ)·g; update = orthogonalize((1 − μ)·g + μ·buffer)
/// (Nesterov); θ ← θ·(1 − lr·wd) − lr·√max(1, rows/cols)·update. Returns the new θ and buffer.
pub fn muon(
    theta: &Tensor,
    momentum: &Tensor,
    g: &Tensor,
    step: &MuonStep,
) -> Result<(Tensor, Tensor)> {
    let (rows, cols) = theta.dims2()?;
    let g = (g * step.grad_scale)?;
    let mu = step.momentum;
    let buffer = ((momentum * mu)? + (&g * (1.0 - mu))?)?;
    let nesterov = ((&g * (1.0 - mu))? + (&buffer * mu)?)?;
    let update = orthogonalize(&nesterov)?;
    let scale = step.lr * (rows as f64 / cols as f64).max(1.0).sqrt();
    let decayed = (theta * (1.0 - step.lr * step.weight_decay))?;
    Ok(((decayed - (update * scale)?)?, buffer))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The squared row norms of `x` (the diagonal of x·xᵀ).
    fn gram_diagonal(x: &Tensor) -> Result<Vec<f32>> {
        let rows = x.matmul(&x.t()?)?.to_vec2::<f32>()?;
        Ok((0..rows.len()).map(|i| rows[i][i]).collect())
    }

    fn matrix(rows: usize, cols: usize, seed: u64) -> Tensor {
        // Pseudo-random entries (an LCG), every seventh one ten times larger than the rest.
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                unit * if i % 7 == 0 { 10.0 } else { 1.0 }
            })
            .collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn orthogonalized_rows_have_unit_length_and_are_nearly_orthogonal() {
        for (rows, cols) in [(16, 40), (40, 16), (20, 64)] {
            let x = orthogonalize(&matrix(rows, cols, 3)).unwrap();
            assert_eq!(x.dims2().unwrap(), (rows, cols));
            // The wide orientation: its rows are (nearly) orthonormal, singular values in ~[0.7, 1.2].
            let wide = if rows > cols { x.t().unwrap() } else { x };
            for d in gram_diagonal(&wide).unwrap() {
                assert!((0.45..=1.45).contains(&d), "{rows}×{cols}: squared row norm {d}");
            }
            let gram = wide.matmul(&wide.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            let n = gram.len();
            let off: f32 = (0..n)
                .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
                .map(|(i, j)| gram[i][j].abs())
                .fold(0.0, f32::max);
            assert!(off < 0.35, "{rows}×{cols}: largest off-diagonal {off}");
        }
    }

    #[test]
    fn the_update_does_not_depend_on_the_gradient_scale() {
        let theta = matrix(8, 12, 1);
        let g = matrix(8, 12, 2);
        let zero = theta.zeros_like().unwrap();
        let step = MuonStep { lr: 0.02, momentum: 0.95, weight_decay: 0.0, grad_scale: 1.0 };
        let (a, _) = muon(&theta, &zero, &g, &step).unwrap();
        let (b, _) = muon(&theta, &zero, &(&g * 1000.0).unwrap(), &step).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn momentum_accumulates_and_the_step_is_scaled_for_tall_matrices() {
        let g = matrix(12, 4, 5);
        let theta = g.zeros_like().unwrap();
        let step = MuonStep { lr: 0.1, momentum: 0.9, weight_decay: 0.0, grad_scale: 1.0 };
        let (after, buffer) = muon(&theta, &theta, &g, &step).unwrap();
        let expected = (&g * 0.1).unwrap();
        let diff = (buffer - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
        // A tall 12×4 update has column norms ≈ 1, times lr·√3.
        let cols = after.sqr().unwrap().sum(0).unwrap().sqrt().unwrap().to_vec1::<f32>().unwrap();
        for norm in cols {
            let expected = 0.1 * 3f32.sqrt();
            assert!((norm / expected - 1.0).abs() < 0.35, "{norm} vs {expected}");
        }
    }

    #[test]
    fn decay_shrinks_the_matrix_before_the_update() {
        let theta = matrix(6, 6, 9);
        let g = theta.zeros_like().unwrap();
        let step = MuonStep { lr: 0.1, momentum: 0.95, weight_decay: 0.5, grad_scale: 1.0 };
        let (after, _) = muon(&theta, &g, &g, &step).unwrap();
        let expected = (&theta * 0.95).unwrap();
        let diff = (after - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }
}
