//! Which lines the replay retypes (a seeded, deterministic sample of the held-out files' lines)
//! and the text arithmetic of one line: the document with the line's text removed, UTF-16
//! columns, and whether a suggestion completes the line.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Longer lines are skipped: they are rare in code and would dominate the request count.
pub const MAX_LINE_CHARS: usize = 200;

/// A held-out file, its text with `\r\n` read as `\n`.
pub struct SourceFile {
    /// Where it was read from (its `file://` URI is the document's).
    pub path: PathBuf,
    /// Its text, `\n` line ends.
    pub text: String,
}

/// One line to retype: `file` indexes the files, `line` is 0-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LinePick {
    /// Index into the files.
    pub file: usize,
    /// 0-based line number.
    pub line: usize,
}

/// The `.rs` files under `dir`, sorted by path (hidden directories and `target` skipped).
pub fn rust_files(dir: &Path) -> anyhow::Result<Vec<SourceFile>> {
    let mut paths = Vec::new();
    collect(dir, &mut paths)?;
    paths.sort();
    if paths.is_empty() {
        bail!("no .rs files under {}", dir.display());
    }
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {} as UTF-8", path.display()))?;
            Ok(SourceFile { path, text: text.replace("\r\n", "\n") })
        })
        .collect()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if entry.file_type()?.is_dir() {
            if !name.starts_with('.') && name != "target" {
                collect(&path, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// Up to `n` lines picked at random (seeded) among the lines that are not blank and at most
/// [`MAX_LINE_CHARS`] long, in file and line order.
pub fn sample_lines(files: &[SourceFile], n: usize, seed: u64) -> Vec<LinePick> {
    let mut eligible: Vec<LinePick> = files
        .iter()
        .enumerate()
        .flat_map(|(file, f)| {
            f.text.split('\n').enumerate().filter_map(move |(line, text)| {
                let keep = !text.trim().is_empty() && text.chars().count() <= MAX_LINE_CHARS;
                keep.then_some(LinePick { file, line })
            })
        })
        .collect();
    // A partial Fisher–Yates shuffle: the first `n` are a uniform sample.
    let mut rng = SplitMix64(seed);
    let n = n.min(eligible.len());
    for i in 0..n {
        let j = i + (rng.next() % (eligible.len() - i) as u64) as usize;
        eligible.swap(i, j);
    }
    eligible.truncate(n);
    eligible.sort();
    eligible
}

/// SplitMix64: a tiny seeded generator, so a sample is the same on every machine and version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A line to retype, cut out of its file.
#[derive(Debug, PartialEq)]
pub struct Cut {
    /// The file's text with the line's text after its indentation removed.
    pub doc: String,
    /// The line's indentation (kept in `doc`).
    pub indent: String,
    /// The line's text after the indentation: what the replay types.
    pub body: String,
}

/// Cuts line `line` (0-based) of `text`.
pub fn cut_line(text: &str, line: usize) -> Option<Cut> {
    let start: usize = text.split('\n').take(line).map(|l| l.len() + 1).sum();
    let original = text.get(start..)?.split('\n').next()?;
    let body = original.trim_start();
    let indent = &original[..original.len() - body.len()];
    let doc = format!("{}{}", &text[..start + indent.len()], &text[start + original.len()..]);
    Some(Cut { doc, indent: indent.to_string(), body: body.to_string() })
}

/// The UTF-16 length of `s`: LSP columns.
pub fn utf16_len(s: &str) -> u32 {
    s.encode_utf16().count() as u32
}

/// The byte offset of UTF-16 column `col` in `line` (clamped to its end).
fn byte_at_utf16(line: &str, col: u32) -> usize {
    let mut units = 0;
    for (i, c) in line.char_indices() {
        if units >= col {
            return i;
        }
        units += c.len_utf16() as u32;
    }
    line.len()
}

/// Whether accepting a suggestion (`insert` over the columns `start..end` of the cursor's line,
/// whose text is `current`) makes that line exactly `original`. Only the suggestion's first line
/// counts: the replay measures one line at a time.
pub fn completes_line(current: &str, start: u32, end: u32, insert: &str, original: &str) -> bool {
    let first = insert.split('\n').next().unwrap_or_default();
    let (a, b) = (byte_at_utf16(current, start), byte_at_utf16(current, end));
    a <= b && format!("{}{first}{}", &current[..a], &current[b..]) == original
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(texts: &[&str]) -> Vec<SourceFile> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| SourceFile { path: format!("{i}.rs").into(), text: t.to_string() })
            .collect()
    }

    #[test]
    fn samples_are_seeded_sorted_and_skip_blank_and_long_lines() {
        let long = "x".repeat(MAX_LINE_CHARS + 1);
        let a = format!("fn a() {{\n\n    {long}\n   \n}}\n");
        let files = files(&[&a, "fn b() {}\nfn c() {}\n"]);
        let all = sample_lines(&files, 100, 7);
        let lines: Vec<(usize, usize)> = all.iter().map(|p| (p.file, p.line)).collect();
        assert_eq!(lines, [(0, 0), (0, 4), (1, 0), (1, 1)]);
        let some = sample_lines(&files, 2, 7);
        assert_eq!(some.len(), 2);
        assert_eq!(some, sample_lines(&files, 2, 7));
        assert!(some.windows(2).all(|w| w[0] < w[1]));
        assert!(some.iter().all(|p| all.contains(p)));
    }

    #[test]
    fn cuts_the_text_after_the_indentation() {
        let cut = cut_line("fn f() {\n    let x = 1;\n}\n", 1).unwrap();
        assert_eq!(cut.doc, "fn f() {\n    \n}\n");
        assert_eq!((cut.indent.as_str(), cut.body.as_str()), ("    ", "let x = 1;"));
        let last = cut_line("a\n\tb", 1).unwrap();
        assert_eq!((last.doc.as_str(), last.body.as_str()), ("a\n\t", "b"));
        assert_eq!(cut_line("a\n", 5), None);
    }

    #[test]
    fn a_suggestion_completes_the_line_by_its_first_line_and_range() {
        let original = "    let s = \"é\"; // ok";
        assert!(completes_line("    let s", 9, 9, " = \"é\"; // ok\n    more", original));
        assert!(!completes_line("    let s", 9, 9, " = \"é\";", original));
        // Columns are UTF-16: the range after `é` starts at column 14, byte 15.
        assert!(completes_line("    let s = \"é", 14, 14, "\"; // ok", original));
        // A range over auto-closed punctuation replaces it.
        assert!(completes_line("f(x)", 3, 4, ", y)", "f(x, y)"));
        assert!(!completes_line("f(x)", 4, 3, ", y)", "f(x, y)"));
    }
}
