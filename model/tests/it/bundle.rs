//! Release bundle: a written bundle loads back to the same model and passes `sha256sum -c`; any
//! flipped byte, missing file or config/weights disagreement refuses to load, naming the file;
//! so does a file that is not a regular file, without blocking on it.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use candle_core::{DType, Device};
use m31r_model::bundle::{
    BundleConfig, BundleMetadata, CHECKSUM_FILE, CHECKSUMMED_FILES, CONFIG_FILE, METADATA_FILE,
    TOKENIZER_FILE, WEIGHTS_FILE, sha256_hex,
};
use m31r_model::{Bundle, BundleInfo, Model, ModelConfig, RawModelConfig, Tokenizer, write_bundle};

use m31r_model::testing::{max_abs_diff, row};

const CORPUS: &[&str] = &[
    "fn main() {\n    let names = vec![\"größe\", \"日本語\", \"🦀\"];\n    for n in &names {\n        println!(\"{n}\");\n    }\n}\n",
    "pub struct Point { pub x: f64, pub y: f64 }\n\nimpl Point {\n    pub fn norm(&self) -> f64 {\n        (self.x * self.x + self.y * self.y).sqrt()\n    }\n}\n",
    "use std::collections::HashMap;\n\npub fn count(words: &[&str]) -> HashMap<String, usize> {\n    let mut map = HashMap::new();\n    for w in words {\n        *map.entry(w.to_string()).or_insert(0) += 1;\n    }\n    map\n}\n",
    "#[derive(Debug, Clone, PartialEq)]\npub enum Token { Ident(String), Number(i64), Punct(char) }\n\nimpl std::fmt::Display for Token {\n    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {\n        match self {\n            Token::Ident(s) => write!(f, \"{s}\"),\n            Token::Number(n) => write!(f, \"{n}\"),\n            Token::Punct(c) => write!(f, \"{c}\"),\n        }\n    }\n}\n",
];

struct Fixture {
    dir: tempfile::TempDir,
    model: Model,
    tokenizer: Tokenizer,
}

impl Fixture {
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("bundle")
    }
}

fn fixture() -> Fixture {
    let tokenizer = Tokenizer::train(CORPUS.iter().cycle().take(40), 320).unwrap();
    let config = ModelConfig::new(&RawModelConfig {
        vocab_size: tokenizer.vocab_size(),
        d_model: 32,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: None,
        d_ff: 64,
        context_length: 64,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
    })
    .unwrap();
    let (model, _) = Model::init(&config, 5, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture { dir, model, tokenizer };
    let info = BundleInfo {
        model_version: "test-1".into(),
        dataset_id: "fixture".into(),
        training_seed: 5,
        ..Default::default()
    };
    write_bundle(
        &fixture.path(),
        &fixture.model.named_tensors(),
        &fixture.tokenizer,
        &config,
        &info,
    )
    .unwrap();
    fixture
}

fn open_err(dir: &Path) -> String {
    Bundle::open(dir).map(|_| ()).unwrap_err().to_string()
}

/// Recomputes metadata hashes and `checksum.txt`, as a careless tool editing a bundle would, so
/// that the semantic checks (not the checksums) must catch the inconsistency.
fn reseal(dir: &Path) {
    let meta_path = dir.join(METADATA_FILE);
    let mut meta: BundleMetadata = serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    meta.config_hash = sha256_hex(&fs::read(dir.join(CONFIG_FILE)).unwrap());
    meta.tokenizer_hash = sha256_hex(&fs::read(dir.join(TOKENIZER_FILE)).unwrap());
    fs::write(&meta_path, serde_json::to_string(&meta).unwrap()).unwrap();
    let listing: String = CHECKSUMMED_FILES
        .iter()
        .map(|f| format!("{}  {f}\n", sha256_hex(&fs::read(dir.join(f)).unwrap())))
        .collect();
    fs::write(dir.join(CHECKSUM_FILE), listing).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut BundleConfig)) {
    let path = dir.join(CONFIG_FILE);
    let mut config: BundleConfig = serde_yaml::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    reseal(dir);
}

