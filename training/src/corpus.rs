//! The `corpus` stage: walks directories of Rust code, filters and deduplicates files, splits
//! them by crate and writes the data directory's `manifest.jsonl`, `documents.bin` and
//! `dataset.json`; and [`Corpus`], which reads them back for the later stages.
//!
//! The kept texts are copied into `documents.bin` (concatenated in manifest order) rather than
//! referenced by path. That costs disk space equal to the kept text, and buys a data directory
//! that is self-contained and reproducible: Cargo garbage-collects `registry/src`, users edit
//! their checkouts, and a dataset id must keep naming the same bytes regardless. Every document's
//! sha256 is checked again when a later stage reads it, so a damaged `documents.bin` is an error
//! naming the document, never silently different data.
//!
//! `dataset.json` is written last and names the dataset id; a directory without it is not a
//! finished corpus.

mod walk;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::{CorpusConfig, SplitConfig};
use crate::crates::Version;
use crate::error::{Error, Result, check_format, invalid, io_err, require_stage};
use crate::filters::{self, DropReason};
pub use crate::fsutil::path_text;
use crate::fsutil::{AtomicFile, TEMP_PREFIX, read_json, sha256_hex, write_atomic, write_json};
use crate::progress::Progress;
use crate::split::{self, Split};
use walk::{Candidate, walk};

/// Every file seen, one JSON object per line, in manifest order.
pub const MANIFEST_FILE: &str = "manifest.jsonl";
/// The kept texts, concatenated in manifest order.
pub const DOCUMENTS_FILE: &str = "documents.bin";
/// Dataset id, statistics and the settings that produced them; written last.
pub const DATASET_FILE: &str = "dataset.json";
/// Version of the data directory layout.
pub const FORMAT_VERSION: u32 = 1;
/// Files of later stages, removed when `--force` replaces the dataset they were built from.
const DOWNSTREAM: [&str; 3] = ["tokenizer.json", "tokenizer-report.json", "shards"];

/// One line of `manifest.jsonl`: a file seen in the inputs, kept (with a split and an offset
/// into `documents.bin`) or dropped (with a reason).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Where the file was found.
    pub path: String,
    /// The crate it belongs to.
    #[serde(rename = "crate")]
    pub crate_name: String,
    /// The crate's version.
    pub version: String,
    /// The file's path inside its crate, `/`-separated.
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256 of the content, for every file that was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The split of a kept file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    /// Byte offset of a kept file's text in `documents.bin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Why a dropped file was dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropReason>,
    /// More about the drop (the I/O error of an unreadable file, the first copy of a duplicate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ManifestEntry {
    /// The part of a kept entry that defines the dataset: where the text sits in the corpus
    /// and what it is, but not where it was read from, so moving a checkout keeps the id.
    fn id_line(&self) -> String {
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\n",
            self.crate_name,
            self.version,
            self.file,
            self.sha256.as_deref().unwrap_or(""),
            self.bytes,
            self.split.map_or("", Split::as_str),
        )
    }
}

/// Files and bytes of one split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitStats {
    /// Crates in the split.
    pub crates: u64,
    /// Files kept.
    pub files: u64,
    /// Bytes kept.
    pub bytes: u64,
}

/// Files and bytes dropped for one reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropStats {
    /// Files dropped.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// `dataset.json`: the dataset id, what went in and what came out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetInfo {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// sha256 of the kept manifest entries (crate, version, file, sha256, bytes, split).
    pub dataset_id: String,
    /// The input directories.
    pub inputs: Vec<String>,
    /// The filter settings used.
    pub corpus: CorpusConfig,
    /// The split settings used.
    pub split: SplitConfig,
    /// Files seen in the inputs.
    pub files_seen: u64,
    /// Size of `documents.bin`.
    pub documents_bytes: u64,
    /// Kept files per split.
    pub splits: BTreeMap<Split, SplitStats>,
    /// Dropped files per reason.
    pub dropped: BTreeMap<DropReason, DropStats>,
}

