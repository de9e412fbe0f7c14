//! The release bundle (DESIGN §4): one directory holding weights, tokenizer, config, metadata and
//! `checksum.txt`. Writing is atomic (temporary directory + rename); loading verifies every checksum
//! and cross-checks config, tokenizer and weights before any weight is used.
//!
//! A bundle stores its weights at one [`Precision`], recorded in `metadata.json`. Quantized
//! bundles keep the safetensors container: each 2-D weight is its raw GGML blocks as a `U8`
//! tensor of shape `(rows, bytes per row)`, which the loader checks against the shape the config
//! implies, so checksums, shape validation and atomic writing work exactly as for f32.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{ModelConfig, RawModelConfig};
use crate::quant::{self, Precision, Weight};
use crate::tokenizer::Tokenizer;
use crate::transformer::Model;
use crate::weights::weight_shapes;

mod verify;
mod write;

use verify::{
    MAX_CHECKSUM_BYTES, check_tokenizer, check_weights, open_regular, parse_checksums,
    read_regular, verify,
};
pub use write::{write_bundle, write_bundle_weights, write_quantized_bundle};

/// Version of the bundle layout written by this crate.
pub const BUNDLE_FORMAT_VERSION: u32 = 1;
/// Weights file.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Tokenizer file.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Model config file.
pub const CONFIG_FILE: &str = "config.yaml";
/// Metadata file.
pub const METADATA_FILE: &str = "metadata.json";
/// Checksum list, in `sha256sum` format.
pub const CHECKSUM_FILE: &str = "checksum.txt";
/// Every file a bundle must contain besides `checksum.txt`.
pub const CHECKSUMMED_FILES: [&str; 4] = [WEIGHTS_FILE, TOKENIZER_FILE, CONFIG_FILE, METADATA_FILE];

/// Why a bundle could not be written or loaded; always names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file is missing, corrupt or inconsistent with the rest of the bundle.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An I/O operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> BundleError {
    BundleError::Invalid { path: path.into(), reason: reason.into() }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |source| BundleError::Io { path: path.to_path_buf(), source }
}

/// `config.yaml`: the model architecture plus the special-token ids it was trained with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleConfig {
    /// Architecture and sizes.
    pub model: RawModelConfig,
    /// Special token text → id.
    pub special_tokens: BTreeMap<String, u32>,
}

/// `metadata.json`: provenance of the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleMetadata {
    /// Layout version; must equal [`BUNDLE_FORMAT_VERSION`].
    pub format_version: u32,
    /// Free-form model version (e.g. `tiny-2026-11-23`).
    pub model_version: String,
    /// Id of the corpus manifest the model was trained on.
    pub dataset_id: String,
    /// Hash of the training data (shards).
    pub dataset_hash: String,
    /// sha256 of `tokenizer.json`.
    pub tokenizer_hash: String,
    /// sha256 of `config.yaml`.
    pub config_hash: String,
    /// Seed of the training run.
    pub training_seed: u64,
    /// Optimiser steps taken.
    pub steps: u64,
    /// Training tokens seen.
    pub tokens_seen: u64,
    /// Evaluation results by metric name.
    pub eval: BTreeMap<String, f64>,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// How the weights are stored (bundles written before quantization existed are f32).
    #[serde(default)]
    pub precision: Precision,
}

/// What the caller knows about the weights; the writer adds hashes, format version and time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BundleInfo {
    /// See [`BundleMetadata::model_version`].
    pub model_version: String,
    /// See [`BundleMetadata::dataset_id`].
    pub dataset_id: String,
    /// See [`BundleMetadata::dataset_hash`].
    pub dataset_hash: String,
    /// See [`BundleMetadata::training_seed`].
    pub training_seed: u64,
    /// See [`BundleMetadata::steps`].
    pub steps: u64,
    /// See [`BundleMetadata::tokens_seen`].
    pub tokens_seen: u64,
    /// See [`BundleMetadata::eval`].
    pub eval: BTreeMap<String, f64>,
}

