//! Stop rules applied to generated text as it streams: stop strings, and the Rust-aware rules that
//! end a code completion where a human would (a line dedenting below the cursor's block, a closing
//! brace the suffix already has, a blank line at item level). Text that a later token could still
//! turn into a stop is held back, so nothing past a stop point is ever sent.

use m31r_protocol::StopReason;

/// Spaces a tab counts for when comparing indentation.
const TAB_WIDTH: usize = 4;

/// What the completion is inserted into.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeContext {
    /// Indentation of the cursor's line (its leading whitespace, measured in columns).
    pub cursor_indent: usize,
    /// The closing bracket that follows the cursor in the suffix, ignoring whitespace, if any.
    pub suffix_closer: Option<char>,
}

impl CodeContext {
    /// Derives the context from the text around the cursor.
    pub fn new(prefix: &str, suffix: &str) -> Self {
        let line = prefix.rsplit('\n').next().unwrap_or("");
        Self {
            cursor_indent: indent_width(line),
            suffix_closer: suffix
                .trim_start()
                .chars()
                .next()
                .filter(|c| matches!(c, '}' | ')' | ']')),
        }
    }
}

fn indent_width(line: &str) -> usize {
    line.chars()
        .take_while(|c| *c == ' ' || *c == '\t')
        .map(|c| if c == '\t' { TAB_WIDTH } else { 1 })
        .sum()
}

/// Scans generated text for stop points and decides how much of it may be sent.
#[derive(Debug, Clone)]
pub struct StopScanner {
    code: Option<CodeContext>,
    stop_strings: Vec<String>,
    text: String,
    emitted: usize,
    /// Bracket depth and lexical state of `text[..scanned]`.
    scanned: usize,
    depth: i64,
    lexer: Lex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Code,
    Str { escaped: bool },
    LineComment,
}

impl StopScanner {
    /// A scanner with the Rust rules when `code` is given, plus `stop_strings`.
    pub fn new(code: Option<CodeContext>, stop_strings: Vec<String>) -> Self {
        Self {
            code,
            stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            emitted: 0,
            scanned: 0,
            depth: 0,
            lexer: Lex::Code,
        }
    }

    /// All text accepted so far (sent or held back).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Adds generated text. Returns what may be sent now and, if a stop point was reached, why;
    /// text at and after a stop point is never returned.
    pub fn push(&mut self, delta: &str) -> (String, Option<StopReason>) {
        self.text.push_str(delta);
        if let Some((at, reason)) = self.find_stop() {
            self.text.truncate(at);
            return (self.take_until(at), Some(reason));
        }
        let safe = self.safe_len();
        (self.take_until(safe), None)
    }

    /// Ends the stream: returns everything still held back.
    pub fn finish(&mut self) -> String {
        self.take_until(self.text.len())
    }

    fn take_until(&mut self, at: usize) -> String {
        let at = at.max(self.emitted);
        let out = self.text[self.emitted..at].to_string();
        self.emitted = at;
        out
    }

    fn find_stop(&mut self) -> Option<(usize, StopReason)> {
        let mut best: Option<(usize, StopReason)> = None;
        let mut consider = |at: usize, reason| {
            if best.is_none_or(|(b, _)| at < b) {
                best = Some((at, reason));
            }
        };
        for stop in &self.stop_strings {
            let from = floor_char_boundary(&self.text, self.emitted.saturating_sub(stop.len()));
            if let Some(i) = self.text[from..].find(stop.as_str()) {
                consider(from + i, StopReason::StopString);
            }
        }
        if let Some(code) = self.code.clone() {
            self.dedent_or_blank(&code, &mut consider);
            if let Some(at) = self.closing_brace(&code) {
                consider(at, StopReason::ClosingBrace);
            }
        }
        best
    }

    /// Lines after the first: the first one indented below the cursor ends the completion before
    /// its newline; at item level, so does a blank line once code has been written.
    fn dedent_or_blank(&self, code: &CodeContext, consider: &mut impl FnMut(usize, StopReason)) {
        let Some(first_newline) = self.text.find('\n') else {
            return;
        };
        let mut line_start = first_newline + 1;
        let mut wrote_code = !self.text[..line_start].trim().is_empty();
        loop {
            let rest = &self.text[line_start..];
            let line_end = rest.find('\n').map(|i| line_start + i);
            let line = &self.text[line_start..line_end.unwrap_or(self.text.len())];
            let newline_before = line_start - 1;
            if !line.trim().is_empty() {
                if indent_width(line) < code.cursor_indent {
                    return consider(newline_before, StopReason::Dedent);
                }
                wrote_code = true;
            } else if line_end.is_some() && code.cursor_indent == 0 && wrote_code {
                return consider(newline_before, StopReason::BlankLine);
            }
            match line_end {
                Some(end) => line_start = end + 1,
                None => return,
            }
        }
    }

