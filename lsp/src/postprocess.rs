//! Post-processing: turns the daemon's raw completion into the edit the editor shows, or into a
//! suppression with a reason code. Rules, in order: empty/whitespace, single- or multi-line shape,
//! lines repeating the document's next lines, text repeating the rest of the line, the
//! degenerate-output filters (a short n-gram repeated across a line, a line repeating the one
//! above it, closers nothing opened: on the first line they suppress, on a later line they cut
//! there), auto-closed punctuation right of the cursor (replaced through the edit's range),
//! indentation in the document's style, trailing whitespace.

use std::fmt;

/// Single-line or multi-line completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Code right of the cursor: complete the line only.
    SingleLine,
    /// Nothing right of the cursor but auto-closed punctuation: up to `maxLines` lines.
    MultiLine,
}

impl Shape {
    /// The shape for a cursor followed by `line_suffix` on its line.
    pub fn of(line_suffix: &str) -> Self {
        if line_suffix.chars().all(|c| c.is_whitespace() || is_closing(c)) {
            Shape::MultiLine
        } else {
            Shape::SingleLine
        }
    }
}

/// Characters an editor auto-closes, as they appear right of the cursor.
fn is_closing(c: char) -> bool {
    matches!(c, ')' | ']' | '}' | '"' | '\'' | '>' | ';' | ',')
}

/// The document's indentation style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Indent {
    /// Tabs.
    Tabs,
    /// This many spaces per level.
    Spaces(usize),
}

impl Indent {
    /// The style of `text`: tabs if most indented lines start with a tab, else the most common
    /// positive indentation step between consecutive non-blank lines (4 when there is none).
    pub fn detect(text: &str) -> Self {
        let (mut tabs, mut spaced) = (0usize, 0usize);
        let mut steps = [0usize; 9];
        let mut previous = 0usize;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if line.starts_with('\t') {
                tabs += 1;
                continue;
            }
            let width = line.len() - line.trim_start_matches(' ').len();
            if width > 0 {
                spaced += 1;
            }
            if width > previous && width - previous < steps.len() {
                steps[width - previous] += 1;
            }
            previous = width;
        }
        if tabs > spaced {
            return Indent::Tabs;
        }
        // Ties go to the larger step, so 4-space code with a few 2-space continuations stays 4.
        match (1..steps.len()).rev().max_by_key(|&s| steps[s]) {
            Some(step) if steps[step] > 0 => Indent::Spaces(step),
            _ => Indent::Spaces(4),
        }
    }
}

/// Why a completion was not shown. The code appears in `window/logMessage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Completions are switched off (`enabled: false`).
    Disabled,
    /// The document's language is not in `languages`.
    Language,
    /// The document is not open.
    UnknownDocument,
    /// The daemon cannot be reached.
    DaemonUnavailable,
    /// The daemon answered with an error, or the connection dropped mid-request.
    DaemonError,
    /// The daemon did not finish within the request's timeout (the request was cancelled there).
    DaemonTimeout,
    /// A newer request for the same document replaced this one.
    Superseded,
    /// The first-line budget passed with nothing worth showing yet; the generation carries on
    /// in the background for the same position.
    NotReady,
    /// The daemon produced nothing.
    Empty,
    /// The daemon produced only whitespace (or only whitespace was left of the first line).
    Whitespace,
    /// All of the completion repeats the text right of the cursor.
    RepeatsSuffix,
    /// All of the completion repeats the lines after the cursor.
    RepeatsNextLines,
    /// The model's confidence in the first line is below the threshold ([`crate::gate`]).
    LowConfidence,
    /// The first line is mostly a short n-gram repeated (`ininin…`, `0, 0, 0, …`).
    Repetitive,
    /// The first line repeats the line above the cursor.
    RepeatsPreviousLine,
    /// The first line has closing brackets that nothing before it (nor the line) opened.
    Unbalanced,
}

