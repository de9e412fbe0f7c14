//! Deterministic batches: seed + step + micro-batch ⇒ the same sequences, drawn from packed shards
//! (windows across document boundaries), with the FIM and chain-of-thought transforms applied at
//! batch time.
//!
//! - **Next token**: a random window of `seq_len + 1` tokens.
//! - **FIM**: a next-token window whose longest document segment is decoded, cut into
//!   prefix/middle/suffix, each tokenised separately and laid out PSM or SPM (`m31r_model::fim`);
//!   the sequence is then cut or padded with `<|fim_pad|>` back to its length. The middle is cut
//!   at two random character positions ([`FimSpan::Chars`]), or, for a share `fim_line_share` of
//!   the samples (none by default), as the editor asks for it: the rest of one line, from its
//!   start or from a point inside it ([`FimSpan::Line`]). Special tokens are never split: segments are delimited by `<|endoftext|>` ids and only
//!   ordinary text is decoded.
//! - **CoT**: `<|cot|>` + a comment block (`//` or `///` lines explaining what follows) + the code
//!   it introduces, taken from a random document, packed up to the sequence length. This teaches the
//!   model to continue a reasoning comment into code; where a document has no such pair the sequence
//!   falls back to next-token.

use m31r_model::fim::{FimMode, training_sequence};
use m31r_model::rng::Rng;
use m31r_model::tokenizer::Tokenizer;

use crate::config::TrainConfig;
use crate::shards::ShardSet;

/// The objective a sequence trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Objective {
    /// Left-to-right next-token prediction.
    Next,
    /// Fill-in-the-middle.
    Fim,
    /// Comment-then-code.
    Cot,
}

impl Objective {
    /// All objectives, in loss-report order.
    pub const ALL: [Objective; 3] = [Objective::Next, Objective::Fim, Objective::Cot];

    /// Name used in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Objective::Next => "next",
            Objective::Fim => "fim",
            Objective::Cot => "cot",
        }
    }
}

/// One training sequence: `ids` has `seq_len + 1` tokens (inputs are `ids[..n]`, targets
/// `ids[1..]`); `mask[t]` says whether target `t` counts in the loss (padding does not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Loss mask over the targets (`seq_len` entries).
    pub mask: Vec<bool>,
    /// What it trains.
    pub objective: Objective,
}

/// Draws sequences for (step, micro-batch, row) from a shard set.
pub struct BatchSampler<'a> {
    shards: &'a ShardSet,
    tokenizer: &'a Tokenizer,
    config: &'a TrainConfig,
}

impl<'a> BatchSampler<'a> {
    /// A sampler over `shards`; the shards must have been written with `tokenizer`.
    pub fn new(shards: &'a ShardSet, tokenizer: &'a Tokenizer, config: &'a TrainConfig) -> Self {
        Self { shards, tokenizer, config }
    }

    /// The `batch_size` sequences of micro-batch `micro` of step `step`.
    pub fn micro_batch(&self, step: u64, micro: usize) -> Vec<Sequence> {
        (0..self.config.batch_size)
            .map(|row| {
                let mut rng =
                    Rng::for_stream(self.config.seed, &format!("batch/{step}/{micro}/{row}"));
                self.sequence(&mut rng)
            })
            .collect()
    }

    /// A fixed next-token validation micro-batch (`index` picks which), independent of the step.
    pub fn eval_batch(&self, index: usize) -> Vec<Sequence> {
        (0..self.config.batch_size)
            .map(|row| {
                let mut rng = Rng::for_stream(self.config.seed, &format!("eval/{index}/{row}"));
                self.next_token(&mut rng)
            })
            .collect()
    }

    fn sequence(&self, rng: &mut Rng) -> Sequence {
        let c = self.config;
        let draw = rng.next_f64();
        if draw < c.cot_share
            && let Some(seq) = self.cot(rng)
        {
            return seq;
        }
        let base = self.next_token(rng);
        if rng.next_f64() < c.fim_rate {
            let mode = if rng.next_f64() < c.spm_share { FimMode::Spm } else { FimMode::Psm };
            // No draw at a share of 0, so runs from before the key see the batches they saw.
            let line = c.fim_line_share > 0.0 && rng.next_f64() < c.fim_line_share;
            let span = if line { FimSpan::Line } else { FimSpan::Chars };
            if let Some(seq) = self.fim(&base.ids, mode, span, rng) {
                return seq;
            }
        }
        base
    }

