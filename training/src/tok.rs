//! The `tokenizer` stage: trains the byte-level BPE on the train split only, writes
//! `tokenizer.json` and reports bytes/token on the validation split.

use std::path::{Path, PathBuf};

use m31r_model::tokenizer::Tokenizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::corpus::{Corpus, ManifestEntry};
use crate::error::{Result, require_stage};
use crate::fsutil::{read_json, sha256_hex, write_atomic, write_json};
use crate::progress::Progress;
use crate::split::Split;

/// The trained tokenizer, in the `tokenizers` crate format.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// What the tokenizer was trained on and how well it compresses held-out text.
pub const REPORT_FILE: &str = "tokenizer-report.json";

/// `tokenizer-report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerReport {
    /// sha256 of `tokenizer.json`.
    pub tokenizer_id: String,
    /// The dataset whose train split it was trained on.
    pub dataset_id: String,
    /// Vocabulary size asked for.
    pub vocab_size_requested: usize,
    /// Vocabulary size obtained (smaller when the corpus has too few distinct pairs).
    pub vocab_size: usize,
    /// Train documents the trainer saw.
    pub train_documents: u64,
    /// Their bytes.
    pub train_bytes: u64,
    /// Validation documents encoded for the report.
    pub validation_documents: u64,
    /// Their bytes.
    pub validation_bytes: u64,
    /// Their tokens.
    pub validation_tokens: u64,
    /// `validation_bytes / validation_tokens`; absent without validation text.
    pub validation_bytes_per_token: Option<f64>,
}

impl TokenizerReport {
    /// The end-of-stage summary table.
    pub fn table(&self) -> String {
        let bpt = self.validation_bytes_per_token.map_or("-".to_owned(), |b| format!("{b:.3}"));
        format!(
            "tokenizer {}\n\
             vocab size           {} (asked {})\n\
             trained on           {} train documents, {} bytes\n\
             validation           {} documents, {} bytes, {} tokens\n\
             bytes/token (valid.) {bpt}\n",
            self.tokenizer_id,
            self.vocab_size,
            self.vocab_size_requested,
            self.train_documents,
            self.train_bytes,
            self.validation_documents,
            self.validation_bytes,
            self.validation_tokens,
        )
    }
}

/// What the `tokenizer` stage needs.
#[derive(Debug, Clone)]
pub struct TokenizerOptions {
    /// The data directory (a finished corpus).
    pub data: PathBuf,
    /// Vocabulary size, special tokens included.
    pub vocab_size: usize,
    /// Cap on the train bytes the trainer sees.
    pub max_train_bytes: u64,
    /// Progress bars.
    pub progress: Progress,
}

/// The train-split documents the trainer sees: ordered by sha256 (a deterministic sample that
/// does not favour crates early in the alphabet) and cut at `max_train_bytes`. Validation and
/// test documents are never among them.
pub fn training_documents(corpus: &Corpus, max_train_bytes: u64) -> Vec<&ManifestEntry> {
    let mut docs: Vec<&ManifestEntry> = corpus.documents(Split::Train).collect();
    docs.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    let mut total = 0u64;
    docs.into_iter()
        .take_while(|d| {
            total += d.bytes;
            total <= max_train_bytes
        })
        .collect()
}

/// Runs the `tokenizer` stage.
pub fn train_tokenizer(opts: &TokenizerOptions) -> Result<TokenizerReport> {
    let corpus = Corpus::open(&opts.data)?;
    let docs = training_documents(&corpus, opts.max_train_bytes);
    let texts = docs.iter().map(|d| corpus.text(d)).collect::<Result<Vec<&str>>>()?;
    let train_bytes: u64 = texts.iter().map(|t| t.len() as u64).sum();

    let spinner = opts.progress.spinner("training");
    spinner.set_message(format!("BPE on {} documents, {train_bytes} bytes", texts.len()));
    let tokenizer = Tokenizer::train(texts.into_iter(), opts.vocab_size)?;
    spinner.finish_and_clear();
    let json = tokenizer.to_json()?;

    let validation: Vec<&ManifestEntry> = corpus.documents(Split::Validation).collect();
    let bar = opts.progress.bar(validation.len() as u64, "validation");
    let counts = validation
        .par_iter()
        .map(|d| {
            let text = corpus.text(d)?;
            let tokens = tokenizer.encode(text)?.len() as u64;
            bar.inc(1);
            Ok((text.len() as u64, tokens))
        })
        .collect::<Result<Vec<(u64, u64)>>>()?;
    bar.finish_and_clear();
    let validation_bytes: u64 = counts.iter().map(|c| c.0).sum();
    let validation_tokens: u64 = counts.iter().map(|c| c.1).sum();

    let report = TokenizerReport {
        tokenizer_id: sha256_hex(json.as_bytes()),
        dataset_id: corpus.info().dataset_id.clone(),
        vocab_size_requested: opts.vocab_size,
        vocab_size: tokenizer.vocab_size(),
        train_documents: docs.len() as u64,
        train_bytes,
        validation_documents: validation.len() as u64,
        validation_bytes,
        validation_tokens,
        validation_bytes_per_token: (validation_tokens > 0)
            .then(|| validation_bytes as f64 / validation_tokens as f64),
    };
    write_atomic(&opts.data.join(TOKENIZER_FILE), json.as_bytes())?;
    write_json(&opts.data.join(REPORT_FILE), &report)?;
    Ok(report)
}

/// Loads the tokenizer of a data directory with its id, checking it was trained on the
/// directory's current dataset.
pub fn load_tokenizer(data: &Path, dataset_id: &str) -> Result<(Tokenizer, String)> {
    let path = data.join(TOKENIZER_FILE);
    require_stage(&path, data, TOKENIZER_FILE, "tokenizer")?;
    let bytes = std::fs::read(&path).map_err(crate::error::io_err(&path))?;
    let id = sha256_hex(&bytes);
    let report_path = data.join(REPORT_FILE);
    let report: TokenizerReport = read_json(&report_path)?;
    if report.tokenizer_id != id || report.dataset_id != dataset_id {
        return Err(crate::error::invalid(
            &path,
            format!(
                "was not trained on dataset {dataset_id} (its report names tokenizer {} on dataset {}); \
                 rerun `m31r-train tokenizer`",
                report.tokenizer_id, report.dataset_id
            ),
        ));
    }
    // Loaded from the file, not the bytes, so a parse error names it.
    Ok((Tokenizer::from_file(&path)?, id))
}
