//! `FILE:LINE:COL` cursor positions: parsing them and splitting a file's text at one into the
//! prefix and suffix of a fill-in-the-middle request.

use std::path::PathBuf;

use anyhow::{Context, bail};

/// A cursor in a file: 1-based line, 1-based column counted in characters (Unicode scalar
/// values, as most terminals and editors show them; not UTF-16 units, not bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The file.
    pub file: PathBuf,
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1; one past the line's last character is its end.
    pub column: usize,
}

impl std::str::FromStr for Position {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> anyhow::Result<Self> {
        // Split from the right: the path itself may contain colons.
        let mut parts = spec.rsplitn(3, ':');
        let (Some(column), Some(line), Some(file)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("{spec:?} is not FILE:LINE:COL (e.g. src/main.rs:12:5)");
        };
        let number = |what: &str, text: &str| -> anyhow::Result<usize> {
            match text.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => bail!("{spec:?}: {what} {text:?} is not a number from 1"),
            }
        };
        if file.is_empty() {
            bail!("{spec:?}: the file name is empty");
        }
        Ok(Self {
            file: PathBuf::from(file),
            line: number("line", line)?,
            column: number("column", column)?,
        })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

impl Position {
    /// Reads the file and splits it at the cursor into (prefix, suffix).
    pub fn split_file(&self) -> anyhow::Result<(String, String)> {
        let text = std::fs::read_to_string(&self.file)
            .with_context(|| format!("cannot read {} as UTF-8 text", self.file.display()))?;
        let at = self.byte_offset(&text).with_context(|| format!("position {self}"))?;
        let (prefix, suffix) = text.split_at(at);
        Ok((prefix.to_owned(), suffix.to_owned()))
    }

    /// The byte offset of the cursor in `text`.
    pub fn byte_offset(&self, text: &str) -> anyhow::Result<usize> {
        let mut line_start = 0;
        for n in 1..self.line {
            match text[line_start..].find('\n') {
                Some(i) => line_start += i + 1,
                None => bail!("the file has only {n} lines"),
            }
        }
        let rest = &text[line_start..];
        let line = rest.find('\n').map_or(rest, |i| &rest[..i]);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let chars = line.chars().count();
        if self.column > chars + 1 {
            bail!(
                "line {} has {chars} characters; the column must be 1..={}",
                self.line,
                chars + 1
            );
        }
        let within = line.char_indices().nth(self.column - 1).map_or(line.len(), |(i, _)| i);
        Ok(line_start + within)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(spec: &str) -> Position {
        spec.parse().unwrap()
    }

    #[test]
    fn parses_from_the_right() {
        assert_eq!(pos("a:b.rs:3:7"), Position { file: "a:b.rs".into(), line: 3, column: 7 });
        for bad in ["main.rs", "main.rs:3", ":1:1", "f.rs:0:1", "f.rs:1:x", "f.rs:-1:2"] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
    }

    #[test]
    fn offsets_count_characters_and_allow_the_line_end() {
        let text = "fn a() {\r\n    let é = 1;\n}";
        assert_eq!(pos("f:1:1").byte_offset(text).unwrap(), 0);
        assert_eq!(pos("f:1:9").byte_offset(text).unwrap(), 8); // before "\r\n"
        assert_eq!(pos("f:2:10").byte_offset(text).unwrap(), 10 + 4 + 4 + 2); // after "é"
        assert_eq!(pos("f:3:2").byte_offset(text).unwrap(), text.len());
        let err = pos("f:1:10").byte_offset(text).unwrap_err().to_string();
        assert!(err.contains("1..=9"), "{err}");
        assert!(pos("f:4:1").byte_offset(text).is_err());
    }
}