    fn window_len(&self) -> usize {
        self.config.seq_len + 1
    }

    fn next_token(&self, rng: &mut Rng) -> Sequence {
        let n = self.window_len() as u64;
        let total = self.shards.len();
        let ids = if total > n {
            let start = rng.below(total - n);
            self.shards.tokens(start..start + n)
        } else {
            // A corpus shorter than one window: repeat it (only in toy runs).
            let all = self.shards.tokens(0..total);
            all.iter().copied().cycle().take(n as usize).collect()
        };
        Sequence { mask: vec![true; n as usize - 1], ids, objective: Objective::Next }
    }

    /// Applies FIM to the longest `<|endoftext|>`-free segment of `ids`.
    fn fim(&self, ids: &[u32], mode: FimMode, span: FimSpan, rng: &mut Rng) -> Option<Sequence> {
        let (a, b) = (rng.next_u64(), rng.next_u64());
        let eot = self.shards.end_of_text();
        let (out, _) = fim_transform(self.tokenizer, ids, eot, mode, span, a, b)?;
        Some(self.fit(out, Objective::Fim))
    }

    /// Comment-then-code samples from random documents, packed into one sequence.
    fn cot(&self, rng: &mut Rng) -> Option<Sequence> {
        let special = self.tokenizer.special_ids();
        let docs = self.shards.num_documents() as u64;
        if docs == 0 {
            return None;
        }
        let mut ids = Vec::new();
        for _ in 0..8 {
            if ids.len() >= self.window_len() {
                break;
            }
            let doc = self.shards.document(rng.below(docs) as usize)?;
            let text = self.tokenizer.decode(&doc).ok()?;
            for (comment, code) in comment_code_pairs(&text) {
                ids.push(special.cot);
                ids.extend(self.tokenizer.encode(&format!("{comment}{code}")).ok()?);
                ids.push(special.end_of_text);
                if ids.len() >= self.window_len() {
                    break;
                }
            }
        }
        (!ids.is_empty()).then(|| self.fit(ids, Objective::Cot))
    }

    /// Cuts or pads (with `<|fim_pad|>`, masked out) to exactly `seq_len + 1` tokens.
    fn fit(&self, mut ids: Vec<u32>, objective: Objective) -> Sequence {
        let n = self.window_len();
        let real = ids.len().min(n);
        ids.resize(n, self.tokenizer.special_ids().fim_pad);
        ids.truncate(n);
        // Target t is ids[t + 1]: it counts only if it is a real token.
        let mask = (0..n - 1).map(|t| t + 1 < real).collect();
        Sequence { ids, mask, objective }
    }
}

/// Where a FIM sample's middle is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FimSpan {
    /// Between two random character positions of the segment: any length, any boundary.
    Chars,
    /// The rest of one random line that has a letter or digit: from its start (indentation
    /// included) or from a random character inside it, to its end without the `\n`. That is the
    /// editor's request (complete the line at the cursor) and what `m31r-train eval` masks.
    Line,
}