impl Reason {
    /// The reason code.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Disabled => "disabled",
            Reason::Language => "language",
            Reason::UnknownDocument => "unknown_document",
            Reason::DaemonUnavailable => "daemon_unavailable",
            Reason::DaemonError => "daemon_error",
            Reason::DaemonTimeout => "daemon_timeout",
            Reason::Superseded => "superseded",
            Reason::NotReady => "not_ready",
            Reason::Empty => "empty",
            Reason::Whitespace => "whitespace",
            Reason::RepeatsSuffix => "repeats_suffix",
            Reason::RepeatsNextLines => "repeats_next_lines",
            Reason::LowConfidence => "low_confidence",
            Reason::Repetitive => "repetitive",
            Reason::RepeatsPreviousLine => "repeats_previous_line",
            Reason::Unbalanced => "unbalanced",
        }
    }

    /// Every reason, for documentation and tests.
    pub const ALL: [Reason; 15] = [
        Reason::Disabled,
        Reason::Language,
        Reason::UnknownDocument,
        Reason::DaemonUnavailable,
        Reason::DaemonError,
        Reason::DaemonTimeout,
        Reason::Superseded,
        Reason::Empty,
        Reason::Whitespace,
        Reason::RepeatsSuffix,
        Reason::RepeatsNextLines,
        Reason::LowConfidence,
        Reason::Repetitive,
        Reason::RepeatsPreviousLine,
        Reason::Unbalanced,
    ];
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// The cursor's surroundings.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    /// Text of the cursor line before the cursor.
    pub line_prefix: String,
    /// Text of the cursor line after the cursor.
    pub line_suffix: String,
    /// The next lines of the document after the cursor line, without terminators.
    pub next_lines: Vec<String>,
    /// The lines of the document before the cursor line, nearest last, without terminators:
    /// the context of the degenerate-output filters (the line above, brackets left open).
    pub prev_lines: Vec<String>,
    /// Apply the degenerate-output filters ([`Reason::Repetitive`],
    /// [`Reason::RepeatsPreviousLine`], [`Reason::Unbalanced`]); on by default.
    pub filters: bool,
    /// The document's indentation style.
    pub indent: Indent,
    /// The document uses `\r\n`.
    pub crlf: bool,
    /// Single- or multi-line.
    pub shape: Shape,
    /// Most lines of a multi-line completion.
    pub max_lines: usize,
}

/// What to show: insert `text` at the cursor, replacing the `replace` bytes right of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    /// The text to insert.
    pub text: String,
    /// Bytes right of the cursor that `text` replaces (auto-closed punctuation it retypes).
    pub replace: usize,
}

/// Applies the rules to the daemon's `raw` completion at `site`.
pub fn postprocess(raw: &str, site: &Site) -> Result<Edit, Reason> {
    if raw.is_empty() {
        return Err(Reason::Empty);
    }
    if raw.trim().is_empty() {
        return Err(Reason::Whitespace);
    }
    let raw = raw.replace("\r\n", "\n");

    let mut lines: Vec<&str> = raw.split('\n').collect();
    match site.shape {
        Shape::SingleLine => lines.truncate(1),
        Shape::MultiLine => lines.truncate(site.max_lines.max(1)),
    }
    if lines.iter().all(|l| l.trim().is_empty()) {
        return Err(Reason::Whitespace);
    }

    // Lines that repeat what follows the cursor line: the model ran on into existing code.
    let first_full = if site.line_prefix.trim().is_empty() && site.line_suffix.trim().is_empty() {
        0
    } else {
        1
    };
    let next: Vec<&str> =
        site.next_lines.iter().map(|l| l.trim()).skip_while(|l| l.is_empty()).collect();
    // Closing lines the kept part opened are its own, not a repetition of the document's.
    let repeat_at = (first_full..lines.len())
        .find(|&i| repeats(&lines[i..], &next) && open_brackets(&lines[..i].join("\n")) == 0);
    if let Some(cut) = repeat_at {
        lines.truncate(cut);
        if lines.iter().all(|l| l.trim().is_empty()) {
            return Err(Reason::RepeatsNextLines);
        }
    }
    let mut text = lines.join("\n");
    text.truncate(text.trim_end().len());
    let mut replace = 0;

    let suffix = site.line_suffix.as_str();
    let single = !suffix.trim().is_empty() && Shape::of(suffix) == Shape::SingleLine;
    if single && let Some(stripped) = text.trim_end().strip_suffix(suffix.trim_end()) {
        // The model retyped the rest of the line: keep only what goes before it.
        text = stripped.to_string();
        if text.trim().is_empty() {
            return Err(Reason::RepeatsSuffix);
        }
    }
    if site.filters {
        let keep = degenerate_cut(&text, site)?;
        if keep < text.len() {
            text.truncate(keep);
            text.truncate(text.trim_end().len());
        }
    }
    if !suffix.trim().is_empty() && !single {
        replace = closes_over(&text, suffix);
    }

    let mut text = reindent(&text, site.indent);
    if text.trim().is_empty() {
        return Err(Reason::Whitespace);
    }
    if site.crlf {
        text = text.replace('\n', "\r\n");
    }
    Ok(Edit { text, replace })
}

