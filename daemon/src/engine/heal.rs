//! Token healing: when the text before the cursor ends in the middle of a token (inside an
//! identifier, after `.`, `::` or an operator character), its last token is a fragment the model
//! rarely saw in training. Healing removes that token from the prompt and makes the first
//! generated tokens reproduce its bytes, so the model picks the token it would have used for the
//! whole word; the reproduced bytes are not sent, only what follows them.

/// Whether `text` ends where its last token is probably a fragment: inside an identifier, or
/// after `.`, `:` or an operator character. Whitespace, brackets, `,` and `;` end tokens cleanly.
pub(crate) fn ends_in_fragment(text: &str) -> bool {
    text.as_bytes().last().is_some_and(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'_' | b'.'
                    | b':'
                    | b'+'
                    | b'-'
                    | b'*'
                    | b'/'
                    | b'%'
                    | b'='
                    | b'<'
                    | b'>'
                    | b'!'
                    | b'&'
                    | b'|'
                    | b'^'
                    | b'~'
                    | b'?'
            )
    })
}

/// The constraint on the first generated tokens of a healed prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Healing {
    /// The bytes of the token removed from the prompt.
    removed: Vec<u8>,
    /// How many of them the generated tokens have reproduced so far.
    matched: usize,
}

/// What one generated token did to a [`Healing`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step<'a> {
    /// The token lay inside the removed bytes; more of them remain.
    Inside,
    /// The removed bytes are reproduced; these bytes of the token follow them (possibly none).
    Done(&'a [u8]),
}

impl Healing {
    /// Heals `ids`, the prompt whose text ends with `text`: when `text` ends in a fragment and
    /// the last id spells (per `table`, [`m31r_model::Tokenizer::token_bytes`]) the end of
    /// `text`, that id is removed and the constraint for it returned. At least one id is kept,
    /// and a special id (a FIM marker before an empty prefix) is never removed.
    pub(crate) fn start(ids: &mut Vec<u32>, text: &str, table: &[Vec<u8>]) -> Option<Self> {
        if ids.len() < 2 || !ends_in_fragment(text) {
            return None;
        }
        let last = *ids.last()?;
        let removed = table.get(last as usize)?;
        if removed.is_empty() || !text.as_bytes().ends_with(removed) {
            return None;
        }
        ids.pop();
        Some(Self { removed: removed.clone(), matched: 0 })
    }

    /// The bytes removed from the prompt.
    pub(crate) fn removed(&self) -> &[u8] {
        &self.removed
    }

    /// Whether a token spelling `token` may come next: it is consistent with the removed bytes
    /// still to reproduce (one is a prefix of the other). A token without bytes (a special one)
    /// never is, so healing always makes progress.
    pub(crate) fn allows(&self, token: &[u8]) -> bool {
        let rest = &self.removed[self.matched..];
        !token.is_empty() && (token.starts_with(rest) || rest.starts_with(token))
    }

    /// Takes the generated token spelling `token`, which [`Healing::allows`] accepted.
    pub(crate) fn accept<'a>(&mut self, token: &'a [u8]) -> Step<'a> {
        let rest = self.removed.len() - self.matched;
        if token.len() < rest {
            self.matched += token.len();
            Step::Inside
        } else {
            self.matched = self.removed.len();
            Step::Done(&token[rest..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<Vec<u8>> {
        ["", "std", "::", "coll", "co", "c", "ollections", "ll", "(", " ", "x"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect()
    }

    #[test]
    fn fragments_are_decided_by_the_last_byte() {
        for text in ["std::coll", "a.", "x::", "a +", "a =", "x_1", "foo!", "a &&"] {
            assert!(ends_in_fragment(text), "{text:?}");
        }
        for text in ["", "foo(", "a ", "x\n", "f(a,", "x;", "{", "\"s\"", "é"] {
            assert!(!ends_in_fragment(text), "{text:?}");
        }
    }

    #[test]
    fn the_last_token_is_removed_only_when_it_is_a_fragment() {
        let t = table();
        let mut ids = vec![1, 2, 3];
        let h = Healing::start(&mut ids, "std::coll", &t).unwrap();
        assert_eq!((ids.as_slice(), h.removed()), (&[1, 2][..], &b"coll"[..]));
        // Not a fragment, a special last id, a last id that is not the text's end, one id only.
        for (mut ids, text) in
            [(vec![1, 8], "std("), (vec![1, 0], "std"), (vec![1, 3], "std::co"), (vec![3], "coll")]
        {
            let before = ids.clone();
            assert_eq!(Healing::start(&mut ids, text, &t), None, "{text:?}");
            assert_eq!(ids, before);
        }
    }

    #[test]
    fn generated_tokens_must_reproduce_the_removed_bytes() {
        let t = table();
        let mut h = Healing::start(&mut vec![1, 2, 3], "std::coll", &t).unwrap();
        let allowed: Vec<&str> = (0..t.len())
            .filter(|&i| h.allows(&t[i]))
            .map(|i| std::str::from_utf8(&t[i]).unwrap())
            .collect();
        assert_eq!(allowed, ["coll", "co", "c"]);
        assert_eq!(h.accept(b"co"), Step::Inside);
        assert!(h.allows(b"ll") && h.allows(b"llections") && !h.allows(b"co") && !h.allows(b""));
        assert_eq!(h.accept(b"llections"), Step::Done(b"ections"));
        let mut exact = Healing::start(&mut vec![1, 2, 3], "std::coll", &t).unwrap();
        assert_eq!(exact.accept(b"coll"), Step::Done(b""));
    }
}
