//! `m31r-train eval`: measures a release bundle on the test split of its data directory — bits per
//! byte beside `xz -9` and `zstd -19` on the same bytes, and single-line completion (fill in the
//! middle with the serving layout, and left to right) beside an n-gram baseline trained on the
//! train split. Only held-out (test-split) crates are ever scored. See `docs/eval.md`.

pub mod compress;
pub mod fim;
pub mod lm;
pub mod ngram;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::DType;
use m31r_model::bundle::{Bundle, BundleError, sha256_hex};
use m31r_model::fim::{FimBudget, FimError, serving_prompt};
use m31r_model::tokenizer::{Tokenizer, TokenizerError};
use m31r_model::transformer::ModelError;
use serde::{Deserialize, Serialize};

use crate::corpus::{Corpus, ManifestEntry};
use crate::error::Error;
use crate::progress::Progress;
use crate::shards::ShardSet;
use crate::split::Split;
use crate::tok::load_tokenizer;
use compress::CompressorResult;
use fim::{Score, ScoreSum, complete_line, sample_items};
use lm::{DecodeSpeed, ModelPredictor, document_scores};
use m31r_model::recall::{RecallParams, SOURCE_CACHE_CHUNKS, SourceTokens};
use ngram::{NgramModel, NgramPredictor};

/// Why an evaluation could not run; names the bundle, data directory or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The data directory is unusable (missing stage, no test split, damaged files).
    #[error(transparent)]
    Data(#[from] Error),
    /// The bundle is missing, damaged or inconsistent.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The bundle's tokenizer is not the one that wrote the data directory's shards.
    #[error(
        "bundle {} was trained with tokenizer {bundle_tokenizer}, but data directory {} holds \
         tokenizer {data_tokenizer}; evaluate with the data directory the model was trained on",
        bundle.display(),
        data.display()
    )]
    TokenizerMismatch {
        /// The bundle directory.
        bundle: PathBuf,
        /// sha256 of its `tokenizer.json`.
        bundle_tokenizer: String,
        /// The data directory.
        data: PathBuf,
        /// sha256 of its `tokenizer.json`.
        data_tokenizer: String,
    },
    /// The data directory has no held-out text to evaluate on.
    #[error("{}: {reason}", data.display())]
    NoTestData {
        /// The data directory.
        data: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// An option is unusable.
    #[error("eval: {0}")]
    Usage(String),
    /// A tensor operation failed.
    #[error("model forward failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The model refused an input.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Encoding or decoding failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The FIM prompt could not be built.
    #[error(transparent)]
    Fim(#[from] FimError),
}

/// What [`evaluate_bundle`] measures and on what.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The release bundle.
    pub bundle: PathBuf,
    /// The data directory (corpus, tokenizer, shards) the model was trained on.
    pub data: PathBuf,
    /// Masked lines in the completion benchmark.
    pub items: usize,
    /// Test bytes scored for bits per byte (whole documents, in sha256 order, until reached).
    pub max_bytes: u64,
    /// Seed of the line sample.
    pub seed: u64,
    /// Most tokens generated per line.
    pub max_new_tokens: usize,
    /// Prompt budget in tokens; default and upper bound: the context minus `max_new_tokens`.
    pub max_prompt_tokens: Option<usize>,
    /// Order of the n-gram baseline (4 = three tokens of context).
    pub ngram_order: usize,
    /// Train-split tokens the n-gram baseline counts (from the start of the stream).
    pub ngram_max_tokens: u64,
    /// Items whose completions are copied into the report as examples.
    pub examples: usize,
    /// Progress bars.
    pub progress: Progress,
    /// Device the model runs on (`cuda` needs a CUDA build).
    pub device: m31r_model::DeviceSpec,
    /// Recall mixed into the model's predictions (the daemon's default unless told otherwise).
    pub recall: RecallParams,
    /// The held-out split scored: test (the report's), or validation (to choose settings on).
    pub split: Split,
    /// Also print bits/byte over a grid of recall weights and half-lengths at `recall`'s order.
    pub tune_recall: bool,
}

impl EvalOptions {
    /// The defaults: 400 lines, 256 KiB of test bytes, 4-gram on 4M train tokens.
    pub fn new(bundle: impl Into<PathBuf>, data: impl Into<PathBuf>) -> Self {
        Self {
            bundle: bundle.into(),
            data: data.into(),
            items: 400,
            max_bytes: 256 * 1024,
            seed: 31,
            max_new_tokens: 64,
            max_prompt_tokens: None,
            ngram_order: 4,
            ngram_max_tokens: 4_000_000,
            examples: 5,
            progress: Progress::hidden(),
            device: m31r_model::DeviceSpec::Cpu,
            recall: RecallParams::DEFAULT,
            split: Split::Test,
            tune_recall: false,
        }
    }
}

