//! The single-line completion benchmark of `eval`: whole lines masked out of held-out files, a
//! deterministic sample of them, greedy decoding up to the end of the line, and the two scores
//! (exact match, edit similarity).
//!
//! An item masks one whole line, indentation included: the prefix ends right after the previous
//! `\n`, the suffix starts with the line's own `\n`. Masking from the start of the line keeps the
//! prompt's last token on a boundary the tokenizer also produces in training text (a prompt that
//! ends inside a run of indentation spaces would not be). Candidate lines hold at least one ASCII
//! letter or digit, so lines of closing brackets, trivially predictable, do not inflate the scores.

use m31r_model::rng::Rng;
use m31r_model::tokenizer::{Tokenizer, TokenizerError};
use serde::{Deserialize, Serialize};

/// Longest line (in bytes) the benchmark asks for; longer ones are generated or data, not code.
pub const MAX_LINE_BYTES: usize = 200;

/// One masked line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Index of the document among the test documents, in manifest order.
    pub document: usize,
    /// 1-based line number.
    pub line: usize,
    /// Text before the line.
    pub prefix: String,
    /// The line, without its `\n`.
    pub middle: String,
    /// Text after the line, starting with its `\n` (empty for a last line without one).
    pub suffix: String,
}

/// The candidate lines of `texts` and a seeded sample of `count` of them (all of them when there
/// are fewer), ordered by document and line. Returns the items and the number of candidates.
pub fn sample_items(texts: &[&str], count: usize, seed: u64) -> (Vec<Item>, usize) {
    let mut candidates: Vec<(usize, usize, usize, usize)> = Vec::new();
    for (doc, text) in texts.iter().enumerate() {
        let mut start = 0;
        for (n, line) in text.split_inclusive('\n').enumerate() {
            let body = line.strip_suffix('\n').unwrap_or(line);
            let body = body.strip_suffix('\r').unwrap_or(body);
            if body.len() <= MAX_LINE_BYTES && body.bytes().any(|b| b.is_ascii_alphanumeric()) {
                candidates.push((doc, n + 1, start, start + body.len()));
            }
            start += line.len();
        }
    }
    let total = candidates.len();
    // Partial Fisher-Yates: the first `count` slots become a uniform sample.
    let mut rng = Rng::for_stream(seed, "eval-fim-items");
    let take = count.min(total);
    for i in 0..take {
        let j = i + rng.below((total - i) as u64) as usize;
        candidates.swap(i, j);
    }
    let mut chosen = candidates[..take].to_vec();
    chosen.sort_unstable();
    let items = chosen
        .into_iter()
        .map(|(document, line, start, end)| {
            let text = texts[document];
            Item {
                document,
                line,
                prefix: text[..start].to_owned(),
                middle: text[start..end].to_owned(),
                suffix: text[end..].to_owned(),
            }
        })
        .collect();
    (items, total)
}

/// Something that predicts the greedy next token of a sequence, extended one token at a time.
pub trait Predictor {
    /// The error of a prediction.
    type Error: From<TokenizerError>;
    /// Starts a new sequence with `prompt` and returns its greedy next token.
    fn start(&mut self, prompt: &[u32]) -> Result<u32, Self::Error>;
    /// Appends `token` to the sequence and returns the greedy next token.
    fn push(&mut self, token: u32) -> Result<u32, Self::Error>;
}

/// A completion and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The generated text, cut before the first `\n`.
    pub text: String,
    /// Tokens generated (the stopping token not counted).
    pub tokens: usize,
}