impl DatasetInfo {
    /// The end-of-stage summary table.
    pub fn table(&self) -> String {
        let mut out = format!("dataset {}\n", self.dataset_id);
        out += &format!("{:<15} {:>8} {:>10} {:>14}\n", "split", "crates", "files", "bytes");
        for split in Split::ALL {
            let s = self.splits.get(&split).copied().unwrap_or_default();
            out += &format!("{:<15} {:>8} {:>10} {:>14}\n", split, s.crates, s.files, s.bytes);
        }
        out += &format!("{:<15} {:>8} {:>10} {:>14}\n", "dropped", "", "files", "bytes");
        for reason in DropReason::ALL {
            let d = self.dropped.get(&reason).copied().unwrap_or_default();
            out += &format!("{:<15} {:>8} {:>10} {:>14}\n", reason, "", d.files, d.bytes);
        }
        out += &format!("{:<15} {:>8} {:>10}\n", "files seen", "", self.files_seen);
        out
    }
}

/// What the `corpus` stage reads and where it writes.
#[derive(Debug, Clone)]
pub struct CorpusOptions {
    /// Directories of Rust code.
    pub inputs: Vec<PathBuf>,
    /// The data directory to write.
    pub out: PathBuf,
    /// Filter thresholds.
    pub corpus: CorpusConfig,
    /// Split ratios.
    pub split: SplitConfig,
    /// Replace a data directory that holds another dataset.
    pub force: bool,
    /// Progress bars.
    pub progress: Progress,
}

/// `$CARGO_HOME/registry/src` (default `~/.cargo/registry/src`), where Cargo unpacks crates.
pub fn default_registry_src() -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(cargo_home.join("registry").join("src"))
}

/// What reading and filtering a candidate gave.
enum Outcome {
    Drop { reason: DropReason, sha256: Option<String>, detail: Option<String> },
    Keep { text: String, sha256: String },
}

