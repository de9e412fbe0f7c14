//! `eval` on a tiny seeded bundle over the fixture data directory: end to end (library and CLI),
//! every JSON field, determinism, the model's code length against a direct computation, and the
//! refusals (another tokenizer, no test split).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use m31r_model::recall::RecallParams;
use m31r_model::{BundleInfo, Model, ModelConfig, RawModelConfig, Tokenizer, write_bundle};
use m31r_train::eval::lm::document_nats;
use m31r_train::eval::{EvalError, EvalOptions, EvalReport, evaluate_bundle};
use m31r_train::shards::{INDEX_FILE, SHARDS_DIR};
use m31r_train::tok::TOKENIZER_FILE;
use m31r_train::{Error, ShardSet, Split};
use tempfile::TempDir;

use crate::common::{Pipeline, copy_tree, pipeline};

/// The fixture data directory and a tiny seeded bundle over its tokenizer, built once.
struct Fixture {
    pipeline: Pipeline,
    bundle: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let pipeline = pipeline();
        let bundle = pipeline.tmp.path().join("bundle");
        let tokenizer = Tokenizer::from_file(pipeline.data().join(TOKENIZER_FILE)).unwrap();
        tiny_bundle(&bundle, &tokenizer, &pipeline.info.dataset_id);
        Fixture { pipeline, bundle }
    })
}

/// A 2-layer model with a 128-token context, so test documents span several scoring windows.
fn tiny_config(vocab_size: usize) -> ModelConfig {
    ModelConfig::new(&RawModelConfig {
        vocab_size,
        d_model: 32,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: None,
        d_ff: 64,
        context_length: 128,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
    })
    .unwrap()
}

fn tiny_bundle(dest: &Path, tokenizer: &Tokenizer, dataset_id: &str) {
    let config = tiny_config(tokenizer.vocab_size());
    let (model, _) = Model::init(&config, 7, &Device::Cpu).unwrap();
    let info = BundleInfo {
        model_version: "fixture-tiny".into(),
        dataset_id: dataset_id.into(),
        steps: 0,
        ..Default::default()
    };
    write_bundle(dest, &model.named_tensors(), tokenizer, &config, &info).unwrap();
}

fn options(f: &Fixture) -> EvalOptions {
    EvalOptions {
        items: 6,
        max_bytes: 3000,
        max_new_tokens: 12,
        ngram_max_tokens: 20_000,
        ..EvalOptions::new(&f.bundle, f.pipeline.data())
    }
}

