//! Request building: the daemon `fim` input for a cursor in a document — prefix and suffix windows
//! cut at stable line boundaries, snippets of other open documents (or those documents whole) as
//! context — and the facts about the cursor that post-processing needs.
//!
//! The daemon lays the prompt out as `context… <fim_prefix><fim_suffix> SUFFIX <fim_middle> PREFIX`
//! and reuses the longest cached token prefix. So everything before PREFIX's end must stay
//! byte-identical while the user types: context files come in a stable order, the suffix window
//! ends on a line chosen in steps, and the prefix window starts on a line chosen in steps. Token
//! budgeting stays with the daemon; the windows only bound what is sent.

use m31r_protocol::{ContextFile, FimInput, GenerationParams};

use crate::config::Config;
use crate::document::Document;
use crate::postprocess::{Indent, Shape, Site};
use crate::snippets::{self, Chunking};

/// Most tokens of a single-line completion: about 120 characters of Rust with the project's
/// tokenizers (a line of `rustfmt`'s 100 columns fits), whatever `maxTokens` allows.
pub const SINGLE_LINE_TOKENS: u32 = 48;

/// Window sizes, in lines and bytes.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Lines before the cursor line that the prefix holds at least (when the file has them).
    pub prefix_lines: usize,
    /// Lines after the cursor line that the suffix holds at least.
    pub suffix_lines: usize,
    /// Window edges move in multiples of this many lines, so they stay put while typing.
    pub step: usize,
    /// Most bytes of prefix (dropped from the start, a step of lines at a time).
    pub prefix_bytes: usize,
    /// Most bytes of suffix (whole lines dropped from the end).
    pub suffix_bytes: usize,
    /// Most context documents sent whole; the least relevant (first) are dropped beyond it.
    pub context_files: usize,
    /// Most bytes of one context document sent whole (its head, whole lines).
    pub context_bytes: usize,
    /// How context documents are cut into snippets (`contextSnippets`).
    pub snippets: Chunking,
    /// Lines after the cursor line kept for post-processing's repetition check.
    pub next_lines: usize,
    /// Lines before the cursor line kept for the degenerate-output filters (the line above,
    /// brackets left open).
    pub prev_lines: usize,
}

impl Default for Windows {
    fn default() -> Self {
        Self {
            prefix_lines: 256,
            suffix_lines: 32,
            step: 32,
            prefix_bytes: 64 * 1024,
            suffix_bytes: 16 * 1024,
            context_files: 8,
            context_bytes: 16 * 1024,
            snippets: Chunking::default(),
            next_lines: 8,
            prev_lines: 32,
        }
    }
}

/// Another open document offered as context.
#[derive(Debug, Clone, Copy)]
pub struct ContextDoc<'a> {
    /// Workspace-relative path shown to the model.
    pub path: &'a str,
    /// Its text.
    pub text: &'a str,
}

/// A built request: what goes to the daemon and what post-processing needs.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The daemon's `fim` input.
    pub input: FimInput,
    /// Generation parameters.
    pub params: GenerationParams,
    /// The cursor's surroundings.
    pub site: Site,
    /// First line of the prefix window (for logs and tests).
    pub prefix_start_line: usize,
    /// Line after the suffix window (for logs and tests).
    pub suffix_end_line: usize,
}