/// Where a user's model lives when nothing else is configured: `bundle/` in M31R's data directory
/// (`~/.local/share/m31r/bundle` on Linux, as in `configs/systemd/m31rd.service`).
/// `m31r-train quickstart` exports there and `m31rd` serves it when no bundle is given. `None`
/// without a home directory.
pub fn default_bundle_dir() -> Option<PathBuf> {
    m31r_data_dir().map(|d| d.join("bundle"))
}

/// M31R's per-user data directory (`~/.local/share/m31r` on Linux), if a home directory is known.
pub fn m31r_data_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "m31r").map(|d| d.data_dir().to_path_buf())
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A verified bundle: checksums matched, config, tokenizer and weight shapes agree.
#[derive(Debug)]
pub struct Bundle {
    dir: PathBuf,
    config: ModelConfig,
    metadata: BundleMetadata,
    tokenizer: Tokenizer,
    weights: memmap2::Mmap,
}

impl Bundle {
    /// Opens and verifies the bundle in `dir`. Nothing is trusted before its checksum matches.
    pub fn open(dir: &Path) -> Result<Self, BundleError> {
        let checksum_path = dir.join(CHECKSUM_FILE);
        let listing = read_regular(&checksum_path, MAX_CHECKSUM_BYTES)?;
        let listing = String::from_utf8(listing).map_err(|e| {
            invalid(&checksum_path, format!("is not UTF-8 text: {}", e.utf8_error()))
        })?;
        let expected = parse_checksums(&listing, &checksum_path)?;

        // The weights are memory-mapped, hashed, and later loaded from that same mapping.
        let weights_path = dir.join(WEIGHTS_FILE);
        let weights_file = open_regular(&weights_path)?;
        // SAFETY: the mapping is read-only; a bundle is immutable once written (written to a
        // temporary directory and renamed), and the bytes are checksummed before use.
        let weights =
            unsafe { memmap2::Mmap::map(&weights_file) }.map_err(io_err(&weights_path))?;
        verify(&weights_path, &weights, &expected[WEIGHTS_FILE])?;
        let read = |file: &str| -> Result<Vec<u8>, BundleError> {
            let path = dir.join(file);
            let bytes = read_regular(&path, u64::MAX)?;
            verify(&path, &bytes, &expected[file])?;
            Ok(bytes)
        };
        let tokenizer_bytes = read(TOKENIZER_FILE)?;
        let config_bytes = read(CONFIG_FILE)?;
        let metadata_bytes = read(METADATA_FILE)?;

        let config_path = dir.join(CONFIG_FILE);
        let bundle_config: BundleConfig = serde_yaml::from_slice(&config_bytes)
            .map_err(|e| invalid(&config_path, e.to_string()))?;
        let config = ModelConfig::new(&bundle_config.model)
            .map_err(|e| invalid(&config_path, e.to_string()))?;

        let metadata_path = dir.join(METADATA_FILE);
        let metadata: BundleMetadata = serde_json::from_slice(&metadata_bytes)
            .map_err(|e| invalid(&metadata_path, e.to_string()))?;
        if metadata.format_version != BUNDLE_FORMAT_VERSION {
            return Err(invalid(
                &metadata_path,
                format!(
                    "bundle format version {} is not supported (expected {BUNDLE_FORMAT_VERSION})",
                    metadata.format_version
                ),
            ));
        }
        for (what, recorded, actual) in [
            (TOKENIZER_FILE, &metadata.tokenizer_hash, sha256_hex(&tokenizer_bytes)),
            (CONFIG_FILE, &metadata.config_hash, sha256_hex(&config_bytes)),
        ] {
            if *recorded != actual {
                return Err(invalid(
                    &metadata_path,
                    format!("records {what} hash {recorded}, but the file hashes to {actual}"),
                ));
            }
        }

        let tokenizer_path = dir.join(TOKENIZER_FILE);
        let tokenizer = Tokenizer::from_bytes(&tokenizer_bytes)
            .map_err(|e| invalid(&tokenizer_path, e.to_string()))?;
        check_tokenizer(&tokenizer, &config, &bundle_config.special_tokens, dir)?;

        let header = safetensors::SafeTensors::deserialize(&weights)
            .map_err(|e| invalid(&weights_path, e.to_string()))?;
        let precision = metadata.precision;
        let logical: HashMap<String, Vec<usize>> = weight_shapes(&config).into_iter().collect();
        let mut shapes = HashMap::new();
        for (name, view) in header.tensors() {
            // Whether blocks can hold the rows is decided on the shape the config implies (the
            // stored shape of blocks is rows × bytes).
            let fallback = match (precision.ggml_dtype(), logical.get(name.as_str())) {
                (Some(d), Some(shape)) => shape.len() == 2 && !quant::fits_blocks(shape, d),
                _ => false,
            };
            let blocks = precision.is_quantized() && view.shape().len() == 2 && !fallback;
            let dtype_ok = match view.dtype() {
                safetensors::Dtype::U8 => blocks,
                safetensors::Dtype::F32 => !blocks && !fallback,
                safetensors::Dtype::F16 => fallback || !precision.is_quantized(),
                safetensors::Dtype::BF16 => !precision.is_quantized(),
                _ => false,
            };
            if !dtype_ok {
                let expected = if blocks {
                    format!("u8 ({precision} blocks)")
                } else if fallback {
                    "f16 (rows that blocks cannot hold)".to_string()
                } else if precision.is_quantized() {
                    "f32".to_string()
                } else {
                    "f32, f16 or bf16".to_string()
                };
                return Err(invalid(
                    &weights_path,
                    format!(
                        "tensor {name} has dtype {:?}; a {precision} bundle stores it as {expected}",
                        view.dtype()
                    ),
                ));
            }
            shapes.insert(name, view.shape().to_vec());
        }
        let shapes = shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        check_weights(&config, &shapes, precision, &weights_path)?;

        Ok(Self { dir: dir.to_path_buf(), config, metadata, tokenizer, weights })
    }