/// Runs the `corpus` stage.
pub fn build_corpus(opts: &CorpusOptions) -> Result<DatasetInfo> {
    if opts.inputs.is_empty() {
        return Err(Error::EmptyCorpus {
            inputs: "(none)".into(),
            reason: "no input directory given".into(),
        });
    }
    let mut roots = Vec::with_capacity(opts.inputs.len());
    for input in &opts.inputs {
        if !input.is_dir() {
            return Err(Error::MissingInput { path: input.clone() });
        }
        roots.push(fs::canonicalize(input).map_err(io_err(input))?);
    }
    let inputs_text = opts.inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>();
    check_out_dir(&opts.out, opts.force)?;
    fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
    let out = fs::canonicalize(&opts.out).map_err(io_err(&opts.out))?;

    let mut candidates = walk(&roots, &out, opts.progress);
    if candidates.is_empty() {
        return Err(Error::EmptyCorpus {
            inputs: inputs_text.join(", "),
            reason: "the directories contain no files".into(),
        });
    }
    // Manifest order: by crate, version, file; independent of input order and of the walk.
    candidates
        .sort_by(|a, b| (&a.crate_id, &a.file, &a.path).cmp(&(&b.crate_id, &b.file, &b.path)));
    let mut newest: HashMap<&str, &Version> = HashMap::new();
    for c in &candidates {
        let v = newest.entry(c.crate_id.name.as_str()).or_insert(&c.crate_id.version);
        if c.crate_id.version > **v {
            *v = &c.crate_id.version;
        }
    }

    let mut documents = AtomicFile::create(&out.join(DOCUMENTS_FILE))?;
    let mut entries = Vec::with_capacity(candidates.len());
    let mut first_copy: HashMap<String, usize> = HashMap::new();
    let bar = opts.progress.bar(candidates.len() as u64, "corpus");
    // Chunks bound the texts held in memory while files are read and filtered in parallel.
    for chunk in candidates.chunks(1024) {
        let outcomes: Vec<Outcome> = chunk
            .par_iter()
            .map(|c| {
                let is_newest =
                    newest.get(c.crate_id.name.as_str()).is_none_or(|v| **v == c.crate_id.version);
                examine(c, is_newest, &opts.corpus)
            })
            .collect();
        for (c, outcome) in chunk.iter().zip(outcomes) {
            let mut entry = ManifestEntry {
                path: path_text(&c.path),
                crate_name: c.crate_id.name.clone(),
                version: c.crate_id.version.to_string(),
                file: c.file.clone(),
                bytes: c.bytes,
                sha256: None,
                split: None,
                offset: None,
                drop: None,
                detail: None,
            };
            match outcome {
                Outcome::Drop { reason, sha256, detail } => {
                    entry.drop = Some(reason);
                    entry.sha256 = sha256;
                    entry.detail = detail;
                }
                Outcome::Keep { text, sha256 } => {
                    entry.bytes = text.len() as u64;
                    if let Some(&first) = first_copy.get(&sha256) {
                        let original: &ManifestEntry = &entries[first];
                        entry.drop = Some(DropReason::Duplicate);
                        entry.detail = Some(format!("{} {}", original.crate_name, original.file));
                    } else {
                        first_copy.insert(sha256.clone(), entries.len());
                        entry.offset = Some(documents.len());
                        documents
                            .write_all(text.as_bytes())
                            .map_err(io_err(out.join(DOCUMENTS_FILE)))?;
                    }
                    entry.sha256 = Some(sha256);
                }
            }
            entries.push(entry);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();

    let kept_crates: Vec<&str> = {
        let mut names: Vec<&str> =
            entries.iter().filter(|e| e.drop.is_none()).map(|e| e.crate_name.as_str()).collect();
        names.dedup();
        names
    };
    if kept_crates.is_empty() {
        let mut reasons: BTreeMap<DropReason, u64> = BTreeMap::new();
        for e in &entries {
            if let Some(r) = e.drop {
                *reasons.entry(r).or_default() += 1;
            }
        }
        let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        return Err(Error::EmptyCorpus {
            inputs: inputs_text.join(", "),
            reason: format!("{} files seen, all dropped ({})", entries.len(), reasons.join(", ")),
        });
    }
    let splits = split::assign(kept_crates.iter().copied(), &opts.split);
    for e in entries.iter_mut().filter(|e| e.drop.is_none()) {
        e.split = splits.get(&e.crate_name).copied();
    }

    let info = DatasetInfo {
        format: FORMAT_VERSION,
        dataset_id: dataset_id(&entries),
        inputs: inputs_text,
        corpus: opts.corpus.clone(),
        split: opts.split.clone(),
        files_seen: entries.len() as u64,
        documents_bytes: documents.len(),
        splits: split_stats(&entries),
        dropped: drop_stats(&entries),
    };
    claim_out_dir(&out, &info.dataset_id, opts.force)?;
    documents.commit()?;
    let mut manifest = String::new();
    for e in &entries {
        manifest += &serde_json::to_string(e)
            .map_err(|e| invalid(out.join(MANIFEST_FILE), e.to_string()))?;
        manifest.push('\n');
    }
    write_atomic(&out.join(MANIFEST_FILE), manifest.as_bytes())?;
    write_json(&out.join(DATASET_FILE), &info)?;
    Ok(info)
}

/// The dataset id of a manifest: sha256 of the id lines of its kept entries, in order.
pub fn dataset_id(entries: &[ManifestEntry]) -> String {
    let text: String =
        entries.iter().filter(|e| e.split.is_some()).map(ManifestEntry::id_line).collect();
    sha256_hex(text.as_bytes())
}

fn split_stats(entries: &[ManifestEntry]) -> BTreeMap<Split, SplitStats> {
    let mut out: BTreeMap<Split, SplitStats> =
        Split::ALL.iter().map(|&s| (s, SplitStats::default())).collect();
    let mut crates: HashSet<(&str, Split)> = HashSet::new();
    for e in entries {
        if let Some(split) = e.split {
            let s = out.entry(split).or_default();
            s.files += 1;
            s.bytes += e.bytes;
            if crates.insert((&e.crate_name, split)) {
                s.crates += 1;
            }
        }
    }
    out
}

fn drop_stats(entries: &[ManifestEntry]) -> BTreeMap<DropReason, DropStats> {
    let mut out: BTreeMap<DropReason, DropStats> =
        DropReason::ALL.iter().map(|&r| (r, DropStats::default())).collect();
    for e in entries {
        if let Some(reason) = e.drop {
            let d = out.entry(reason).or_default();
            d.files += 1;
            d.bytes += e.bytes;
        }
    }
    out
}

/// Refuses, before any work, an output directory that holds something other than a dataset.
fn check_out_dir(out: &Path, force: bool) -> Result<()> {
    if force || !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(Error::WouldOverwrite {
            path: out.to_path_buf(),
            reason: "exists and is not a directory".into(),
        });
    }
    let has_dataset = out.join(DATASET_FILE).is_file();
    let empty = fs::read_dir(out).map_err(io_err(out))?.next().is_none();
    if !has_dataset && !empty {
        return Err(Error::WouldOverwrite {
            path: out.to_path_buf(),
            reason: format!(
                "is not empty and holds no {DATASET_FILE}, so it is not an m31r data directory"
            ),
        });
    }
    Ok(())
}

/// Once the new dataset id is known: refuses to replace another dataset without `force`, and
/// removes what was derived from a replaced one. The old `dataset.json` is gone before the new
/// files are renamed in, so an interrupted rewrite leaves a directory no stage takes as complete.
fn claim_out_dir(out: &Path, dataset_id: &str, force: bool) -> Result<()> {
    let dataset_path = out.join(DATASET_FILE);
    if !dataset_path.exists() {
        return Ok(());
    }
    let old = read_json::<DatasetInfo>(&dataset_path).map(|i| i.dataset_id).ok();
    if old.as_deref() == Some(dataset_id) {
        return Ok(());
    }
    if !force {
        return Err(Error::WouldOverwrite {
            path: out.to_path_buf(),
            reason: format!(
                "holds dataset {} but these inputs give dataset {dataset_id}",
                old.as_deref().unwrap_or("(unreadable dataset.json)")
            ),
        });
    }
    // Derived files go before dataset.json: a crash in between leaves the old dataset whole.
    for name in DOWNSTREAM {
        let path = out.join(name);
        if path.is_dir() {
            fs::remove_dir_all(&path).map_err(io_err(&path))?;
        } else if path.exists() {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    fs::remove_file(&dataset_path).map_err(io_err(&dataset_path))?;
    Ok(())
}

/// Reads and filters one candidate.
fn examine(c: &Candidate, is_newest: bool, config: &CorpusConfig) -> Outcome {
    let drop = |reason, sha256, detail| Outcome::Drop { reason, sha256, detail };
    if let Some((reason, detail)) = &c.walk_drop {
        return drop(*reason, None, Some(detail.clone()));
    }
    if c.path.extension().is_none_or(|e| e != "rs") {
        return drop(DropReason::NotRust, None, None);
    }
    if !is_newest {
        return drop(DropReason::OldVersion, None, None);
    }
    if c.bytes > config.max_file_bytes {
        return drop(DropReason::HugeFile, None, None);
    }
    let bytes = match fs::read(&c.read_path) {
        Ok(b) => b,
        Err(e) => return drop(DropReason::Unreadable, None, Some(e.to_string())),
    };
    // The size may have changed since the walk.
    if bytes.len() as u64 > config.max_file_bytes {
        return drop(DropReason::HugeFile, None, None);
    }
    let sha256 = sha256_hex(&bytes);
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let detail = format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to());
            return drop(DropReason::NonUtf8, Some(sha256), Some(detail));
        }
    };
    match filters::check_text(&text, &c.crate_id.name, config) {
        Some(reason) => drop(reason, Some(sha256), None),
        None => Outcome::Keep { text, sha256 },
    }
}