/// The FIM transform of a window: its longest `eot`-free segment is decoded (fragments of
/// characters cut by the window edges dropped), split into prefix, middle and suffix at the
/// positions `span` picks with `a` and `b`, each encoded separately and laid out in `mode`; the
/// layout replaces the segment and its trailing separator. Returns the new ids (not yet fitted to
/// the window length) and the segment's text, which the layout's pieces reassemble exactly.
pub fn fim_transform(
    tokenizer: &Tokenizer,
    ids: &[u32],
    eot: u32,
    mode: FimMode,
    span: FimSpan,
    a: u64,
    b: u64,
) -> Option<(Vec<u32>, String)> {
    let (start, end) = longest_segment(ids, eot);
    let text = tokenizer.decode(&ids[start..end]).ok()?;
    let text = text.trim_matches('\u{FFFD}');
    let (i, j) = match span {
        FimSpan::Chars => {
            let chars: Vec<usize> =
                text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
            if chars.len() < 3 {
                return None;
            }
            let pick = |r: u64| chars[(r % chars.len() as u64) as usize];
            (pick(a).min(pick(b)), pick(a).max(pick(b)))
        }
        FimSpan::Line => {
            let lines = code_lines(text);
            if lines.is_empty() {
                return None;
            }
            let (first, last) = lines[(a % lines.len() as u64) as usize];
            let from = if b.is_multiple_of(2) {
                first
            } else {
                let inside: Vec<usize> = text[first..last].char_indices().map(|(i, _)| i).collect();
                first + inside[((b / 2) % inside.len() as u64) as usize]
            };
            (from, last)
        }
    };
    let encode = |s: &str| tokenizer.encode(s).ok();
    let (p, m, s) = (encode(&text[..i])?, encode(&text[i..j])?, encode(&text[j..])?);
    let layout = training_sequence(tokenizer.special_ids(), mode, &p, &m, &s);
    let after = if end < ids.len() { end + 1 } else { end };
    let mut out = ids[..start].to_vec();
    out.extend(layout);
    out.extend_from_slice(&ids[after..]);
    Some((out, text.to_string()))
}

/// `[start, end)` byte ranges of the lines of `text` with an ASCII letter or digit, without their
/// line ending.
fn code_lines(text: &str) -> Vec<(usize, usize)> {
    let mut lines = Vec::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let body = line.strip_suffix('\n').unwrap_or(line);
        let body = body.strip_suffix('\r').unwrap_or(body);
        if body.bytes().any(|c| c.is_ascii_alphanumeric()) {
            lines.push((start, start + body.len()));
        }
        start += line.len();
    }
    lines
}

/// `[start, end)` of the longest run of ids without `eot`.
fn longest_segment(ids: &[u32], eot: u32) -> (usize, usize) {
    let mut best = (0, 0);
    let mut start = 0;
    for (i, &id) in ids.iter().chain([&eot]).enumerate() {
        if id == eot {
            if i - start > best.1 - best.0 {
                best = (start, i);
            }
            start = i + 1;
        }
    }
    best
}

/// Comment blocks (consecutive `//`/`///` lines, not `//!`, at least 3 words) followed by the code
/// they introduce: the next lines up to a blank line or a line indented less than the comment,
/// at most 40 lines.
pub fn comment_code_pairs(text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let is_comment = |l: &str| {
        let t = l.trim_start();
        t.starts_with("//") && !t.starts_with("//!")
    };
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if !is_comment(lines[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < lines.len() && is_comment(lines[i]) {
            i += 1;
        }
        let comment: String = lines[start..i].concat();
        let words =
            comment.split_whitespace().filter(|w| w.chars().any(char::is_alphabetic)).count();
        let base = indent(lines[start]);
        let code_start = i;
        while i < lines.len()
            && i - code_start < 40
            && !lines[i].trim().is_empty()
            && !is_comment(lines[i])
            && (i == code_start
                || indent(lines[i]) >= base
                || lines[i].trim_start().starts_with('}'))
        {
            i += 1;
        }
        if words >= 3 && i - code_start >= 2 {
            pairs.push((comment, lines[code_start..i].concat()));
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_segment_skips_separators() {
        assert_eq!(longest_segment(&[5, 6, 0, 7, 8, 9, 0, 1], 0), (3, 6));
        assert_eq!(longest_segment(&[5, 6, 7], 0), (0, 3));
        assert_eq!(longest_segment(&[0, 0], 0), (0, 0));
    }

    #[test]
    fn comment_code_pairs_find_documented_items() {
        let text = "//! crate docs here are skipped\n\n/// Adds two numbers and returns\n/// their sum.\npub fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\n// x\nlet y = 1;\nlet z = 2;\n";
        let pairs = comment_code_pairs(text);
        assert_eq!(pairs.len(), 1, "{pairs:?}");
        assert!(pairs[0].0.starts_with("/// Adds"));
        assert_eq!(pairs[0].1, "pub fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n");
    }
}