/// Every key path of a JSON value (array elements under `[]`).
fn key_paths(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                out.insert(path.clone());
                key_paths(v, &path, out);
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                key_paths(v, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

fn without_timings(report: &EvalReport) -> serde_json::Value {
    let mut v = serde_json::to_value(report).unwrap();
    v.as_object_mut().unwrap().remove("timings");
    v
}

#[test]
fn eval_runs_end_to_end_and_its_json_has_every_field() {
    let f = fixture();
    let report = evaluate_bundle(&options(f)).unwrap();
    println!("{}", report.table());

    let json = serde_json::to_value(&report).unwrap();
    let mut keys = BTreeSet::new();
    key_paths(&json, "", &mut keys);
    let keys: Vec<String> = keys.into_iter().collect();
    expect_test::expect![[r#"
        bits_per_byte
        bits_per_byte.bytes
        bits_per_byte.documents
        bits_per_byte.model
        bits_per_byte.model_recall
        bits_per_byte.nats_per_token
        bits_per_byte.tokens
        bits_per_byte.xz
        bits_per_byte.xz.bits_per_byte
        bits_per_byte.xz.command
        bits_per_byte.xz.compressed_bytes
        bits_per_byte.xz.error
        bits_per_byte.zstd
        bits_per_byte.zstd.bits_per_byte
        bits_per_byte.zstd.command
        bits_per_byte.zstd.compressed_bytes
        bits_per_byte.zstd.error
        bundle
        bundle.context_length
        bundle.dataset_id
        bundle.dir
        bundle.model_version
        bundle.params
        bundle.steps
        bundle.tokenizer_hash
        bundle.tokens_seen
        completion
        completion.candidate_lines
        completion.examples
        completion.examples[].expected
        completion.examples[].location
        completion.examples[].model_fim
        completion.examples[].model_left_to_right
        completion.examples[].ngram
        completion.items
        completion.model_fim
        completion.model_fim.edit_similarity
        completion.model_fim.exact
        completion.model_fim.exact_match
        completion.model_fim.items
        completion.model_fim.mean_tokens
        completion.model_left_to_right
        completion.model_left_to_right.edit_similarity
        completion.model_left_to_right.exact
        completion.model_left_to_right.exact_match
        completion.model_left_to_right.items
        completion.model_left_to_right.mean_tokens
        completion.ngram
        completion.ngram.edit_similarity
        completion.ngram.exact
        completion.ngram.exact_match
        completion.ngram.items
        completion.ngram.mean_tokens
        data
        data.dataset_id
        data.dir
        data.same_dataset_as_bundle
        data.test_bytes
        data.test_documents
        data.test_tokens
        data.tokenizer_id
        ngram
        ngram.contexts
        ngram.order
        ngram.train_tokens
        settings
        settings.items
        settings.max_bytes
        settings.max_new_tokens
        settings.max_prompt_tokens
        settings.ngram_max_tokens
        settings.ngram_order
        settings.recall
        settings.seed
        settings.split
        timings
        timings.bits_per_byte_s
        timings.completion_s
        timings.decode_ms_per_token
        timings.decode_tokens
        timings.ngram_train_s
        timings.prefill_tokens_per_s
        timings.total_s
    "#]]
    .assert_eq(&(keys.join("\n") + "\n"));
    // Every prompt is timed; single-token steps (none when each line ends at its first token,
    // as this untrained fixture's do) have a speed exactly when there are some.
    let t = &report.timings;
    assert!(t.prefill_tokens_per_s > 0.0, "{t:?}");
    assert_eq!(t.decode_tokens > 0, t.decode_ms_per_token > 0.0, "{t:?}");

    // The numbers are what they claim to be.
    let b = &report.bits_per_byte;
    assert!(b.documents >= 1 && b.bytes >= 1 && b.tokens >= 1, "{b:?}");
    assert!(b.bytes >= 3000 || b.documents == report.data.test_documents, "{b:?}");
    let expected = b.nats_per_token * b.tokens as f64 / std::f64::consts::LN_2 / b.bytes as f64;
    assert!((b.model - expected).abs() < 1e-9);
    // An untrained model is close to uniform over the vocabulary: ≈ ln(vocab) nats per token.
    let ln_vocab = (f.pipeline.report.vocab_size as f64).ln();
    assert!((b.nats_per_token - ln_vocab).abs() < 0.5, "{} vs ln V {ln_vocab}", b.nats_per_token);
    for r in [&b.xz, &b.zstd] {
        match (r.bits_per_byte, &r.error) {
            (Some(x), None) => assert!(x > 0.0 && x < 8.0, "{r:?}"),
            (None, Some(e)) => assert!(e.contains("not installed"), "{r:?}"),
            _ => panic!("a compressor has a result or an error: {r:?}"),
        }
    }
    let c = &report.completion;
    assert_eq!(c.items, 6);
    assert!(c.candidate_lines >= 6);
    for s in [&c.model_fim, &c.model_left_to_right, &c.ngram] {
        assert_eq!(s.items, 6);
        assert!((0.0..=1.0).contains(&s.exact_match) && (0.0..=1.0).contains(&s.edit_similarity));
        assert!(s.mean_tokens <= 12.0);
    }
    assert!(!c.examples.is_empty() && c.examples.len() <= 5);
    for e in &c.examples {
        assert!(!e.expected.contains('\n') && !e.model_fim.contains('\n'), "{e:?}");
    }
    assert_eq!(report.settings.max_prompt_tokens, 128 - 12);
    assert!(report.data.same_dataset_as_bundle);
    assert_eq!(report.ngram.order, 4);
    assert_eq!(report.ngram.contexts.len(), 3);
    assert!(report.ngram.train_tokens > 1000);

    let metrics = report.metrics();
    for key in ["test_bits_per_byte", "fim_exact_match", "l2r_edit_similarity", "ngram_exact_match"]
    {
        assert!(metrics.contains_key(key), "{key} missing from {metrics:?}");
    }
    let table = report.table();
    for word in ["bits/byte", "model", "xz -9", "zstd -19", "exact match", "4-gram baseline"] {
        assert!(table.contains(word), "{word} missing from\n{table}");
    }

    // Recall (on by default) mixes the documents' own repetitions in: a shorter code than the
    // untrained network's near-uniform one, and the settings say which recall was used.
    let with_recall = b.model_recall.expect("recall is on by default");
    assert!(with_recall < b.model - 0.1, "{with_recall} vs {}", b.model);
    assert!(metrics.contains_key("test_bits_per_byte_recall"));
    assert_eq!(report.settings.recall, RecallParams::DEFAULT.to_string());
    assert_eq!(report.settings.split, "test");
    assert!(b.recall_grid.is_empty());

    // Deterministic: the same items, completions and numbers again.
    let again = evaluate_bundle(&options(f)).unwrap();
    assert_eq!(without_timings(&report), without_timings(&again));
}

#[test]
fn recall_off_is_the_network_alone_and_the_validation_split_tunes_it() {
    let f = fixture();
    let on = evaluate_bundle(&options(f)).unwrap();
    let off = evaluate_bundle(&EvalOptions { recall: RecallParams::OFF, ..options(f) }).unwrap();
    assert_eq!(off.bits_per_byte.model, on.bits_per_byte.model);
    assert_eq!(off.bits_per_byte.model_recall, None);
    assert_eq!(off.settings.recall, "off");
    assert!(off.table().contains("recall off"), "{}", off.table());

    let tuned =
        evaluate_bundle(&EvalOptions { split: Split::Validation, tune_recall: true, ..options(f) })
            .unwrap();
    assert_eq!(tuned.settings.split, "validation");
    assert!(tuned.table().contains("on the validation split"), "{}", tuned.table());
    // 8 weights × 6 half-lengths at the default order, each a code length.
    assert_eq!(tuned.bits_per_byte.recall_grid.len(), 48);
    assert!(
        tuned.bits_per_byte.recall_grid.iter().all(|(name, x)| name.starts_with("16,") && *x > 0.0)
    );
    assert_ne!(tuned.bits_per_byte.bytes, 0);
}

#[test]
fn the_code_length_matches_the_inference_forward() {
    let f = fixture();
    let tokenizer = Tokenizer::from_file(f.pipeline.data().join(TOKENIZER_FILE)).unwrap();
    let config = tiny_config(tokenizer.vocab_size());
    let (model, _) = Model::init(&config, 7, &Device::Cpu).unwrap();
    let eot = tokenizer.special_ids().end_of_text;
    let doc: Vec<u32> = tokenizer.encode("fn main() {\n    let x = 1;\n}\n").unwrap();
    let nats = document_nats(&model, eot, &doc).unwrap();

    let seq: Vec<u32> = std::iter::once(eot).chain(doc.iter().copied()).collect();
    let ids = Tensor::new(seq.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    // Through the daemon's inference forward, so the check does not reuse eval's own path.
    let mut cache = model.new_cache(128).unwrap();
    let logits =
        model.forward(&ids, &mut cache).unwrap().i(0).unwrap().to_dtype(DType::F32).unwrap();
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let rows: Vec<Vec<f32>> = log_probs.to_vec2().unwrap();
    let direct: f64 = (1..seq.len()).map(|i| -f64::from(rows[i - 1][seq[i] as usize])).sum();
    assert!((nats - direct).abs() < 1e-3 * direct, "{nats} vs {direct}");

    // A document longer than the context is scored in windows: every token counted once, each
    // costing about ln(vocab) under this untrained model.
    let long: Vec<u32> = (0..300).map(|i| doc[i % doc.len()]).collect();
    let nats = document_nats(&model, eot, &long).unwrap();
    let per_token = nats / long.len() as f64;
    assert!((per_token - (tokenizer.vocab_size() as f64).ln()).abs() < 0.5, "{per_token}");
}

#[test]
fn a_bundle_with_another_tokenizer_is_refused_naming_both() {
    let f = fixture();
    let tmp = TempDir::new().unwrap();
    let texts = ["fn main() { println!(\"hi\"); }\n"; 20];
    let other = Tokenizer::train(texts.iter(), 400).unwrap();
    let bundle = tmp.path().join("other-bundle");
    tiny_bundle(&bundle, &other, "");
    let err = evaluate_bundle(&EvalOptions::new(&bundle, f.pipeline.data())).unwrap_err();
    assert!(matches!(err, EvalError::TokenizerMismatch { .. }), "{err}");
    let msg = err.to_string();
    let other_hash = m31r_model::bundle::sha256_hex(other.to_json().unwrap().as_bytes());
    for part in [
        other_hash.as_str(),
        f.pipeline.report.tokenizer_id.as_str(),
        "other-bundle",
        f.pipeline.data().to_str().unwrap(),
    ] {
        assert!(msg.contains(part), "{part} missing from: {msg}");
    }
}

#[test]
fn a_data_dir_without_a_test_split_is_refused() {
    let f = fixture();
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    copy_tree(&f.pipeline.data(), &data);
    let index_path = data.join(SHARDS_DIR).join(INDEX_FILE);
    let mut index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&index_path).unwrap()).unwrap();
    index["splits"].as_object_mut().unwrap().remove("test");
    fs::write(&index_path, serde_json::to_string(&index).unwrap()).unwrap();
    let err = evaluate_bundle(&EvalOptions::new(&f.bundle, &data)).unwrap_err();
    assert!(matches!(err, EvalError::Data(Error::Invalid { .. })), "{err}");
    assert!(err.to_string().contains("has no test split"), "{err}");
    assert!(ShardSet::open(&f.pipeline.data(), Split::Test).is_ok(), "the original is untouched");

    // A data directory that was never prepared names the stage to run.
    let bare = tmp.path().join("bare");
    copy_tree(&f.pipeline.data(), &bare);
    fs::remove_dir_all(bare.join(SHARDS_DIR)).unwrap();
    let err = evaluate_bundle(&EvalOptions::new(&f.bundle, &bare)).unwrap_err();
    assert!(err.to_string().contains("m31r-train prepare"), "{err}");
}

#[test]
fn the_cli_prints_the_table_and_writes_the_json() {
    let f = fixture();
    let tmp = TempDir::new().unwrap();
    let out_path = tmp.path().join("eval.json");
    let out = Command::new(env!("CARGO_BIN_EXE_m31r-train"))
        .args(["eval", "--bundle", f.bundle.to_str().unwrap(), "--data"])
        .arg(f.pipeline.data())
        .args(["--items", "3", "--max-bytes", "1000", "--ngram-tokens", "5000", "--out"])
        .arg(&out_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for word in ["bits/byte", "xz -9", "zstd -19", "exact match", "edit similarity"] {
        assert!(stdout.contains(word), "{word} missing from\n{stdout}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&out_path).unwrap()).unwrap();
    assert_eq!(json["completion"]["items"], 3);

    // A bundle directory that does not exist is named.
    let out = Command::new(env!("CARGO_BIN_EXE_m31r-train"))
        .args(["eval", "--bundle", "no-such-bundle", "--data"])
        .arg(f.pipeline.data())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-bundle"));
}
