//! Rust text for the bench: sources from the local cargo registry, or this repository's own
//! files when there is no registry. Files are taken in sorted path order, so a machine with the
//! same registry gets the same text.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// Larger files are mostly generated tables, not code anyone types.
const MAX_FILE_BYTES: u64 = 256 << 10;

/// Rust sources and where they came from.
pub struct Corpus {
    /// File contents, in path order.
    pub files: Vec<String>,
    /// The directory they came from.
    pub root: PathBuf,
}

impl Corpus {
    /// Total bytes of text.
    pub fn bytes(&self) -> usize {
        self.files.iter().map(String::len).sum()
    }
}

/// Up to `max_bytes` of Rust from `$CARGO_HOME/registry/src`, falling back to this repository.
pub fn collect(max_bytes: usize) -> anyhow::Result<Corpus> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let repository = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf);
    let roots = cargo_home.map(|c| c.join("registry").join("src")).into_iter().chain(repository);
    for root in roots {
        let mut files = Vec::new();
        let mut bytes = 0;
        walk(&root, max_bytes, &mut files, &mut bytes);
        // A registry with a crate or two is too little text to look like a real prompt.
        if bytes >= max_bytes.min(256 << 10) {
            return Ok(Corpus { files, root });
        }
    }
    bail!(
        "found no Rust sources for the bench under $CARGO_HOME/registry/src or {}; \
         pass --bundle DIR and a prompt source",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn walk(dir: &Path, max_bytes: usize, files: &mut Vec<String>, bytes: &mut usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        if *bytes >= max_bytes {
            return;
        }
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        let Ok(kind) = entry.file_type() else { continue };
        let path = entry.path();
        if kind.is_dir() {
            walk(&path, max_bytes, files, bytes);
        } else if kind.is_file()
            && name.ends_with(".rs")
            && entry.metadata().is_ok_and(|m| m.len() <= MAX_FILE_BYTES)
            && let Ok(text) = std::fs::read_to_string(&path)
        {
            *bytes += text.len();
            files.push(text);
        }
    }
}
