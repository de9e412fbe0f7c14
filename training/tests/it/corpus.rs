//! The `corpus` stage on the fixture: drop reasons, dedup, newest version, split by crate.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use m31r_train::corpus::{Corpus, MANIFEST_FILE, build_corpus};
use m31r_train::split::crate_score;
use m31r_train::{DropReason, ManifestEntry, Split};
use tempfile::TempDir;

use crate::common::{copy_tree, corpus_options, fixture_corpus, fixtures, registry, workspace};

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
    // Every reason occurs in the fixture except those about hostile trees, which get trees of
    // their own (unreadable: bad_input and below; symlink_outside, binary: below).
    let elsewhere = [DropReason::Unreadable, DropReason::SymlinkOutside, DropReason::Binary];
    for reason in DropReason::ALL.into_iter().filter(|r| !elsewhere.contains(r)) {
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
        split             crates      files          bytes
        train                  7         16          12825
        validation             1          2           2242
        test                   1          2            400
        dropped                       files          bytes
        not_rust                         12           1001
        old_version                       3            305
        unreadable                        0              0
        symlink_outside                   0              0
        huge_file                         1          25502
        non_utf8                          1             87
        binary                            0              0
        generated                         1            225
        huge_line                         1           1306
        sys_bindings                      1           1703
        table_dump                        1           1780
        duplicate                         1            999
        files seen                       42
    "#]]
    .assert_eq(&info.table());
}

/// Writes `files` (path inside `root`, content) into a fresh tree.
fn write_tree(root: &Path, files: &[(&str, &[u8])]) {
    for (path, content) in files {
        let path = root.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }
}

fn entry<'a>(corpus: &'a Corpus, file: &str) -> &'a ManifestEntry {
    corpus.entries().iter().find(|e| e.file == file).unwrap_or_else(|| {
        let files: Vec<&str> = corpus.entries().iter().map(|e| e.file.as_str()).collect();
        panic!("{file} not in the manifest: {files:?}")
    })
}

const LIB: &[u8] = b"pub fn answer() -> u32 {\n    42\n}\n";

#[test]
fn an_unreadable_directory_is_recorded_as_unreadable_with_its_error() {
    let src = TempDir::new().unwrap();
    write_tree(
        src.path(),
        &[
            ("delta-1.0.0/src/lib.rs", LIB),
            ("delta-1.0.0/src/locked/hidden.rs", b"pub fn hidden() {}\n"),
        ],
    );
    let locked = src.path().join("delta-1.0.0/src/locked");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    // Root lists mode-000 directories anyway, so then the corpus runs as `nobody` (uid and gid
    // 65534 on Linux) through the binary, with the trees opened up for it.
    let as_root = fs::read_dir(&locked).is_ok();
    let out_parent = TempDir::new().unwrap();
    let out = out_parent.path().join("data");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_m31r-train"));
    cmd.arg("corpus")
        .arg(src.path())
        .arg("--out")
        .arg(&out)
        .arg("--config")
        .arg(fixtures().join("test.toml"))
        .current_dir(out_parent.path());
    if as_root {
        eprintln!("running as root: the corpus runs as uid 65534 so mode 000 blocks it");
        fs::set_permissions(src.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(out_parent.path(), fs::Permissions::from_mode(0o777)).unwrap();
        cmd.uid(65534).gid(65534);
    }
    let output = cmd.output().unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let corpus = Corpus::open(&out).unwrap();
    let dir = entry(&corpus, "src/locked");
    assert_eq!(dir.drop, Some(DropReason::Unreadable), "{dir:?}");
    let detail = dir.detail.as_deref().unwrap_or("");
    assert!(detail.contains("Permission denied") && detail.contains("missing"), "{detail}");
    assert_eq!(corpus.info().dropped[&DropReason::Unreadable].files, 1);
    assert_eq!(corpus.info().dropped[&DropReason::NotRust].files, 0);
    assert_eq!(entry(&corpus, "src/lib.rs").drop, None);
}

#[test]
fn binary_files_are_dropped_and_escapes_stay_text() {
    let src = TempDir::new().unwrap();
    let mut control_heavy = b"pub fn f() {}\n".to_vec();
    for i in 0..20u8 {
        control_heavy.extend_from_slice(&[1 + i % 8, 0x1b, b'\n']);
    }
    // One raw escape character in 200 is under the 1% threshold: still text.
    let mut one_raw_escape = b"// colour: \x1b[0m\n".to_vec();
    one_raw_escape.extend_from_slice(&b"pub fn g() -> u8 {\n    7\n}\n".repeat(8));
    write_tree(
        src.path(),
        &[
            ("bin-1.0.0/src/lib.rs", LIB),
            ("bin-1.0.0/src/nul.rs", b"pub const X: u8 = 1;\n\0\0\0\0\n"),
            ("bin-1.0.0/src/control.rs", &control_heavy),
            (
                "bin-1.0.0/src/escapes.rs",
                b"pub const E: &str = \"\\x00\\x1b[1m\\u{7f}\\t\";\r\n\x0c\n\tpub const C: char = '\\0';\n",
            ),
            ("bin-1.0.0/src/raw_escape.rs", &one_raw_escape),
        ],
    );
    let out = TempDir::new().unwrap();
    let info = build_corpus(&corpus_options(&[src.path()], out.path())).unwrap();
    let corpus = Corpus::open(out.path()).unwrap();
    assert_eq!(entry(&corpus, "src/nul.rs").drop, Some(DropReason::Binary));
    assert_eq!(entry(&corpus, "src/control.rs").drop, Some(DropReason::Binary));
    assert!(entry(&corpus, "src/nul.rs").sha256.is_some(), "the file was read and hashed");
    for kept in ["src/lib.rs", "src/escapes.rs", "src/raw_escape.rs"] {
        assert_eq!(entry(&corpus, kept).drop, None, "{kept}");
    }
    assert_eq!(info.dropped[&DropReason::Binary].files, 2);
}

#[test]
fn non_utf8_file_names_stay_distinct_in_the_manifest() {
    let src = TempDir::new().unwrap();
    let dir = src.path().join("names-1.0.0/src");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("lib.rs"), LIB).unwrap();
    let names: [&[u8]; 3] = [b"a\xff.rs", b"a\xfe.rs", b"a\\xff.rs"];
    for (i, name) in names.iter().enumerate() {
        fs::write(dir.join(OsStr::from_bytes(name)), format!("pub fn f{i}() {{}}\n")).unwrap();
    }
    let out = TempDir::new().unwrap();
    build_corpus(&corpus_options(&[src.path()], out.path())).unwrap();
    let corpus = Corpus::open(out.path()).unwrap();
    // Invalid bytes become `\xNN`; a literal backslash is doubled, so no name can pose as one.
    for file in [r"src/a\xff.rs", r"src/a\xfe.rs", r"src/a\\xff.rs"] {
        assert_eq!(entry(&corpus, file).drop, None, "{file}");
    }
    let paths: BTreeSet<&str> = corpus.entries().iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths.len(), 4, "{paths:?}");
    assert!(paths.iter().any(|p| p.ends_with(r"/names-1.0.0/src/a\xfe.rs")), "{paths:?}");
}

