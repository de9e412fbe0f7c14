//! GGUF export (issue 10): an M31R model as a llama.cpp / Ollama `llama` model file — LLaMA
//! architecture keys, llama.cpp tensor names, our byte-level BPE with the `llama-bpe` pre-tokenizer
//! and FIM token ids, tied embeddings without `output.weight`.
//!
//! Our checkpoints use Hugging Face's rotate-half RoPE; llama.cpp's `llama` architecture rotates
//! adjacent pairs. Like llama.cpp's `convert_hf_to_gguf.py`, the writer permutes the rows of each
//! head of `q_proj` and `k_proj` so that pair `(2i, 2i+1)` holds what was `(i, i + head_dim/2)`;
//! attention scores, and so the model, are unchanged. Rows are permuted as whole GGML block rows,
//! so a quantized bundle exports bit-identical blocks.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::quant::{Precision, Weight};
use crate::tokenizer::{SpecialToken, Tokenizer};
pub use crate::weights::gguf_name;

/// Name of our pre-tokenizer regex in llama.cpp (LLaMA-3's split pattern).
pub const PRE_TOKENIZER: &str = "llama-bpe";

/// Why a GGUF file could not be written; names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// A tensor could not be converted.
    #[error("{}: tensor {name}: {reason}", path.display())]
    Tensor {
        /// The file being written.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// The tokenizer could not be described in GGUF terms.
    #[error("{}: tokenizer: {reason}", path.display())]
    Tokenizer {
        /// The file being written.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Writing failed.
    #[error("{}: {reason}", path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// The row order llama.cpp's interleaved RoPE needs for a `(heads·head_dim, in)` projection:
/// output row `h·d + 2i + j` is input row `h·d + j·d/2 + i`.
pub fn rope_row_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut order = Vec::with_capacity(heads * head_dim);
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                order.push(h * head_dim + j * half + i);
            }
        }
    }
    order
}

/// `weight` with its rows taken in `order` (dense or GGML block rows).
fn permute_rows(weight: &Weight, order: &[usize]) -> candle_core::Result<Weight> {
    match weight {
        Weight::Dense(t) => {
            let idx = Tensor::new(
                order.iter().map(|&r| r as u32).collect::<Vec<_>>().as_slice(),
                t.device(),
            )?;
            Ok(Weight::Dense(t.index_select(&idx, 0)?))
        }
        Weight::Quantized(q) => {
            let data = q.data()?;
            let rows = q.shape().dims()[0];
            if order.len() != rows || data.len() % rows != 0 {
                candle_core::bail!("cannot permute {rows} rows by an order of {}", order.len());
            }
            let row_bytes = data.len() / rows;
            let mut out = Vec::with_capacity(data.len());
            for &r in order {
                out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
            }
            let storage = QStorage::from_data(Cow::Owned(out), &q.device(), q.dtype())?;
            Ok(Weight::Quantized(Arc::new(QTensor::new(storage, q.shape().clone())?)))
        }
    }
}

/// GGML `general.file_type` of a precision (llama.cpp's `LLAMA_FTYPE_*`).
fn file_type(precision: Precision) -> u32 {
    match precision {
        Precision::F32 => 0,
        Precision::F16 => 1,
        Precision::Q4_0 => 2,
        Precision::Q8_0 => 7,
        Precision::Q4K => 14,
    }
}

/// Tokens by id, their GGUF token types, and merges.
type Vocabulary = (Vec<String>, Vec<i32>, Vec<String>);