/// A finished corpus, read back from a data directory.
pub struct Corpus {
    dir: PathBuf,
    info: DatasetInfo,
    entries: Vec<ManifestEntry>,
    documents: Option<Mmap>,
}

impl std::fmt::Debug for Corpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Corpus")
            .field("dir", &self.dir)
            .field("dataset_id", &self.info.dataset_id)
            .finish()
    }
}

impl Corpus {
    /// Opens the corpus in `dir`, checking that the manifest matches the dataset id.
    pub fn open(dir: &Path) -> Result<Self> {
        let dataset_path = dir.join(DATASET_FILE);
        require_stage(&dataset_path, dir, DATASET_FILE, "corpus")?;
        let info: DatasetInfo = read_json(&dataset_path)?;
        check_format(&dataset_path, info.format, FORMAT_VERSION)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&manifest_path).map_err(io_err(&manifest_path))?;
        let entries = text
            .lines()
            .enumerate()
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .map_err(|e| invalid(&manifest_path, format!("line {}: {e}", i + 1)))
            })
            .collect::<Result<Vec<ManifestEntry>>>()?;
        if dataset_id(&entries) != info.dataset_id {
            return Err(invalid(
                &manifest_path,
                format!("does not match dataset {} in {DATASET_FILE}", info.dataset_id),
            ));
        }
        let documents_path = dir.join(DOCUMENTS_FILE);
        let file = fs::File::open(&documents_path).map_err(io_err(&documents_path))?;
        let len = file.metadata().map_err(io_err(&documents_path))?.len();
        if len != info.documents_bytes {
            return Err(invalid(
                &documents_path,
                format!("is {len} bytes, {DATASET_FILE} says {}", info.documents_bytes),
            ));
        }
        let documents = if len == 0 {
            None
        } else {
            // SAFETY: the pipeline never writes documents.bin in place (it is replaced by
            // rename), so the mapped file does not change under us; every document read
            // through the map is checked against its sha256 anyway.
            Some(unsafe { Mmap::map(&file) }.map_err(io_err(&documents_path))?)
        };
        Ok(Self { dir: dir.to_path_buf(), info, entries, documents })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `dataset.json`.
    pub fn info(&self) -> &DatasetInfo {
        &self.info
    }

    /// Every manifest entry, in manifest order.
    pub fn entries(&self) -> &[ManifestEntry] {
        &self.entries
    }

    /// The kept entries of `split`, in manifest order.
    pub fn documents(&self, split: Split) -> impl Iterator<Item = &ManifestEntry> {
        self.entries.iter().filter(move |e| e.split == Some(split))
    }

    /// The text of a kept entry, checked against its sha256.
    pub fn text(&self, entry: &ManifestEntry) -> Result<&str> {
        let path = self.dir.join(DOCUMENTS_FILE);
        let what = || format!("{} {}", entry.crate_name, entry.file);
        let (Some(offset), Some(sha)) = (entry.offset, entry.sha256.as_deref()) else {
            return Err(invalid(&path, format!("{} is not a kept document", what())));
        };
        let data: &[u8] = self.documents.as_deref().unwrap_or(&[]);
        let end = offset.checked_add(entry.bytes).filter(|&e| e <= data.len() as u64);
        let Some(end) = end else {
            return Err(invalid(&path, format!("document {} lies outside the file", what())));
        };
        let bytes = &data[offset as usize..end as usize];
        if sha256_hex(bytes) != sha {
            return Err(invalid(
                &path,
                format!("document {} does not match its sha256 {sha}", what()),
            ));
        }
        std::str::from_utf8(bytes).map_err(|e| invalid(&path, format!("document {}: {e}", what())))
    }
}

/// Whether `name` is a temporary file of an unfinished write.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}
