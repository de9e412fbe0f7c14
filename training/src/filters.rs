//! The corpus filters: which files are not worth training on, each with a named drop reason.
//!
//! Content checks run on text already known to be valid UTF-8 and small enough; they are cheap
//! line scans, so a corpus of hundreds of megabytes filters in seconds.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::CorpusConfig;
use crate::fsutil::by_name;

/// Why a file is not in the dataset. The `as_str` names are the manifest's `drop` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Not a `.rs` file.
    NotRust,
    /// A newer version of the same crate is in the corpus.
    OldVersion,
    /// The file could not be read (permissions, a dangling link, an I/O error), or it is a
    /// directory that could not be listed (its files are missing, so it is counted).
    Unreadable,
    /// A symbolic link whose target lies outside the input directories (or inside the output
    /// directory): not followed, so the corpus holds only what the inputs hold.
    SymlinkOutside,
    /// Larger than `max_file_bytes`.
    HugeFile,
    /// Not valid UTF-8.
    NonUtf8,
    /// Valid UTF-8 but binary in practice: a NUL, or more than 1% control characters
    /// (see [`is_binary`]).
    Binary,
    /// Says in its header that it is generated.
    Generated,
    /// Has a line longer than `max_line_chars`.
    HugeLine,
    /// A `-sys` crate's bindings module: mostly bare FFI declarations.
    SysBindings,
    /// Mostly lines of literals: a lookup table or data dump.
    TableDump,
    /// Same bytes as a file kept earlier in manifest order.
    Duplicate,
}

impl DropReason {
    /// Every reason, in report order: what the walk found, then the content checks in the
    /// order they apply. (The walk's own verdicts, `unreadable` and `symlink_outside`, are
    /// given before the name is looked at: a directory or a link has no meaningful extension.)
    pub const ALL: [DropReason; 12] = [
        DropReason::NotRust,
        DropReason::OldVersion,
        DropReason::Unreadable,
        DropReason::SymlinkOutside,
        DropReason::HugeFile,
        DropReason::NonUtf8,
        DropReason::Binary,
        DropReason::Generated,
        DropReason::HugeLine,
        DropReason::SysBindings,
        DropReason::TableDump,
        DropReason::Duplicate,
    ];

