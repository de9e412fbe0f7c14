//! The `corpus` stage on the fixture: drop reasons, dedup, newest version, split by crate.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use m31r_train::corpus::{Corpus, MANIFEST_FILE, build_corpus};
use m31r_train::split::crate_score;
use m31r_train::{DropReason, ManifestEntry, Split};
use tempfile::TempDir;

use crate::common::{copy_tree, corpus_options, fixture_corpus, registry, workspace};

/// `(crate, version, file)` → drop reason (`None` when kept).
fn outcomes(entries: &[ManifestEntry]) -> BTreeMap<(String, String, String), Option<DropReason>> {
    entries
        .iter()
        .map(|e| ((e.crate_name.clone(), e.version.clone(), e.file.clone()), e.drop))
        .collect()
}

fn key(krate: &str, version: &str, file: &str) -> (String, String, String) {
    (krate.to_owned(), version.to_owned(), file.to_owned())
}

#[test]
fn each_drop_reason_fires_where_expected() {
    let tmp = TempDir::new().unwrap();
    let info = fixture_corpus(tmp.path());
    let corpus = Corpus::open(tmp.path()).unwrap();
    let got = outcomes(corpus.entries());
    let expected = [
        (key("alpha", "0.1.0", "Cargo.toml"), Some(DropReason::NotRust)),
        (key("alpha", "0.1.0", "src/lib.rs"), Some(DropReason::OldVersion)),
        (key("alpha", "0.1.0", "src/util.rs"), Some(DropReason::OldVersion)),
        (key("alpha", "0.2.0", "README.md"), Some(DropReason::NotRust)),
        (key("alpha", "0.2.0", "src/generated.rs"), Some(DropReason::Generated)),
        (key("alpha", "0.2.0", "src/lib.rs"), None),
        (key("alpha", "0.2.0", "src/parse.rs"), None),
        (key("alpha", "0.2.0", "src/util.rs"), None),
        (key("beta", "1.0.0", "src/big.rs"), Some(DropReason::HugeFile)),
        (key("beta", "1.0.0", "src/latin1.rs"), Some(DropReason::NonUtf8)),
        (key("beta", "1.0.0", "src/lib.rs"), None),
        (key("beta", "1.0.0", "src/long_line.rs"), Some(DropReason::HugeLine)),
        (key("beta", "1.0.0", "src/table.rs"), Some(DropReason::TableDump)),
        (key("beta", "1.0.0", "src/words.rs"), Some(DropReason::Duplicate)),
        (key("gamma-sys", "0.3.0", "build.rs"), None),
        (key("gamma-sys", "0.3.0", "src/bindings.rs"), Some(DropReason::SysBindings)),
        (key("gamma-sys", "0.3.0", "src/lib.rs"), None),
        (key("zeta", "1.2.2", "src/lib.rs"), Some(DropReason::OldVersion)),
        (key("zeta", "1.2.3-beta.1", "src/lib.rs"), None),
        (key("myapp", "0.3.0", "src/main.rs"), None),
        (key("myapp", "0.3.0", "src/cli.rs"), None),
    ];
    for (k, reason) in expected {
        assert_eq!(got.get(&k), Some(&reason), "{k:?}");
    }
    // Every reason but `unreadable` (see bad_input) occurs in the fixture.
    for reason in DropReason::ALL.into_iter().filter(|&r| r != DropReason::Unreadable) {
        assert!(info.dropped[&reason].files > 0, "{reason} never fired");
    }
    // Cargo's build output is never searched.
    assert!(corpus.entries().iter().all(|e| !e.path.contains("/target/")));
    let kept: Vec<&str> =
        corpus.entries().iter().filter(|e| e.drop.is_none()).map(|e| e.file.as_str()).collect();
    assert_eq!(kept.len() as u64, info.splits.values().map(|s| s.files).sum::<u64>(), "{kept:?}");
    assert_eq!(info.files_seen, corpus.entries().len() as u64);
}

