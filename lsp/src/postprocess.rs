//! Post-processing: turns the daemon's raw completion into the edit the editor shows, or into a
//! suppression with a reason code. Rules, in order: empty/whitespace, single- or multi-line shape,
//! lines repeating the document's next lines, auto-closed punctuation right of the cursor
//! (replaced through the edit's range) or text repeating the rest of the line, indentation in the
//! document's style, trailing whitespace.

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
    /// The daemon produced nothing.
    Empty,
    /// The daemon produced only whitespace (or only whitespace was left of the first line).
    Whitespace,
    /// All of the completion repeats the text right of the cursor.
    RepeatsSuffix,
    /// All of the completion repeats the lines after the cursor.
    RepeatsNextLines,
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
            Reason::Empty => "empty",
            Reason::Whitespace => "whitespace",
            Reason::RepeatsSuffix => "repeats_suffix",
            Reason::RepeatsNextLines => "repeats_next_lines",
        }
    }

    /// Every reason, for documentation and tests.
    pub const ALL: [Reason; 11] = [
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
    if !suffix.trim().is_empty() {
        if Shape::of(suffix) == Shape::MultiLine {
            replace = closes_over(&text, suffix);
        } else if let Some(stripped) = text.trim_end().strip_suffix(suffix.trim_end()) {
            // The model retyped the rest of the line: keep only what goes before it.
            text = stripped.to_string();
            if text.trim().is_empty() {
                return Err(Reason::RepeatsSuffix);
            }
        }
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