    /// The reason's name in the manifest and reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::NotRust => "not_rust",
            DropReason::OldVersion => "old_version",
            DropReason::Unreadable => "unreadable",
            DropReason::SymlinkOutside => "symlink_outside",
            DropReason::HugeFile => "huge_file",
            DropReason::NonUtf8 => "non_utf8",
            DropReason::Binary => "binary",
            DropReason::Generated => "generated",
            DropReason::HugeLine => "huge_line",
            DropReason::SysBindings => "sys_bindings",
            DropReason::TableDump => "table_dump",
            DropReason::Duplicate => "duplicate",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` honours width and alignment, which the summary tables use.
        f.pad(self.as_str())
    }
}

impl FromStr for DropReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        by_name(&Self::ALL, Self::as_str, s, "drop reason")
    }
}

/// Whether `crate_name` is a `-sys` crate (FFI bindings to a native library).
pub fn is_sys_crate(crate_name: &str) -> bool {
    crate_name.ends_with("-sys") || crate_name.ends_with("_sys")
}

/// The content filters, in order, for a UTF-8 text of acceptable size.
pub fn check_text(text: &str, crate_name: &str, config: &CorpusConfig) -> Option<DropReason> {
    if is_binary(text) {
        return Some(DropReason::Binary);
    }
    if is_generated(text, config.header_lines) {
        return Some(DropReason::Generated);
    }
    if text.lines().any(|l| l.chars().count() > config.max_line_chars) {
        return Some(DropReason::HugeLine);
    }
    let mut nonblank = 0usize;
    let mut data = 0usize;
    let mut decls = 0usize;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with("//") {
            continue;
        }
        nonblank += 1;
        data += usize::from(is_data_line(t));
        decls += usize::from(is_ffi_decl_line(t));
    }
    let share = |n: usize| if nonblank == 0 { 0.0 } else { n as f64 / nonblank as f64 };
    if is_sys_crate(crate_name)
        && decls >= config.min_sys_decl_lines
        && share(decls) > config.max_sys_decl_share
    {
        return Some(DropReason::SysBindings);
    }
    if data >= config.min_data_lines && share(data) > config.max_data_line_share {
        return Some(DropReason::TableDump);
    }
    None
}

/// Whether a UTF-8 text is binary in practice: it holds a NUL, or more than 1% of its
/// characters are control characters other than tab, line feed, carriage return and form feed
/// (C0 controls, DEL and the C1 range U+0080..U+009F). Source code spells control characters as
/// escapes (`"\x00"`, `'\u{1b}'`), which are printable text, so real Rust files pass; the 1%
/// leaves room for the odd raw escape character pasted into a string or comment.
pub fn is_binary(text: &str) -> bool {
    let (mut chars, mut controls) = (0usize, 0usize);
    for c in text.chars() {
        if c == '\0' {
            return true;
        }
        chars += 1;
        controls += usize::from(c.is_control() && !matches!(c, '\t' | '\n' | '\r' | '\x0c'));
    }
    controls * 100 > chars
}

/// Markers that, in a comment near the top of a file, say a tool wrote it.
const GENERATED_MARKERS: [&str; 10] = [
    "@generated",
    "automatically generated",
    "auto-generated",
    "autogenerated",
    "do not edit",
    "this file is generated",
    "this file was generated",
    "is generated code",
    "is a generated file",
    "code generated by",
];

/// Whether one of the first `header_lines` lines is a comment carrying a generated-code marker.
/// Only comments count, so a string literal mentioning "do not edit" does not drop a file.
pub fn is_generated(text: &str, header_lines: usize) -> bool {
    text.lines().take(header_lines).any(|line| {
        let t = line.trim_start();
        let comment = t.starts_with("//") || t.starts_with("/*") || t.starts_with('*');
        comment && {
            let lower = t.to_ascii_lowercase();
            GENERATED_MARKERS.iter().any(|m| lower.contains(m))
        }
    })
}

/// Whether a trimmed line is data rather than code: it holds at least one literal (number,
/// char or string), and identifiers and operators make up at most 30% of its non-blank,
/// non-bracket characters. `0x00, 0x1f, 0x7f,` and `('\u{41}', '\u{5a}', Lu),` are data;
/// `vec![1, 2, 3],` and `f(a, 1, 2)` are code. A lone literal counts only when it ends with a
/// comma, as in a one-entry-per-line table.
pub fn is_data_line(line: &str) -> bool {
    let chars: Vec<char> = line.chars().collect();
    let (mut literals, mut literal_chars, mut residue) = (0usize, 0usize, 0usize);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '.'))
            {
                i += 1;
            }
            literals += 1;
            literal_chars += i - start;
        } else if c == '"' || c == '\'' {
            match closing_quote(&chars, i) {
                Some(end) => {
                    literals += 1;
                    literal_chars += end + 1 - i;
                    i = end + 1;
                }
                // A lifetime or an unterminated string: code, not a literal.
                None => {
                    residue += 1;
                    i += 1;
                }
            }
        } else if c.is_whitespace() || matches!(c, ',' | '(' | ')' | '[' | ']' | '{' | '}' | '-') {
            i += 1;
        } else {
            residue += 1;
            i += 1;
        }
    }
    let counted = literal_chars + residue;
    let enough = literals >= 2 || (literals == 1 && line.ends_with(','));
    enough && counted > 0 && residue * 10 <= counted * 3
}

/// Index of the quote closing the literal opened at `start`, honouring backslash escapes.
/// Char literals are at most a few characters long (`'\u{10FFFF}'`), which tells them from
/// lifetimes.
fn closing_quote(chars: &[char], start: usize) -> Option<usize> {
    let quote = chars[start];
    let limit = if quote == '\'' { start + 12 } else { chars.len() };
    let mut i = start + 1;
    while i < chars.len().min(limit) {
        match chars[i] {
            '\\' => i += 2,
            c if c == quote => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// Whether a trimmed line is a bare FFI declaration as bindings generators and hand-written
/// `-sys` modules produce them: constants, statics, type aliases, body-less functions, `repr`
/// and `derive` attributes, `pub` struct fields and `link!` invocations.
pub fn is_ffi_decl_line(t: &str) -> bool {
    let decl_start = ["pub const ", "pub static ", "pub type ", "pub fn ", "fn ", "pub unsafe fn "];
    (decl_start.iter().any(|p| t.starts_with(p)) && t.ends_with(';'))
        || t.starts_with("#[repr(")
        || t.starts_with("#[derive(")
        || t.starts_with("#[link(")
        || t.contains("link!(")
        || (t.starts_with("pub ") && t.ends_with(',') && t.contains(": "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_lines_are_told_from_code() {
        for data in [
            "0x00, 0x1f, 0x7f,",
            "('\\u{41}', '\\u{5a}', Lu),",
            "[1.0, 2.5, -3.0],",
            "\"alpha\", \"beta\", \"gamma\",",
            "42,",
            "(0x0041, 0x005a), (0x0061, 0x007a),",
        ] {
            assert!(is_data_line(data), "{data}");
        }
        for code in [
            "vec![1, 2, 3],",
            "f(a, 1, 2)",
            "let x = 1;",
            "}",
            "fn foo<'a>(x: &'a str, y: &'a str) {",
            "assert_eq!(parse(\"1\"), Ok(1));",
            "42",
            "Some(3),",
        ] {
            assert!(!is_data_line(code), "{code}");
        }
    }

    #[test]
    fn binary_means_a_nul_or_over_one_percent_control_characters() {
        assert!(is_binary("fn f() {}\0"));
        assert!(is_binary("\x01\x02\x03\n\x04\x05\n"));
        let text = "let s = \"\\x00\\x1b\\u{7f}\";\r\n\t\x0c\n";
        assert!(!is_binary(text), "escapes are text");
        // Exactly 1% is still text; one more control character is not.
        let mut text = "a".repeat(99);
        text.push('\x1b');
        assert!(!is_binary(&text));
        text.push('\u{85}');
        assert!(is_binary(&text));
    }

    #[test]
    fn generated_markers_only_count_in_header_comments() {
        assert!(is_generated("// @generated by build.rs\nfn f() {}\n", 20));
        assert!(is_generated("//! Tables.\n/* This file is AUTOMATICALLY GENERATED. */\n", 20));
        assert!(is_generated("// THIS IS GENERATED CODE\nuse core::ops::*;\n", 20));
        assert!(!is_generated("fn f() { let s = \"do not edit\"; }\n", 20));
        assert!(!is_generated("//! Helpers to test generated parsers.\n", 20));
        let late = format!("{}// @generated\n", "fn f() {}\n".repeat(30));
        assert!(!is_generated(&late, 20));
    }

    #[test]
    fn drop_reason_names_round_trip() {
        for r in DropReason::ALL {
            assert_eq!(r.as_str().parse::<DropReason>().unwrap(), r);
        }
        assert!("nope".parse::<DropReason>().is_err());
    }
}