#[test]
fn symlinks_out_of_the_inputs_are_not_followed() {
    let outside = TempDir::new().unwrap();
    write_tree(outside.path(), &[("secret.rs", b"pub fn secret_outside_marker() {}\n")]);
    let src = TempDir::new().unwrap();
    write_tree(src.path(), &[("links-1.0.0/src/lib.rs", LIB)]);
    let crate_src = src.path().join("links-1.0.0/src");
    let symlink = |target: &Path, link: &str| {
        std::os::unix::fs::symlink(target, crate_src.join(link)).unwrap();
    };
    symlink(outside.path(), "escape");
    symlink(&outside.path().join("secret.rs"), "escape.rs");
    // Inside links: a directory loop (not followed, its files are walked where they are) and
    // a file alias (read, then dropped as a duplicate).
    symlink(Path::new(".."), "loop");
    symlink(Path::new("lib.rs"), "z_alias.rs");

    let out = TempDir::new().unwrap();
    let info = build_corpus(&corpus_options(&[src.path()], out.path())).unwrap();
    let corpus = Corpus::open(out.path()).unwrap();
    let files: Vec<&str> = corpus.entries().iter().map(|e| e.file.as_str()).collect();
    assert_eq!(files, ["src/escape", "src/escape.rs", "src/lib.rs", "src/z_alias.rs"]);
    for link in ["src/escape", "src/escape.rs"] {
        let e = entry(&corpus, link);
        assert_eq!(e.drop, Some(DropReason::SymlinkOutside), "{e:?}");
        assert_eq!(e.sha256, None, "{link} was not read");
        let outside_dir = outside.path().to_str().unwrap();
        assert!(e.detail.as_deref().unwrap_or("").contains(outside_dir), "{e:?}");
    }
    assert_eq!(entry(&corpus, "src/lib.rs").drop, None);
    assert_eq!(entry(&corpus, "src/z_alias.rs").drop, Some(DropReason::Duplicate));
    assert_eq!(info.dropped[&DropReason::SymlinkOutside].files, 2);
    let documents = fs::read(out.path().join(m31r_train::corpus::DOCUMENTS_FILE)).unwrap();
    assert!(!String::from_utf8_lossy(&documents).contains("secret_outside_marker"));
}
