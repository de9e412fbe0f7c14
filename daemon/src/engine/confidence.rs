//! The model's confidence in what it generated, reported per line in `done`
//! ([`m31r_protocol::LineConfidence`]): each generated token's natural-log probability under the
//! plain softmax of its logits row (temperature 1, whatever the sampler did), assigned to the
//! line of the sent text that holds the first byte the token added to it.

use m31r_protocol::LineConfidence;

/// The lowest log-probability reported for one token, so that every number stays finite (a
/// token the model gave probability 0 in f64, or a row with non-finite logits).
pub(crate) const LOGPROB_FLOOR: f64 = -1.0e4;

/// `ln softmax(row)[id]`, computed in f64 with the log-sum-exp trick; clamped to
/// [`LOGPROB_FLOOR`]`..=0`. Independent of temperature, top-k, top-p and healing constraints.
pub(crate) fn token_logprob(row: &[f32], id: u32) -> f64 {
    let Some(&chosen) = row.get(id as usize) else {
        return LOGPROB_FLOOR;
    };
    let max = row.iter().copied().filter(|l| l.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() || !chosen.is_finite() {
        return LOGPROB_FLOOR;
    }
    let max = f64::from(max);
    let sum: f64 = row.iter().filter(|l| l.is_finite()).map(|&l| (f64::from(l) - max).exp()).sum();
    let lp = f64::from(chosen) - max - sum.ln();
    if lp.is_finite() { lp.clamp(LOGPROB_FLOOR, 0.0) } else { LOGPROB_FLOOR }
}

/// The offset in `String::from_utf8_lossy(bytes)` of the character holding byte `at` of
/// `bytes` (a continuation byte belongs to the character it continues).
pub(crate) fn lossy_offset(bytes: &[u8], mut at: usize) -> usize {
    at = at.min(bytes.len());
    while at > 0 && at < bytes.len() && (bytes[at] & 0b1100_0000) == 0b1000_0000 {
        at -= 1;
    }
    String::from_utf8_lossy(&bytes[..at]).len()
}

/// Log-probabilities of the scored tokens, each at the byte position in the streamed text (the
/// stop scanner's text) of the first byte it added.
#[derive(Debug, Default)]
pub(crate) struct Scores {
    tokens: Vec<(usize, f64)>,
}

impl Scores {
    /// Records a token whose first added byte is at `position` of the streamed text.
    pub(crate) fn record(&mut self, position: usize, logprob: f64) {
        self.tokens.push((position, logprob));
    }

    /// The confidence of each line of `sent`, the text the client received (a prefix of the
    /// streamed text): one entry per line (`sent.split('\n')`), none when `sent` is empty.
    /// Tokens at or past `sent`'s end (withheld by a stop rule, or held back when the request
    /// was cancelled) count toward no line.
    pub(crate) fn lines(&self, sent: &str) -> Vec<LineConfidence> {
        if sent.is_empty() {
            return Vec::new();
        }
        let bytes = sent.as_bytes();
        let mut lines =
            vec![LineConfidence::default(); bytes.iter().filter(|&&b| b == b'\n').count() + 1];
        // Positions only grow, so one sweep counts the newlines before each.
        let (mut line, mut scanned) = (0, 0);
        for &(position, logprob) in &self.tokens {
            if position >= bytes.len() {
                continue;
            }
            if position > scanned {
                line += bytes[scanned..position].iter().filter(|&&b| b == b'\n').count();
                scanned = position;
            }
            lines[line].add(logprob);
        }
        lines
    }

    /// Appends `piece` to `sent` and returns the confidence so far of the lines `piece` adds
    /// to: the line it starts in, then one more per newline in it (what `token` carries).
    pub(crate) fn lines_touched(&self, sent: &mut String, piece: &str) -> Vec<LineConfidence> {
        let first = sent.bytes().filter(|&b| b == b'\n').count();
        sent.push_str(piece);
        let mut lines = self.lines(sent);
        lines.drain(..first.min(lines.len()));
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprob_is_the_plain_log_softmax() {
        let row = [1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|l| l.exp()).sum();
        for id in 0..3 {
            let want = (f64::from(row[id]).exp() / z).ln();
            assert!((token_logprob(&row, id as u32) - want).abs() < 1e-12, "{id}");
        }
        assert_eq!(token_logprob(&row, 3), LOGPROB_FLOOR);
        assert_eq!(token_logprob(&row, 9), LOGPROB_FLOOR);
        assert_eq!(token_logprob(&[f32::NAN, 1.0], 0), LOGPROB_FLOOR);
        assert_eq!(token_logprob(&[5.0], 0), 0.0);
        // Huge logits do not overflow.
        assert!((token_logprob(&[1e30, 1e30], 0) - 0.5f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn lossy_offsets_land_on_character_starts() {
        let text = "aé\nb";
        let bytes = text.as_bytes();
        assert_eq!(lossy_offset(bytes, 0), 0);
        assert_eq!(lossy_offset(bytes, 1), 1);
        assert_eq!(lossy_offset(bytes, 2), 1, "inside é");
        assert_eq!(lossy_offset(bytes, 3), 3);
        assert_eq!(lossy_offset(bytes, 99), text.len());
    }

    #[test]
    fn tokens_count_toward_the_line_of_their_first_byte() {
        // Tokens: "let" " x" " = 1;\n" "    " "y" "\n}" — the newline-led token belongs to the
        // line its newline ends.
        let sent = "let x = 1;\n    y\n}";
        let mut scores = Scores::default();
        for (position, lp) in [(0, -0.1), (3, -0.2), (5, -0.3), (11, -1.0), (15, -2.0), (16, -0.5)]
        {
            scores.record(position, lp);
        }
        let lines = scores.lines(sent);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].tokens, 3);
        assert!((lines[0].logprob_sum - -0.6).abs() < 1e-12);
        assert_eq!(lines[0].logprob_min, -0.3);
        assert_eq!((lines[1].tokens, lines[1].logprob_min), (3, -2.0));
        // "}" came with the previous line's token.
        assert_eq!(lines[2], LineConfidence::default());
        // A cut answer drops what lies past it.
        let cut = scores.lines("let x");
        assert_eq!(cut.len(), 1);
        assert_eq!(cut[0].tokens, 2);
        assert!(scores.lines("").is_empty());
    }

    #[test]
    fn each_piece_carries_the_lines_it_adds_to() {
        let mut scores = Scores::default();
        for (position, lp) in [(0, -0.1), (3, -0.2), (5, -0.3), (11, -1.0)] {
            scores.record(position, lp);
        }
        let mut sent = String::new();
        let first = scores.lines_touched(&mut sent, "let x");
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].tokens, 2, "only the tokens that start in what was sent so far");
        let second = scores.lines_touched(&mut sent, " = 1;\n    y");
        assert_eq!(second.len(), 2, "the line it starts in and the one its newline opens");
        assert_eq!(second[0], scores.lines(&sent)[0]);
        assert_eq!(second[0].tokens, 3);
        assert_eq!(second[1].tokens, 1);
        assert_eq!(sent, "let x = 1;\n    y");
    }
}
