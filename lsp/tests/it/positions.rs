//! Incremental sync with multi-byte text: random edits addressed in UTF-16 (or UTF-8) positions
//! give the same text as a full sync, checked against an independent char-vector model.

use m31r_lsp::document::{Document, Encoding};
use tower_lsp_server::ls_types::{Position, Range, TextDocumentContentChangeEvent};

const PIECES: &[&str] = &["é", "😀", "中文", "a", "\n", "fn x() {}", "\r\n", "🦀🦀", " ", "ß\n"];

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

/// The position of char index `at` in `chars`, counted independently of `Document`.
fn position(chars: &[char], at: usize, encoding: Encoding) -> Position {
    let (mut line, mut col) = (0u32, 0u32);
    for &c in &chars[..at] {
        if c == '\n' {
            line += 1;
            col = 0;
        } else {
            col += match encoding {
                Encoding::Utf16 => c.len_utf16() as u32,
                Encoding::Utf8 => c.len_utf8() as u32,
            };
        }
    }
    Position::new(line, col)
}

fn run(encoding: Encoding, seed: u64) {
    let mut rng = Rng(seed);
    let start = "é😀 中文\n🦀 fn main() {}\r\n";
    let mut model: Vec<char> = start.chars().collect();
    let mut doc = Document::new(start.into(), 0, "rust".into());
    for step in 0..400 {
        let a = rng.below(model.len() + 1);
        let b = (a + rng.below(4)).min(model.len());
        // Never split a \r\n pair: positions cannot address the gap between them.
        let inside_crlf = |i: usize| i > 0 && model[i - 1] == '\r' && model.get(i) == Some(&'\n');
        if inside_crlf(a) || inside_crlf(b) {
            continue;
        }
        let insert: String = (0..rng.below(3)).map(|_| PIECES[rng.below(PIECES.len())]).collect();
        let range = Range::new(position(&model, a, encoding), position(&model, b, encoding));
        model.splice(a..b, insert.chars());
        doc.apply(
            &TextDocumentContentChangeEvent {
                range: Some(range),
                range_length: None,
                text: insert,
            },
            encoding,
        );
        let full: String = model.iter().collect();
        assert_eq!(doc.text(), full, "step {step} ({encoding:?})");
        let synced = Document::new(full.clone(), step, "rust".into());
        assert_eq!(doc.line_count(), synced.line_count());
        // Every char boundary maps to the same position both ways.
        for mut at in [0, model.len() / 2, model.len()] {
            if at > 0 && model[at - 1] == '\r' && model.get(at) == Some(&'\n') {
                at -= 1;
            }
            let offset: usize = model[..at].iter().map(|c| c.len_utf8()).sum();
            let pos = position(&model, at, encoding);
            assert_eq!(doc.position(offset, encoding), pos, "step {step}: char {at}");
            assert_eq!(doc.offset(pos, encoding), offset, "step {step}: char {at}");
        }
    }
}

#[test]
fn incremental_edits_in_utf16_equal_a_full_sync() {
    for seed in [1, 2, 3] {
        run(Encoding::Utf16, seed);
    }
}

#[test]
fn incremental_edits_in_utf8_equal_a_full_sync() {
    run(Encoding::Utf8, 7);
}

#[test]
fn full_sync_change_replaces_the_text() {
    let mut doc = Document::new("old".into(), 0, "rust".into());
    doc.apply(
        &TextDocumentContentChangeEvent {
            range: None, range_length: None, text: "né😀\n".into()
        },
        Encoding::Utf16,
    );
    assert_eq!((doc.text(), doc.line_count()), ("né😀\n", 2));
    assert_eq!(doc.position(doc.text().len() - 1, Encoding::Utf16), Position::new(0, 4));
}
