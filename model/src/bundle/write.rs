//! Writing a bundle: every file to a temporary sibling directory, synced, then renamed into
//! place; the weights are checked against the config before anything is written.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::verify::{check_tokenizer, check_weights};
use super::{
    BUNDLE_FORMAT_VERSION, BundleConfig, BundleError, BundleInfo, BundleMetadata, CHECKSUM_FILE,
    CHECKSUMMED_FILES, CONFIG_FILE, METADATA_FILE, TOKENIZER_FILE, WEIGHTS_FILE, invalid, io_err,
    sha256_hex,
};
use crate::config::ModelConfig;
use crate::quant::{self, Precision, Weight};
use crate::tokenizer::{SpecialToken, Tokenizer};

/// Writes a bundle to `dest`, which must not exist yet. Files go to a sibling temporary directory
/// that is renamed into place only when complete, so a crash never leaves a half-written bundle.
pub fn write_bundle(
    dest: &Path,
    tensors: &[(String, Tensor)],
    tokenizer: &Tokenizer,
    config: &ModelConfig,
    info: &BundleInfo,
) -> Result<BundleMetadata, BundleError> {
    let embedding_dtype =
        tensors.iter().find(|(n, _)| n == crate::weights::EMBEDDING).map(|(_, t)| t.dtype());
    let precision =
        if embedding_dtype == Some(DType::F16) { Precision::F16 } else { Precision::F32 };
    let weights: Vec<(String, Weight)> =
        tensors.iter().map(|(n, t)| (n.clone(), Weight::Dense(t.clone()))).collect();
    write_bundle_weights(dest, &weights, precision, tokenizer, config, info)
}

/// Quantizes f32 `tensors` to `precision` (see [`crate::quant::quantize`]) and writes them as a
/// bundle, like [`write_bundle`].
pub fn write_quantized_bundle(
    dest: &Path,
    tensors: &[(String, Tensor)],
    precision: Precision,
    tokenizer: &Tokenizer,
    config: &ModelConfig,
    info: &BundleInfo,
) -> Result<BundleMetadata, BundleError> {
    let weights = quant::quantize(tensors, precision)
        .map_err(|e| invalid(dest.join(WEIGHTS_FILE), e.to_string()))?;
    write_bundle_weights(dest, &weights, precision, tokenizer, config, info)
}

/// Writes weights already stored at `precision` as a bundle, like [`write_bundle`].
pub fn write_bundle_weights(
    dest: &Path,
    weights: &[(String, Weight)],
    precision: Precision,
    tokenizer: &Tokenizer,
    config: &ModelConfig,
    info: &BundleInfo,
) -> Result<BundleMetadata, BundleError> {
    let weights_path = dest.join(WEIGHTS_FILE);
    let tensors = weights
        .iter()
        .map(|(name, w)| Ok((name.clone(), stored_tensor(name, w, precision, &weights_path)?)))
        .collect::<Result<Vec<_>, BundleError>>()?;
    if dest.exists() {
        return Err(invalid(dest, "already exists; refusing to overwrite a bundle"));
    }
    check_tokenizer(tokenizer, config, &special_ids(tokenizer), dest)?;
    let shapes: HashMap<&str, &[usize]> =
        tensors.iter().map(|(n, t)| (n.as_str(), t.dims())).collect();
    check_weights(config, &shapes, precision, &dest.join(WEIGHTS_FILE))?;

    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dest
        .file_name()
        .ok_or_else(|| invalid(dest, "bundle path has no directory name"))?
        .to_string_lossy();
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let tmp = parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let written =
        write_files(&tmp, &tensors, precision, tokenizer, config, info).and_then(|meta| {
            fs::rename(&tmp, dest).map_err(io_err(dest))?;
            sync_dir(&parent)?;
            Ok(meta)
        });
    if written.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    written
}

