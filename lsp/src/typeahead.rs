//! Typing along a shown suggestion: what is left of a document's last completion while the user
//! types its next characters, so the next request is answered from it without a daemon round trip.
//!
//! The remainder is cut from the text the editor was shown (after post-processing), never from
//! the daemon's raw text: the editor then sees the same suggestion, only shorter. All offsets are
//! bytes in the document as the server holds it; any edit that is not typing along drops the
//! suggestion, so they never go stale.

/// The rest of the last completion shown in one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggestion {
    /// Byte offset where the remainder starts: the cursor, after the characters typed along.
    cursor: usize,
    /// What is left of the shown text; never empty.
    remainder: String,
    /// Bytes right of the cursor that the item replaces (auto-closed punctuation it retypes).
    /// Typing at the cursor inserts before them, so they stay right of it.
    replace: usize,
    /// Whether the user typed part of it yet. Only then is it served: a repeated request with
    /// nothing typed goes to the daemon, which may know better by now (a restart, new context).
    typed: bool,
}

/// A suggestion answered from the remainder: the text and the bytes right of the cursor it
/// replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remainder<'a> {
    /// The text still to insert.
    pub text: &'a str,
    /// Bytes right of the cursor that `text` replaces.
    pub replace: usize,
}

impl Suggestion {
    /// The suggestion `text` shown at byte `cursor`, replacing `replace` bytes right of it;
    /// `None` when `text` is empty (nothing to type along).
    pub fn new(cursor: usize, text: String, replace: usize) -> Option<Self> {
        (!text.is_empty()).then_some(Self { cursor, remainder: text, replace, typed: false })
    }

    /// The remainder, when a request at byte `cursor` may be answered with it: the user typed
    /// along and the cursor is right after what they typed.
    pub fn answer(&self, cursor: usize) -> Option<Remainder<'_>> {
        (self.typed && cursor == self.cursor)
            .then_some(Remainder { text: &self.remainder, replace: self.replace })
    }

    /// The suggestion after an edit that replaced bytes `start..end` (of the text before it)
    /// with `text`: kept, shorter, when the edit inserts the remainder's next characters at the
    /// cursor; `None` for any other edit, or when nothing is left to type.
    pub fn edited(self, start: usize, end: usize, text: &str) -> Option<Self> {
        if start == end && text.is_empty() {
            // Changes nothing, wherever it is.
            return Some(self);
        }
        if start != end || start != self.cursor || !self.remainder.starts_with(text) {
            return None;
        }
        // A matching prefix of a `str` ends on a character boundary, so the slice is sound.
        let remainder = self.remainder[text.len()..].to_string();
        if remainder.is_empty() {
            return None;
        }
        Some(Self { cursor: start + text.len(), remainder, replace: self.replace, typed: true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(cursor: usize, text: &str) -> Suggestion {
        Suggestion::new(cursor, text.into(), 1).expect("a non-empty suggestion")
    }

    #[test]
    fn typing_along_keeps_the_rest_and_moves_the_cursor() {
        let s = shown(10, "foo(bar)");
        assert_eq!(s.answer(10), None, "nothing typed yet: the daemon answers");
        let s = s.edited(10, 10, "fo").expect("typed along");
        assert_eq!(s.answer(12), Some(Remainder { text: "o(bar)", replace: 1 }));
        assert_eq!(s.answer(11), None, "another position");
        let s = s.edited(12, 12, "").expect("an empty change is no edit");
        let s = s.edited(12, 12, "o(").expect("typed along");
        assert_eq!(s.answer(14).map(|r| r.text), Some("bar)"));
        assert_eq!(s.edited(14, 14, "bar)"), None, "typed it all: nothing left");
    }

    #[test]
    fn any_other_edit_drops_it() {
        let s = shown(10, "foo(bar)");
        assert_eq!(s.clone().edited(10, 10, "x"), None, "text that does not match");
        assert_eq!(s.clone().edited(11, 11, "o"), None, "another position");
        assert_eq!(s.clone().edited(9, 10, "f"), None, "a replacement");
        assert_eq!(s.clone().edited(9, 10, ""), None, "a deletion");
        assert_eq!(s.edited(10, 10, "foo(bar)x"), None, "more than the suggestion");
        assert_eq!(Suggestion::new(3, String::new(), 0), None);
    }

    #[test]
    fn later_lines_stay_in_the_remainder_and_a_matching_newline_types_along() {
        let s = shown(0, "let a = 1;\r\n    let b = 2;").edited(0, 0, "let a = 1;").unwrap();
        assert_eq!(s.answer(10).map(|r| r.text), Some("\r\n    let b = 2;"));
        let s = s.edited(10, 10, "\r\n    ").expect("a newline with the same indentation");
        assert_eq!(s.answer(16).map(|r| r.text), Some("let b = 2;"));
        assert_eq!(s.edited(16, 16, "\n"), None);
        let multibyte = shown(0, "é😀x").edited(0, 0, "é").unwrap();
        assert_eq!(multibyte.answer(2).map(|r| r.text), Some("😀x"));
    }
}