/// Whether `lines` (at least one non-blank) all equal the start of `next`, ignoring surrounding
/// whitespace and blank completion lines at the end.
fn repeats(lines: &[&str], next: &[&str]) -> bool {
    let lines: Vec<&str> = lines.iter().map(|l| l.trim()).collect();
    let end = lines.iter().rposition(|l| !l.is_empty()).map_or(0, |i| i + 1);
    end > 0 && !lines[0].is_empty() && end <= next.len() && lines[..end] == next[..end]
}

/// Brackets `text` opens and does not close (strings and `//` comments skipped).
fn open_brackets(text: &str) -> usize {
    let mut depth = 0usize;
    for line in text.split('\n') {
        let mut in_string = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if in_string => {
                    chars.next();
                }
                '"' => in_string = !in_string,
                '/' if !in_string && chars.peek() == Some(&'/') => break,
                '(' | '[' | '{' if !in_string => depth += 1,
                ')' | ']' | '}' if !in_string => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    depth
}

/// How many bytes of the punctuation `suffix` the completion `text` types again: its closers
/// that have no opener in `text` itself must match the suffix's closers in order; what follows
/// the last of them may also match the suffix further. 0 when they do not match.
fn closes_over(text: &str, suffix: &str) -> usize {
    let mut stack = Vec::new();
    let mut excess = Vec::new();
    let mut in_string = None::<char>;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if let Some(quote) = in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                _ if c == quote => in_string = None,
                _ => {}
            }
            continue;
        }
        match c {
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.last() == Some(&open) {
                    stack.pop();
                } else {
                    excess.push((i, c));
                }
            }
            // A quote closes the string the cursor is in when the suffix starts with it and
            // `text` has no string of its own open yet.
            '"' | '\'' if suffix.trim_start().starts_with(c) && excess.is_empty() => {
                if text[i + 1..].contains(c) {
                    in_string = Some(c);
                } else {
                    excess.push((i, c));
                }
            }
            '"' => in_string = Some('"'),
            _ => {}
        }
    }
    let mut matched = 0; // bytes of `suffix` retyped so far
    let mut last = None; // end of the last matched closer in `text`
    for (i, c) in excess {
        let rest = &suffix[matched..];
        let skipped = rest.len() - rest.trim_start().len();
        if rest.trim_start().starts_with(c) {
            matched += skipped + c.len_utf8();
            last = Some(i + c.len_utf8());
        } else {
            break;
        }
    }
    let Some(last) = last else { return 0 };
    let tail = &text[last..];
    let common = tail.chars().zip(suffix[matched..].chars()).take_while(|(a, b)| a == b);
    matched + common.map(|(a, _)| a.len_utf8()).sum::<usize>()
}

/// Rewrites the leading whitespace of every line after the first in the document's style: tabs
/// become `n` spaces in a spaces document, runs of 4 spaces become tabs in a tabs document.
/// Widths are never rescaled: the model saw the document's indentation and follows its nesting.
fn reindent(text: &str, indent: Indent) -> String {
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.split('\n').enumerate() {
        if n > 0 {
            out.push('\n');
            let body = line.trim_start_matches([' ', '\t']);
            let lead = &line[..line.len() - body.len()];
            match indent {
                Indent::Spaces(width) => out.push_str(&lead.replace('\t', &" ".repeat(width))),
                Indent::Tabs => out.push_str(&lead.replace("    ", "\t")),
            }
            out.push_str(body);
        } else {
            out.push_str(line);
        }
    }
    out
}