/// Builds the request for a cursor at byte `cursor` of `doc`. `context` is the other open
/// documents of the same language in a stable order, least relevant first. With
/// `contextSnippets` the context is their windows most similar to the lines above the cursor's
/// line (see [`snippets`]), else their heads whole.
pub fn build(
    doc: &Document,
    cursor: usize,
    context: &[ContextDoc<'_>],
    config: &Config,
    windows: &Windows,
) -> Prepared {
    let text = doc.text();
    let lines = LineIndex(doc);
    let cursor = floor_char_boundary(text, cursor);
    let cursor_line = lines.line_of(cursor);

    let step = windows.step.max(1);
    let mut start_line = cursor_line.saturating_sub(windows.prefix_lines) / step * step;
    while start_line + step <= cursor_line
        && cursor - lines.start(start_line) > windows.prefix_bytes
    {
        start_line += step;
    }
    let prefix = &text[lines.start(start_line)..cursor];

    let mut end_line = (cursor_line + 1 + windows.suffix_lines).div_ceil(step) * step;
    end_line = end_line.min(lines.count());
    while end_line > cursor_line + 1 && lines.start(end_line) - cursor > windows.suffix_bytes {
        end_line -= 1;
    }
    let suffix = &text[cursor..lines.start(end_line).max(cursor)];

    let context_files = if config.context_files && config.context_snippets {
        let query = snippets::query(text, cursor_line, windows.snippets.query_lines);
        let budget = config.context_snippet_bytes as usize;
        let docs = context.iter().map(|d| (d.path, d.text));
        snippets::choose(query, docs, &windows.snippets, budget)
            .into_iter()
            .map(|s| ContextFile { path: s.label(), text: s.text.to_string() })
            .collect()
    } else if config.context_files {
        let skip = context.len().saturating_sub(windows.context_files);
        context[skip..]
            .iter()
            .map(|doc| ContextFile {
                path: doc.path.to_string(),
                text: head_lines(doc.text, windows.context_bytes).to_string(),
            })
            .collect()
    } else {
        Vec::new()
    };

    let line_start = lines.start(cursor_line);
    let line_end = lines.end(cursor_line);
    let line_prefix = &text[line_start..cursor];
    let line_suffix = &text[cursor..line_end];
    let shape = Shape::of(line_suffix);
    let next_lines = (cursor_line + 1..lines.count().min(cursor_line + 1 + windows.next_lines))
        .map(|l| text[lines.start(l)..lines.end(l)].to_string())
        .collect();
    let prev_lines = (cursor_line.saturating_sub(windows.prev_lines)..cursor_line)
        .map(|l| text[lines.start(l)..lines.end(l)].to_string())
        .collect();
    let site = Site {
        line_prefix: line_prefix.to_string(),
        line_suffix: line_suffix.to_string(),
        next_lines,
        prev_lines,
        filters: config.degenerate_filters,
        indent: Indent::detect(text),
        crlf: text.contains("\r\n"),
        shape,
        max_lines: config.max_lines as usize,
    };
    let params = GenerationParams {
        // A line is rarely longer than this: a model that does not end one stops here instead
        // of running on for `maxTokens`, which a single line cannot use.
        max_tokens: match shape {
            Shape::SingleLine => config.max_tokens.min(SINGLE_LINE_TOKENS),
            Shape::MultiLine => config.max_tokens,
        },
        // A single-line completion is cut at its first newline anyway: let the daemon stop there.
        stop: match shape {
            Shape::SingleLine => vec!["\n".into()],
            Shape::MultiLine => Vec::new(),
        },
        ..GenerationParams::default()
    };
    Prepared {
        input: FimInput { prefix: prefix.to_string(), suffix: suffix.to_string(), context_files },
        params,
        site,
        prefix_start_line: start_line,
        suffix_end_line: end_line,
    }
}

/// The head of `text`, at most `max` bytes, ending after a whole line (or at a character boundary
/// when the first line alone is longer).
fn head_lines(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let cut = floor_char_boundary(text, max);
    match text[..cut].rfind('\n') {
        Some(i) => &text[..=i],
        None => &text[..cut],
    }
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Line arithmetic over a document, with `start(count())` = the text's end.
struct LineIndex<'a>(&'a Document);

impl LineIndex<'_> {
    fn count(&self) -> usize {
        self.0.line_count()
    }

    fn start(&self, line: usize) -> usize {
        self.0.line_range(line).start
    }

    fn end(&self, line: usize) -> usize {
        self.0.line_range(line).end
    }

    fn line_of(&self, offset: usize) -> usize {
        self.0.line_of(offset)
    }
}
