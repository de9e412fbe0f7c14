//! The `prepare` stage and its reader: every split tokenized into packed shard files of raw
//! little-endian ids, with an `index.json` that training samples from without reading the
//! shards, and [`ShardSet`], the memory-mapped reader.
//!
//! Layout of `<data>/shards/`: `<split>-NNNNN.bin` holds the split's documents in manifest
//! order, each followed by `<|endoftext|>`; documents never straddle shards. `<split>.offsets`
//! holds `documents + 1` little-endian `u64`s: the position of each document's first token in
//! the split's token stream (its shards concatenated), then the stream's length. `index.json`
//! records every file with its sha256 and is written last: a shard without an index entry, or
//! whose size or hash does not match it, is never used.

use std::collections::BTreeMap;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::corpus::{Corpus, DATASET_FILE, DatasetInfo};
use crate::error::{Result, check_format, invalid, io_err, require_stage};
use crate::fsutil::{AtomicFile, read_json, sha256_hex, write_atomic, write_json};
use crate::progress::Progress;
use crate::split::Split;
use crate::tok::load_tokenizer;

/// Folder of the shards inside the data directory.
pub const SHARDS_DIR: &str = "shards";
/// The shard index, written last.
pub const INDEX_FILE: &str = "index.json";
/// Version of the shard layout.
pub const FORMAT_VERSION: u32 = 1;

/// Width of a stored token id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// Little-endian `u16`: vocabularies up to 65 536 ids.
    U16,
    /// Little-endian `u32`.
    U32,
}

impl Dtype {
    /// The narrowest type that holds every id of a `vocab_size` vocabulary.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 { Dtype::U16 } else { Dtype::U32 }
    }

    /// Bytes per token.
    pub const fn size(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
}

/// `index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardIndex {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// The corpus the shards were built from.
    pub dataset_id: String,
    /// sha256 of the `tokenizer.json` that encoded them.
    pub tokenizer_id: String,
    /// The tokenizer's vocabulary size.
    pub vocab_size: usize,
    /// Id of `<|endoftext|>`, the document separator.
    pub end_of_text: u32,
    /// Width of the stored ids.
    pub dtype: Dtype,
    /// Per split.
    pub splits: BTreeMap<Split, SplitIndex>,
}

/// One split in `index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitIndex {
    /// Documents.
    pub documents: u64,
    /// Tokens, separators included.
    pub tokens: u64,
    /// Source bytes of the documents.
    pub source_bytes: u64,
    /// The shard files, in stream order.
    pub shards: Vec<ShardEntry>,
    /// The document offsets file.
    pub offsets: FileEntry,
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// File name inside `shards/`.
    pub file: String,
    /// Tokens in it.
    pub tokens: u64,
    /// Documents in it.
    pub documents: u64,
    /// sha256 of its bytes.
    pub sha256: String,
}

/// A file referenced by the index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// File name inside `shards/`.
    pub file: String,
    /// sha256 of its bytes.
    pub sha256: String,
}

impl ShardIndex {
    /// The end-of-stage summary table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "shards for dataset {} / tokenizer {} ({:?})\n",
            self.dataset_id, self.tokenizer_id, self.dtype
        );
        out += &format!(
            "{:<12} {:>10} {:>14} {:>8} {:>14} {:>8}\n",
            "split", "documents", "tokens", "shards", "source bytes", "B/token"
        );
        for (split, s) in &self.splits {
            let bpt = if s.tokens > 0 { s.source_bytes as f64 / s.tokens as f64 } else { 0.0 };
            out += &format!(
                "{:<12} {:>10} {:>14} {:>8} {:>14} {:>8.3}\n",
                split,
                s.documents,
                s.tokens,
                s.shards.len(),
                s.source_bytes,
                bpt
            );
        }
        out
    }
}

/// What the `prepare` stage needs.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// The data directory (corpus and tokenizer done).
    pub data: PathBuf,
    /// Shard size bound in tokens.
    pub shard_tokens: u64,
    /// Progress bars.
    pub progress: Progress,
}

