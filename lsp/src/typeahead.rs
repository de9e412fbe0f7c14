//! Typing along a shown suggestion: what is left of a document's last completion while the user
//! types its next characters, so the next request is answered from it without a daemon round trip.
//!
//! The remainder is cut from the text the editor was shown (after post-processing), never from
//! the daemon's raw text: the editor then sees the same suggestion, only shorter. All offsets are
//! bytes in the document as the server holds it; any edit that is not typing along drops the
//! suggestion, so they never go stale.
//!
//! A suggestion shown before its generation ended (its first line) is extended with the rest
//! when the generation finishes; the rest is then served at the same position as well.

/// The rest of the last completion shown in one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggestion {
    /// Byte offset where the suggestion was shown.
    start: usize,
    /// The whole text shown (or, once extended, the whole finished text) from `start`.
    shown: String,
    /// Byte offset where the remainder starts: the cursor, after the characters typed along.
    cursor: usize,
    /// What is left of the shown text; never empty.
    remainder: String,
    /// Bytes right of the cursor that the item replaces (auto-closed punctuation it retypes).
    /// Typing at the cursor inserts before them, so they stay right of it.
    replace: usize,
    /// Whether the user typed part of it yet, or it was extended past what the editor was
    /// shown. Only then is it served: a repeated request with nothing typed and nothing new goes
    /// to the daemon, which may know better by now (a restart, new context).
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
        (!text.is_empty()).then(|| Self {
            start: cursor,
            shown: text.clone(),
            cursor,
            remainder: text,
            replace,
            typed: false,
        })
    }

    /// The finished answer `text` of a generation that had shown nothing when its request was
    /// answered (the first-line budget ran out), at byte `cursor`, replacing `replace` bytes:
    /// servable at once, as the editor has not seen it. `None` when `text` is empty.
    pub fn unshown(cursor: usize, text: String, replace: usize) -> Option<Self> {
        Self::new(cursor, text, replace).map(|s| Self { typed: true, ..s })
    }

    /// The suggestion once its generation finished with `full` (post-processed like the shown
    /// text) at byte `start`, replacing `replace` bytes: what is left of `full` after what was
    /// typed along, servable at once. `None` when `full` does not continue what was shown
    /// there (post-processing decided otherwise with the whole text), or adds nothing.
    pub fn extended(&self, start: usize, full: &str, replace: usize) -> Option<Self> {
        if start != self.start
            || replace != self.replace
            || full.len() <= self.shown.len()
            || !full.starts_with(&self.shown)
        {
            return None;
        }
        // What was typed is a prefix of `shown`, so of `full`: the slice is on a boundary.
        let typed = self.cursor - self.start;
        Some(Self {
            start,
            shown: full.to_string(),
            cursor: self.cursor,
            remainder: full[typed..].to_string(),
            replace,
            typed: true,
        })
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
        Some(Self { cursor: start + text.len(), remainder, typed: true, ..self })
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
    fn a_finished_generation_extends_what_was_shown_and_typed() {
        let s = shown(10, "let a = 1;");
        let full = "let a = 1;\n    let b = 2;";
        let e = s.extended(10, full, 1).expect("the full text starts with the shown one");
        assert_eq!(e.answer(10).map(|r| r.text), Some(full), "served at the same position");
        let typed = s.clone().edited(10, 10, "let").unwrap().extended(10, full, 1).unwrap();
        assert_eq!(typed.answer(13).map(|r| r.text), Some(" a = 1;\n    let b = 2;"));
        assert_eq!(s.extended(11, full, 1), None, "another start");
        assert_eq!(s.extended(10, full, 0), None, "another replacement");
        assert_eq!(s.extended(10, "let a = 2;\n", 1), None, "not an extension");
        assert_eq!(s.extended(10, "let a = 1;", 1), None, "nothing more");
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
