//! `m31r-train`: command-line entry point of the training pipeline.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use m31r_train::corpus::{CorpusOptions, build_corpus, default_registry_src};
use m31r_train::shards::{PrepareOptions, prepare};
use m31r_train::tok::{TokenizerOptions, train_tokenizer};
use m31r_train::{DataConfig, Progress, fetch};

/// Default data directory, relative to the working directory.
const DEFAULT_DATA: &str = "runs/data";

/// M31R's training pipeline. The data stages run in order on one data directory:
/// `corpus`, then `tokenizer`, then `prepare`.
#[derive(Debug, Parser)]
#[command(name = "m31r-train", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Collect Rust sources into a filtered, deduplicated corpus split by crate.
    ///
    /// Writes manifest.jsonl (every file seen: kept with its split, or dropped with a reason),
    /// documents.bin (the kept texts) and dataset.json (dataset id and statistics) to --out.
    Corpus {
        /// Directories of Rust code [default: $CARGO_HOME/registry/src, unless --fetch-crates].
        dirs: Vec<PathBuf>,
        /// Download the crates pinned in this list (e.g. configs/corpus/crates.txt) with
        /// `cargo fetch` and add their sources to the inputs.
        #[arg(long, value_name = "FILE")]
        fetch_crates: Option<PathBuf>,
        /// Data directory to write.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA)]
        out: PathBuf,
        /// Training config: a TOML file or a shipped preset name (tiny, small).
        #[arg(long, value_name = "FILE|PRESET", default_value = "tiny")]
        config: String,
        /// Replace a data directory that holds a different dataset (its tokenizer and shards
        /// are deleted).
        #[arg(long)]
        force: bool,
    },
    /// Train the byte-level BPE tokenizer on the train split; writes tokenizer.json.
    Tokenizer {
        /// Data directory written by `corpus`.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// Training config: a TOML file or a shipped preset name (tiny, small).
        #[arg(long, value_name = "FILE|PRESET", default_value = "tiny")]
        config: String,
        /// Vocabulary size, special tokens included [default: from the config].
        #[arg(long, value_name = "N")]
        vocab_size: Option<usize>,
    },
    /// Tokenize every split into packed shards with an index; writes <data>/shards/.
    Prepare {
        /// Data directory with a corpus and a tokenizer.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA)]
        data: PathBuf,
        /// Training config: a TOML file or a shipped preset name (tiny, small).
        #[arg(long, value_name = "FILE|PRESET", default_value = "tiny")]
        config: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let progress = Progress::stderr();
    let started = Instant::now();
    match cli.command {
        Command::Corpus { dirs, fetch_crates, out, config, force } => {
            let config = load_config(&config)?;
            let mut inputs = dirs;
            if let Some(list) = &fetch_crates {
                let fetched = fetch::fetch_crates(list)
                    .with_context(|| format!("fetching the crates of {}", list.display()))?;
                eprintln!("fetched {} crates listed in {}", fetched.len(), list.display());
                inputs.extend(fetched);
            } else if inputs.is_empty() {
                inputs.push(
                    default_registry_src().context(
                        "no input directory given and neither CARGO_HOME nor HOME is set",
                    )?,
                );
            }
            let opts = CorpusOptions {
                inputs,
                out: out.clone(),
                corpus: config.corpus,
                split: config.split,
                force,
                progress,
            };
            let info = build_corpus(&opts)
                .with_context(|| format!("building the corpus in {}", out.display()))?;
            print!("{}", info.table());
        }
        Command::Tokenizer { data, config, vocab_size } => {
            let config = load_config(&config)?;
            let vocab_size = match vocab_size {
                Some(n) => n,
                None => config.vocab_size()?,
            };
            let opts = TokenizerOptions {
                data: data.clone(),
                vocab_size,
                max_train_bytes: config.tokenizer.max_train_bytes,
                progress,
            };
            let report = train_tokenizer(&opts)
                .with_context(|| format!("training the tokenizer of {}", data.display()))?;
            print!("{}", report.table());
        }
        Command::Prepare { data, config } => {
            let config = load_config(&config)?;
            let opts = PrepareOptions {
                data: data.clone(),
                shard_tokens: config.shards.shard_tokens,
                progress,
            };
            let index = prepare(&opts)
                .with_context(|| format!("preparing shards in {}", data.display()))?;
            print!("{}", index.table());
        }
    }
    println!("wall time {:.2}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn load_config(spec: &str) -> Result<DataConfig> {
    DataConfig::load(spec).with_context(|| format!("loading training config {spec}"))
}