    /// A closing bracket that would take the depth of the generated code below zero, when the
    /// suffix starts with that same bracket: the editor already has it. The stop is placed at the
    /// start of its line when only whitespace precedes it there.
    fn closing_brace(&mut self, code: &CodeContext) -> Option<usize> {
        let closer = code.suffix_closer?;
        let chars: Vec<(usize, char)> =
            self.text[self.scanned..].char_indices().map(|(i, c)| (self.scanned + i, c)).collect();
        for (at, c) in chars {
            self.scanned = at + c.len_utf8();
            match (self.lexer, c) {
                (Lex::Str { escaped: false }, '\\') => self.lexer = Lex::Str { escaped: true },
                (Lex::Str { escaped: true }, _) => self.lexer = Lex::Str { escaped: false },
                (Lex::Str { .. }, '"') => self.lexer = Lex::Code,
                (Lex::Str { .. }, _) => {}
                (Lex::LineComment, '\n') => self.lexer = Lex::Code,
                (Lex::LineComment, _) => {}
                (Lex::Code, '"') => self.lexer = Lex::Str { escaped: false },
                (Lex::Code, '/') if self.text[..at].ends_with('/') => self.lexer = Lex::LineComment,
                (Lex::Code, '{' | '(' | '[') => self.depth += 1,
                (Lex::Code, '}' | ')' | ']') => {
                    self.depth -= 1;
                    if self.depth < 0 && c == closer {
                        let line_start = self.text[..at].rfind('\n').map_or(0, |i| i + 1);
                        let before = &self.text[line_start..at];
                        let stop = if before.trim().is_empty() && line_start > 0 {
                            line_start - 1
                        } else {
                            at
                        };
                        return Some(stop);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// How much text is certainly not part of a future stop.
    fn safe_len(&self) -> usize {
        let mut safe = self.text.len();
        // A partial stop string at the end might complete with the next token.
        for stop in &self.stop_strings {
            for k in (1..stop.len()).rev() {
                if self.text.len() >= k
                    && self.text.is_char_boundary(self.text.len() - k)
                    && stop.is_char_boundary(k)
                    && self.text.ends_with(&stop[..k])
                {
                    safe = safe.min(self.text.len() - k);
                    break;
                }
            }
        }
        // A line of only whitespace after a newline may still dedent or be a blank line: hold it
        // back, newline included, until its first visible character arrives.
        if self.code.is_some()
            && let Some(nl) = self.text.rfind('\n')
            && self.text[nl + 1..].trim().is_empty()
        {
            safe = safe.min(nl);
        }
        safe
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` one by one; returns what was sent and why it stopped.
    fn run(
        code: Option<CodeContext>,
        stops: &[&str],
        pieces: &[&str],
    ) -> (String, Option<StopReason>) {
        let mut s = StopScanner::new(code, stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (emit, stop) = s.push(p);
            out.push_str(&emit);
            if stop.is_some() {
                return (out, stop);
            }
        }
        out.push_str(&s.finish());
        (out, None)
    }

    fn ctx(prefix: &str, suffix: &str) -> Option<CodeContext> {
        Some(CodeContext::new(prefix, suffix))
    }

    #[test]
    fn context_reads_indent_and_suffix_closer() {
        let c = CodeContext::new("fn f() {\n\tif x {\n        let y", "\n    }\n}");
        assert_eq!(c, CodeContext { cursor_indent: 8, suffix_closer: Some('}') });
        assert_eq!(CodeContext::new("", "x").suffix_closer, None);
    }

    #[test]
    fn dedent_below_the_cursor_block_stops_before_the_newline() {
        let c = ctx("fn f() {\n    let a = 1;\n    ", "");
        let (out, stop) = run(c, &[], &["let b", " = 2;\n", "    let c = 3;\n", "}\n", "fn g"]);
        assert_eq!(out, "let b = 2;\n    let c = 3;");
        assert_eq!(stop, Some(StopReason::Dedent));
    }

    #[test]
    fn whitespace_lines_are_held_until_their_indent_is_known() {
        let mut s = StopScanner::new(ctx("    ", ""), vec![]);
        assert_eq!(s.push("x();\n"), ("x();".to_string(), None));
        assert_eq!(s.push("  "), (String::new(), None));
        assert_eq!(s.push("  y();"), ("\n    y();".to_string(), None));
    }

    #[test]
    fn closing_brace_the_suffix_provides_is_not_repeated() {
        let (out, stop) = run(ctx("fn f() {", "}\n"), &[], &[" if a { b(); }", " }", "\n"]);
        assert_eq!(out, " if a { b(); } ");
        assert_eq!(stop, Some(StopReason::ClosingBrace));
        // On a line of its own, the stop goes before the line; the dedent rule agrees.
        let (out, stop) = run(ctx("fn f() {\n    ", "\n}\n"), &[], &["b();", "\n", "}"]);
        assert_eq!(out, "b();");
        assert!(matches!(stop, Some(StopReason::ClosingBrace | StopReason::Dedent)), "{stop:?}");
        // Inline: `foo(a` with `)` after the cursor.
        let (out, stop) = run(ctx("let x = foo(a", ")"), &[], &[", \"b)\"", ")", ";"]);
        assert_eq!(out, ", \"b)\"");
        assert_eq!(stop, Some(StopReason::ClosingBrace));
    }

    #[test]
    fn blank_line_at_item_level_ends_the_item() {
        let c = ctx("use std::io;\n\n", "");
        let (out, stop) = run(c, &[], &["fn a() {}\n", "\n", "fn b() {}"]);
        assert_eq!(out, "fn a() {}");
        assert_eq!(stop, Some(StopReason::BlankLine));
        // Inside a block, blank lines are fine.
        let (out, stop) = run(ctx("    ", ""), &[], &["a();\n", "\n", "    b();"]);
        assert_eq!((out.as_str(), stop), ("a();\n\n    b();", None));
    }

    #[test]
    fn stop_strings_are_cut_even_across_pieces() {
        let (out, stop) = run(None, &["END"], &["abc E", "N", "D more"]);
        assert_eq!((out.as_str(), stop), ("abc ", Some(StopReason::StopString)));
        let (out, stop) = run(None, &["END"], &["abc E", "Nx"]);
        assert_eq!((out.as_str(), stop), ("abc ENx", None));
        let (out, _) = run(None, &["é!"], &["café", "!"]);
        assert_eq!(out, "caf");
    }

    #[test]
    fn plain_generation_has_no_code_rules() {
        let (out, stop) = run(None, &[], &["a\n", "\n", "}\nb"]);
        assert_eq!((out.as_str(), stop), ("a\n\n}\nb", None));
    }
}