/// The evaluated bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleSummary {
    /// Bundle directory.
    pub dir: String,
    /// Its `model_version`.
    pub model_version: String,
    /// Trainable parameters.
    pub params: u64,
    /// Context length in tokens.
    pub context_length: usize,
    /// Optimiser steps of the run.
    pub steps: u64,
    /// Training tokens seen.
    pub tokens_seen: u64,
    /// Dataset it was trained on (empty when the bundle does not say).
    pub dataset_id: String,
    /// sha256 of its `tokenizer.json`.
    pub tokenizer_hash: String,
}

/// The data directory and its test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    /// Data directory.
    pub dir: String,
    /// Its dataset id.
    pub dataset_id: String,
    /// sha256 of its `tokenizer.json`.
    pub tokenizer_id: String,
    /// Whether the bundle names this dataset (false also when the bundle names none).
    pub same_dataset_as_bundle: bool,
    /// Documents in the test split.
    pub test_documents: u64,
    /// Their bytes.
    pub test_bytes: u64,
    /// Their tokens (separators excluded).
    pub test_tokens: u64,
}

/// The settings used, resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSettings {
    /// Masked lines asked for.
    pub items: usize,
    /// Byte cap for bits per byte.
    pub max_bytes: u64,
    /// Seed of the line sample.
    pub seed: u64,
    /// Most tokens generated per line.
    pub max_new_tokens: usize,
    /// Prompt budget in tokens.
    pub max_prompt_tokens: usize,
    /// Order of the n-gram baseline.
    pub ngram_order: usize,
    /// Cap on its training tokens.
    pub ngram_max_tokens: u64,
    /// Recall mixed into the model's completions and `model_recall` (`off` or
    /// `ORDER,WEIGHT,HALF`).
    #[serde(default = "recall_off")]
    pub recall: String,
    /// The split scored.
    #[serde(default = "test_split")]
    pub split: String,
}

fn recall_off() -> String {
    "off".into()
}

fn test_split() -> String {
    "test".into()
}

/// Bits per byte on test documents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitsPerByte {
    /// Documents scored.
    pub documents: u64,
    /// Their bytes: the input of the compressors and the denominator of every bits-per-byte.
    pub bytes: u64,
    /// Their tokens.
    pub tokens: u64,
    /// The model's mean loss, nats per token.
    pub nats_per_token: f64,
    /// The network's code length, bits per byte.
    pub model: f64,
    /// The code length of the network mixed with recall (`settings.recall`), bits per byte.
    #[serde(default)]
    pub model_recall: Option<f64>,
    /// Bits per byte over a grid of recall settings (`eval --tune-recall`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recall_grid: Vec<(String, f64)>,
    /// `xz -9` on the same bytes.
    pub xz: CompressorResult,
    /// `zstd -19` on the same bytes.
    pub zstd: CompressorResult,
}

/// One item's completions, for reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// `crate file:line`.
    pub location: String,
    /// The masked line.
    pub expected: String,
    /// The model's completion with the suffix (SPM).
    pub model_fim: String,
    /// The model's completion from the prefix alone.
    pub model_left_to_right: String,
    /// The n-gram baseline's completion.
    pub ngram: String,
}

/// The single-line completion benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionReport {
    /// Candidate lines in the test documents.
    pub candidate_lines: u64,
    /// Lines sampled and scored.
    pub items: u64,
    /// The model with prefix and suffix, serving (SPM) layout.
    pub model_fim: Score,
    /// The model with the prefix only.
    pub model_left_to_right: Score,
    /// The n-gram baseline (prefix only: an n-gram cannot use a suffix).
    pub ngram: Score,
    /// A few items in full.
    pub examples: Vec<Example>,
}

/// The n-gram baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NgramSummary {
    /// Its order.
    pub order: usize,
    /// Train-split tokens counted.
    pub train_tokens: u64,
    /// Distinct contexts kept per context length (1, 2, … tokens).
    pub contexts: Vec<u64>,
}

