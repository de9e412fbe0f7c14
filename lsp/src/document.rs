//! Open documents: their text, a line index, and the conversion between LSP positions (UTF-16 or
//! UTF-8 code units, as negotiated) and byte offsets, which everything else in the crate uses.

use tower_lsp_server::ls_types::{Position, Range, TextDocumentContentChangeEvent};

/// The unit of `Position.character`, negotiated at `initialize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// UTF-16 code units: the LSP default every client supports.
    #[default]
    Utf16,
    /// UTF-8 bytes, when the client offers `positionEncodings: ["utf-8", …]`.
    Utf8,
}

impl Encoding {
    /// Length of `c` in this encoding's code units.
    fn units(self, c: char) -> u32 {
        match self {
            // Both lengths are at most 4, so the casts cannot truncate.
            Encoding::Utf16 => c.len_utf16() as u32,
            Encoding::Utf8 => c.len_utf8() as u32,
        }
    }

    /// The LSP name (`"utf-16"`, `"utf-8"`).
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Utf16 => "utf-16",
            Encoding::Utf8 => "utf-8",
        }
    }
}

/// One open document.
#[derive(Debug, Clone)]
pub struct Document {
    text: String,
    /// Byte offset of the start of every line; `line_starts[0] == 0`.
    line_starts: Vec<usize>,
    /// The editor's version number.
    pub version: i32,
    /// The editor's language id (`rust`, …).
    pub language_id: String,
}

impl Document {
    /// A document with `text`.
    pub fn new(text: String, version: i32, language_id: String) -> Self {
        let line_starts = line_starts(&text);
        Self { text, line_starts, version, language_id }
    }

    /// The whole text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Number of lines (a trailing newline starts one more, empty, line).
    pub fn line_count(&self) -> usize {
        self.line_starts.len()
    }

    /// Byte range of line `line` without its line terminator (`\n` or `\r\n`); clamped.
    pub fn line_range(&self, line: usize) -> std::ops::Range<usize> {
        let Some(&start) = self.line_starts.get(line) else {
            return self.text.len()..self.text.len();
        };
        let mut end = self.line_starts.get(line + 1).map_or(self.text.len(), |&next| next - 1);
        if end > start && self.text.as_bytes()[end - 1] == b'\r' {
            end -= 1;
        }
        start..end
    }

    /// The line holding byte `offset`.
    pub fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= offset).saturating_sub(1)
    }

    /// Byte offset of `pos`. Per the LSP, a character past the end of its line means the line's
    /// end and a line past the end means the end of the text; a position inside a character
    /// (half a surrogate pair) goes to that character's start.
    pub fn offset(&self, pos: Position, encoding: Encoding) -> usize {
        let line = pos.line as usize;
        if line >= self.line_starts.len() {
            return self.text.len();
        }
        let range = self.line_range(line);
        let mut units = 0;
        for (i, c) in self.text[range.clone()].char_indices() {
            let next = units + encoding.units(c);
            if next > pos.character {
                return range.start + i;
            }
            units = next;
        }
        range.end
    }

    /// The position of byte `offset` (rounded down to a character boundary).
    pub fn position(&self, offset: usize, encoding: Encoding) -> Position {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.line_of(offset);
        let start = self.line_starts[line];
        let character = self.text[start..offset].chars().map(|c| encoding.units(c)).sum();
        Position::new(line as u32, character)
    }

    /// The LSP range of a byte range.
    pub fn range(&self, bytes: std::ops::Range<usize>, encoding: Encoding) -> Range {
        Range::new(self.position(bytes.start, encoding), self.position(bytes.end, encoding))
    }

    /// Applies one change from `didChange`: a range replacement, or the full text without a range.
    pub fn apply(&mut self, change: &TextDocumentContentChangeEvent, encoding: Encoding) {
        match change.range {
            Some(range) => {
                let start = self.offset(range.start, encoding);
                let end = self.offset(range.end, encoding).max(start);
                self.text.replace_range(start..end, &change.text);
            }
            None => self.text.clone_from(&change.text),
        }
        // A full rescan is a memcpy-speed pass over the text; simpler than patching the index and
        // fast enough for source files.
        self.line_starts = line_starts(&self.text);
    }
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_in_both_encodings() {
        let doc = Document::new("é😀x\r\n中文\n".into(), 1, "rust".into());
        assert_eq!(doc.line_count(), 3);
        assert_eq!(doc.line_range(0), 0..7);
        // é is 1 UTF-16 unit and 2 bytes, 😀 2 units and 4 bytes.
        assert_eq!(doc.offset(Position::new(0, 3), Encoding::Utf16), 6);
        assert_eq!(doc.offset(Position::new(0, 6), Encoding::Utf8), 6);
        // Half a surrogate pair goes to the emoji's start; past the end goes to the line end.
        assert_eq!(doc.offset(Position::new(0, 2), Encoding::Utf16), 2);
        assert_eq!(doc.offset(Position::new(0, 99), Encoding::Utf16), 7);
        assert_eq!(doc.offset(Position::new(9, 0), Encoding::Utf16), doc.text().len());
        assert_eq!(doc.position(12, Encoding::Utf16), Position::new(1, 1));
        assert_eq!(doc.position(12, Encoding::Utf8), Position::new(1, 3));
        for offset in [0, 2, 6, 7, 9, 12, 15, 16] {
            for enc in [Encoding::Utf16, Encoding::Utf8] {
                assert_eq!(doc.offset(doc.position(offset, enc), enc), offset, "{offset} {enc:?}");
            }
        }
    }
}
