//! `m31r-train` library: the training pipeline stages, usable from tests.
//!
//! The data stages run in order on one data directory:
//! [`corpus::build_corpus`] (`manifest.jsonl`, `documents.bin`, `dataset.json`),
//! [`tok::train_tokenizer`] (`tokenizer.json`, `tokenizer-report.json`) and
//! [`shards::prepare`] (`shards/`), read back by [`shards::ShardSet`].

pub mod budget;
pub mod config;
pub mod corpus;
pub mod crates;
pub mod error;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod filters;
pub mod fsutil;
pub mod params;
pub mod progress;
pub mod quickstart;
pub mod report;
pub mod shards;
pub mod split;
pub mod tok;
pub mod train;

pub use config::DataConfig;
pub use corpus::{Corpus, CorpusOptions, DatasetInfo, ManifestEntry, build_corpus};
pub use error::Error;
pub use filters::DropReason;
pub use progress::{LogTicker, Progress};
pub use shards::{Dtype, PrepareOptions, ShardIndex, ShardSet, prepare};
pub use split::Split;
pub use tok::{TokenizerOptions, TokenizerReport, train_tokenizer};
