//! Parameter accounting: the per-component table of a config and the parameter-budget solver that
//! picks `d_model`, `n_layers` and `d_ff` for a target size.

use std::fmt;

/// Largest model M31R will build or load; bigger models cannot meet the latency budget on a laptop.
pub const MAX_PARAMS: u64 = 500_000_000;

/// One line of a [`ParamTable`].
#[derive(Debug, Clone, PartialEq)]
pub struct ParamRow {
    /// Component name.
    pub component: &'static str,
    /// Parameters of one layer, for per-layer components.
    pub per_layer: Option<u64>,
    /// Parameters of the component in the whole model.
    pub count: u64,
    /// Share of the total, in percent.
    pub percent: f64,
}

/// Where a model's parameters are: embedding, attention and feed-forward per layer, norms, head.
/// The rows sum to `total`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamTable {
    /// The components.
    pub rows: Vec<ParamRow>,
    /// Total trainable parameters.
    pub total: u64,
}

impl fmt::Display for ParamTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<24} {:>12} {:>14} {:>7}", "component", "per layer", "total", "share")?;
        for row in &self.rows {
            let per_layer = row.per_layer.map(|p| p.to_string()).unwrap_or_default();
            writeln!(
                f,
                "{:<24} {:>12} {:>14} {:>6.2}%",
                row.component, per_layer, row.count, row.percent
            )?;
        }
        write!(f, "{:<24} {:>12} {:>14} {:>6.2}%", "total", "", self.total, 100.0)
    }
}

/// What the solver is asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SolverSpec {
    /// Target trainable parameters.
    pub target_params: u64,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Desired share of the parameters in the token embedding (sets the width).
    pub embedding_ratio: f64,
    /// Nominal SwiGLU hidden width as a multiple of `d_model` (8/3 in LLaMA).
    pub glu_expansion: f64,
    /// Size of one attention head; `d_model` is a multiple of it.
    pub head_dim: usize,
    /// Whether the LM head is tied to the embedding.
    pub tied: bool,
}

/// The shape the solver chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Feed-forward hidden width.
    pub d_ff: usize,
}

/// Why no shape meets a budget.
#[derive(Debug, thiserror::Error)]
pub enum SolverError {
    /// The spec itself is unusable.
    #[error("invalid solver input {field} = {value}: {reason}")]
    InvalidSpec {
        /// Offending field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// No width/depth within the solver's rules lands within tolerance of the target.
    #[error(
        "no shape has {target} parameters within ±0.5%: {reason} \
         (vocab {vocab}, head size {head_dim}, embedding ratio {ratio})"
    )]
    Unreachable {
        /// The target.
        target: u64,
        /// Vocabulary size.
        vocab: usize,
        /// Head size.
        head_dim: usize,
        /// Requested embedding share.
        ratio: f64,
        /// Why.
        reason: String,
    },
}

/// Relative tolerance on the total.
pub const SOLVER_TOLERANCE: f64 = 0.005;
/// Shallowest aspect ratio allowed: `d_model / n_layers ≥ 24` (deeper is not trainable in practice).
pub(crate) const MIN_ASPECT: usize = 24;
/// The feed-forward width may deviate this much from its nominal `glu_expansion · d_model`.
const FFN_BAND: (f64, f64) = (0.8, 1.25);

/// Chooses `d_model`, `n_layers` and `d_ff` whose parameter count is within ±0.5% of the target.
///
/// Rules, in order: `d_model` is the multiple of `head_dim` closest to the width at which the
/// embedding holds `embedding_ratio` of the budget; depth is the largest `n_layers` (at most
/// `d_model / 24`) that leaves the feed-forward width within 0.8–1.25× its nominal size, which favours
/// depth over width; `d_ff` absorbs the remainder, rounded to the coarsest multiple of 64, 32, …, 1 that
/// stays within tolerance. If the budget cannot fit at that width, the width moves one head at a time.
pub fn solve(spec: &SolverSpec) -> Result<Shape, SolverError> {
    validate_spec(spec)?;
    let head = spec.head_dim;
    let embed_copies = if spec.tied { 1 } else { 2 };
    let ideal =
        spec.embedding_ratio * spec.target_params as f64 / (spec.vocab_size * embed_copies) as f64;
    let start = ((ideal / head as f64).round() as usize).max(1);
    // Try the ideal width first, then alternate outward: +1 head, −1 head, +2, −2, ...
    let mut last_reason = String::new();
    for step in 0..128usize {
        let offset = step.div_ceil(2) as isize * if step % 2 == 1 { 1 } else { -1 };
        let heads = start as isize + offset;
        if heads < 1 {
            continue;
        }
        let d = heads as usize * head;
        match solve_at_width(spec, d) {
            Ok(shape) => return Ok(shape),
            Err(reason) => {
                if step == 0 {
                    last_reason = reason;
                }
            }
        }
    }
    Err(SolverError::Unreachable {
        target: spec.target_params,
        vocab: spec.vocab_size,
        head_dim: spec.head_dim,
        ratio: spec.embedding_ratio,
        reason: format!("at the ideal width {}: {last_reason}", start * head),
    })
}

