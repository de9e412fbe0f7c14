//! Similar-snippet context: the other open documents cut into overlapping line windows, and the
//! windows most like the lines above the cursor chosen within a byte budget.
//!
//! The model's context is 512–2048 tokens, so whole files are mostly cut away; what helps a
//! completion is code that looks like the code being written. Similarity is the Jaccard index of
//! identifier-like token sets, compared exactly (as fractions), so the choice is deterministic.
//! The query is the lines above the cursor's line, never the line being typed: the chosen
//! snippets, which the daemon puts first in its prompt, stay byte-identical while the user types
//! along one line, and its prefix cache keeps holding.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::ops::Range;

/// How documents are cut and how much is sent.
#[derive(Debug, Clone, Copy)]
pub struct Chunking {
    /// Lines per window.
    pub lines: usize,
    /// Window starts are this many lines apart (less than `lines`: windows overlap, so code
    /// near a window edge is whole in one of them).
    pub step: usize,
    /// Lines above the cursor's line that make the query.
    pub query_lines: usize,
    /// Bytes of one document's head that are searched; the rest of a huge file is ignored, so
    /// one generated file cannot slow every keystroke down.
    pub scan_bytes: usize,
}

impl Default for Chunking {
    fn default() -> Self {
        Self { lines: 32, step: 16, query_lines: 32, scan_bytes: 256 * 1024 }
    }
}

/// A chosen window of a context document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snippet<'a> {
    /// The document's workspace-relative path.
    pub path: &'a str,
    /// Its lines (0-based, end exclusive).
    pub lines: Range<usize>,
    /// Its text: whole lines, with their terminators.
    pub text: &'a str,
    /// The window is the whole document.
    pub whole: bool,
}

impl Snippet<'_> {
    /// The name the model sees: the path, plus the 1-based inclusive line range when the
    /// snippet is only part of the file (`src/util.rs:17-48`).
    pub fn label(&self) -> String {
        if self.whole {
            self.path.to_string()
        } else {
            format!("{}:{}-{}", self.path, self.lines.start + 1, self.lines.end)
        }
    }
}

/// The query text for a cursor on line `cursor_line` of `text`: up to `query_lines` lines above
/// it, without the cursor's line itself.
pub fn query(text: &str, cursor_line: usize, query_lines: usize) -> &str {
    let starts = line_starts(text);
    let end_line = cursor_line.min(starts.len());
    let start_line = end_line.saturating_sub(query_lines);
    let at = |line: usize| starts.get(line).copied().unwrap_or(text.len());
    &text[at(start_line)..at(end_line)]
}

/// The windows of `docs` (path, text) most similar to `query`, least similar first (the daemon's order: the
/// last context is the nearest to the prefix and the first is dropped first when short of room).
/// Windows sharing no token with the query are never chosen, nor two overlapping windows of one
/// document. Ties go to the smaller (path, start line). The snippets' texts and labels together
/// take at most `budget` bytes.
pub fn choose<'a>(
    query: &str,
    docs: impl IntoIterator<Item = (&'a str, &'a str)>,
    chunking: &Chunking,
    budget: usize,
) -> Vec<Snippet<'a>> {
    let query = tokens(query);
    if query.is_empty() {
        return Vec::new();
    }
    let mut candidates: Vec<(Score, Snippet<'a>)> = Vec::new();
    for (path, text) in docs {
        let text = head(text, chunking.scan_bytes);
        for snippet in windows(path, text, chunking) {
            let score = Score::of(&query, &tokens(snippet.text));
            if score.shared > 0 {
                candidates.push((score, snippet));
            }
        }
    }
    candidates.sort_by(|(a, x), (b, y)| {
        b.cmp(a).then_with(|| x.path.cmp(y.path)).then_with(|| x.lines.start.cmp(&y.lines.start))
    });

    let mut left = budget;
    let mut chosen: Vec<Snippet<'a>> = Vec::new();
    for (_, snippet) in candidates {
        let cost = snippet.text.len() + snippet.label().len();
        let overlaps = chosen.iter().any(|c| {
            c.path == snippet.path
                && c.lines.start < snippet.lines.end
                && snippet.lines.start < c.lines.end
        });
        // A window too big for what is left is skipped, not the end: a smaller one may fit.
        if cost <= left && !overlaps {
            left -= cost;
            chosen.push(snippet);
        }
    }
    chosen.reverse();
    chosen
}

/// A Jaccard index kept as the fraction `shared / union`, compared exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Score {
    shared: usize,
    union: usize,
}

impl Score {
    fn of(a: &HashSet<&str>, b: &HashSet<&str>) -> Self {
        let shared = a.iter().filter(|t| b.contains(*t)).count();
        Self { shared, union: a.len() + b.len() - shared }
    }
}