/// The degenerate-output filters over `text` (the completion after the shape, repetition and
/// suffix rules) at `site`: `Err` with the reason when its first line is degenerate, else the
/// length of `text` to keep — all of it, or up to the newline before its first degenerate line.
///
/// A line is degenerate when it is mostly a short n-gram repeated ([`repetitive`]), when it
/// repeats the nearest non-blank line above it (the document's for the first line, counting the
/// text before the cursor; lines without a letter, such as `}` or `});`, may repeat), when it
/// ends a block of up to 4 lines that repeats the block right before it, or when it has a closing
/// bracket that matches nothing open before it ([`Brackets`]). A first line that cuts everything
/// away is reported with its reason.
fn degenerate_cut(text: &str, site: &Site) -> Result<usize, Reason> {
    let mut brackets = Brackets::default();
    for line in &site.prev_lines {
        brackets.line(line);
    }
    // The cursor line as the document has it, without the completion.
    let baseline = {
        let mut b = brackets.clone();
        b.line(&format!("{}{}", site.line_prefix, site.line_suffix))
    };
    // Trimmed non-blank lines above, nearest last, each with where its line starts in `text`
    // (`None`: the document's).
    let mut above: Vec<(String, Option<usize>)> = site
        .prev_lines
        .iter()
        .rev()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .take(1)
        .map(|l| (l.to_owned(), None))
        .collect();
    let mut start = 0;
    for (i, line) in text.split('\n').enumerate() {
        let (full, own) = if i == 0 {
            let suffix = if Shape::of(&site.line_suffix) == Shape::SingleLine {
                site.line_suffix.as_str()
            } else {
                ""
            };
            (format!("{}{}{}", site.line_prefix, line, suffix), line)
        } else {
            (line.to_string(), line)
        };
        let trimmed = full.trim();
        // The text before the cursor is the user's: the first line is judged by what it adds.
        let adds_words = i > 0 || own.chars().any(char::is_alphabetic);
        let mut cut = start;
        let verdict = if repetitive(own) {
            Some(Reason::Repetitive)
        } else if let Some(k) = repeats_above(trimmed, &above).filter(|_| adds_words) {
            // The repetition starts k - 1 non-blank lines above this one.
            cut = if k == 1 { start } else { above[above.len() + 1 - k].1.unwrap_or(0) };
            Some(Reason::RepeatsPreviousLine)
        } else if brackets.line(&full) > if i == 0 { baseline } else { 0 } && !own.trim().is_empty()
        {
            Some(Reason::Unbalanced)
        } else {
            None
        };
        if let Some(reason) = verdict {
            if text[..cut].trim().is_empty() {
                return Err(reason);
            }
            return Ok(cut.saturating_sub(1));
        }
        if !trimmed.is_empty() {
            above.push((trimmed.to_owned(), Some(start)));
        }
        start += line.len() + 1;
    }
    Ok(text.len())
}

/// Whether `line` (trimmed) ends `above` (trimmed non-blank lines, nearest last) by repeating:
/// `Some(k)` when `above` plus `line` ends with two equal blocks of `k` lines (1 to 4; 1: `line`
/// equals the line above it). Lines without a letter (`}`, `});`, `]`, `//`) may repeat.
fn repeats_above<T>(line: &str, above: &[(String, T)]) -> Option<usize> {
    if line.is_empty() || !line.chars().any(char::is_alphabetic) {
        return None;
    }
    let n = above.len() + 1;
    let at = |i: usize| if i + 1 == n { line } else { above[i].0.as_str() };
    (1..=4).find(|&k| n >= 2 * k && (0..k).all(|j| at(n - k + j) == at(n - 2 * k + j)))
}

/// Whether `line` is mostly one short n-gram repeated: a run of a unit of 1 to 8 characters
/// (holding a letter or digit, so `=====` and indentation do not count) repeated at least 4
/// times (12 for one character) over at least 12 characters and at least 60 % of the line's
/// trimmed length.
pub fn repetitive(line: &str) -> bool {
    let chars: Vec<char> = line.trim().chars().collect();
    let len = chars.len();
    if len < 12 {
        return false;
    }
    for period in 1..=8.min(len / 2) {
        let mut run_start = 0;
        for j in period..=len {
            if j < len && chars[j] == chars[j - period] {
                continue;
            }
            // chars[run_start..j] has period `period`.
            let run = j - run_start;
            let reps = run / period;
            let unit = &chars[run_start..run_start + period];
            if run >= 12
                && reps >= if period == 1 { 12 } else { 4 }
                && run * 10 >= len * 6
                && unit.iter().any(|c| c.is_alphanumeric())
            {
                return true;
            }
            run_start = j + 1 - period;
        }
    }
    false
}

/// Brackets open across lines, seen through Rust's lexical shapes: strings (raw ones too), char
/// literals (not lifetimes), `//` and `/* */` comments.
#[derive(Debug, Clone, Default)]
struct Brackets {
    open: Vec<char>,
    /// Inside a string across lines: the closing delimiter (`"`, or `"#`… for raw strings).
    string: Option<String>,
    /// Nesting of `/* */` comments across lines.
    comment: usize,
}