/// Wall time of each part, seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalTimings {
    /// Model scoring and both compressors.
    pub bits_per_byte_s: f64,
    /// Counting the n-grams.
    pub ngram_train_s: f64,
    /// The completion benchmark (three systems).
    pub completion_s: f64,
    /// Everything, loading included.
    pub total_s: f64,
    /// The model's decode speed in the completion benchmark: milliseconds per single-token step
    /// (forward, greedy pick, copy to the host), over `decode_tokens` steps.
    #[serde(default)]
    pub decode_ms_per_token: f64,
    /// Single-token steps timed.
    #[serde(default)]
    pub decode_tokens: u64,
    /// Prompt tokens per second in the completion benchmark (chunks of up to 256 tokens).
    #[serde(default)]
    pub prefill_tokens_per_s: f64,
}

/// Everything `eval` measured; serialised as the JSON report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The bundle.
    pub bundle: BundleSummary,
    /// The data directory.
    pub data: DataSummary,
    /// Settings.
    pub settings: EvalSettings,
    /// Bits per byte beside the compressors.
    pub bits_per_byte: BitsPerByte,
    /// Single-line completion.
    pub completion: CompletionReport,
    /// The baseline.
    pub ngram: NgramSummary,
    /// Timings.
    pub timings: EvalTimings,
}

impl EvalReport {
    /// Reads a JSON report written by `eval --out`.
    pub fn read(path: &std::path::Path) -> Result<Self, Error> {
        crate::fsutil::read_json(path)
    }

    /// Flat metric → value map for the bundle's `metadata.json` `eval` field. Compressor values
    /// are absent when the tool could not run.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let b = &self.bits_per_byte;
        let c = &self.completion;
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: f64| {
            m.insert(k.to_owned(), v);
        };
        put("test_bits_per_byte", b.model);
        if let Some(x) = b.model_recall {
            put("test_bits_per_byte_recall", x);
        }
        put("test_nats_per_token", b.nats_per_token);
        put("test_bytes", b.bytes as f64);
        if let Some(x) = b.xz.bits_per_byte {
            put("xz_bits_per_byte", x);
        }
        if let Some(x) = b.zstd.bits_per_byte {
            put("zstd_bits_per_byte", x);
        }
        put("fim_items", c.items as f64);
        for (name, s) in
            [("fim", &c.model_fim), ("l2r", &c.model_left_to_right), ("ngram", &c.ngram)]
        {
            put(&format!("{name}_exact_match"), s.exact_match);
            put(&format!("{name}_edit_similarity"), s.edit_similarity);
        }
        m
    }

    /// The short text table printed at the end of `eval`.
    pub fn table(&self) -> String {
        let b = &self.bits_per_byte;
        let c = &self.completion;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "eval of {} ({}, {} params, step {}) on the {} split of {}",
            self.bundle.dir,
            self.bundle.model_version,
            human(self.bundle.params),
            self.bundle.steps,
            self.settings.split,
            self.data.dir
        );
        if !self.data.same_dataset_as_bundle {
            let _ = writeln!(
                out,
                "warning: the bundle names dataset {:?}, the data directory holds {}",
                self.bundle.dataset_id, self.data.dataset_id
            );
        }
        let _ = writeln!(
            out,
            "\nbits/byte on {} {} bytes ({} documents, {} tokens)",
            b.bytes, self.settings.split, b.documents, b.tokens
        );
        let _ = writeln!(out, "  {:<34} {:>8.3}", "model (network alone)", b.model);
        if let Some(x) = b.model_recall {
            let name = format!("model + recall {}", self.settings.recall);
            let _ = writeln!(out, "  {name:<34} {x:>8.3}");
        }
        for (name, r) in [("xz -9", &b.xz), ("zstd -19", &b.zstd)] {
            match (r.bits_per_byte, &r.error) {
                (Some(x), _) => {
                    let _ = writeln!(out, "  {name:<34} {x:>8.3}");
                }
                (None, e) => {
                    let _ = writeln!(
                        out,
                        "  {name:<34} {:>8}  ({})",
                        "n/a",
                        e.as_deref().unwrap_or("no result")
                    );
                }
            }
        }
        if !b.recall_grid.is_empty() {
            let _ = writeln!(out, "\nrecall grid (order,weight,half: bits/byte)");
            for (name, x) in &b.recall_grid {
                let _ = writeln!(out, "  {name:<34} {x:>8.4}");
            }
        }
        let _ = writeln!(
            out,
            "\nsingle-line completion on {} of {} {} lines (recall {})",
            c.items, c.candidate_lines, self.settings.split, self.settings.recall
        );
        let _ = writeln!(out, "  {:<42} {:>11} {:>15}", "", "exact match", "edit similarity");
        let ngram = format!(
            "{}-gram baseline ({} train tokens)",
            self.ngram.order,
            human(self.ngram.train_tokens)
        );
        for (name, s) in [
            ("model, FIM (prefix + suffix)", &c.model_fim),
            ("model, left to right (prefix only)", &c.model_left_to_right),
            (ngram.as_str(), &c.ngram),
        ] {
            let _ = writeln!(
                out,
                "  {name:<42} {:>10.1}% {:>15.3}",
                100.0 * s.exact_match,
                s.edit_similarity
            );
        }
        let t = &self.timings;
        let _ = writeln!(
            out,
            "\nmodel speed: decode {:.2} ms/token ({} steps), prompts {:.0} tokens/s",
            t.decode_ms_per_token, t.decode_tokens, t.prefill_tokens_per_s
        );
        out
    }
}

