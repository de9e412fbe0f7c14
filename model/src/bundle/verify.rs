//! What the loader trusts only after checking: regular files of bounded size, `checksum.txt`
//! and every hash in it, the tokenizer against the config, and every weight's shape.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::Path;

use super::{
    BundleError, CHECKSUMMED_FILES, CONFIG_FILE, TOKENIZER_FILE, invalid, io_err, sha256_hex,
};
use crate::config::ModelConfig;
use crate::quant::{self, Precision};
use crate::tokenizer::{SpecialToken, Tokenizer};
use crate::weights::weight_shapes;

/// Largest `checksum.txt` accepted: four lines of `sha256sum` output are about 300 bytes.
pub(super) const MAX_CHECKSUM_BYTES: u64 = 64 << 10;

/// Opens a bundle file for reading. Only a regular file (after following symlinks) is accepted:
/// opening a FIFO would block start-up forever, and a device could be read without end.
pub(super) fn open_regular(path: &Path) -> Result<fs::File, BundleError> {
    let refuse =
        |meta: &fs::Metadata| invalid(path, format!("is {}, not a regular file", file_kind(meta)));
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(refuse(&meta));
    }
    let mut options = fs::OpenOptions::new();
    options.read(true);
    // Non-blocking, so that a file swapped for a FIFO after the check cannot block the open
    // either; reads of a regular file ignore the flag.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(refuse(&meta));
    }
    Ok(file)
}

/// Reads a whole bundle file through [`open_regular`], refusing one longer than `limit` bytes.
pub(super) fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, BundleError> {
    let mut bytes = Vec::new();
    open_regular(path)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() as u64 > limit {
        return Err(invalid(path, format!("is larger than the {limit} bytes allowed")));
    }
    Ok(bytes)
}

/// What a file that is not a regular file is, for error messages.
fn file_kind(meta: &fs::Metadata) -> &'static str {
    let kind = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_block_device() || kind.is_char_device() {
            return "a device";
        }
    }
    if kind.is_dir() { "a directory" } else { "a special file" }
}

/// Parses `sha256sum` output; every checksummed file must be listed exactly once, nothing else.
///
/// Errors give the line number but never the line: `checksum.txt` may be a symlink to a file
/// that is not meant to be shown (a line of `/etc/shadow` must not end up in a log).
pub(super) fn parse_checksums(
    listing: &str,
    path: &Path,
) -> Result<HashMap<&'static str, String>, BundleError> {
    let mut found = HashMap::new();
    for (n, line) in listing.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |why: &str| invalid(path, format!("line {}: {why}", n + 1));
        let (hash, name) =
            line.split_once(' ').ok_or_else(|| bad("expected '<sha256>  <file>'"))?;
        // sha256sum writes ' ' (text) or '*' (binary) between the two spaces' worth of separator.
        let name = name.strip_prefix(' ').or_else(|| name.strip_prefix('*')).unwrap_or(name);
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("not a sha256 hex digest"));
        }
        let known = CHECKSUMMED_FILES.iter().find(|&&f| f == name).ok_or_else(|| {
            bad(&format!("lists {}, which is not part of a bundle", shown_name(name)))
        })?;
        if found.insert(*known, hash.to_ascii_lowercase()).is_some() {
            return Err(bad(&format!("lists {known} twice")));
        }
    }
    for file in CHECKSUMMED_FILES {
        if !found.contains_key(file) {
            return Err(invalid(path, format!("has no checksum for {file}")));
        }
    }
    Ok(found)
}

/// A file name from `checksum.txt` as an error may show it: quoted when it looks like a short
/// plain file name, otherwise nothing of it.
fn shown_name(name: &str) -> String {
    let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/');
    if !name.is_empty() && name.len() <= 64 && name.bytes().all(plain) {
        format!("{name:?}")
    } else {
        "a file".to_string()
    }
}

pub(super) fn verify(path: &Path, bytes: &[u8], expected: &str) -> Result<(), BundleError> {
    let actual = sha256_hex(bytes);
    if actual != expected {
        return Err(invalid(
            path,
            format!("checksum mismatch: checksum.txt says {expected}, the file hashes to {actual}"),
        ));
    }
    Ok(())
}

/// The tokenizer must match the config's vocabulary and special-token ids.
pub(super) fn check_tokenizer(
    tokenizer: &Tokenizer,
    config: &ModelConfig,
    specials: &BTreeMap<String, u32>,
    dir: &Path,
) -> Result<(), BundleError> {
    let tokenizer_path = dir.join(TOKENIZER_FILE);
    if tokenizer.vocab_size() != config.vocab_size() {
        return Err(invalid(
            &tokenizer_path,
            format!(
                "vocabulary has {} tokens but {CONFIG_FILE} says vocab_size = {}",
                tokenizer.vocab_size(),
                config.vocab_size()
            ),
        ));
    }
    for token in SpecialToken::ALL {
        let actual = tokenizer.special_ids().get(token);
        match specials.get(token.as_str()) {
            Some(&id) if id == actual => {}
            Some(&id) => {
                return Err(invalid(
                    dir.join(CONFIG_FILE),
                    format!(
                        "special token {} has id {id}, the tokenizer says {actual}",
                        token.as_str()
                    ),
                ));
            }
            None => {
                return Err(invalid(
                    dir.join(CONFIG_FILE),
                    format!("special token {} is missing", token.as_str()),
                ));
            }
        }
    }
    if specials.len() != SpecialToken::ALL.len() {
        return Err(invalid(dir.join(CONFIG_FILE), "lists unknown special tokens"));
    }
    Ok(())
}

/// The weights must be exactly the tensors the config implies, with the right shapes (for GGML
/// blocks: rows × bytes per row of the implied shape).
pub(super) fn check_weights(
    config: &ModelConfig,
    shapes: &HashMap<&str, &[usize]>,
    precision: Precision,
    path: &Path,
) -> Result<(), BundleError> {
    let mut expected = weight_shapes(config);
    if let Some(dtype) = precision.ggml_dtype() {
        // Rows that blocks cannot hold are stored f16 at their logical shape.
        for (_, shape) in expected.iter_mut().filter(|(_, s)| s.len() == 2) {
            if quant::fits_blocks(shape, dtype) {
                shape[1] = shape[1] / dtype.block_size() * dtype.type_size();
            }
        }
    }
    for (name, shape) in &expected {
        match shapes.get(name.as_str()) {
            None => return Err(invalid(path, format!("tensor {name} is missing"))),
            Some(actual) if *actual != shape.as_slice() => {
                return Err(invalid(
                    path,
                    format!("tensor {name} has shape {actual:?}, {CONFIG_FILE} implies {shape:?}"),
                ));
            }
            Some(_) => {}
        }
    }
    if shapes.len() != expected.len() {
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        let extra: Vec<&&str> = shapes.keys().filter(|n| !known.contains(**n)).collect();
        return Err(invalid(path, format!("unexpected tensors {extra:?}")));
    }
    Ok(())
}
