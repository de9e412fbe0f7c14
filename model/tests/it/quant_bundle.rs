//! Quantized release bundles: the metadata records the precision, the loader rebuilds exactly the
//! quantized model that was written, checksums still cover every file, and a tampered or
//! inconsistent quantized bundle never loads.

use std::fs;
use std::path::Path;

use candle_core::{DType, Device};
use m31r_model::bundle::{
    BundleMetadata, CHECKSUM_FILE, CHECKSUMMED_FILES, METADATA_FILE, WEIGHTS_FILE, sha256_hex,
    write_quantized_bundle,
};
use m31r_model::quant;
use m31r_model::{Bundle, BundleInfo, Model, ModelConfig, Precision, RawModelConfig, Tokenizer};

use m31r_model::testing::{max_abs_diff, row};

const CORPUS: &[&str] = &[
    "fn main() {\n    let v = vec![1, 2, 3];\n    for x in &v {\n        println!(\"{x}\");\n    }\n}\n",
    "pub struct Point { pub x: f64, pub y: f64 }\n\nimpl Point {\n    pub fn norm(&self) -> f64 {\n        (self.x * self.x + self.y * self.y).sqrt()\n    }\n}\n",
];

struct Fixture {
    dir: tempfile::TempDir,
    config: ModelConfig,
    model: Model,
    tokenizer: Tokenizer,
}

fn fixture() -> Fixture {
    let tokenizer = Tokenizer::train(CORPUS.iter().cycle().take(40), 300).unwrap();
    let config = ModelConfig::new(&RawModelConfig {
        vocab_size: tokenizer.vocab_size(),
        d_model: 64,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: None,
        d_ff: 128,
        context_length: 64,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
    })
    .unwrap();
    let (model, _) = Model::init(&config, 9, &Device::Cpu).unwrap();
    Fixture { dir: tempfile::tempdir().unwrap(), config, model, tokenizer }
}

fn write(f: &Fixture, name: &str, precision: Precision) -> std::path::PathBuf {
    let path = f.dir.path().join(name);
    let info = BundleInfo { model_version: format!("test-{precision}"), ..Default::default() };
    write_quantized_bundle(
        &path,
        &f.model.named_tensors(),
        precision,
        &f.tokenizer,
        &f.config,
        &info,
    )
    .unwrap();
    path
}

fn open_err(dir: &Path) -> String {
    Bundle::open(dir).map(|_| ()).unwrap_err().to_string()
}

#[test]
fn quantized_bundles_load_back_to_the_quantized_model() {
    let f = fixture();
    let ids = row(&f.tokenizer.encode("fn main() {").unwrap());
    // Q4_K: 64- and 128-value rows fill no super-block, so this is the f16 fallback's round trip.
    for precision in [Precision::Q8_0, Precision::Q4_0, Precision::F16, Precision::Q4K] {
        let dir = write(&f, precision.name(), precision);
        let bundle = Bundle::open(&dir).unwrap();
        assert_eq!(bundle.precision(), precision);
        assert_eq!(bundle.metadata().precision, precision);
        let loaded = bundle.model_at(precision, &Device::Cpu).unwrap();
        // The same quantization in memory, never written to disk.
        let weights =
            quant::inference_weights(&f.model.named_tensors(), precision, &Device::Cpu).unwrap();
        let direct = Model::from_weights(
            &f.config,
            weights.into_iter().collect(),
            precision.activation_dtype(&Device::Cpu),
            &Device::Cpu,
        )
        .unwrap();
        let a = loaded.forward(&ids, &mut loaded.new_cache(16).unwrap()).unwrap();
        let b = direct.forward(&ids, &mut direct.new_cache(16).unwrap()).unwrap();
        let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{precision}: bundle round trip changed the model");
        // Smaller on disk, as the precision promises.
        let file = fs::metadata(dir.join(WEIGHTS_FILE)).unwrap().len();
        let bytes = precision.weight_bytes(&f.config);
        assert!(file >= bytes && file < bytes + 4096, "{precision}: file {file} vs {bytes}");
    }
}