impl Brackets {
    /// Reads one line; returns how many of its closing brackets are out of place: closing
    /// another kind than the innermost open one, or, with nothing open, coming after code on the
    /// line (a line's leading closers may close what opened before the lines seen).
    fn line(&mut self, line: &str) -> usize {
        let chars: Vec<char> = line.chars().collect();
        let mut bad = 0;
        let mut code_seen = false;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if let Some(end) = &self.string {
                if c == '\\' && end == "\"" {
                    i += 2;
                    continue;
                }
                let end_chars: Vec<char> = end.chars().collect();
                if chars[i..].starts_with(&end_chars) {
                    i += end_chars.len();
                    self.string = None;
                } else {
                    i += 1;
                }
                continue;
            }
            if self.comment > 0 {
                if chars[i..].starts_with(&['*', '/']) {
                    self.comment -= 1;
                    i += 2;
                } else if chars[i..].starts_with(&['/', '*']) {
                    self.comment += 1;
                    i += 2;
                } else {
                    i += 1;
                }
                continue;
            }
            match c {
                '/' if chars.get(i + 1) == Some(&'/') => break,
                '/' if chars.get(i + 1) == Some(&'*') => {
                    self.comment += 1;
                    i += 2;
                    continue;
                }
                '"' => self.string = Some("\"".into()),
                'r' if !chars[..i].last().is_some_and(|p| p.is_alphanumeric() || *p == '_') => {
                    // r"…", r#"…"#, br"…"
                    let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
                    if chars.get(i + 1 + hashes) == Some(&'"') {
                        self.string = Some(format!("\"{}", "#".repeat(hashes)));
                        i += 2 + hashes;
                        code_seen = true;
                        continue;
                    }
                }
                '\'' => {
                    // A char literal ('x', '\n', '\u{..}'); otherwise a lifetime.
                    if chars.get(i + 1) == Some(&'\\') && i + 3 <= chars.len() {
                        if let Some(close) = chars[i + 3..].iter().position(|&q| q == '\'') {
                            i += close + 4;
                            code_seen = true;
                            continue;
                        }
                    } else if chars.get(i + 2) == Some(&'\'') {
                        i += 3;
                        code_seen = true;
                        continue;
                    }
                }
                '(' | '[' | '{' => self.open.push(c),
                ')' | ']' | '}' => {
                    let opener = match c {
                        ')' => '(',
                        ']' => '[',
                        _ => '{',
                    };
                    match self.open.iter().rposition(|&o| o == opener) {
                        Some(at) if at + 1 == self.open.len() => {
                            self.open.pop();
                        }
                        // It closes an outer bracket while inner ones are open.
                        Some(at) => {
                            self.open.truncate(at);
                            bad += 1;
                        }
                        None if code_seen || !self.open.is_empty() => bad += 1,
                        None => {}
                    }
                    i += 1;
                    continue;
                }
                _ => {}
            }
            if !c.is_whitespace() && !matches!(c, ';' | ',' | '.') {
                code_seen = true;
            }
            i += 1;
        }
        bad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site at the end of `before`'s last line (its text before the cursor), with `after` the
    /// rest of that line, in a document whose earlier lines are `before`'s other lines.
    fn site(before: &str, after: &str) -> Site {
        let mut prev: Vec<String> = before.split('\n').map(str::to_owned).collect();
        let line_prefix = prev.pop().unwrap_or_default();
        Site {
            line_prefix,
            line_suffix: after.into(),
            next_lines: Vec::new(),
            prev_lines: prev,
            filters: true,
            indent: Indent::Spaces(4),
            crlf: false,
            shape: Shape::of(after),
            max_lines: 8,
        }
    }

    fn shown(raw: &str, site: &Site) -> Result<String, Reason> {
        postprocess(raw, site).map(|e| e.text)
    }