#[test]
fn written_bundle_loads_back_to_the_same_model() {
    let f = fixture();
    let bundle = Bundle::open(&f.path()).unwrap();
    assert_eq!(bundle.metadata().model_version, "test-1");
    assert_eq!(bundle.tokenizer().to_json().unwrap(), f.tokenizer.to_json().unwrap());
    let loaded = bundle.model(DType::F32, &Device::Cpu).unwrap();
    let ids = row(&f.tokenizer.encode("fn main() {").unwrap());
    let a = f.model.forward(&ids, &mut f.model.new_cache(16).unwrap()).unwrap();
    let b = loaded.forward(&ids, &mut loaded.new_cache(16).unwrap()).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // Only the bundle is left in the parent: the temporary directory was renamed away.
    assert_eq!(fs::read_dir(f.dir.path()).unwrap().count(), 1);
}

#[test]
fn sha256sum_accepts_the_checksum_file() {
    let f = fixture();
    let out = Command::new("sha256sum")
        .args(["-c", CHECKSUM_FILE])
        .current_dir(f.path())
        .output()
        .expect("sha256sum is installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches(": OK").count(), 4);
}

#[test]
fn a_flipped_byte_in_any_file_refuses_to_load() {
    let f = fixture();
    for file in CHECKSUMMED_FILES.iter().chain([&CHECKSUM_FILE]) {
        let path = f.path().join(file);
        let original = fs::read(&path).unwrap();
        for at in [0, original.len() / 2, original.len() - 2] {
            let mut bytes = original.clone();
            bytes[at] ^= 0x01;
            fs::write(&path, &bytes).unwrap();
            let err = open_err(&f.path());
            assert!(err.contains(file), "flipping byte {at} of {file}: {err}");
        }
        fs::write(&path, &original).unwrap();
    }
    Bundle::open(&f.path()).unwrap();
}

#[test]
fn a_missing_file_refuses_to_load() {
    let f = fixture();
    for file in CHECKSUMMED_FILES.iter().chain([&CHECKSUM_FILE]) {
        let path = f.path().join(file);
        let original = fs::read(&path).unwrap();
        fs::remove_file(&path).unwrap();
        let err = open_err(&f.path());
        assert!(err.contains(file), "without {file}: {err}");
        fs::write(&path, &original).unwrap();
    }
}

#[test]
fn a_config_that_disagrees_with_the_weights_refuses_to_load() {
    let f = fixture();
    edit_config(&f.path(), |c| c.model.d_ff = 96);
    let err = open_err(&f.path());
    assert!(err.contains(WEIGHTS_FILE) && err.contains("gate_proj"), "{err}");

    let f = fixture();
    edit_config(&f.path(), |c| c.model.vocab_size += 8);
    let err = open_err(&f.path());
    assert!(err.contains(TOKENIZER_FILE) && err.contains("vocab_size"), "{err}");

    let f = fixture();
    edit_config(&f.path(), |c| {
        c.special_tokens.insert("<|fim_middle|>".into(), 7);
    });
    let err = open_err(&f.path());
    assert!(err.contains(CONFIG_FILE) && err.contains("<|fim_middle|>"), "{err}");

    let f = fixture();
    let path = f.path().join(CONFIG_FILE);
    let text = fs::read_to_string(&path).unwrap().replace("d_ff:", "dropout: 0.1\n  d_ff:");
    fs::write(&path, text).unwrap();
    reseal(&f.path());
    let err = open_err(&f.path());
    assert!(err.contains(CONFIG_FILE) && err.contains("dropout"), "{err}");
}

#[test]
fn stale_metadata_hashes_refuse_to_load() {
    let f = fixture();
    let meta_path = f.path().join(METADATA_FILE);
    let mut meta: BundleMetadata = serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    meta.tokenizer_hash = "0".repeat(64);
    fs::write(&meta_path, serde_json::to_string(&meta).unwrap()).unwrap();
    let listing: String = CHECKSUMMED_FILES
        .iter()
        .map(|file| format!("{}  {file}\n", sha256_hex(&fs::read(f.path().join(file)).unwrap())))
        .collect();
    fs::write(f.path().join(CHECKSUM_FILE), listing).unwrap();
    let err = open_err(&f.path());
    assert!(err.contains(METADATA_FILE) && err.contains(TOKENIZER_FILE), "{err}");
}

#[test]
fn writing_never_overwrites_or_leaves_debris() {
    let f = fixture();
    let config = f.model.config().clone();
    let err = write_bundle(
        &f.path(),
        &f.model.named_tensors(),
        &f.tokenizer,
        &config,
        &BundleInfo::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    // Weights that do not match the config are refused before anything is written.
    let other = f.dir.path().join("other");
    let mut tensors = f.model.named_tensors();
    tensors.pop();
    let err =
        write_bundle(&other, &tensors, &f.tokenizer, &config, &BundleInfo::default()).unwrap_err();
    assert!(err.to_string().contains("model.norm.weight"), "{err}");
    let entries: Vec<_> =
        fs::read_dir(f.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("bundle")]);
}

/// `open_err` in a thread, waited for at most a generous two minutes, so that a regression that
/// blocks (opening a FIFO) fails the test instead of hanging the run.
fn open_err_promptly(dir: &Path) -> String {
    let dir = dir.to_path_buf();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(open_err(&dir));
    });
    rx.recv_timeout(Duration::from_secs(120)).expect("Bundle::open blocked on a FIFO")
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("mkfifo is installed");
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn a_fifo_in_place_of_a_bundle_file_is_refused_without_blocking() {
    let f = fixture();
    let elsewhere = f.dir.path().join("fifo");
    for file in CHECKSUMMED_FILES.iter().chain([&CHECKSUM_FILE]) {
        let path = f.path().join(file);
        let original = fs::read(&path).unwrap();
        fs::remove_file(&path).unwrap();
        mkfifo(&path);
        let err = open_err_promptly(&f.path());
        assert!(err.contains(file) && err.contains("FIFO"), "{file} as a FIFO: {err}");

        // Symlinks are followed: one to a FIFO is refused the same way.
        fs::remove_file(&path).unwrap();
        mkfifo(&elsewhere);
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        let err = open_err_promptly(&f.path());
        assert!(err.contains(file) && err.contains("FIFO"), "{file} to a FIFO: {err}");
        fs::remove_file(&path).unwrap();
        fs::remove_file(&elsewhere).unwrap();

        // So is a directory.
        fs::create_dir(&path).unwrap();
        let err = open_err_promptly(&f.path());
        assert!(err.contains(file) && err.contains("directory"), "{file} as a dir: {err}");
        fs::remove_dir(&path).unwrap();
        fs::write(&path, &original).unwrap();
    }
    // A symlink to a regular file is still a bundle file.
    let path = f.path().join(CONFIG_FILE);
    let real = f.dir.path().join("config-elsewhere.yaml");
    fs::rename(&path, &real).unwrap();
    std::os::unix::fs::symlink(&real, &path).unwrap();
    Bundle::open(&f.path()).unwrap();
}

