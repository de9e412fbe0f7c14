//! `m31r-train export`: turns a run's newest checkpoint into a release bundle (DESIGN §4) whose
//! metadata traces the dataset, tokenizer, seed, steps, tokens seen and last validation results.
//! With `--eval-report`, the results of `m31r-train eval` on the same checkpoint join the metadata.
//! Optionally at a quantized precision (`--quantize`, so the daemon starts without quantizing) and
//! as a GGUF file for llama.cpp / Ollama (`--gguf`), from the very same weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use m31r_model::Precision;
use m31r_model::bundle::{BundleInfo, BundleMetadata, write_bundle_weights};
use m31r_model::config::ModelConfig;
use m31r_model::tokenizer::Tokenizer;

use crate::error::Error;
use crate::eval::EvalReport;
use crate::fsutil::read_json;
use crate::train::checkpoint::{self, LoopState};
use crate::train::{METRICS_FILE, RUN_FILE, RunSpec, read_run_spec};

/// Optional outputs of [`export_with`].
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Precision of the bundle's weights (default f32).
    pub precision: Precision,
    /// Also write the same weights as a GGUF file here.
    pub gguf: Option<PathBuf>,
    /// An `eval` report of this very checkpoint (same step and dataset), whose metrics go into
    /// the bundle's `eval` metadata beside the last validation results.
    pub eval: Option<(PathBuf, EvalReport)>,
}

/// Writes the bundle of `run_dir`'s newest checkpoint to `out` (which must not exist), using the
/// tokenizer of the data directory `data`.
pub fn export(run_dir: &Path, data: &Path, out: &Path) -> Result<BundleMetadata, Error> {
    export_with(run_dir, data, out, &ExportOptions::default())
}

/// [`export`] at `options.precision`, and optionally as GGUF.
pub fn export_with(
    run_dir: &Path,
    data: &Path,
    out: &Path,
    options: &ExportOptions,
) -> Result<BundleMetadata, Error> {
    let invalid = |path: PathBuf, reason: String| Error::Invalid { path, reason };
    if !run_dir.join(RUN_FILE).is_file() {
        return Err(invalid(
            run_dir.to_path_buf(),
            format!("is not a training run (no {RUN_FILE}); give the --run-dir `train` wrote"),
        ));
    }
    let spec = read_run_spec(&run_dir.join(RUN_FILE))?;
    let Some((_, ckpt)) = checkpoint::list(run_dir)?.pop() else {
        return Err(invalid(run_dir.to_path_buf(), "has no complete checkpoint to export".into()));
    };
    let tokenizer_path = data.join("tokenizer.json");
    let json = std::fs::read(&tokenizer_path)
        .map_err(|source| Error::Io { path: tokenizer_path.clone(), source })?;
    if m31r_model::bundle::sha256_hex(&json) != spec.tokenizer_id {
        return Err(invalid(
            tokenizer_path,
            format!("is not the tokenizer this run trained with ({})", spec.tokenizer_id),
        ));
    }
    let tokenizer =
        Tokenizer::from_bytes(&json).map_err(|e| invalid(tokenizer_path.clone(), e.to_string()))?;
    let config = ModelConfig::new(&spec.model)
        .map_err(|e| invalid(run_dir.join(RUN_FILE), e.to_string()))?;
    let weights_path = ckpt.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)
        .map_err(|e| invalid(weights_path.clone(), e.to_string()))?;
    let state: LoopState = read_json(&ckpt.join("state.json"))?;
    let mut eval = last_validation(&run_dir.join(METRICS_FILE));
    if let Some((path, report)) = &options.eval {
        check_eval_report(path, report, &spec, &state)?;
        eval.extend(report.metrics());
    }
    let info = BundleInfo {
        model_version: format!("{}-step{}", spec.model.d_model, state.step),
        dataset_id: spec.dataset_id.clone(),
        dataset_hash: spec.dataset_id.clone(),
        training_seed: spec.train.seed,
        steps: state.step,
        tokens_seen: state.tokens_seen,
        eval,
    };
    let mut named: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let weights = m31r_model::quant::quantize(&named, options.precision)
        .map_err(|e| invalid(weights_path.clone(), e.to_string()))?;
    if let Some(gguf) = &options.gguf {
        if gguf.exists() {
            return Err(invalid(gguf.clone(), "already exists; refusing to overwrite".into()));
        }
        m31r_model::gguf::write_gguf(
            gguf,
            &weights,
            options.precision,
            &tokenizer,
            &config,
            &info.model_version,
        )
        .map_err(|e| invalid(gguf.clone(), e.to_string()))?;
    }
    write_bundle_weights(out, &weights, options.precision, &tokenizer, &config, &info)
        .map_err(|e| invalid(out.to_path_buf(), e.to_string()))
}

/// Refuses an eval report of another checkpoint or dataset than the one being exported.
fn check_eval_report(
    path: &Path,
    report: &EvalReport,
    spec: &RunSpec,
    state: &LoopState,
) -> Result<(), Error> {
    let evaluated = &report.bundle;
    let reason = if evaluated.steps != state.step {
        format!(
            "evaluates a bundle of step {}, but the newest checkpoint is step {}",
            evaluated.steps, state.step
        )
    } else if evaluated.dataset_id != spec.dataset_id {
        format!(
            "evaluates a model of dataset {}, but the run trained on {}",
            evaluated.dataset_id, spec.dataset_id
        )
    } else if evaluated.tokenizer_hash != spec.tokenizer_id {
        format!(
            "evaluates a model with tokenizer {}, but the run used {}",
            evaluated.tokenizer_hash, spec.tokenizer_id
        )
    } else {
        return Ok(());
    };
    Err(Error::Invalid { path: path.to_path_buf(), reason })
}

/// The last validation line of the metrics, as metric → value.
fn last_validation(metrics: &Path) -> BTreeMap<String, f64> {
    let text = std::fs::read_to_string(metrics).unwrap_or_default();
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("val_loss").is_some())
        .map(|v| {
            ["val_loss", "val_bits_per_byte"]
                .iter()
                .filter_map(|k| v[*k].as_f64().map(|x| (k.to_string(), x)))
                .collect()
        })
        .unwrap_or_default()
}