    /// Builds the model in `dtype` on `device` from the verified weights. A quantized bundle
    /// builds its own precision (f32 activations) whatever `dtype` says.
    pub fn model(&self, dtype: DType, device: &Device) -> Result<Model, BundleError> {
        let path = self.dir.join(WEIGHTS_FILE);
        if self.precision().is_quantized() {
            return self.model_at(self.precision(), device);
        }
        let tensors = candle_core::safetensors::load_buffer(&self.weights, device)
            .map_err(|e| invalid(&path, e.to_string()))?;
        Model::from_tensors(&self.config, tensors, dtype, device)
            .map_err(|e| invalid(&path, e.to_string()))
    }

    /// Builds the model at `precision`: as stored when it is the bundle's own; a dense bundle is
    /// converted (quantized at load, which costs start-up time: prefer a quantized bundle); a
    /// quantized bundle cannot be turned into another precision and is refused.
    pub fn model_at(&self, precision: Precision, device: &Device) -> Result<Model, BundleError> {
        let path = self.dir.join(WEIGHTS_FILE);
        let stored = self.precision();
        let fail = |e: &dyn std::fmt::Display| invalid(&path, e.to_string());
        if stored.is_quantized() && stored != precision {
            return Err(invalid(
                &path,
                format!(
                    "stores {stored} weights; they cannot be served as {precision} (export the \
                     bundle again with `m31r-train export --quantize {precision}`, or serve it \
                     as {stored})"
                ),
            ));
        }
        if !stored.is_quantized() {
            // f16 on a CPU runs as llama.cpp runs it: f16 weight rows, f32 activations (CPUs have
            // no fast f16 arithmetic); elsewhere the whole model is f16.
            let f16_rows = precision == Precision::F16 && device.is_cpu();
            if !precision.is_quantized() && !f16_rows {
                return self.model(precision.dense_dtype(), device);
            }
            let tensors = candle_core::safetensors::load_buffer(&self.weights, &Device::Cpu)
                .map_err(|e| fail(&e))?;
            let mut named: Vec<(String, Tensor)> = tensors.into_iter().collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            let weights =
                quant::inference_weights(&named, precision, device).map_err(|e| fail(&e))?;
            return Model::from_weights(
                &self.config,
                weights.into_iter().collect(),
                precision.activation_dtype(device),
                device,
            )
            .map_err(|e| fail(&e));
        }
        let weights = self.stored_weights(device)?.into_iter().collect();
        Model::from_weights(&self.config, weights, DType::F32, device).map_err(|e| fail(&e))
    }