/// Runs the `prepare` stage.
pub fn prepare(opts: &PrepareOptions) -> Result<ShardIndex> {
    let corpus = Corpus::open(&opts.data)?;
    let dataset_id = corpus.info().dataset_id.clone();
    let (tokenizer, tokenizer_id) = load_tokenizer(&opts.data, &dataset_id)?;
    let dtype = Dtype::for_vocab(tokenizer.vocab_size());
    let eot = tokenizer.special_ids().end_of_text;

    let dir = opts.data.join(SHARDS_DIR);
    clear_shards_dir(&dir)?;
    let mut splits = BTreeMap::new();
    for split in Split::ALL {
        let docs: Vec<_> = corpus.documents(split).collect();
        let source_bytes: u64 = docs.iter().map(|d| d.bytes).sum();
        let bar = opts.progress.bar(docs.len() as u64, split.as_str());
        let mut writer = ShardWriter::new(&dir, split, dtype, opts.shard_tokens);
        let mut offsets: Vec<u64> = Vec::with_capacity(docs.len() + 1);
        // Chunks bound the encoded documents held in memory; within one, documents are
        // encoded in parallel and written in manifest order.
        for chunk in docs.chunks(256) {
            let encoded = chunk
                .par_iter()
                .map(|d| Ok(tokenizer.encode(corpus.text(d)?)?))
                .collect::<Result<Vec<Vec<u32>>>>()?;
            for ids in encoded {
                offsets.push(writer.total_tokens());
                writer.push_document(&ids, eot)?;
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        offsets.push(writer.total_tokens());
        let (shards, tokens) = writer.finish()?;
        let offsets_name = format!("{split}.offsets");
        let bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        write_atomic(&dir.join(&offsets_name), &bytes)?;
        splits.insert(
            split,
            SplitIndex {
                documents: docs.len() as u64,
                tokens,
                source_bytes,
                shards,
                offsets: FileEntry { file: offsets_name, sha256: sha256_hex(&bytes) },
            },
        );
    }
    let index = ShardIndex {
        format: FORMAT_VERSION,
        dataset_id,
        tokenizer_id,
        vocab_size: tokenizer.vocab_size(),
        end_of_text: eot,
        dtype,
        splits,
    };
    write_json(&dir.join(INDEX_FILE), &index)?;
    Ok(index)
}

/// Empties the shard folder, index first, so that nothing of an older or interrupted run can
/// be read while this one writes.
fn clear_shards_dir(dir: &Path) -> Result<()> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        fs::remove_file(&index).map_err(io_err(&index))?;
    }
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(io_err(dir))?;
    }
    fs::create_dir_all(dir).map_err(io_err(dir))
}

/// Appends documents to the shards of one split, rolling to a new file at the size bound.
struct ShardWriter {
    dir: PathBuf,
    split: Split,
    dtype: Dtype,
    bound: u64,
    current: Option<(AtomicFile, String, u64, u64)>,
    done: Vec<ShardEntry>,
    total: u64,
}

impl ShardWriter {
    fn new(dir: &Path, split: Split, dtype: Dtype, bound: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            split,
            dtype,
            bound,
            current: None,
            done: Vec::new(),
            total: 0,
        }
    }

    fn total_tokens(&self) -> u64 {
        self.total
    }

    fn push_document(&mut self, ids: &[u32], eot: u32) -> Result<()> {
        let len = ids.len() as u64 + 1;
        if let Some((_, _, tokens, _)) = &self.current
            && *tokens > 0
            && tokens + len > self.bound
        {
            self.close()?;
        }
        let (file, name, tokens, docs) = match &mut self.current {
            Some(c) => c,
            None => {
                let name = format!("{}-{:05}.bin", self.split, self.done.len());
                let file = AtomicFile::create(&self.dir.join(&name))?;
                self.current.insert((file, name, 0, 0))
            }
        };
        let mut bytes = Vec::with_capacity(len as usize * self.dtype.size());
        for &id in ids.iter().chain([eot].iter()) {
            match self.dtype {
                Dtype::U16 => {
                    let id = u16::try_from(id).map_err(|_| {
                        invalid(self.dir.join(&*name), format!("token id {id} does not fit in u16"))
                    })?;
                    bytes.extend_from_slice(&id.to_le_bytes());
                }
                Dtype::U32 => bytes.extend_from_slice(&id.to_le_bytes()),
            }
        }
        file.write_all(&bytes).map_err(io_err(self.dir.join(&*name)))?;
        *tokens += len;
        *docs += 1;
        self.total += len;
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some((file, name, tokens, documents)) = self.current.take() {
            let sha256 = file.commit()?;
            self.done.push(ShardEntry { file: name, tokens, documents, sha256 });
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(Vec<ShardEntry>, u64)> {
        self.close()?;
        Ok((self.done, self.total))
    }
}

/// The shards of one split, memory-mapped and verified against `index.json`.
pub struct ShardSet {
    split: Split,
    dtype: Dtype,
    end_of_text: u32,
    tokenizer_id: String,
    dataset_id: String,
    /// Each shard's map and its first position in the split's stream.
    shards: Vec<(Option<Mmap>, u64)>,
    offsets: Vec<u64>,
}

impl std::fmt::Debug for ShardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSet")
            .field("split", &self.split)
            .field("dtype", &self.dtype)
            .field("shards", &self.shards.len())
            .field("documents", &self.num_documents())
            .field("tokens", &self.len())
            .finish()
    }
}

