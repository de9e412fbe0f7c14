//! Atomic file writes, JSON files, path text, hashing and name lookup helpers shared by the
//! stages.
//!
//! Every file a stage produces is written under a temporary name in the same directory and
//! renamed into place only when complete: a crash leaves either the old file or the new one,
//! never a truncated one that a later stage would take as complete.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use serde::{Deserialize, Serialize};

use crate::error::{Result, invalid, io_err};

/// Prefix of every temporary file the pipeline writes; such files are never read as output.
pub const TEMP_PREFIX: &str = ".tmp-";

/// The temporary sibling of `path` used while writing it.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!("{TEMP_PREFIX}{}-{name}", std::process::id()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut writer = AtomicFile::create(path)?;
    writer.write_all(bytes).map_err(io_err(path))?;
    writer.commit().map(drop)
}

/// A file being written under a temporary name, renamed to its final name by [`commit`].
/// Dropped without a commit, it removes its temporary file.
///
/// [`commit`]: AtomicFile::commit
pub struct AtomicFile {
    dest: PathBuf,
    temp: PathBuf,
    writer: Option<BufWriter<File>>,
    hasher: Sha256,
    len: u64,
}

impl AtomicFile {
    /// Starts writing `dest`.
    pub fn create(dest: &Path) -> Result<Self> {
        let temp = temp_path(dest);
        let file = File::create(&temp).map_err(io_err(&temp))?;
        Ok(Self {
            dest: dest.to_path_buf(),
            temp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            hasher: Sha256::new(),
            len: 0,
        })
    }

    /// Appends `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        match self.writer.as_mut() {
            Some(w) => w.write_all(bytes),
            None => Err(std::io::Error::other("file already committed")),
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Flushes, syncs and renames the file into place; returns the sha256 of its content.
    pub fn commit(mut self) -> Result<String> {
        let Some(writer) = self.writer.take() else {
            return Ok(hex::encode(self.hasher.clone().finalize()));
        };
        let file = writer.into_inner().map_err(|e| io_err(&self.temp)(e.into_error()))?;
        // The rename must not become visible before the data it names.
        file.sync_all().map_err(io_err(&self.temp))?;
        drop(file);
        fs::rename(&self.temp, &self.dest).map_err(io_err(&self.dest))?;
        Ok(hex::encode(self.hasher.clone().finalize()))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            // Best effort: a leftover temp file is ignored by every reader anyway.
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    m31r_model::bundle::sha256_hex(bytes)
}

/// Writes `value` as pretty JSON with a final newline, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| invalid(path, e.to_string()))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Reads a JSON file; a syntax or shape error names the file.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| invalid(path, e.to_string()))
}

/// A path as text for the manifest, one-to-one: valid UTF-8 is kept except that `\` becomes
/// `\\`, and each byte that is not UTF-8 becomes `\xNN` (lowercase hex). A lossy conversion
/// would give two names differing only in such a byte the same text.
pub fn path_text(path: &Path) -> String {
    let bytes = path.as_os_str().as_encoded_bytes();
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out += &format!("\\x{b:02x}");
        }
    }
    out
}

/// The one of `all` called `name` (as `name_of` calls it), or an error saying that `name` is no
/// known `what`: `FromStr` of the closed sets of names (splits, drop reasons).
pub(crate) fn by_name<T: Copy>(
    all: &[T],
    name_of: impl Fn(T) -> &'static str,
    name: &str,
    what: &str,
) -> std::result::Result<T, String> {
    all.iter()
        .copied()
        .find(|x| name_of(*x) == name)
        .ok_or_else(|| format!("unknown {what} {name:?}"))
}
