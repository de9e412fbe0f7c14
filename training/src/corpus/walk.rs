//! The `corpus` stage's walk over its inputs: which files become candidates, in what order,
//! and how symbolic links and unreadable entries are recorded rather than followed or lost.

use std::fs;
use std::path::{Path, PathBuf};

use walkdir::WalkDir;

use crate::crates::{CrateId, CrateResolver};
use crate::filters::DropReason;
use crate::fsutil::path_text;
use crate::progress::Progress;

/// A file found by the walk, before it is read.
pub(super) struct Candidate {
    /// Where the walk found it (for a followed symlink, the link).
    pub(super) path: PathBuf,
    /// What to read: `path`, or a followed symlink's resolved target.
    pub(super) read_path: PathBuf,
    pub(super) crate_id: CrateId,
    pub(super) file: String,
    pub(super) bytes: u64,
    /// The walk's own verdict (an unlistable directory, a link out of the inputs), given
    /// before anything else is looked at.
    pub(super) walk_drop: Option<(DropReason, String)>,
}

/// Walks the inputs in a deterministic order. Unreadable entries become candidates carrying
/// their error, so they are counted rather than lost.
///
/// Symbolic links are never followed by the walk itself, so it cannot loop or leave the
/// inputs. Each link is resolved instead: a link to a file inside the inputs is read like that
/// file (and usually dropped as its duplicate); a link to a directory inside the inputs is
/// skipped, since the walk reaches that directory's files where they are; a link resolving
/// outside the inputs, or into the output directory, is recorded as `symlink_outside` and not
/// read; a dangling link is `unreadable`.
pub(super) fn walk(roots: &[PathBuf], out: &Path, progress: Progress) -> Vec<Candidate> {
    let spinner = progress.spinner("scanning");
    let mut resolver = CrateResolver::default();
    let mut candidates = Vec::new();
    for root in roots {
        let walker = WalkDir::new(root)
            .follow_links(false)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| !skip_dir(e, out));
        for entry in walker {
            let found = match entry {
                Ok(e) if e.file_type().is_file() => {
                    let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
                    let path = e.into_path();
                    Found { read_path: path.clone(), path, bytes, walk_drop: None }
                }
                Ok(e) if e.path_is_symlink() => match follow_link(e.path(), roots, out) {
                    Some(found) => found,
                    None => continue,
                },
                Ok(_) => continue,
                Err(err) => {
                    // Without followed links the walk cannot loop, so every error has a path.
                    let Some(path) = err.path().map(Path::to_path_buf) else { continue };
                    let why = err.io_error().map_or_else(|| err.to_string(), |e| e.to_string());
                    let detail = if path.is_dir() {
                        format!("directory not listed, its files are missing: {why}")
                    } else {
                        why
                    };
                    let walk_drop = Some((DropReason::Unreadable, detail));
                    Found { read_path: path.clone(), path, bytes: 0, walk_drop }
                }
            };
            let (crate_id, crate_dir) = resolver.resolve(root, &found.path);
            let file = found
                .path
                .strip_prefix(&crate_dir)
                .unwrap_or(&found.path)
                .components()
                .map(|c| path_text(Path::new(c.as_os_str())))
                .collect::<Vec<_>>()
                .join("/");
            candidates.push(Candidate {
                path: found.path,
                read_path: found.read_path,
                crate_id,
                file,
                bytes: found.bytes,
                walk_drop: found.walk_drop,
            });
            spinner.inc(1);
        }
    }
    spinner.finish_and_clear();
    candidates
}

/// What the walk makes of one entry, before the crate is resolved.
struct Found {
    path: PathBuf,
    read_path: PathBuf,
    bytes: u64,
    walk_drop: Option<(DropReason, String)>,
}

/// Resolves the symlink at `link` by the rules of [`walk`]; `None` when it is not a candidate
/// (a directory inside the inputs, or something that is not a file).
fn follow_link(link: &Path, roots: &[PathBuf], out: &Path) -> Option<Found> {
    let found = |read_path: PathBuf, bytes, walk_drop| Found {
        path: link.to_path_buf(),
        read_path,
        bytes,
        walk_drop,
    };
    let target = match fs::canonicalize(link) {
        Ok(t) => t,
        Err(e) => {
            let detail = format!("symlink does not resolve: {e}");
            return Some(found(link.to_path_buf(), 0, Some((DropReason::Unreadable, detail))));
        }
    };
    let inside = roots.iter().any(|r| target.starts_with(r)) && !target.starts_with(out);
    if !inside {
        let detail = format!("points to {}", path_text(&target));
        return Some(found(target, 0, Some((DropReason::SymlinkOutside, detail))));
    }
    match fs::metadata(&target) {
        Ok(m) if m.is_file() => Some(found(target, m.len(), None)),
        Ok(_) => None,
        Err(e) => Some(found(target, 0, Some((DropReason::Unreadable, e.to_string())))),
    }
}

/// Directories never searched: version control, Cargo build output (marked by `CACHEDIR.TAG`,
/// full of generated code) and the output directory itself.
fn skip_dir(entry: &walkdir::DirEntry, out: &Path) -> bool {
    if !entry.file_type().is_dir() {
        return false;
    }
    let name = entry.file_name().to_string_lossy();
    name == ".git" || entry.path() == out || entry.path().join("CACHEDIR.TAG").is_file()
}