impl ShardSet {
    /// Opens the `split` shards of data directory `data`. Fails, naming the file, unless
    /// `index.json` exists and matches the current dataset and tokenizer, and every shard and
    /// the offsets file match their size and sha256 in it.
    pub fn open(data: &Path, split: Split) -> Result<Self> {
        let dir = data.join(SHARDS_DIR);
        let index_path = dir.join(INDEX_FILE);
        require_stage(&index_path, data, "shards/index.json", "prepare")?;
        let index: ShardIndex = read_json(&index_path)?;
        check_format(&index_path, index.format, FORMAT_VERSION)?;
        let dataset: DatasetInfo = read_json(&data.join(DATASET_FILE))?;
        let tokenizer_path = data.join(crate::tok::TOKENIZER_FILE);
        let tokenizer_id = sha256_hex(&fs::read(&tokenizer_path).map_err(io_err(&tokenizer_path))?);
        if index.dataset_id != dataset.dataset_id || index.tokenizer_id != tokenizer_id {
            return Err(invalid(
                &index_path,
                "was built from another dataset or tokenizer; rerun `m31r-train prepare`",
            ));
        }
        let Some(entry) = index.splits.get(&split) else {
            return Err(invalid(&index_path, format!("has no {split} split")));
        };
        let mut shards = Vec::with_capacity(entry.shards.len());
        let mut start = 0u64;
        for shard in &entry.shards {
            let path = dir.join(&shard.file);
            let map = map_verified(&path, shard.tokens * index.dtype.size() as u64, &shard.sha256)?;
            shards.push((map, start));
            start += shard.tokens;
        }
        if start != entry.tokens {
            return Err(invalid(
                &index_path,
                format!("{split} shards hold {start} tokens, not {}", entry.tokens),
            ));
        }
        let offsets_path = dir.join(&entry.offsets.file);
        let raw = fs::read(&offsets_path).map_err(io_err(&offsets_path))?;
        if sha256_hex(&raw) != entry.offsets.sha256 {
            return Err(invalid(&offsets_path, "does not match its sha256 in index.json"));
        }
        let offsets: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let consistent = offsets.len() as u64 == entry.documents + 1
            && offsets.windows(2).all(|w| w[0] < w[1])
            && offsets.last() == Some(&entry.tokens);
        if !consistent {
            return Err(invalid(&offsets_path, "offsets do not describe the split's documents"));
        }
        Ok(Self {
            split,
            dtype: index.dtype,
            end_of_text: index.end_of_text,
            tokenizer_id: index.tokenizer_id,
            dataset_id: index.dataset_id,
            shards,
            offsets,
        })
    }

    /// The split.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Width of the stored ids.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The document separator id.
    pub fn end_of_text(&self) -> u32 {
        self.end_of_text
    }

    /// sha256 of the tokenizer that encoded the shards.
    pub fn tokenizer_id(&self) -> &str {
        &self.tokenizer_id
    }

    /// The dataset the shards were built from.
    pub fn dataset_id(&self) -> &str {
        &self.dataset_id
    }

    /// Tokens in the split, separators included.
    pub fn len(&self) -> u64 {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Whether the split holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of documents.
    pub fn num_documents(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Tokens `range` of the split's stream (clamped to its end). A range may span shards.
    pub fn tokens(&self, range: Range<u64>) -> Vec<u32> {
        let end = range.end.min(self.len());
        let mut out = Vec::with_capacity(end.saturating_sub(range.start) as usize);
        let mut pos = range.start;
        while pos < end {
            let shard = self.shards.partition_point(|&(_, start)| start <= pos) - 1;
            let (map, start) = &self.shards[shard];
            let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
            let shard_end = start + (bytes.len() / self.dtype.size()) as u64;
            let stop = end.min(shard_end);
            let size = self.dtype.size();
            let slice = &bytes[((pos - start) as usize) * size..((stop - start) as usize) * size];
            match self.dtype {
                Dtype::U16 => out.extend(
                    slice.chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))),
                ),
                Dtype::U32 => out.extend(
                    slice.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
            }
            pos = stop;
        }
        out
    }

    /// Token range of document `i` in the stream, without its separator.
    pub fn document_range(&self, i: usize) -> Option<Range<u64>> {
        let start = *self.offsets.get(i)?;
        let next = *self.offsets.get(i + 1)?;
        Some(start..next - 1)
    }

    /// The ids of document `i`, without its separator.
    pub fn document(&self, i: usize) -> Option<Vec<u32>> {
        self.document_range(i).map(|r| self.tokens(r))
    }

    /// Every document's ids, in manifest order.
    pub fn documents(&self) -> impl Iterator<Item = Vec<u32>> + '_ {
        (0..self.num_documents()).filter_map(|i| self.document(i))
    }
}

/// Maps a shard after checking its size and sha256.
fn map_verified(path: &Path, expected_len: u64, sha256: &str) -> Result<Option<Mmap>> {
    let file = fs::File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    if len != expected_len {
        return Err(invalid(path, format!("is {len} bytes, index.json says {expected_len}")));
    }
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: shards are written under a temporary name and renamed into place, never modified
    // afterwards; `prepare` replaces the whole folder. The content is hashed right here.
    let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    if sha256_hex(&map) != sha256 {
        return Err(invalid(path, "does not match its sha256 in index.json"));
    }
    Ok(Some(map))
}
