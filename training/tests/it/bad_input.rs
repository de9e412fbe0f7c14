//! Bad input gets a clear error and loses nothing: missing and empty inputs, unreadable files,
//! an output directory of another dataset, interrupted or damaged stages.

use std::fs;
use std::path::Path;

use m31r_train::corpus::{Corpus, DATASET_FILE, DOCUMENTS_FILE, build_corpus};
use m31r_train::fsutil::TEMP_PREFIX;
use m31r_train::shards::{INDEX_FILE, SHARDS_DIR};
use m31r_train::tok::TOKENIZER_FILE;
use m31r_train::{DropReason, Error, ShardSet, Split};
use tempfile::TempDir;

use crate::common::{
    copy_tree, corpus_options, fixture_corpus, pipeline, registry, run_prepare, run_tokenizer,
    workspace,
};

#[test]
fn a_missing_input_dir_is_named() {
    let tmp = TempDir::new().unwrap();
    let missing = tmp.path().join("no-such-dir");
    let err = build_corpus(&corpus_options(&[&registry(), &missing], &tmp.path().join("out")))
        .unwrap_err();
    assert!(matches!(err, Error::MissingInput { .. }), "{err}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");
    // A file is not a directory either.
    let file = tmp.path().join("file.rs");
    fs::write(&file, "fn main() {}\n").unwrap();
    let err = build_corpus(&corpus_options(&[&file], &tmp.path().join("out"))).unwrap_err();
    assert!(err.to_string().contains("file.rs"), "{err}");
    assert!(!tmp.path().join("out").exists(), "nothing is written on a bad input");
}

#[test]
fn empty_inputs_are_errors() {
    let tmp = TempDir::new().unwrap();
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = build_corpus(&corpus_options(&[&empty], &tmp.path().join("out"))).unwrap_err();
    assert!(matches!(err, Error::EmptyCorpus { .. }), "{err}");
    assert!(err.to_string().contains("empty") && err.to_string().contains("no files"), "{err}");

    let docs = tmp.path().join("docs");
    fs::create_dir(&docs).unwrap();
    fs::write(docs.join("README.md"), "# nothing to see\n").unwrap();
    fs::write(docs.join("gen.rs"), "// @generated\nfn f() {}\n").unwrap();
    let err = build_corpus(&corpus_options(&[&docs], &tmp.path().join("out2"))).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("all dropped") && msg.contains("1 not_rust") && msg.contains("1 generated"),
        "{msg}"
    );
    assert!(!tmp.path().join("out2").join(DATASET_FILE).exists());
}

#[test]
fn unreadable_files_are_skipped_and_counted() {
    let src = TempDir::new().unwrap();
    copy_tree(&registry(), src.path());
    let crate_dir = src.path().join("index.crates.io-0000000000000000/delta-2.0.0/src");
    std::os::unix::fs::symlink(crate_dir.join("gone.rs"), crate_dir.join("dangling.rs")).unwrap();
    let locked = crate_dir.join("locked.rs");
    fs::write(&locked, "pub fn locked() {}\n").unwrap();
    fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    // Root reads mode-000 files anyway; then only the dangling link is unreadable.
    let root_reads_anything = fs::read(&locked).is_ok();
    if root_reads_anything {
        eprintln!(
            "running as root: mode 000 does not block reads, checking the dangling link only"
        );
    }

    let out = TempDir::new().unwrap();
    let info = build_corpus(&corpus_options(&[src.path(), &workspace()], out.path())).unwrap();
    let corpus = Corpus::open(out.path()).unwrap();
    let unreadable: Vec<_> =
        corpus.entries().iter().filter(|e| e.drop == Some(DropReason::Unreadable)).collect();
    let expected = if root_reads_anything { 1 } else { 2 };
    assert_eq!(unreadable.len(), expected, "{unreadable:?}");
    assert_eq!(info.dropped[&DropReason::Unreadable].files, expected as u64);
    let dangling = unreadable.iter().find(|e| e.file == "src/dangling.rs").unwrap();
    assert_eq!(dangling.crate_name, "delta");
    assert!(dangling.detail.is_some());
    // Everything else of the crate is still there.
    let delta_kept =
        corpus.entries().iter().filter(|e| e.crate_name == "delta" && e.drop.is_none()).count();
    assert_eq!(delta_kept, 3 + usize::from(root_reads_anything));
    fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
}