#[test]
fn exact_duplicates_keep_the_first_copy_in_manifest_order() {
    let tmp = TempDir::new().unwrap();
    fixture_corpus(tmp.path());
    let corpus = Corpus::open(tmp.path()).unwrap();
    let dup = corpus.entries().iter().find(|e| e.drop == Some(DropReason::Duplicate)).unwrap();
    let original = corpus
        .entries()
        .iter()
        .find(|e| e.drop.is_none() && e.sha256 == dup.sha256)
        .expect("the first copy is kept");
    assert_eq!((original.crate_name.as_str(), original.file.as_str()), ("alpha", "src/util.rs"));
    assert_eq!(dup.detail.as_deref(), Some("alpha src/util.rs"));
    // No two kept documents share content.
    let kept: Vec<_> =
        corpus.entries().iter().filter(|e| e.drop.is_none()).map(|e| &e.sha256).collect();
    let unique: BTreeSet<_> = kept.iter().collect();
    assert_eq!(kept.len(), unique.len());
}

#[test]
fn only_the_newest_version_of_a_crate_is_kept() {
    let tmp = TempDir::new().unwrap();
    fixture_corpus(tmp.path());
    let corpus = Corpus::open(tmp.path()).unwrap();
    let mut kept_versions: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in corpus.entries().iter().filter(|e| e.drop.is_none()) {
        kept_versions.entry(&e.crate_name).or_default().insert(&e.version);
    }
    assert!(kept_versions.values().all(|v| v.len() == 1), "{kept_versions:?}");
    // A pre-release of a higher version beats an older release (semver, not string order).
    assert_eq!(kept_versions["zeta"], BTreeSet::from(["1.2.3-beta.1"]));
    assert_eq!(kept_versions["alpha"], BTreeSet::from(["0.2.0"]));
    let old: Vec<_> = corpus
        .entries()
        .iter()
        .filter(|e| {
            (e.crate_name == "zeta" && e.version == "1.2.2")
                || (e.crate_name == "alpha" && e.version == "0.1.0")
        })
        .collect();
    assert_eq!(old.len(), 5, "{old:?}");
    assert!(
        old.iter().all(|e| matches!(e.drop, Some(DropReason::OldVersion | DropReason::NotRust))),
        "{old:?}"
    );
}

#[test]
fn no_crate_lands_in_two_splits_and_every_split_is_used() {
    let tmp = TempDir::new().unwrap();
    let info = fixture_corpus(tmp.path());
    let corpus = Corpus::open(tmp.path()).unwrap();
    let mut splits: BTreeMap<&str, BTreeSet<Split>> = BTreeMap::new();
    for e in corpus.entries() {
        if let Some(s) = e.split {
            splits.entry(&e.crate_name).or_default().insert(s);
        }
    }
    assert!(splits.values().all(|s| s.len() == 1), "{splits:?}");
    // 9 crates: the rule guarantees at least one validation and one test crate.
    assert_eq!(splits.len(), 9, "{splits:?}");
    for split in Split::ALL {
        assert!(info.splits[&split].files > 0, "{split} is empty");
        assert!(info.splits[&split].crates > 0, "{split} has no crate");
    }
}