#[test]
fn checksums_cover_every_file_of_a_quantized_bundle() {
    let f = fixture();
    let dir = write(&f, "q8", Precision::Q8_0);
    let listing = fs::read_to_string(dir.join(CHECKSUM_FILE)).unwrap();
    for file in CHECKSUMMED_FILES {
        let hash = sha256_hex(&fs::read(dir.join(file)).unwrap());
        assert!(listing.contains(&format!("{hash}  {file}")), "{file} not covered:\n{listing}");
    }
    // One flipped bit in the GGML blocks (near the end of the file: weights, not header).
    let path = dir.join(WEIGHTS_FILE);
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x10;
    fs::write(&path, bytes).unwrap();
    let err = open_err(&dir);
    assert!(err.contains(WEIGHTS_FILE) && err.contains("checksum mismatch"), "{err}");
}

/// Rewrites `metadata.json` with `edit` and re-seals `checksum.txt`, as a careless tool would:
/// the loader's own validation, not the checksums, must catch the inconsistency.
fn reseal_metadata(dir: &Path, edit: impl FnOnce(&mut BundleMetadata)) {
    let path = dir.join(METADATA_FILE);
    let mut meta: BundleMetadata = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut meta);
    fs::write(&path, serde_json::to_string_pretty(&meta).unwrap()).unwrap();
    let mut listing = String::new();
    for file in CHECKSUMMED_FILES {
        listing.push_str(&format!("{}  {file}\n", sha256_hex(&fs::read(dir.join(file)).unwrap())));
    }
    fs::write(dir.join(CHECKSUM_FILE), listing).unwrap();
}

#[test]
fn a_precision_that_disagrees_with_the_weights_refuses_to_load() {
    let f = fixture();
    // Q8_0 blocks declared as f32 weights.
    let dir = write(&f, "q8-as-f32", Precision::Q8_0);
    reseal_metadata(&dir, |m| m.precision = Precision::F32);
    let err = open_err(&dir);
    assert!(err.contains(WEIGHTS_FILE) && err.contains("has dtype U8"), "{err}");
    // Q8_0 blocks declared as Q4_0: the byte rows do not match Q4_0's size.
    let dir = write(&f, "q8-as-q4", Precision::Q8_0);
    reseal_metadata(&dir, |m| m.precision = Precision::Q4_0);
    let err = open_err(&dir);
    assert!(err.contains("has shape [") && err.contains("config.yaml implies"), "{err}");
    // f32 weights declared as Q8_0.
    let dir = write(&f, "f32-as-q8", Precision::F32);
    reseal_metadata(&dir, |m| m.precision = Precision::Q8_0);
    let err = open_err(&dir);
    assert!(err.contains("u8 (q8_0 blocks)"), "{err}");
}

#[test]
fn serving_precision_rules() {
    let f = fixture();
    let q8 = Bundle::open(&write(&f, "q8", Precision::Q8_0)).unwrap();
    let err = q8.model_at(Precision::Q4_0, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("stores q8_0 weights") && err.contains("--quantize q4_0"), "{err}");
    // The old dtype API builds a quantized bundle at its own precision.
    assert_eq!(q8.model(DType::F16, &Device::Cpu).unwrap().dtype(), DType::F32);
    // A dense bundle can be quantized at load.
    let dense = Bundle::open(&write(&f, "f32", Precision::F32)).unwrap();
    assert_eq!(dense.precision(), Precision::F32);
    let at_load = dense.model_at(Precision::Q8_0, &Device::Cpu).unwrap();
    let ids = row(&f.tokenizer.encode("pub struct").unwrap());
    let a = at_load.forward(&ids, &mut at_load.new_cache(8).unwrap()).unwrap();
    let b = q8.model_at(Precision::Q8_0, &Device::Cpu).unwrap();
    let b = b.forward(&ids, &mut b.new_cache(8).unwrap()).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}