    /// The weights exactly as stored (GGML blocks of a quantized bundle are not dequantized),
    /// sorted by name: what a GGUF export of this bundle writes.
    pub fn stored_weights(&self, device: &Device) -> Result<Vec<(String, Weight)>, BundleError> {
        let path = self.dir.join(WEIGHTS_FILE);
        let fail = |e: &dyn std::fmt::Display| invalid(&path, e.to_string());
        let Some(dtype) = self.precision().ggml_dtype() else {
            let tensors = candle_core::safetensors::load_buffer(&self.weights, device)
                .map_err(|e| fail(&e))?;
            let mut named: Vec<(String, Weight)> =
                tensors.into_iter().map(|(n, t)| (n, Weight::Dense(t))).collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            return Ok(named);
        };
        let header = safetensors::SafeTensors::deserialize(&self.weights).map_err(|e| fail(&e))?;
        let shapes: HashMap<String, Vec<usize>> = weight_shapes(&self.config).into_iter().collect();
        let mut weights = Vec::new();
        for (name, view) in header.tensors() {
            let weight = if view.dtype() == safetensors::Dtype::U8 {
                let bytes = view.data();
                // GGML blocks hold f16 scales (2-byte alignment); a mapping offset that breaks it
                // costs one copy rather than a misaligned read.
                let bytes = if (bytes.as_ptr() as usize).is_multiple_of(8) {
                    Cow::Borrowed(bytes)
                } else {
                    Cow::Owned(bytes.to_vec())
                };
                let storage = QStorage::from_data(bytes, device, dtype).map_err(|e| fail(&e))?;
                let shape = shapes[&name].clone();
                let q = QTensor::new(storage, shape)
                    .map_err(|e| invalid(&path, format!("tensor {name}: {e}")))?;
                Weight::Quantized(Arc::new(q))
            } else if view.dtype() == safetensors::Dtype::F16 && view.shape().len() == 2 {
                // The f16 fallback of a matrix whose rows blocks cannot hold.
                let bytes = Cow::Owned(view.data().to_vec());
                let storage =
                    QStorage::from_data(bytes, device, GgmlDType::F16).map_err(|e| fail(&e))?;
                let q = QTensor::new(storage, view.shape())
                    .map_err(|e| invalid(&path, format!("tensor {name}: {e}")))?;
                Weight::Quantized(Arc::new(q))
            } else {
                let t = candle_core::safetensors::Load::load(&view, device)
                    .map_err(|e| invalid(&path, format!("tensor {name}: {e}")))?;
                Weight::Dense(t)
            };
            weights.push((name, weight));
        }
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(weights)
    }

    /// How the bundle stores its weights.
    pub fn precision(&self) -> Precision {
        self.metadata.precision
    }

    /// Size of the weights file in bytes (what the model takes in memory, roughly).
    pub fn weights_bytes(&self) -> usize {
        self.weights.len()
    }

    /// The bundle directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The validated model config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    /// Provenance.
    pub fn metadata(&self) -> &BundleMetadata {
        &self.metadata
    }
    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}
