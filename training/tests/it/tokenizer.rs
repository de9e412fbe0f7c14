//! The `tokenizer` stage: round trips, special tokens, compression, and held-out crates.

use std::collections::BTreeSet;
use std::fs;
use std::sync::LazyLock;

use m31r_model::config::ModelConfig;
use m31r_model::tokenizer::{SpecialToken, Tokenizer};
use m31r_train::corpus::Corpus;
use m31r_train::tok::{TOKENIZER_FILE, training_documents};
use m31r_train::{DataConfig, Split};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use tempfile::TempDir;

use crate::common::{
    config, copy_tree, corpus_options, fixture_corpus, pipeline, run_tokenizer, workspace,
};

/// The tokenizer trained on the fixture's train split (vocab 512), shared by the tests.
static FIXTURE_TOKENIZER: LazyLock<(Tokenizer, Vec<String>)> = LazyLock::new(|| {
    let tmp = TempDir::new().unwrap();
    fixture_corpus(tmp.path());
    run_tokenizer(tmp.path());
    let tok = Tokenizer::from_file(tmp.path().join(TOKENIZER_FILE)).unwrap();
    let corpus = Corpus::open(tmp.path()).unwrap();
    let texts = Split::ALL
        .into_iter()
        .flat_map(|s| {
            corpus.documents(s).map(|e| corpus.text(e).unwrap().to_owned()).collect::<Vec<_>>()
        })
        .collect();
    (tok, texts)
});

#[test]
fn fixture_round_trips_exactly() {
    let (tok, texts) = &*FIXTURE_TOKENIZER;
    assert!(texts.len() >= 15);
    for text in texts {
        let ids = tok.encode(text).unwrap();
        assert_eq!(&tok.decode(&ids).unwrap(), text);
    }
}

#[test]
fn special_tokens_are_single_ids_never_produced_from_text() {
    let (tok, texts) = &*FIXTURE_TOKENIZER;
    let specials = tok.special_ids();
    let ids: BTreeSet<u32> = SpecialToken::ALL.iter().map(|&t| specials.get(t)).collect();
    assert_eq!(ids.len(), SpecialToken::ALL.len());
    for token in SpecialToken::ALL {
        assert_eq!(tok.token_to_id(token.as_str()), Some(specials.get(token)), "{token}");
        // Text spelling a control token is ordinary bytes.
        let encoded = tok.encode(token.as_str()).unwrap();
        assert!(
            encoded.len() > 1 && encoded.iter().all(|id| !specials.contains(*id)),
            "{token}: {encoded:?}"
        );
    }
    assert_eq!(specials.end_of_text, 0);
    for text in texts {
        assert!(tok.encode(text).unwrap().iter().all(|id| !specials.contains(*id)));
    }
    let sneaky = "let s = \"<|endoftext|><|fim_prefix|>\"; // <|fim_middle|>";
    let encoded = tok.encode(sneaky).unwrap();
    assert!(encoded.iter().all(|id| !specials.contains(*id)));
    assert_eq!(tok.decode(&encoded).unwrap(), sneaky);
}

/// The floor for bytes/token on the fixture's validation crates with the 512-token vocabulary.
///
/// 1.0 is what a byte-level BPE without merges gives, so anything above it shows merges learned
/// from train crates carry over to crates never seen. The fixture's train split is only ~15 KB,
/// which learns little more than indentation runs, common keywords (`fn`, `let`, `self`,
/// `pub`) and `///`; those alone cover a third to a half of typical Rust bytes and give ≈2
/// bytes/token here (measured 2.15). A floor of 1.8 fails if the validation text leaked into
/// training the other way round (much higher) or merges stopped working (≈1.0), with margin for
/// fixture edits.
const FIXTURE_BYTES_PER_TOKEN_FLOOR: f64 = 1.8;

#[test]
fn bytes_per_token_on_validation_is_above_the_floor() {
    let p = pipeline();
    let bpt = p.report.validation_bytes_per_token.expect("the fixture has validation text");
    eprintln!("fixture validation bytes/token: {bpt:.3}");
    assert!(bpt > FIXTURE_BYTES_PER_TOKEN_FLOOR, "{bpt}");
    assert!(bpt < 6.0, "{bpt}: implausibly high for a 512-token vocabulary");
    assert_eq!(p.report.dataset_id, p.info.dataset_id);
    assert_eq!(p.report.vocab_size_requested, 512);
    let json = fs::read(p.data().join(TOKENIZER_FILE)).unwrap();
    assert_eq!(p.report.tokenizer_id, m31r_model::bundle::sha256_hex(&json));
}

#[test]
fn tokenizer_training_sees_only_the_train_split() {
    let tmp = TempDir::new().unwrap();
    fixture_corpus(tmp.path());
    let corpus = Corpus::open(tmp.path()).unwrap();
    let training = training_documents(&corpus, u64::MAX);
    let train: Vec<_> = corpus.documents(Split::Train).collect();
    assert_eq!(training.len(), train.len());
    assert!(training.iter().all(|e| e.split == Some(Split::Train)));
    let held_out: BTreeSet<&str> = [Split::Validation, Split::Test]
        .into_iter()
        .flat_map(|s| corpus.documents(s).map(|e| e.crate_name.as_str()).collect::<Vec<_>>())
        .collect();
    assert!(!held_out.is_empty());
    assert!(training.iter().all(|e| !held_out.contains(e.crate_name.as_str())));
    // The byte cap keeps a prefix of the sha256 order.
    let capped = training_documents(&corpus, 3000);
    assert!(!capped.is_empty() && capped.len() < training.len());
    assert!(capped.iter().map(|e| e.bytes).sum::<u64>() <= 3000);
}