#[test]
fn a_malformed_checksum_line_is_not_echoed() {
    let f = fixture();
    let path = f.path().join(CHECKSUM_FILE);
    let listing = fs::read_to_string(&path).unwrap();
    // What a symlink to /etc/shadow would show.
    let secret = "root:$6$hunter2salt$Zm9vYmFyYmF6cXV4c2VjcmV0aGFzaA:19000:0:99999:7:::";
    let hex = "a".repeat(64);
    for bad in [
        secret.to_string(),
        format!("{secret}  {WEIGHTS_FILE}"),
        format!("{hex}  {secret}"),
        format!("{hex} \u{1b}[2J{secret}"),
    ] {
        fs::write(&path, format!("{listing}{bad}\n")).unwrap();
        let err = open_err(&f.path());
        assert!(err.contains(CHECKSUM_FILE) && err.contains("line 5"), "{err}");
        for piece in ["root", "hunter2", "Zm9v", "19000", "\u{1b}"] {
            assert!(!err.contains(piece), "the error shows {piece:?}: {err}");
        }
    }
    // A plain file name is still shown, to say what is wrong.
    fs::write(&path, format!("{listing}{hex}  extra.bin\n")).unwrap();
    let err = open_err(&f.path());
    assert!(err.contains("line 5") && err.contains("extra.bin"), "{err}");
    fs::write(&path, format!("{listing}{listing}")).unwrap();
    let err = open_err(&f.path());
    assert!(err.contains("line 5") && err.contains("twice"), "{err}");

    // A huge checksum.txt (a symlink to a big file) is refused before it is read whole.
    fs::write(&path, "x".repeat(1 << 20)).unwrap();
    let err = open_err(&f.path());
    assert!(err.contains(CHECKSUM_FILE) && err.contains("larger"), "{err}");
}