    #[test]
    fn the_recorded_degenerate_outputs_are_never_shown() {
        // Issue 21: the seeded demo model after `map.in`, and the quickstart model after
        // `pub fn back(&self) -> Option<&T> {`.
        let map = site("fn f(map: &HashMap<u32, u32>) {\n    let n = map.in", "");
        assert_eq!(shown("inininininininininininin", &map), Err(Reason::Repetitive));
        let back = site("impl<T> Deque<T> {\n    pub fn back(&self) -> Option<&T> {\n        ", "");
        let buf = "let mut buf = [0; 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0";
        assert_eq!(shown(buf, &back), Err(Reason::Repetitive));
        // Longer runs, with or without more lines after them.
        assert_eq!(shown(&format!("{buf}, 0, 0, 0, 0, 0]\n}}"), &back), Err(Reason::Repetitive));
        assert_eq!(shown("0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0", &back), Err(Reason::Repetitive));
        assert_eq!(shown(&"in".repeat(40), &map), Err(Reason::Repetitive));
        // The filters can be turned off.
        let off = Site { filters: false, ..map.clone() };
        assert_eq!(
            shown("inininininininininininin", &off).as_deref(),
            Ok("inininininininininininin")
        );
    }

    #[test]
    fn a_degenerate_later_line_cuts_the_completion_there() {
        let s = site("fn f() {\n    ", "");
        assert_eq!(
            shown("let a = vec![1, 2];\n    let b = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];", &s),
            Ok("let a = vec![1, 2];".into())
        );
        assert_eq!(
            shown("let a = 1;\n    let b = 2;\n    let b = 2;\n    let b = 2;", &s),
            Ok("let a = 1;\n    let b = 2;".into())
        );
        // A block of two lines repeated.
        assert_eq!(
            shown("a.push(1);\n    b.push(2);\n    a.push(1);\n    b.push(2);", &s),
            Ok("a.push(1);\n    b.push(2);".into())
        );
        assert_eq!(shown("let a = f(x);\n    g(y))", &s), Ok("let a = f(x);".into()));
        // A blank first line does not keep a degenerate second one alive.
        assert_eq!(shown("\n    xyxyxyxyxyxyxyxyxyxy", &s), Err(Reason::Repetitive));
    }

    #[test]
    fn a_first_line_repeating_the_line_above_is_suppressed_but_closers_may_repeat() {
        let s = site("fn f() {\n    let x = compute(1);\n    ", "");
        assert_eq!(shown("let x = compute(1);", &s), Err(Reason::RepeatsPreviousLine));
        // Completing a partly typed line counts the typed part.
        let typed = site("fn f() {\n    let x = compute(1);\n    let x = comp", "");
        assert_eq!(shown("ute(1);", &typed), Err(Reason::RepeatsPreviousLine));
        // Blank lines between do not hide it.
        let gap = site("fn f() {\n    let x = compute(1);\n\n    ", "");
        assert_eq!(shown("let x = compute(1);", &gap), Err(Reason::RepeatsPreviousLine));
        // Closers, blank-ish and punctuation-only lines are legitimately repeated.
        let nested =
            site("fn f() {\n    if a {\n        if b {\n            x();\n        }\n    ", "");
        assert_eq!(shown("}", &nested), Ok("}".into()));
        let calls = site("fn f() {\n    g(|| {\n        h();\n    });\n    ", "");
        assert_eq!(shown("});", &calls), Ok("});".into()));
        let docs = site("///\n", "");
        assert_eq!(shown("///", &docs), Ok("///".into()));
        // A new line after a line the user repeated is the completion's own.
        let dup = site("let x = 1;\nlet x = 1;", "");
        assert_eq!(shown("\nlet y = 2;", &dup), Ok("\nlet y = 2;".into()));
    }

    #[test]
    fn closers_nothing_opened_are_unbalanced() {
        let s = site("fn f() {\n    let v = foo(", ").len();");
        assert_eq!(shown("a, b)", &s), Err(Reason::Unbalanced), "the suffix closes it already");
        assert_eq!(shown("a, b", &s), Ok("a, b".into()));
        let auto = site("fn f() {\n    let v = foo(", ")");
        // Retyping the auto-closed `)` is fine (it replaces it); one more is not.
        assert_eq!(postprocess("a, b);", &auto).map(|e| e.replace), Ok(1));
        assert_eq!(shown("a, b));", &auto), Err(Reason::Unbalanced));
        assert_eq!(shown("x]);", &auto), Err(Reason::Unbalanced));
        let top = site("", "");
        assert_eq!(shown("foo(x)))))", &top), Err(Reason::Unbalanced));
        // Brackets opened on earlier lines may close, and in strings, chars and comments do
        // not count.
        let call = site("fn f() {\n    let v = foo(\n        a,\n        ", "");
        assert_eq!(shown("b);", &call), Ok("b);".into()));
        let lit = site("fn f() {\n    ", "");
        for ok in [
            r#"let s = ")]}";"#,
            "let c = ')';",
            "let q = '\\'';",
            "f::<'a>(x); // )",
            r##"let r = r#")"#;"##,
            "/* ) */ g();",
        ] {
            assert_eq!(shown(ok, &lit), Ok(ok.into()), "{ok}");
        }
    }

