//! The confidence gate: decides, from the daemon's per-line confidence
//! ([`m31r_protocol::LineConfidence`] in `done`), how many lines of a completion are worth showing.
//! A first line the model was unsure of suppresses the completion ([`Reason::LowConfidence`]); a
//! later one cuts the completion before it.
//!
//! **Threshold**: the least geometric-mean probability of a line's tokens *but its least likely
//! one*, in `[0, 1]`: a line passes when `exp((logprob_sum - logprob_min) / (tokens - 1)) >=
//! threshold`. One uncertain choice (which of several right names, where a line turns) does not
//! sink a line the model is otherwise sure of; a line it is unsure of throughout fails. On the
//! calibration replay this kept more of the characters saved than the plain mean at every
//! precision (docs/lsp.md, "Calibrating `minConfidence`"). `0` turns the gate off: everything is
//! shown. A line of fewer than two tokens of its own (its bytes came with a token that started
//! on the line before, or a single token) passes.
//!
//! **Lines**: the gate works on the lines of the daemon's text, before post-processing — line `i`
//! of [`LineConfidence`]s is `text.split('\n')`'s line `i`. Post-processing only shortens lines
//! (trims the first line at the rest of the cursor's line, drops trailing whitespace) and drops
//! whole lines, so it runs on what the gate kept ([`gate_text`]) and keeps the correspondence. A
//! completion without confidence (a daemon that sent none, a partial text shown before `done`)
//! is not gated; nor are lines past the confidence the daemon sent.

use m31r_protocol::LineConfidence;

use crate::postprocess::Reason;

/// Whether a line with confidence `line` passes `threshold` (see the module doc).
pub fn passes(line: &LineConfidence, threshold: f64) -> bool {
    if threshold.is_nan() || threshold <= 0.0 {
        return true;
    }
    score(line).is_none_or(|score| score >= threshold.ln())
}

/// The mean log-probability of a line's tokens without its least likely one; `None` for a line
/// of fewer than two tokens.
pub fn score(line: &LineConfidence) -> Option<f64> {
    (line.tokens >= 2).then(|| (line.logprob_sum - line.logprob_min) / f64::from(line.tokens - 1))
}

/// How many leading lines of the completion to keep, given the confidence of its lines:
/// `Err(LowConfidence)` when the first fails `threshold`, else `Some(n)` when line `n` (≥ 1) is
/// the first that fails, and `None` when none fails (keep everything).
pub fn gate(lines: &[LineConfidence], threshold: f64) -> Result<Option<usize>, Reason> {
    match lines.iter().position(|line| !passes(line, threshold)) {
        Some(0) => Err(Reason::LowConfidence),
        Some(n) => Ok(Some(n)),
        None => Ok(None),
    }
}

/// The part of the daemon's `text` the gate keeps: all of it, or up to (not including) the
/// newline before the first line below `threshold`; `Err(LowConfidence)` when that is the
/// first line. `lines` is the daemon's confidence for `text` ([`gate`]).
pub fn gate_text<'a>(
    text: &'a str,
    lines: &[LineConfidence],
    threshold: f64,
) -> Result<&'a str, Reason> {
    let Some(keep) = gate(lines, threshold)? else {
        return Ok(text);
    };
    let end = text.match_indices('\n').nth(keep - 1).map_or(text.len(), |(i, _)| i);
    Ok(&text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line of `tokens` tokens, each at log-probability `mean`.
    fn line(tokens: u32, mean: f64) -> LineConfidence {
        LineConfidence { tokens, logprob_sum: mean * f64::from(tokens), logprob_min: mean }
    }

    #[test]
    fn the_threshold_is_a_geometric_mean_probability_without_the_least_likely_token() {
        let half = line(4, 0.5f64.ln());
        assert!(passes(&half, 0.5));
        assert!(passes(&half, 0.4));
        assert!(!passes(&half, 0.6));
        // Three tokens at 0.5 and one at 0.01: the one uncertain choice does not count.
        let mut turn = line(3, 0.5f64.ln());
        turn.add(0.01f64.ln());
        assert!((score(&turn).unwrap() - 0.5f64.ln()).abs() < 1e-12);
        assert!(passes(&turn, 0.5));
        assert!(turn.mean() < 0.4f64.ln(), "the plain mean would fail it");
        // Two uncertain tokens do.
        turn.add(0.01f64.ln());
        assert!(!passes(&turn, 0.3));
        assert!(passes(&line(3, -50.0), 0.0), "0 shows everything");
        assert!(passes(&line(3, -50.0), -1.0));
        assert!(passes(&LineConfidence::default(), 0.99), "a line without tokens passes");
        assert!(passes(&line(1, -20.0), 0.99), "nor does one token say anything");
        assert!(!passes(&line(2, -1e-9), 1.0), "1 passes only certainty");
        assert!(passes(&line(2, 0.0), 1.0));
    }

    #[test]
    fn a_weak_first_line_suppresses_and_a_weak_later_line_cuts() {
        let (sure, unsure) = (line(5, -0.1), line(5, -3.0));
        assert_eq!(gate(&[unsure, sure], 0.2), Err(Reason::LowConfidence));
        assert_eq!(gate(&[sure, sure, unsure, sure], 0.2), Ok(Some(2)));
        assert_eq!(gate(&[sure, sure], 0.2), Ok(None));
        assert_eq!(gate(&[], 0.2), Ok(None), "no confidence, no gate");
        assert_eq!(gate(&[unsure], 0.0), Ok(None));

        let text = "let a = 1;\n    let b = 2;\n    zzz\n}";
        assert_eq!(
            gate_text(text, &[sure, sure, unsure, sure], 0.2),
            Ok("let a = 1;\n    let b = 2;")
        );
        assert_eq!(gate_text(text, &[sure, unsure], 0.2), Ok("let a = 1;"));
        assert_eq!(gate_text(text, &[sure; 4], 0.2), Ok(text));
        assert_eq!(gate_text(text, &[unsure; 4], 0.2), Err(Reason::LowConfidence));
        // More confidence lines than text lines (a daemon that counted differently): all kept.
        assert_eq!(gate_text("x", &[sure, unsure], 0.2), Ok("x"));
    }
}