/// The tensor a weight is saved as: itself when dense, its GGML blocks as `U8 (rows, row bytes)`
/// when quantized. A weight not stored as `precision` demands is refused.
fn stored_tensor(
    name: &str,
    weight: &Weight,
    precision: Precision,
    path: &Path,
) -> Result<Tensor, BundleError> {
    let wrong = |what: String| {
        invalid(path, format!("tensor {name} is {what}, but the bundle precision is {precision}"))
    };
    match (weight, precision.ggml_dtype(), weight.dims().len()) {
        (Weight::Dense(t), Some(_), 2) => Err(wrong(format!("dense {:?}", t.dtype()))),
        (Weight::Quantized(q), None, _) | (Weight::Quantized(q), _, 1) => {
            Err(wrong(format!("quantized ({:?})", q.dtype())))
        }
        (Weight::Quantized(q), Some(dtype), _) if !quant::fits_blocks(q.shape().dims(), dtype) => {
            // The f16 fallback of rows that blocks cannot hold: a plain f16 tensor.
            if q.dtype() != GgmlDType::F16 {
                return Err(wrong(format!("{:?} (expected the f16 fallback)", q.dtype())));
            }
            let bytes = q.data().map_err(|e| invalid(path, format!("tensor {name}: {e}")))?;
            Tensor::from_raw_buffer(&bytes, DType::F16, q.shape().dims(), &Device::Cpu)
                .map_err(|e| invalid(path, format!("tensor {name}: {e}")))
        }
        (Weight::Quantized(q), Some(dtype), _) => {
            if q.dtype() != dtype {
                return Err(wrong(format!("{:?} blocks", q.dtype())));
            }
            let bytes = q.data().map_err(|e| invalid(path, format!("tensor {name}: {e}")))?;
            let rows = q.shape().dims()[0];
            let shape = (rows, bytes.len() / rows.max(1));
            Tensor::from_raw_buffer(&bytes, DType::U8, &[shape.0, shape.1], &Device::Cpu)
                .map_err(|e| invalid(path, format!("tensor {name}: {e}")))
        }
        (Weight::Dense(t), _, _) => Ok(t.clone()),
    }
}

fn write_files(
    dir: &Path,
    tensors: &[(String, Tensor)],
    precision: Precision,
    tokenizer: &Tokenizer,
    config: &ModelConfig,
    info: &BundleInfo,
) -> Result<BundleMetadata, BundleError> {
    let weights_path = dir.join(WEIGHTS_FILE);
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, &weights_path)
        .map_err(|e| invalid(&weights_path, e.to_string()))?;
    let tokenizer_json =
        tokenizer.to_json().map_err(|e| invalid(dir.join(TOKENIZER_FILE), e.to_string()))?;
    let bundle_config =
        BundleConfig { model: config.to_raw(), special_tokens: special_ids(tokenizer) };
    let config_yaml = serde_yaml::to_string(&bundle_config)
        .map_err(|e| invalid(dir.join(CONFIG_FILE), e.to_string()))?;
    let metadata = BundleMetadata {
        format_version: BUNDLE_FORMAT_VERSION,
        model_version: info.model_version.clone(),
        dataset_id: info.dataset_id.clone(),
        dataset_hash: info.dataset_hash.clone(),
        tokenizer_hash: sha256_hex(tokenizer_json.as_bytes()),
        config_hash: sha256_hex(config_yaml.as_bytes()),
        training_seed: info.training_seed,
        steps: info.steps,
        tokens_seen: info.tokens_seen,
        eval: info.eval.clone(),
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        precision,
    };
    let metadata_json = serde_json::to_string_pretty(&metadata)
        .map_err(|e| invalid(dir.join(METADATA_FILE), e.to_string()))?;
    write_synced(&dir.join(TOKENIZER_FILE), tokenizer_json.as_bytes())?;
    write_synced(&dir.join(CONFIG_FILE), config_yaml.as_bytes())?;
    write_synced(&dir.join(METADATA_FILE), metadata_json.as_bytes())?;
    let mut checksums = String::new();
    for file in CHECKSUMMED_FILES {
        let path = dir.join(file);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        // Two spaces: `sha256sum`'s text-mode separator, so `sha256sum -c checksum.txt` works.
        checksums.push_str(&format!("{}  {file}\n", sha256_hex(&bytes)));
    }
    fs::File::open(&weights_path).and_then(|f| f.sync_all()).map_err(io_err(&weights_path))?;
    write_synced(&dir.join(CHECKSUM_FILE), checksums.as_bytes())?;
    sync_dir(dir)?;
    Ok(metadata)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), BundleError> {
    let mut file = fs::File::create(path).map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), BundleError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

fn special_ids(tokenizer: &Tokenizer) -> BTreeMap<String, u32> {
    SpecialToken::ALL
        .iter()
        .map(|&t| (t.as_str().to_string(), tokenizer.special_ids().get(t)))
        .collect()
}