fn validate_spec(spec: &SolverSpec) -> Result<(), SolverError> {
    let bad = |field, value: String, reason| Err(SolverError::InvalidSpec { field, value, reason });
    if spec.target_params > MAX_PARAMS {
        return bad(
            "target_params",
            spec.target_params.to_string(),
            "above the 500M-parameter cap",
        );
    }
    if !(spec.embedding_ratio > 0.0 && spec.embedding_ratio < 1.0) {
        return bad("embedding_ratio", spec.embedding_ratio.to_string(), "must be in (0, 1)");
    }
    if !(spec.glu_expansion > 0.0 && spec.glu_expansion.is_finite()) {
        return bad("glu_expansion", spec.glu_expansion.to_string(), "must be positive");
    }
    if spec.head_dim == 0 || !spec.head_dim.is_multiple_of(2) {
        return bad("head_dim", spec.head_dim.to_string(), "must be positive and even");
    }
    if spec.vocab_size == 0 {
        return bad("vocab_size", "0".into(), "must be positive");
    }
    Ok(())
}

/// Parameter count of a (tied or untied, full-attention) shape.
fn total(spec: &SolverSpec, d: u64, layers: u64, d_ff: u64) -> u64 {
    let embed = spec.vocab_size as u64 * d * if spec.tied { 1 } else { 2 };
    embed + d + layers * (4 * d * d + 2 * d + 3 * d * d_ff)
}

fn solve_at_width(spec: &SolverSpec, d: usize) -> Result<Shape, String> {
    let target = spec.target_params as f64;
    let d64 = d as u64;
    let fixed = total(spec, d64, 0, 0) as f64;
    if fixed >= target {
        return Err(format!("the embedding alone has {fixed} parameters"));
    }
    let nominal = spec.glu_expansion * d as f64;
    let per_layer_without_ffn = (4 * d64 * d64 + 2 * d64) as f64;
    let max_layers = (d / MIN_ASPECT).max(1);
    let mut reason = String::from("no depth fits");
    for layers in (1..=max_layers).rev() {
        let d_ff = ((target - fixed) / layers as f64 - per_layer_without_ffn) / (3.0 * d as f64);
        if d_ff < FFN_BAND.0 * nominal {
            continue; // too deep for this budget: a shallower model gets a wider FFN
        }
        if d_ff > FFN_BAND.1 * nominal {
            reason = format!(
                "even {layers} layers (the depth cap) leave a feed-forward width {d_ff:.0}, \
                 above 1.25× nominal {nominal:.0}"
            );
            break; // fewer layers would only widen it further
        }
        for multiple in [64u64, 32, 16, 8, 4, 2, 1] {
            let rounded = ((d_ff / multiple as f64).round() as u64 * multiple).max(multiple);
            let count = total(spec, d64, layers as u64, rounded) as f64;
            if ((count - target) / target).abs() <= SOLVER_TOLERANCE {
                return Ok(Shape { d_model: d, n_layers: layers, d_ff: rounded as usize });
            }
        }
        reason = format!("{layers} layers miss the tolerance even with d_ff rounded to 1");
        break;
    }
    Err(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(target: u64, vocab: usize, tied: bool) -> SolverSpec {
        SolverSpec {
            target_params: target,
            vocab_size: vocab,
            embedding_ratio: 0.12,
            glu_expansion: 8.0 / 3.0,
            head_dim: 64,
            tied,
        }
    }

    #[test]
    fn prefers_depth_over_width() {
        // At the chosen width, one more layer would push the FFN below its band (or the depth cap).
        let s = spec(60_000_000, 16384, true);
        let shape = solve(&s).unwrap();
        let deeper = shape.n_layers + 1;
        let fixed = total(&s, shape.d_model as u64, 0, 0) as f64;
        let d = shape.d_model as f64;
        let ffn =
            ((s.target_params as f64 - fixed) / deeper as f64 - 4.0 * d * d - 2.0 * d) / (3.0 * d);
        assert!(deeper * MIN_ASPECT > shape.d_model || ffn < FFN_BAND.0 * s.glu_expansion * d);
    }

    #[test]
    fn impossible_budgets_say_why() {
        let err = solve(&spec(100_000, 16384, true)).unwrap_err().to_string();
        assert!(err.contains("embedding alone"), "{err}");
        let err = solve(&spec(600_000_000, 16384, true)).unwrap_err().to_string();
        assert!(err.contains("500M"), "{err}");
    }
}
