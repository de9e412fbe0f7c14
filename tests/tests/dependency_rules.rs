//! DESIGN §1's dependency rule, checked against `cargo metadata`: protocol and kernels depend on
//! no internal crate, model on kernels, daemon on protocol + model, the CLI on protocol + daemon +
//! model, lsp on protocol only, training on model + kernels, and candle is never in the dependency
//! tree of `m31r-lsp` or `m31r-protocol`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Internal packages each package may depend on (normal and build dependencies).
const ALLOWED: &[(&str, &[&str])] = &[
    ("m31r-protocol", &[]),
    ("m31r-kernels", &[]),
    ("m31r-model", &["m31r-kernels"]),
    ("m31r-daemon", &["m31r-protocol", "m31r-model"]),
    ("m31r-lsp", &["m31r-protocol"]),
    ("m31r-cli", &["m31r-protocol", "m31r-daemon", "m31r-model"]),
    ("m31r-train", &["m31r-kernels", "m31r-model"]),
    (
        "m31r-tests",
        &["m31r-protocol", "m31r-model", "m31r-daemon", "m31r-lsp", "m31r-cli", "m31r-train"],
    ),
];

/// Packages that must stay free of candle, at any depth.
const CANDLE_FREE: &[&str] = &["m31r-protocol", "m31r-lsp"];

struct Graph {
    /// Package id → name.
    names: BTreeMap<String, String>,
    /// Package id → ids of its non-dev dependencies.
    deps: BTreeMap<String, Vec<String>>,
    /// Ids of workspace members.
    members: Vec<String>,
}

/// The triple of the platform this test runs on, from `rustc -vV`.
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output().expect("rustc -vV runs");
    let text = String::from_utf8(out.stdout).expect("rustc -vV prints UTF-8");
    text.lines()
        .find_map(|line| line.strip_prefix("host: "))
        .unwrap_or_else(|| panic!("no `host:` line in rustc -vV:\n{text}"))
        .to_string()
}

/// The resolved dependency graph for this platform. `--filter-platform` matters beyond speed:
/// without it cargo needs the manifests of every target's packages (Windows-only crates
/// included), which a machine whose cache holds only what `cargo build` fetched does not have,
/// and `--offline` then fails. The rule is about what ships here, so the host's graph is the one.
fn metadata() -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform"])
        .arg(host_triple())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let names = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().unwrap().to_string(), p["name"].as_str().unwrap().to_string()))
        .collect();
    let mut deps = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve.nodes") {
        let runtime: Vec<String> = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                // Dev-dependencies never ship, so the rule ignores them.
                d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].as_str() != Some("dev"))
            })
            .map(|d| d["pkg"].as_str().unwrap().to_string())
            .collect();
        deps.insert(node["id"].as_str().unwrap().to_string(), runtime);
    }
    let members = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    Graph { names, deps, members }
}

impl Graph {
    fn name(&self, id: &str) -> &str {
        &self.names[id]
    }

    fn closure(&self, root: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![root.to_string()];
        while let Some(id) = stack.pop() {
            for dep in &self.deps[&id] {
                if seen.insert(dep.clone()) {
                    stack.push(dep.clone());
                }
            }
        }
        seen
    }
}

#[test]
fn internal_dependencies_follow_the_design() {
    let graph = metadata();
    let internal: BTreeSet<&str> = graph.members.iter().map(|m| graph.name(m)).collect();
    for member in &graph.members {
        let name = graph.name(member);
        let allowed = ALLOWED
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} is not in the dependency rule; add it to ALLOWED"))
            .1;
        for dep in &graph.deps[member] {
            let dep = graph.name(dep);
            assert!(
                !internal.contains(dep) || allowed.contains(&dep),
                "{name} must not depend on {dep} (allowed: {allowed:?})"
            );
        }
    }
}

#[test]
fn candle_stays_out_of_protocol_and_lsp() {
    let graph = metadata();
    let mut checked = 0;
    for member in &graph.members {
        let name = graph.name(member);
        if !CANDLE_FREE.contains(&name) {
            continue;
        }
        checked += 1;
        let offenders: Vec<&str> = graph
            .closure(member)
            .iter()
            .map(|id| graph.name(id))
            .filter(|n| n.starts_with("candle") || *n == "m31r-model")
            .collect();
        assert!(offenders.is_empty(), "{name} pulls in {offenders:?}");
    }
    assert_eq!(checked, CANDLE_FREE.len(), "{CANDLE_FREE:?} must all be workspace members");
}

#[test]
fn the_model_crate_does_use_candle() {
    // Guards the test itself: if metadata parsing broke, the closure would be empty and pass.
    let graph = metadata();
    let model = graph.members.iter().find(|m| graph.name(m) == "m31r-model").expect("m31r-model");
    assert!(graph.closure(model).iter().any(|id| graph.name(id) == "candle-core"));
}