#[test]
fn another_dataset_is_not_overwritten_without_force() {
    let out = TempDir::new().unwrap();
    let p = pipeline();
    let data = p.data();
    // Same inputs again: same dataset, allowed, and the later stages stay valid.
    fixture_corpus(&data);
    assert!(ShardSet::open(&data, Split::Train).is_ok());

    let other = TempDir::new().unwrap();
    copy_tree(&workspace(), other.path());
    let err = build_corpus(&corpus_options(&[other.path(), &registry()], &data));
    assert!(err.is_ok(), "the same files from another place are the same dataset");
    let err = build_corpus(&corpus_options(&[&workspace()], &data)).unwrap_err();
    assert!(matches!(err, Error::WouldOverwrite { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("--force") && msg.contains(&p.info.dataset_id), "{msg}");
    // Refused before anything changed.
    assert_eq!(Corpus::open(&data).unwrap().info().dataset_id, p.info.dataset_id);
    assert!(ShardSet::open(&data, Split::Train).is_ok());
    assert!(
        fs::read_dir(&data).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(TEMP_PREFIX))
    );

    let mut opts = corpus_options(
        &[
            &workspace(),
            &registry().join("index.crates.io-0000000000000000/delta-2.0.0"),
            &registry().join("index.crates.io-0000000000000000/theta-3.1.4"),
        ],
        &data,
    );
    opts.force = true;
    let info = build_corpus(&opts).unwrap();
    assert_ne!(info.dataset_id, p.info.dataset_id);
    assert!(
        !data.join(TOKENIZER_FILE).exists() && !data.join(SHARDS_DIR).exists(),
        "stale later stages are removed"
    );
    let err = run_prepare(&data).unwrap_err();
    assert!(matches!(err, Error::StageMissing { stage: "tokenizer", .. }), "{err}");

    // A directory that is not a data directory is never written into.
    let foreign = out.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let err = build_corpus(&corpus_options(&[&workspace()], &foreign)).unwrap_err();
    assert!(err.to_string().contains("not an m31r data directory"), "{err}");
    assert_eq!(fs::read_dir(&foreign).unwrap().count(), 1);
}

fn shard_path(data: &Path, name: &str) -> std::path::PathBuf {
    data.join(SHARDS_DIR).join(name)
}

#[test]
fn an_interrupted_prepare_is_never_taken_as_complete() {
    let p = pipeline();
    let data = p.data();
    let expected: Vec<Vec<u32>> =
        ShardSet::open(&data, Split::Train).unwrap().documents().collect();

    // Interrupted before the index was written: shards and a half-written temp shard, no index.
    fs::remove_file(shard_path(&data, INDEX_FILE)).unwrap();
    fs::write(shard_path(&data, &format!("{TEMP_PREFIX}999-train-00005.bin")), [1u8, 0, 2])
        .unwrap();
    let err = ShardSet::open(&data, Split::Train).unwrap_err();
    assert!(matches!(err, Error::StageMissing { stage: "prepare", .. }), "{err}");
    assert!(err.to_string().contains("index.json"), "{err}");

    // A rerun succeeds and leaves no temp file behind.
    run_prepare(&data).unwrap();
    let names: Vec<String> = fs::read_dir(data.join(SHARDS_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with(TEMP_PREFIX)), "{names:?}");
    let set = ShardSet::open(&data, Split::Train).unwrap();
    assert_eq!(set.documents().collect::<Vec<_>>(), expected);

    // A shard file the index does not list is ignored.
    fs::write(shard_path(&data, "train-00099.bin"), [7u8; 64]).unwrap();
    assert_eq!(
        ShardSet::open(&data, Split::Train).unwrap().documents().collect::<Vec<_>>(),
        expected
    );

    // A truncated or altered shard is refused by name.
    let first = &p.index.splits[&Split::Train].shards[0].file;
    let bytes = fs::read(shard_path(&data, first)).unwrap();
    fs::write(shard_path(&data, first), &bytes[..bytes.len() - 2]).unwrap();
    let err = ShardSet::open(&data, Split::Train).unwrap_err().to_string();
    assert!(err.contains(first.as_str()) && err.contains("bytes"), "{err}");
    let mut altered = bytes.clone();
    altered[0] ^= 1;
    fs::write(shard_path(&data, first), &altered).unwrap();
    let err = ShardSet::open(&data, Split::Train).unwrap_err().to_string();
    assert!(err.contains(first.as_str()) && err.contains("sha256"), "{err}");
    // Other splits are untouched and still open.
    assert!(ShardSet::open(&data, Split::Validation).is_ok());
}

#[test]
fn shards_of_another_tokenizer_are_refused() {
    let p = pipeline();
    let data = p.data();
    let mut opts_vocab = crate::common::config();
    opts_vocab.tokenizer.vocab_size = Some(400);
    m31r_train::train_tokenizer(&m31r_train::TokenizerOptions {
        data: data.clone(),
        vocab_size: 400,
        max_train_bytes: opts_vocab.tokenizer.max_train_bytes,
        progress: m31r_train::Progress::hidden(),
    })
    .unwrap();
    let err = ShardSet::open(&data, Split::Train).unwrap_err().to_string();
    assert!(err.contains("rerun `m31r-train prepare`"), "{err}");
    run_prepare(&data).unwrap();
    assert!(ShardSet::open(&data, Split::Train).is_ok());
    run_tokenizer(&data);
}

#[test]
fn damaged_documents_are_named_by_prepare() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    fixture_corpus(&data);
    run_tokenizer(&data);
    let corpus = Corpus::open(&data).unwrap();
    let victim = corpus.documents(Split::Train).nth(1).unwrap().clone();
    drop(corpus);
    let path = data.join(DOCUMENTS_FILE);
    let mut bytes = fs::read(&path).unwrap();
    bytes[victim.offset.unwrap() as usize] ^= 0x20;
    fs::write(&path, bytes).unwrap();
    let err = run_prepare(&data).unwrap_err().to_string();
    assert!(
        err.contains(&victim.file) && err.contains(DOCUMENTS_FILE) && err.contains("sha256"),
        "{err}"
    );
    assert!(!data.join(SHARDS_DIR).join(INDEX_FILE).exists());
}