/// Our vocabulary as llama.cpp's `gpt2` tokenizer model: tokens by id, token types (1 normal,
/// 3 control) and merges (`"a b"`), from the `tokenizers` JSON.
fn vocabulary(tokenizer: &Tokenizer, path: &Path) -> Result<Vocabulary, GgufError> {
    let bad = |reason: String| GgufError::Tokenizer { path: path.to_path_buf(), reason };
    let json = tokenizer.to_json().map_err(|e| bad(e.to_string()))?;
    let root: serde_json::Value = serde_json::from_str(&json).map_err(|e| bad(e.to_string()))?;
    let n = tokenizer.vocab_size();
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    let vocab = root["model"]["vocab"].as_object().ok_or_else(|| bad("no model.vocab".into()))?;
    for (token, id) in vocab {
        let id = id.as_u64().ok_or_else(|| bad(format!("id of {token:?} is not a number")))?;
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| bad(format!("id {id} of {token:?} is outside the vocabulary")))?;
        *slot = Some(token.clone());
    }
    for added in root["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            return Err(bad(format!("malformed added token {added}")));
        };
        let id = id as usize;
        if id >= n {
            return Err(bad(format!("added token {content:?} has id {id} ≥ {n}")));
        }
        tokens[id] = Some(content.to_string());
        if added["special"].as_bool() == Some(true) {
            types[id] = 3;
        }
    }
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.ok_or_else(|| bad(format!("no token has id {id}"))))
        .collect::<Result<Vec<_>, _>>()?;
    // `tokenizers` writes merges as "a b" strings or, in newer versions, as ["a", "b"] pairs.
    let merges = root["model"]["merges"]
        .as_array()
        .ok_or_else(|| bad("no model.merges".into()))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(pair) if pair.len() == 2 => {
                Ok(format!("{} {}", pair[0].as_str().unwrap_or(""), pair[1].as_str().unwrap_or("")))
            }
            other => Err(bad(format!("malformed merge {other}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((tokens, types, merges))
}

/// Writes `weights` (named as in Hugging Face LLaMA, stored at `precision`) with `tokenizer` and
/// `config` as a GGUF file at `path` (written to a temporary file, then renamed). Norm scales are
/// f32; 2-D weights keep their blocks (or dense dtype).
pub fn write_gguf(
    path: &Path,
    weights: &[(String, Weight)],
    precision: Precision,
    tokenizer: &Tokenizer,
    config: &ModelConfig,
    name: &str,
) -> Result<(), GgufError> {
    let tensor_err = |name: &str, reason: String| GgufError::Tensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        reason,
    };
    let q_order = rope_row_order(config.n_heads(), config.head_dim());
    let k_order = rope_row_order(config.n_kv_heads(), config.head_dim());
    let mut tensors: BTreeMap<String, Arc<QTensor>> = BTreeMap::new();
    for (hf, weight) in weights {
        let gguf = gguf_name(hf).ok_or_else(|| tensor_err(hf, "not a LLaMA tensor".into()))?;
        let fail = |e: candle_core::Error| tensor_err(hf, e.to_string());
        let weight = if hf.ends_with("self_attn.q_proj.weight") {
            permute_rows(weight, &q_order).map_err(fail)?
        } else if hf.ends_with("self_attn.k_proj.weight") {
            permute_rows(weight, &k_order).map_err(fail)?
        } else {
            weight.clone()
        };
        let q = match weight {
            Weight::Quantized(q) => q,
            Weight::Dense(t) => {
                let dtype = match t.dtype() {
                    DType::F16 if t.rank() == 2 => GgmlDType::F16,
                    _ => GgmlDType::F32,
                };
                let t = t.to_device(&Device::Cpu).map_err(fail)?;
                Arc::new(QTensor::quantize(&t, dtype).map_err(fail)?)
            }
        };
        tensors.insert(gguf, q);
    }

    let (tokens, types, merges) = vocabulary(tokenizer, path)?;
    let ids = tokenizer.special_ids();
    let u32v = |v: usize| Value::U32(v as u32);
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let eos = ids.get(SpecialToken::EndOfText);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String(name.into())),
        ("general.file_type", Value::U32(file_type(precision))),
        ("general.quantization_version", Value::U32(2)),
        ("llama.vocab_size", u32v(config.vocab_size())),
        ("llama.context_length", u32v(config.context_length())),
        ("llama.embedding_length", u32v(config.d_model())),
        ("llama.block_count", u32v(config.n_layers())),
        ("llama.feed_forward_length", u32v(config.d_ff())),
        ("llama.attention.head_count", u32v(config.n_heads())),
        ("llama.attention.head_count_kv", u32v(config.n_kv_heads())),
        ("llama.rope.dimension_count", u32v(config.head_dim())),
        ("llama.rope.freq_base", Value::F32(config.rope_theta() as f32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(config.norm_eps() as f32)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(PRE_TOKENIZER.into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges", strings(merges)),
        // No BOS: our prompts start with the text (or a FIM token), never a begin marker.
        ("tokenizer.ggml.bos_token_id", Value::U32(eos)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.ggml.eos_token_id", Value::U32(eos)),
        ("tokenizer.ggml.eot_token_id", Value::U32(eos)),
        ("tokenizer.ggml.padding_token_id", Value::U32(ids.get(SpecialToken::FimPad))),
        ("tokenizer.ggml.fim_pre_token_id", Value::U32(ids.get(SpecialToken::FimPrefix))),
        ("tokenizer.ggml.fim_suf_token_id", Value::U32(ids.get(SpecialToken::FimSuffix))),
        ("tokenizer.ggml.fim_mid_token_id", Value::U32(ids.get(SpecialToken::FimMiddle))),
        ("tokenizer.ggml.fim_pad_token_id", Value::U32(ids.get(SpecialToken::FimPad))),
        ("tokenizer.ggml.fim_rep_token_id", Value::U32(ids.get(SpecialToken::RepoName))),
        ("tokenizer.ggml.fim_sep_token_id", Value::U32(ids.get(SpecialToken::FileSep))),
    ];

    let write_err = |reason: String| GgufError::Write { path: path.to_path_buf(), reason };
    let tmp = path.with_extension("gguf.tmp");
    let result = (|| -> Result<(), GgufError> {
        let file = std::fs::File::create(&tmp).map_err(|e| write_err(e.to_string()))?;
        let mut out = BufWriter::new(file);
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let ts: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v.as_ref())).collect();
        candle_core::quantized::gguf_file::write(&mut out, &md, &ts)
            .map_err(|e| write_err(e.to_string()))?;
        out.flush().map_err(|e| write_err(e.to_string()))?;
        out.get_ref().sync_all().map_err(|e| write_err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| write_err(e.to_string()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