/// A marker word repeated in one crate's file becomes a vocabulary token when that crate is in
/// train, and never when it is held out.
#[test]
fn held_out_text_never_reaches_the_vocabulary() {
    const MARKER: &str = "qxzjvkwm";
    let marker_file: String =
        (0..60).map(|i| format!("pub fn {MARKER}_{i}() -> u32 {{ {i} }}\n")).collect();
    let vocab_has_marker = |held_out: bool| -> bool {
        // Find, on the unchanged fixture, a crate of the wanted kind, then plant the marker in it.
        let probe = TempDir::new().unwrap();
        fixture_corpus(probe.path());
        let corpus = Corpus::open(probe.path()).unwrap();
        let wanted = if held_out { Split::Validation } else { Split::Train };
        let entry = corpus.documents(wanted).find(|e| e.path.contains("index.crates.io")).unwrap();
        let crate_dir = format!("{}-{}", entry.crate_name, entry.version);

        let copy = TempDir::new().unwrap();
        copy_tree(&crate::common::registry(), copy.path());
        let target = copy
            .path()
            .join("index.crates.io-0000000000000000")
            .join(&crate_dir)
            .join("src/marker.rs");
        fs::write(&target, &marker_file).unwrap();
        let data = TempDir::new().unwrap();
        m31r_train::build_corpus(&corpus_options(&[copy.path(), &workspace()], data.path()))
            .unwrap();
        let corpus = Corpus::open(data.path()).unwrap();
        let planted = corpus.entries().iter().find(|e| e.file == "src/marker.rs").unwrap();
        assert_eq!(planted.split, Some(wanted), "adding a file never changes its crate's split");
        run_tokenizer(data.path());
        let tok = Tokenizer::from_file(data.path().join(TOKENIZER_FILE)).unwrap();
        (0..tok.vocab_size() as u32)
            .any(|id| tok.id_to_token(id).is_some_and(|t| t.contains(MARKER)))
    };
    assert!(vocab_has_marker(false), "control: a train crate's marker is learned");
    assert!(!vocab_has_marker(true), "a validation crate's text reached the tokenizer");
}

#[test]
fn shipped_configs_match_the_model_presets() {
    for (name, preset) in [("tiny", "tiny"), ("small", "small"), ("cpu", "tiny")] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../configs/train/{name}.toml"));
        let from_file = DataConfig::from_file(&path).unwrap();
        assert_eq!(from_file, DataConfig::load(name).unwrap(), "embedded copy of {name} is stale");
        assert_eq!(from_file.model, preset);
        assert_eq!(
            from_file.vocab_size().unwrap(),
            ModelConfig::preset(preset).unwrap().vocab_size(),
            "{name}"
        );
    }
    assert_eq!(DataConfig::tiny().vocab_size().unwrap(), 2048);
    assert_eq!(config().vocab_size().unwrap(), 512);
}

#[test]
fn unknown_config_keys_and_bad_values_are_errors() {
    let origin = std::path::Path::new("test.toml");
    let err =
        DataConfig::parse("model = \"tiny\"\n[corpus]\nmax_line_char = 5\n", origin).unwrap_err();
    assert!(
        err.to_string().contains("max_line_char") && err.to_string().contains("test.toml"),
        "{err}"
    );
    let err = DataConfig::parse("model = \"tiny\"\nlearning_rate = 0.1\n", origin).unwrap_err();
    assert!(err.to_string().contains("learning_rate"), "{err}");
    let err =
        DataConfig::parse("model = \"tiny\"\n[split]\nvalidation = 0.6\ntest = 0.5\n", origin)
            .unwrap_err();
    assert!(err.to_string().contains("split"), "{err}");
    let err = DataConfig::parse("model = \"huge\"\n", origin).unwrap_err();
    assert!(err.to_string().contains("huge"), "{err}");
    let err =
        DataConfig::parse("model = \"tiny\"\n[tokenizer]\nvocab_size = 100\n", origin).unwrap_err();
    assert!(err.to_string().contains("vocab_size"), "{err}");
    let cfg = DataConfig::parse("model = \"small\"\n", origin).unwrap();
    assert_eq!(cfg.vocab_size().unwrap(), 16384, "vocab defaults to the preset's");
    assert!(
        DataConfig::load("no-such-preset-or-file")
            .unwrap_err()
            .to_string()
            .contains("no-such-preset")
    );
}

fn hermetic(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x3131),
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(hermetic(256))]

    #[test]
    fn random_utf8_round_trips(text in prop_oneof![
        any::<String>(),
        "[a-z_{}();:<>&|=+\\-*/ \t\n\"'#!.,0-9]{0,120}",
        "[ \t\n\r\u{a0}\u{2028}🦀日本語ßé\u{0}-\u{1f}\u{7f}\u{200d}a]{0,60}",
    ]) {
        let (tok, _) = &*FIXTURE_TOKENIZER;
        let ids = tok.encode(&text).unwrap();
        prop_assert!(ids.iter().all(|id| !tok.special_ids().contains(*id)));
        prop_assert_eq!(tok.decode(&ids).unwrap(), text);
    }
}