#[test]
fn the_split_is_stable() {
    let a = TempDir::new().unwrap();
    let b = TempDir::new().unwrap();
    let info_a = fixture_corpus(a.path());
    let info_b = fixture_corpus(b.path());
    assert_eq!(info_a.dataset_id, info_b.dataset_id);
    assert_eq!(
        fs::read(a.path().join(MANIFEST_FILE)).unwrap(),
        fs::read(b.path().join(MANIFEST_FILE)).unwrap()
    );

    // Inputs given in the other order give the same dataset.
    let c = TempDir::new().unwrap();
    let info_c = build_corpus(&corpus_options(&[&workspace(), &registry()], c.path())).unwrap();
    assert_eq!(info_c.dataset_id, info_a.dataset_id);

    // Adding a crate that scores into train moves no other crate.
    let copy = TempDir::new().unwrap();
    copy_tree(&registry(), copy.path());
    let newcomer = ["iota", "kappa", "lambda", "mu", "nu"]
        .into_iter()
        .find(|n| crate_score(n) >= 0.1)
        .expect("one of the names scores into train");
    let dir =
        copy.path().join("index.crates.io-0000000000000000").join(format!("{newcomer}-1.0.0/src"));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("lib.rs"), "pub fn answer() -> u32 {\n    42\n}\n").unwrap();
    let d = TempDir::new().unwrap();
    let info_d = build_corpus(&corpus_options(&[copy.path(), &workspace()], d.path())).unwrap();
    assert_ne!(info_d.dataset_id, info_a.dataset_id);
    let split_of = |dir: &std::path::Path| -> BTreeMap<String, Split> {
        Corpus::open(dir)
            .unwrap()
            .entries()
            .iter()
            .filter_map(|e| e.split.map(|s| (e.crate_name.clone(), s)))
            .collect()
    };
    let before = split_of(a.path());
    let after = split_of(d.path());
    assert_eq!(after[newcomer], Split::Train);
    for (name, split) in &before {
        assert_eq!(after[name], *split, "{name} moved");
    }
}

#[test]
fn kept_texts_are_copied_verbatim() {
    let tmp = TempDir::new().unwrap();
    fixture_corpus(tmp.path());
    let corpus = Corpus::open(tmp.path()).unwrap();
    let mut n = 0;
    for split in Split::ALL {
        for e in corpus.documents(split) {
            assert_eq!(corpus.text(e).unwrap(), fs::read_to_string(&e.path).unwrap(), "{}", e.path);
            n += 1;
        }
    }
    assert!(n >= 15, "{n} documents");
}

#[test]
fn an_edited_manifest_is_refused_by_name() {
    let tmp = TempDir::new().unwrap();
    fixture_corpus(tmp.path());
    let path = tmp.path().join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replacen("\"split\":\"train\"", "\"split\":\"test\"", 1)).unwrap();
    let err = Corpus::open(tmp.path()).unwrap_err().to_string();
    assert!(err.contains(MANIFEST_FILE) && err.contains("does not match"), "{err}");
}

#[test]
fn the_shipped_crate_list_pins_a_few_hundred_crates() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/corpus/crates.txt");
    let crates = m31r_train::fetch::parse_crate_list(&path).unwrap();
    assert!(crates.len() >= 200, "{}", crates.len());
    let names: BTreeSet<&str> = crates.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), crates.len());
    assert!(names.iter().all(|n| !m31r_train::filters::is_sys_crate(n)));

    let tmp = TempDir::new().unwrap();
    let bad = tmp.path().join("bad.txt");
    fs::write(&bad, "serde = \"^1\"\n").unwrap();
    let err = m31r_train::fetch::parse_crate_list(&bad).unwrap_err().to_string();
    assert!(err.contains("bad.txt") && err.contains("serde"), "{err}");
    fs::write(&bad, "# nothing\n").unwrap();
    assert!(m31r_train::fetch::parse_crate_list(&bad).is_err());
}

#[test]
fn the_summary_table_reports_splits_and_drops() {
    let tmp = TempDir::new().unwrap();
    let info = fixture_corpus(tmp.path());
    expect_test::expect![[r#"
        dataset 37daa5d1e7195065f3bf82ec09cd8557548ab9e051fa5d77a782bbb3410e5cd2
        split            crates      files          bytes
        train                 7         16          12825
        validation            1          2           2242
        test                  1          2            400
        dropped                      files          bytes
        not_rust                        12           1001
        old_version                      3            305
        unreadable                       0              0
        huge_file                        1          25502
        non_utf8                         1             87
        generated                        1            225
        huge_line                        1           1306
        sys_bindings                     1           1703
        table_dump                       1           1780
        duplicate                        1            999
        files seen                      42
    "#]]
    .assert_eq(&info.table());
}
