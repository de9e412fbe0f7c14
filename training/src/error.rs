//! The crate's one error type, shared by every stage (data, training, export, report): every
//! variant names the file, directory or setting at fault.

use std::io;
use std::path::{Path, PathBuf};

use m31r_model::tokenizer::TokenizerError;

/// Why a pipeline stage could not run. Per-file problems inside a corpus (an unreadable or
/// non-UTF-8 file) are not errors: they are recorded as drop reasons and counted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input directory does not exist or is not a directory.
    #[error("input directory {} does not exist or is not a directory", path.display())]
    MissingInput {
        /// The directory asked for.
        path: PathBuf,
    },
    /// The input directories hold no Rust file that survived the filters.
    #[error("no Rust source kept from {inputs}: {reason}")]
    EmptyCorpus {
        /// The input directories, for the message.
        inputs: String,
        /// What was found instead.
        reason: String,
    },
    /// The output directory holds data from another dataset (or something that is not a data
    /// directory) and `--force` was not given.
    #[error("{}: {reason}; pass --force to overwrite it", path.display())]
    WouldOverwrite {
        /// The output directory.
        path: PathBuf,
        /// What is there.
        reason: String,
    },
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file or setting is wrong: bad syntax, a hash mismatch, a missing entry, an inconsistent
    /// run.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An earlier stage has not been run on this data directory.
    #[error("{}: {missing} not found; run `m31r-train {stage}` first", dir.display())]
    StageMissing {
        /// The data directory.
        dir: PathBuf,
        /// The file that is missing.
        missing: &'static str,
        /// The stage that produces it.
        stage: &'static str,
    },
    /// Training, loading or using the tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// `cargo fetch` could not be run or failed.
    #[error("fetching crates listed in {}: {reason}", list.display())]
    Fetch {
        /// The crate list.
        list: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A training tensor operation failed.
    #[error("training step failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The model could not be built.
    #[error(transparent)]
    Model(#[from] m31r_model::ModelError),
    /// `train.device` cannot be opened: the binary lacks CUDA or the machine the GPU.
    #[error("train.{0}")]
    Device(#[from] m31r_model::DeviceError),
    /// A run directory has no training metrics to report on.
    #[error(
        "{}: no training metrics (metrics.jsonl is missing or has no step logged); \
         is this a run directory written by `m31r-train train`?",
        run_dir.display()
    )]
    NoMetrics {
        /// The run directory.
        run_dir: PathBuf,
    },
}

/// Shorthand for the pipeline's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds a closure that wraps an I/O error with the path it concerns.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// Fails with [`Error::StageMissing`] unless `path`, the file `missing` of data directory `data`,
/// is there: it is the output of `stage`, which has not been run yet.
pub(crate) fn require_stage(
    path: &Path,
    data: &Path,
    missing: &'static str,
    stage: &'static str,
) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    Err(Error::StageMissing { dir: data.to_path_buf(), missing, stage })
}

/// Fails with [`Error::Invalid`] on `path` unless the layout version `found` it declares is the
/// `expected` one, the only one this build reads.
pub(crate) fn check_format(path: &Path, found: u32, expected: u32) -> Result<()> {
    if found == expected {
        return Ok(());
    }
    Err(invalid(path, format!("format {found} is not {expected}")))
}

/// Builds an [`Error::Invalid`].
pub(crate) fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
    Error::Invalid { path: path.into(), reason: reason.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_format_is_refused_naming_the_file_and_both_versions() {
        let path = Path::new("data/shards/index.json");
        assert!(check_format(path, 1, 1).is_ok());
        let err = check_format(path, 2, 1).unwrap_err();
        assert_eq!(err.to_string(), "data/shards/index.json: format 2 is not 1");
    }
}
