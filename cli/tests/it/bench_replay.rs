//! `m31r bench replay` end to end: the real `m31r`, `m31r-lsp` and `m31rd` binaries on the tiny
//! seeded bundle over a temporary directory of Rust files. Checks the path and the report's
//! consistency, not the (random) model's quality. Gated by `M31R_SLOW_TESTS=1`.
//!
//! The binaries of other packages are not built for this package's tests, so the test builds
//! them with the `cargo` that runs it (a no-op when they are up to date).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

/// A temporary directory removed on drop (the crate has no `tempfile`; the lock file is fixed).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("m31r-replay-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn slow_tests() -> bool {
    std::env::var("M31R_SLOW_TESTS").is_ok_and(|v| v == "1")
}

/// Builds `m31r-lsp` and `m31rd` and returns their paths.
fn lsp_and_daemon() -> (PathBuf, PathBuf) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--bins", "--message-format=json-render-diagnostics"])
        .args(["-p", "m31r-lsp", "-p", "m31r-daemon"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo build of m31r-lsp and m31rd failed");
    let mut found = (None, None);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let message: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        let exe = message["executable"].as_str().map(PathBuf::from);
        match message["target"]["name"].as_str() {
            Some("m31r-lsp") => found.0 = exe,
            Some("m31rd") => found.1 = exe,
            _ => {}
        }
    }
    (found.0.expect("m31r-lsp built"), found.1.expect("m31rd built"))
}

#[test]
fn replay_runs_through_the_real_lsp_and_daemon() {
    if !slow_tests() {
        eprintln!("skipped: set M31R_SLOW_TESTS=1");
        return;
    }
    let (lsp, daemon) = lsp_and_daemon();
    let dir = TempDir::new();
    let bundle = dir.path().join("bundle");
    m31r_model::demo::write_demo_bundle(&bundle, "test-tiny").unwrap();
    let src = dir.path().join("held-out");
    std::fs::create_dir_all(src.join("nested")).unwrap();
    std::fs::write(
        src.join("point.rs"),
        "pub struct Point {\n    pub x: f64,\n    pub y: f64,\n}\n\nimpl Point {\n    pub fn \
         norm(&self) -> f64 {\n        (self.x * self.x + self.y * self.y).sqrt()\n    }\n}\n",
    )
    .unwrap();
    std::fs::write(
        src.join("nested").join("count.rs"),
        "use std::collections::HashMap;\n\npub fn count(words: &[&str]) -> usize {\n    \
         let mut map = HashMap::new();\n    for w in words {\n        *map.entry(w).or_insert(0) \
         += 1;\n    }\n    map.len()\n}\n",
    )
    .unwrap();
    std::fs::write(src.join("notes.txt"), "not rust\n").unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_m31r"))
        .arg("--bundle")
        .arg(&bundle)
        .args(["--threads", "1", "bench", "replay"])
        .arg(&src)
        .args(["--lines", "5", "--json", "--lsp"])
        .arg(&lsp)
        .arg("--daemon")
        .arg(&daemon)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "m31r bench replay failed: {}", out.status);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = |key: &str| report[key].as_u64().unwrap_or_else(|| panic!("no {key} in {report}"));
    assert_eq!(n("lines"), 5, "{report}");
    assert!(n("chars_saved") <= n("chars"), "{report}");
    assert_eq!(n("chars_typed") + n("chars_saved"), n("chars"), "{report}");
    assert!(n("requests") >= n("lines"), "{report}");
    assert!(n("lines_completed_at_first_request") <= n("lines"), "{report}");
    assert_eq!(n("served_by_daemon") + n("served_locally") + n("suppressed"), n("requests"));
    let per_keystroke = report["daemon_requests_per_keystroke"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&per_keystroke), "{report}");
    let saved = report["saved_percent"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&saved), "{report}");
    let ms = |p: &str| report["latency_ms"][p].as_f64().unwrap();
    assert!(ms("p50") > 0.0 && ms("p50") <= ms("p90") && ms("p90") <= ms("p99"), "{report}");
    assert_eq!(report["settings"]["context_snippets"], true);
    assert_eq!(report["settings"]["token_healing"], true);

    // The switches reach the report (and the run still works with them).
    let out = Command::new(env!("CARGO_BIN_EXE_m31r"))
        .arg("--bundle")
        .arg(&bundle)
        .args(["--threads", "1", "bench", "replay"])
        .arg(&src)
        .args(["--lines", "2", "--no-snippets", "--no-token-healing", "--lsp"])
        .arg(&lsp)
        .arg("--daemon")
        .arg(&daemon)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "m31r bench replay (text) failed: {}", out.status);
    let text = String::from_utf8(out.stdout).unwrap();
    for field in
        ["2 lines", "context snippets off, token healing off", "saved of", "requests:", "p99"]
    {
        assert!(text.contains(field), "no {field:?} in:\n{text}");
    }
}
