//! Shared helpers: the fixture corpus, its config and a pipeline run into a temp dir.

use std::fs;
use std::path::{Path, PathBuf};

use m31r_train::corpus::{CorpusOptions, build_corpus};
use m31r_train::shards::{PrepareOptions, prepare};
use m31r_train::tok::{TokenizerOptions, train_tokenizer};
use m31r_train::{DataConfig, DatasetInfo, Progress, ShardIndex, TokenizerReport};
use tempfile::TempDir;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// The fake registry: several crates laid out as `index.*/<name>-<version>/`.
pub fn registry() -> PathBuf {
    fixtures().join("registry")
}

/// A user's checkout identified by its `Cargo.toml`, with a Cargo `target/` to skip.
pub fn workspace() -> PathBuf {
    fixtures().join("workspace")
}

pub fn config() -> DataConfig {
    DataConfig::from_file(&fixtures().join("test.toml")).expect("fixture config parses")
}

pub fn corpus_options(inputs: &[&Path], out: &Path) -> CorpusOptions {
    let config = config();
    CorpusOptions {
        inputs: inputs.iter().map(|p| p.to_path_buf()).collect(),
        out: out.to_path_buf(),
        corpus: config.corpus,
        split: config.split,
        force: false,
        progress: Progress::hidden(),
    }
}

/// Runs `corpus` on the fixture (registry and workspace) into `out`.
pub fn fixture_corpus(out: &Path) -> DatasetInfo {
    build_corpus(&corpus_options(&[&registry(), &workspace()], out)).expect("corpus on the fixture")
}

pub fn run_tokenizer(data: &Path) -> TokenizerReport {
    let config = config();
    train_tokenizer(&TokenizerOptions {
        data: data.to_path_buf(),
        vocab_size: config.vocab_size().unwrap(),
        max_train_bytes: config.tokenizer.max_train_bytes,
        progress: Progress::hidden(),
    })
    .expect("tokenizer on the fixture")
}

pub fn run_prepare(data: &Path) -> Result<ShardIndex, m31r_train::Error> {
    prepare(&PrepareOptions {
        data: data.to_path_buf(),
        shard_tokens: config().shards.shard_tokens,
        progress: Progress::hidden(),
    })
}

/// A temp dir holding a data directory with all three stages run on the fixture.
pub struct Pipeline {
    pub tmp: TempDir,
    pub info: DatasetInfo,
    pub report: TokenizerReport,
    pub index: ShardIndex,
}

impl Pipeline {
    pub fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }
}

pub fn pipeline() -> Pipeline {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    let info = fixture_corpus(&data);
    let report = run_tokenizer(&data);
    let index = run_prepare(&data).expect("prepare on the fixture");
    Pipeline { tmp, info, report, index }
}

/// Copies a directory tree (files and directories only).
pub fn copy_tree(src: &Path, dst: &Path) {
    for entry in walkdir::WalkDir::new(src) {
        let entry = entry.unwrap();
        let target = dst.join(entry.path().strip_prefix(src).unwrap());
        if entry.file_type().is_dir() {
            fs::create_dir_all(&target).unwrap();
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}