/// Greedy single-line decoding with the daemon's token stops: a special token (end of text, any
/// FIM marker) ends the completion, so does the first `\n` of the decoded text, so does
/// `max_new` tokens.
pub fn complete_line<P: Predictor>(
    predictor: &mut P,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_new: usize,
) -> Result<Completion, P::Error> {
    let special = tokenizer.special_ids();
    let mut ids: Vec<u32> = Vec::new();
    let mut next = predictor.start(prompt)?;
    while !special.contains(next) && ids.len() < max_new {
        ids.push(next);
        let text = tokenizer.decode(&ids)?;
        if let Some(end) = text.find('\n') {
            return Ok(Completion { text: text[..end].to_owned(), tokens: ids.len() });
        }
        if ids.len() == max_new {
            break;
        }
        next = predictor.push(next)?;
    }
    Ok(Completion { text: tokenizer.decode(&ids)?, tokens: ids.len() })
}

/// Scores of one system over the items.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Items scored.
    pub items: u64,
    /// Completions equal to the masked line (trailing whitespace ignored).
    pub exact: u64,
    /// `exact / items`.
    pub exact_match: f64,
    /// Mean over items of `1 - levenshtein(completion, line) / max(len)`, in characters.
    pub edit_similarity: f64,
    /// Mean tokens generated per item.
    pub mean_tokens: f64,
}

/// Accumulates a [`Score`].
#[derive(Debug, Clone, Default)]
pub struct ScoreSum {
    items: u64,
    exact: u64,
    similarity: f64,
    tokens: u64,
}

impl ScoreSum {
    /// Adds one item's completion against its expected line.
    pub fn add(&mut self, completion: &Completion, expected: &str) {
        let (got, want) = (completion.text.trim_end(), expected.trim_end());
        self.items += 1;
        self.exact += u64::from(got == want);
        self.similarity += edit_similarity(got, want);
        self.tokens += completion.tokens as u64;
    }

    /// The means.
    pub fn score(&self) -> Score {
        let n = self.items.max(1) as f64;
        Score {
            items: self.items,
            exact: self.exact,
            exact_match: self.exact as f64 / n,
            edit_similarity: self.similarity / n,
            mean_tokens: self.tokens as f64 / n,
        }
    }
}

/// `1 - d / max(|a|, |b|)` with `d` the Levenshtein distance in characters; 1 for two empty
/// strings.
pub fn edit_similarity(a: &str, b: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 1.0;
    }
    1.0 - levenshtein(&a, &b) as f64 / longest as f64
}

fn levenshtein(a: &[char], b: &[char]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_similarity_is_normalised_levenshtein() {
        assert_eq!(edit_similarity("", ""), 1.0);
        assert_eq!(edit_similarity("abc", "abc"), 1.0);
        assert_eq!(edit_similarity("abc", ""), 0.0);
        assert_eq!(
            levenshtein(&['k', 'i', 't', 't', 'e', 'n'], &['s', 'i', 't', 't', 'i', 'n', 'g']),
            3
        );
        assert!((edit_similarity("kitten", "sitting") - (1.0 - 3.0 / 7.0)).abs() < 1e-12);
        assert!((edit_similarity("é", "e") - 0.0).abs() < 1e-12, "counts characters, not bytes");
    }

    #[test]
    fn items_are_whole_lines_and_the_sample_is_seeded() {
        let texts = ["fn a() {\n    let x = 1;\n}\n", "}\n\nstruct S;", "  \n"];
        let (all, total) = sample_items(&texts, 100, 1);
        assert_eq!(total, 3, "closing brackets and blank lines are not candidates");
        assert_eq!(all.len(), 3);
        for item in &all {
            let text = texts[item.document];
            assert_eq!(format!("{}{}{}", item.prefix, item.middle, item.suffix), text);
            assert!(item.prefix.is_empty() || item.prefix.ends_with('\n'));
            assert!(item.suffix.is_empty() || item.suffix.starts_with('\n'));
            assert!(!item.middle.contains('\n'));
        }
        assert_eq!((all[1].middle.as_str(), all[1].line), ("    let x = 1;", 2));
        assert_eq!((all[2].middle.as_str(), all[2].suffix.as_str()), ("struct S;", ""));
        let (two, _) = sample_items(&texts, 2, 7);
        assert_eq!(two, sample_items(&texts, 2, 7).0);
        assert_eq!(two.len(), 2);
    }
}