    /// Real lines of this repository (`lsp/src/daemon.rs`, `daemon/src/engine.rs`,
    /// `lsp/src/postprocess.rs`), each as the completion of its own line after its indentation
    /// with the lines before it above: none is filtered.
    #[test]
    fn ordinary_rust_lines_are_not_filtered() {
        const LINES: &str = r#"use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

impl Worker {
    fn run(mut self, jobs: Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            let (id, events) = (job.id.clone(), job.events.clone());
            let outcome = catch_unwind(AssertUnwindSafe(|| self.run_job(&job)));
            let event = match outcome {
                Ok(Ok(done)) => {
                    if let Event::Done { stop: StopReason::Cancelled, .. } = done {
                        self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    done
                }
                Ok(Err(e)) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    Event::Error { id: Some(id.clone()), code: e.code, message: e.message }
                }
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "unknown panic".into());
                    tracing::error!(request = %id, panic = %what, "job panicked; cache dropped");
                }
            };
        }
    }
}

fn is_closing(c: char) -> bool {
    matches!(c, ')' | ']' | '}' | '"' | '\'' | '>' | ';' | ',')
}

fn open_brackets(text: &str) -> usize {
    let mut depth = 0usize;
    for line in text.split('\n') {
        let mut in_string = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if in_string => {
                    chars.next();
                }
                '"' => in_string = !in_string,
                '/' if !in_string && chars.peek() == Some(&'/') => break,
                '(' | '[' | '{' if !in_string => depth += 1,
                ')' | ']' | '}' if !in_string => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    depth
}

const MASK: u64 = 0x5555555555555555;
const TABLE: [u8; 8] = [0, 0, 0, 0, 1, 1, 1, 1];
// ================================================================
#[test]
fn a_test() {
    assert_eq!(v, [1, 2, 3]);
    let (a, b, c) = (T::default(), T::default(), T::default());
    assert!(matches!(&events[..], [Event::Error { code: ErrorCode::Internal, .. }]));
}
"#;
        let lines: Vec<&str> = LINES.split('\n').collect();
        let mut checked = 0;
        for (i, line) in lines.iter().enumerate() {
            let body = line.trim_start();
            if body.is_empty() {
                continue;
            }
            let indent = &line[..line.len() - body.len()];
            let before = format!(
                "{}{indent}",
                lines[..i].iter().map(|l| format!("{l}\n")).collect::<String>()
            );
            let s = site(&before, "");
            let result = shown(body, &s);
            assert_eq!(result.as_deref(), Ok(body), "line {}: {line:?}", i + 1);
            checked += 1;
            // As a later line of a multi-line completion starting on the line before it.
            if i > 0 && !lines[i - 1].trim().is_empty() {
                let prev = lines[i - 1];
                let prev_body = prev.trim_start();
                let prev_indent = &prev[..prev.len() - prev_body.len()];
                let before = format!(
                    "{}{prev_indent}",
                    lines[..i - 1].iter().map(|l| format!("{l}\n")).collect::<String>()
                );
                let raw = format!("{prev_body}\n{line}");
                let s = site(&before, "");
                assert_eq!(shown(&raw, &s).as_deref(), Ok(raw.as_str()), "line {}", i + 1);
            }
        }
        assert!(checked >= 30, "{checked}");
    }

    #[test]
    fn repetition_needs_a_long_run_over_most_of_the_line() {
        for degenerate in [
            "inininininininininininin",
            "0, 0, 0, 0, 0, 0, 0, 0",
            "abcabcabcabcabc",
            "xxxxxxxxxxxxxxxx",
        ] {
            assert!(repetitive(degenerate), "{degenerate}");
        }
        for fine in [
            "================================",
            "                                ",
            "let s = \"----------------\";",
            "const M1: u64 = 0x5555555555555555;",
            "assert_eq!(buf, [0, 0, 0, 0, 0, 0, 0, 0]);",
            "ininin",
            "self.self.self",
        ] {
            assert!(!repetitive(fine), "{fine}");
        }
    }
}
