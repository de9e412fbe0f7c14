//! The real `m31r-train` binary: help, the three stages end to end, and error reporting.

use std::path::Path;
use std::process::{Command, Output};

use m31r_train::{ShardSet, Split};
use tempfile::TempDir;

use crate::common::{fixtures, registry, workspace};

fn m31r_train(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_m31r-train")).args(args).current_dir(cwd).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_describes_every_stage() {
    let tmp = TempDir::new().unwrap();
    let out = m31r_train(&["--help"], tmp.path());
    assert!(out.status.success());
    let help = text(&out.stdout);
    for stage in ["corpus", "tokenizer", "prepare"] {
        assert!(help.contains(stage), "{help}");
        let out = m31r_train(&[stage, "--help"], tmp.path());
        assert!(out.status.success(), "{stage}");
        let help = text(&out.stdout);
        assert!(help.contains("--config") && help.contains("runs/data"), "{help}");
    }
    let corpus_help = text(&m31r_train(&["corpus", "--help"], tmp.path()).stdout);
    assert!(
        corpus_help.contains("--fetch-crates") && corpus_help.contains("--force"),
        "{corpus_help}"
    );
    assert!(
        text(&m31r_train(&["tokenizer", "--help"], tmp.path()).stdout).contains("--vocab-size")
    );
}

#[test]
fn the_three_stages_run_end_to_end() {
    let tmp = TempDir::new().unwrap();
    let config = fixtures().join("test.toml");
    let config = config.to_str().unwrap();
    let (registry, workspace) = (registry(), workspace());
    let out = m31r_train(
        &["corpus", registry.to_str().unwrap(), workspace.to_str().unwrap(), "--config", config],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for word in ["dataset", "train", "validation", "test", "duplicate", "old_version", "wall time"]
    {
        assert!(stdout.contains(word), "{word} missing from:\n{stdout}");
    }
    // Progress bars are drawn only on a terminal.
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    let data = tmp.path().join("runs/data");
    assert!(data.join("dataset.json").is_file());

    let out = m31r_train(&["tokenizer", "--config", config], tmp.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("bytes/token (valid.)") && stdout.contains("(asked 512)"), "{stdout}");

    let out = m31r_train(&["prepare", "--config", config], tmp.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("documents"), "{}", text(&out.stdout));
    for split in Split::ALL {
        assert!(ShardSet::open(&data, split).unwrap().num_documents() > 0);
    }

    // The vocabulary flag overrides the config.
    let out = m31r_train(&["tokenizer", "--config", config, "--vocab-size", "300"], tmp.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("(asked 300)"));
}

#[test]
fn errors_name_the_culprit_and_exit_non_zero() {
    let tmp = TempDir::new().unwrap();
    let out = m31r_train(&["corpus", "missing-dir"], tmp.path());
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("missing-dir") && stderr.contains("does not exist"), "{stderr}");

    let out = m31r_train(&["prepare", "--data", "nowhere"], tmp.path());
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("dataset.json") && stderr.contains("m31r-train corpus"), "{stderr}");

    let out =
        m31r_train(&["corpus", workspace().to_str().unwrap(), "--config", "nope.toml"], tmp.path());
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("nope.toml"));

    // An existing dataset is protected; --force replaces it.
    let ws = workspace();
    let ws = ws.to_str().unwrap();
    let reg = registry();
    let reg = reg.to_str().unwrap();
    assert!(m31r_train(&["corpus", ws, "--out", "d"], tmp.path()).status.success());
    let out = m31r_train(&["corpus", ws, reg, "--out", "d"], tmp.path());
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--force"), "{}", text(&out.stderr));
    assert!(m31r_train(&["corpus", ws, reg, "--out", "d", "--force"], tmp.path()).status.success());
}

/// Downloads two tiny crates from crates.io; run with `M31R_NETWORK_TESTS=1`.
#[test]
fn fetch_crates_downloads_and_reads_the_list() {
    if std::env::var_os("M31R_NETWORK_TESTS").is_none() {
        eprintln!("skipped: set M31R_NETWORK_TESTS=1 to fetch from crates.io");
        return;
    }
    let tmp = TempDir::new().unwrap();
    std::fs::write(
        tmp.path().join("list.txt"),
        "# test list\nitoa = \"1.0.11\"\nryu = \"1.0.18\"\n",
    )
    .unwrap();
    let out = m31r_train(&["corpus", "--fetch-crates", "list.txt", "--out", "d"], tmp.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let corpus = m31r_train::Corpus::open(&tmp.path().join("d")).unwrap();
    let crates: std::collections::BTreeSet<&str> =
        corpus.entries().iter().map(|e| e.crate_name.as_str()).collect();
    assert_eq!(crates, ["itoa", "ryu"].into());
}