impl Ord for Score {
    fn cmp(&self, other: &Self) -> Ordering {
        // Both fractions have positive denominators whenever compared (the query is non-empty),
        // and token counts are far below u64's range, so cross-multiplication is exact.
        (self.shared as u64 * other.union as u64)
            .cmp(&(other.shared as u64 * self.union as u64))
            .then_with(|| self.shared.cmp(&other.shared))
            .then_with(|| other.union.cmp(&self.union))
    }
}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The windows of one document: `chunking.lines` lines starting every `chunking.step` lines,
/// the last one ending at the document's end. A trailing newline starts no extra line.
fn windows<'a>(path: &'a str, text: &'a str, chunking: &Chunking) -> Vec<Snippet<'a>> {
    let mut starts = line_starts(text);
    if starts.last() == Some(&text.len()) {
        starts.pop();
    }
    let count = starts.len();
    let at = |line: usize| starts.get(line).copied().unwrap_or(text.len());
    let (size, step) = (chunking.lines.max(1), chunking.step.max(1));
    let mut out = Vec::new();
    let mut start = 0;
    while start < count {
        let end = (start + size).min(count);
        out.push(Snippet {
            path,
            lines: start..end,
            text: &text[at(start)..at(end)],
            whole: start == 0 && end == count,
        });
        if end == count {
            break;
        }
        start += step;
    }
    out
}

/// The identifier-like words of `text`: runs of letters, digits and `_`.
fn tokens(text: &str) -> HashSet<&str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|t| !t.is_empty()).collect()
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect()
}

/// The head of `text`, at most `max` bytes, ending after a whole line.
fn head(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].rfind('\n').map_or("", |i| &text[..=i])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A document of `n` lines `let NAME_i = i;`.
    fn doc_of(name: &str, n: usize) -> String {
        (0..n).map(|i| format!("let {name}_{i} = {i};\n")).collect()
    }

    fn labels(chosen: &[Snippet<'_>]) -> Vec<String> {
        chosen.iter().map(Snippet::label).collect()
    }

    #[test]
    fn documents_are_cut_into_overlapping_windows_of_whole_lines() {
        let text = doc_of("a", 40);
        let chunking = Chunking::default();
        let w = windows("a.rs", &text, &chunking);
        let ranges: Vec<_> = w.iter().map(|s| s.lines.clone()).collect();
        assert_eq!(ranges, vec![0..32, 16..40]);
        assert!(w[1].text.starts_with("let a_16 = 16;\n") && w[1].text.ends_with("a_39 = 39;\n"));
        assert!(w.iter().all(|s| !s.whole));
        let small = windows("b.rs", "fn b() {}", &chunking);
        assert_eq!(
            small,
            vec![Snippet { path: "b.rs", lines: 0..1, text: "fn b() {}", whole: true }]
        );
        assert_eq!(small[0].label(), "b.rs");
        assert_eq!(w[1].label(), "a.rs:17-40");
        assert!(windows("c.rs", "", &chunking).is_empty());
    }

    #[test]
    fn the_query_is_the_lines_above_the_cursor_line() {
        let text = "a\nb\nc\nd typing";
        assert_eq!(query(text, 3, 2), "b\nc\n");
        assert_eq!(query(text, 0, 2), "");
        assert_eq!(query(text, 9, 1), "d typing");
    }

    #[test]
    fn choice_is_deterministic_least_similar_first_and_ties_go_by_path_then_line() {
        let alpha = "fn alpha(x: u32) -> u32 {\n    x + 1\n}\n";
        let beta = "fn beta(y: u32) -> u32 {\n    y * 2\n}\n";
        let tie = "fn beta(y: u32) -> u32 {\n    y * 2\n}\n";
        let far = "struct Unrelated;\n";
        let docs = [
            ("src/z.rs", tie),
            ("src/far.rs", far),
            ("src/alpha.rs", alpha),
            ("src/beta.rs", beta),
        ];
        let q = "fn beta(y: u32) -> u32 {\n    y + 1\n";
        let first = choose(q, docs, &Chunking::default(), 4096);
        let second = choose(q, docs, &Chunking::default(), 4096);
        assert_eq!(first, second);
        // beta.rs and z.rs tie; beta.rs is the more relevant by path order, so comes last.
        assert_eq!(labels(&first), ["src/alpha.rs", "src/z.rs", "src/beta.rs"]);
    }

    #[test]
    fn the_budget_bounds_text_and_labels_and_skips_what_does_not_fit() {
        let big = doc_of("same", 64);
        let docs = [("big.rs", big.as_str()), ("small.rs", "let same_1 = 1;\n")];
        let q = "let same_1 = 1;\nlet same_2 = 2;\n";
        for budget in [0, 10, 40, 300, 700, 4096] {
            let chosen = choose(q, docs, &Chunking::default(), budget);
            let cost: usize = chosen.iter().map(|s| s.text.len() + s.label().len()).sum();
            assert!(cost <= budget, "budget {budget}: {cost}");
            if budget >= 40 {
                // The big windows do not fit in 40 or 300 bytes; the small file still does.
                assert!(chosen.iter().any(|s| s.path == "small.rs"), "budget {budget}");
            }
        }
        let chosen = choose(q, docs, &Chunking::default(), 1 << 20);
        // Overlapping windows of one document are never both chosen.
        let big_ranges: Vec<_> =
            chosen.iter().filter(|s| s.path == "big.rs").map(|s| s.lines.clone()).collect();
        assert_eq!(big_ranges, vec![32..64, 0..32]);
    }

    #[test]
    fn nothing_is_chosen_without_shared_tokens() {
        let docs = [("a.rs", "struct Foo;\n")];
        assert!(choose("", docs, &Chunking::default(), 4096).is_empty());
        assert!(choose("let bar = baz;\n", docs, &Chunking::default(), 4096).is_empty());
    }
}