/// `1234567` → `1.2M`.
fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.0}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Evaluates `opts.bundle` on the held-out split `opts.split` (test by default) of `opts.data`. The bundle's tokenizer must be the
/// data directory's (the one its shards were written with).
pub fn evaluate_bundle(opts: &EvalOptions) -> Result<EvalReport, EvalError> {
    let started = Instant::now();
    let corpus = Corpus::open(&opts.data)?;
    let dataset_id = corpus.info().dataset_id.clone();
    let (tokenizer, tokenizer_id) = load_tokenizer(&opts.data, &dataset_id)?;
    let bundle = Bundle::open(&opts.bundle)?;
    check_same_tokenizer(opts, &bundle, &tokenizer, &tokenizer_id)?;

    let test = ShardSet::open(&opts.data, opts.split)?;
    let docs: Vec<&ManifestEntry> = corpus.documents(opts.split).collect();
    if docs.is_empty() || test.num_documents() == 0 {
        return Err(EvalError::NoTestData {
            data: opts.data.clone(),
            reason: "the test split holds no document (too few crates in the corpus to hold \
                     some out?); eval scores held-out crates only"
                .into(),
        });
    }
    if docs.len() != test.num_documents() {
        return Err(EvalError::NoTestData {
            data: opts.data.clone(),
            reason: format!(
                "the corpus has {} test documents but the shards {}; rerun `m31r-train prepare`",
                docs.len(),
                test.num_documents()
            ),
        });
    }
    let texts = docs.iter().map(|d| corpus.text(d)).collect::<Result<Vec<&str>, _>>()?;
    let test_tokens: u64 = (0..test.num_documents())
        .filter_map(|i| test.document_range(i))
        .map(|r| r.end - r.start)
        .sum();

    let config = bundle.config();
    let context = config.context_length();
    let budget = context.saturating_sub(opts.max_new_tokens);
    let budget = opts.max_prompt_tokens.map_or(budget, |m| m.min(budget));
    if budget < 4 {
        return Err(EvalError::Usage(format!(
            "a prompt budget of {budget} tokens (context {context}, max_new_tokens {}, \
             max_prompt_tokens {:?}) leaves no room for a prompt",
            opts.max_new_tokens, opts.max_prompt_tokens
        )));
    }
    let device = opts.device.open().map_err(|e| EvalError::Usage(e.to_string()))?;
    let model = bundle.model(DType::F32, &device)?;

    // Bits per byte: whole documents in sha256 order (a sample that favours no crate) until the
    // byte cap is reached; the compressors see exactly these bytes, concatenated.
    let t = Instant::now();
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.sort_by(|&a, &b| docs[a].sha256.cmp(&docs[b].sha256));
    let mut chosen = Vec::new();
    let mut bytes = 0u64;
    for i in order {
        if bytes >= opts.max_bytes {
            break;
        }
        bytes += texts[i].len() as u64;
        chosen.push(i);
    }
    let bar = opts.progress.bar(chosen.len() as u64, "bits/byte");
    let (mut nats, mut tokens) = (0.0, 0u64);
    let mut scores = Vec::new();
    let mut joined = Vec::with_capacity(bytes as usize);
    for &i in &chosen {
        let ids = test.document(i).unwrap_or_default();
        let doc = document_scores(&model, test.end_of_text(), &ids, opts.recall.max_order)?;
        nats += doc.iter().map(|s| s.nats(&RecallParams::OFF)).sum::<f64>();
        scores.extend(doc);
        tokens += ids.len() as u64;
        joined.extend_from_slice(texts[i].as_bytes());
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (xz, zstd) = (compress::xz(&joined), compress::zstd(&joined));
    let bits_per_byte = BitsPerByte {
        documents: chosen.len() as u64,
        bytes,
        tokens,
        nats_per_token: nats / tokens.max(1) as f64,
        model: nats / std::f64::consts::LN_2 / bytes.max(1) as f64,
        model_recall: opts
            .recall
            .is_on()
            .then(|| bits(&scores, &opts.recall) / bytes.max(1) as f64),
        recall_grid: if opts.tune_recall {
            recall_grid(&scores, opts.recall.max_order, bytes)
        } else {
            Vec::new()
        },
        xz,
        zstd,
    };
    let bits_per_byte_s = t.elapsed().as_secs_f64();

    // The n-gram baseline counts the start of the train stream.
    let t = Instant::now();
    let train = ShardSet::open(&opts.data, Split::Train)?;
    let ngram = NgramModel::train(&train.tokens(0..opts.ngram_max_tokens), opts.ngram_order);
    let ngram_train_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let (completion, speed) =
        completion_benchmark(opts, &tokenizer, &model, &ngram, &docs, &texts, budget)?;
    let completion_s = t.elapsed().as_secs_f64();

    let meta = bundle.metadata();
    Ok(EvalReport {
        bundle: BundleSummary {
            dir: opts.bundle.display().to_string(),
            model_version: meta.model_version.clone(),
            params: config.param_count(),
            context_length: context,
            steps: meta.steps,
            tokens_seen: meta.tokens_seen,
            dataset_id: meta.dataset_id.clone(),
            tokenizer_hash: meta.tokenizer_hash.clone(),
        },
        data: DataSummary {
            dir: opts.data.display().to_string(),
            same_dataset_as_bundle: meta.dataset_id == dataset_id,
            dataset_id,
            tokenizer_id,
            test_documents: docs.len() as u64,
            test_bytes: texts.iter().map(|t| t.len() as u64).sum(),
            test_tokens,
        },
        settings: EvalSettings {
            items: opts.items,
            max_bytes: opts.max_bytes,
            seed: opts.seed,
            max_new_tokens: opts.max_new_tokens,
            max_prompt_tokens: budget,
            ngram_order: ngram.order(),
            ngram_max_tokens: opts.ngram_max_tokens,
            recall: opts.recall.to_string(),
            split: opts.split.as_str().to_string(),
        },
        bits_per_byte,
        completion,
        ngram: NgramSummary {
            order: ngram.order(),
            train_tokens: ngram.train_tokens(),
            contexts: ngram.contexts(),
        },
        timings: EvalTimings {
            bits_per_byte_s,
            ngram_train_s,
            completion_s,
            total_s: started.elapsed().as_secs_f64(),
            decode_ms_per_token: 1e3 * speed.decode_s / speed.decode_tokens.max(1) as f64,
            decode_tokens: speed.decode_tokens,
            prefill_tokens_per_s: speed.prefill_tokens as f64 / speed.prefill_s.max(1e-9),
        },
    })
}

/// The bundle must carry the data directory's tokenizer. Compared by file hash first, then by
/// canonical serialisation (a bundle re-serialises the tokenizer it was given).
fn check_same_tokenizer(
    opts: &EvalOptions,
    bundle: &Bundle,
    data_tokenizer: &Tokenizer,
    data_tokenizer_id: &str,
) -> Result<(), EvalError> {
    let recorded = &bundle.metadata().tokenizer_hash;
    if recorded == data_tokenizer_id {
        return Ok(());
    }
    let canonical = |t: &Tokenizer| t.to_json().map(|j| sha256_hex(j.as_bytes()));
    if canonical(bundle.tokenizer())? == canonical(data_tokenizer)? {
        return Ok(());
    }
    Err(EvalError::TokenizerMismatch {
        bundle: opts.bundle.clone(),
        bundle_tokenizer: recorded.clone(),
        data: opts.data.clone(),
        data_tokenizer: data_tokenizer_id.to_owned(),
    })
}

/// Bits per byte of `bytes` bytes whose tokens scored `scores`, under recall `params`.
fn bits(scores: &[lm::TokenScore], params: &RecallParams) -> f64 {
    scores.iter().map(|s| s.nats(params)).sum::<f64>() / std::f64::consts::LN_2
}

/// Bits per byte of `bytes` bytes over a grid of recall weights and half-lengths at `order`.
fn recall_grid(scores: &[lm::TokenScore], order: usize, bytes: u64) -> Vec<(String, f64)> {
    let mut grid = Vec::new();
    if order == 0 {
        return grid;
    }
    for weight in [0.2f32, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95] {
        for half in [0.25f32, 0.5, 1.0, 2.0, 4.0, 8.0] {
            let params = RecallParams { max_order: order, weight, half };
            grid.push((params.to_string(), bits(scores, &params) / bytes.max(1) as f64));
        }
    }
    grid
}

/// Masks the sampled lines and completes each with the model (FIM and left to right) and the
/// n-gram baseline, under one decoding and stop rule.
fn completion_benchmark(
    opts: &EvalOptions,
    tokenizer: &Tokenizer,
    model: &m31r_model::Model,
    ngram: &NgramModel,
    docs: &[&ManifestEntry],
    texts: &[&str],
    budget: usize,
) -> Result<(CompletionReport, DecodeSpeed), EvalError> {
    let (items, candidates) = sample_items(texts, opts.items, opts.seed);
    let fim_budget = FimBudget { max_prompt_tokens: budget, ..FimBudget::default() };
    let mut model_predictor =
        ModelPredictor::new(model, budget + opts.max_new_tokens, opts.recall)?;
    let mut source = SourceTokens::new(SOURCE_CACHE_CHUNKS);
    let mut ngram_predictor = NgramPredictor::new(ngram);
    let (mut fim_sum, mut l2r_sum, mut ngram_sum) =
        (ScoreSum::default(), ScoreSum::default(), ScoreSum::default());
    let every = (items.len() / opts.examples.max(1)).max(1);
    let mut examples = Vec::new();
    let bar = opts.progress.bar(items.len() as u64, "completion");
    for (n, item) in items.iter().enumerate() {
        let fim_prompt = serving_prompt(tokenizer, &[], &item.prefix, &item.suffix, &fim_budget)?;
        let l2r_prompt = left_to_right_prompt(tokenizer, &item.prefix, budget)?;
        let max_new = opts.max_new_tokens;
        // Recall reads the file around the cursor as the daemon does for a `fim` request (the
        // text before the cursor, then after it) and a `complete` one (before it only).
        let (around_fim, around_l2r) = if opts.recall.is_on() {
            (
                source.around_cursor(tokenizer, &item.prefix, Some(&item.suffix))?,
                source.around_cursor(tokenizer, &item.prefix, None)?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        model_predictor.file_text = around_fim;
        let fim = complete_line(&mut model_predictor, tokenizer, &fim_prompt.ids, max_new)?;
        model_predictor.file_text = around_l2r;
        let l2r = complete_line(&mut model_predictor, tokenizer, &l2r_prompt, max_new)?;
        let base = complete_line(&mut ngram_predictor, tokenizer, &l2r_prompt, max_new)?;
        fim_sum.add(&fim, &item.middle);
        l2r_sum.add(&l2r, &item.middle);
        ngram_sum.add(&base, &item.middle);
        if n % every == 0 && examples.len() < opts.examples {
            let doc = docs[item.document];
            examples.push(Example {
                location: format!("{} {}:{}", doc.crate_name, doc.file, item.line),
                expected: item.middle.clone(),
                model_fim: fim.text,
                model_left_to_right: l2r.text,
                ngram: base.text,
            });
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let report = CompletionReport {
        candidate_lines: candidates as u64,
        items: items.len() as u64,
        model_fim: fim_sum.score(),
        model_left_to_right: l2r_sum.score(),
        ngram: ngram_sum.score(),
        examples,
    };
    Ok((report, model_predictor.speed))
}

/// The prefix-only prompt as the daemon builds it for a plain completion: the encoded prefix,
/// cut from its start in whole steps to fit `budget`, or `<|endoftext|>` alone when empty.
fn left_to_right_prompt(
    tokenizer: &Tokenizer,
    prefix: &str,
    budget: usize,
) -> Result<Vec<u32>, EvalError> {
    let mut ids = tokenizer.encode(prefix)?;
    if ids.is_empty() {
        ids.push(tokenizer.special_ids().end_of_text);
    }
    if ids.len() > budget {
        let step = FimBudget::default().prefix_cut_step.clamp(1, budget);
        let drop = (ids.len() - budget).div_ceil(step) * step;
        ids.drain(..drop.min(ids.len() - 1));
    }
    Ok(ids)
}
