//! No import circles among the modules of a crate: every workspace member's `src/` is read, each
//! file's `use crate::…`, `crate::…`, `super::…` and `self::…` paths become edges between modules,
//! and every strongly connected group of modules is a circle. Circles not fixed yet are listed in [`KNOWN`], exactly, so that a new
//! circle fails the test and so does a listed one that has gone (the list must shrink with it).
//!
//! A module is a file under `src/` (`foo.rs` and `foo/mod.rs` are both `foo`); inline modules
//! (`mod tests { … }`) belong to their file. A path names the deepest file module it reaches:
//! `use crate::train::config::TrainConfig` depends on `train::config` when that file exists,
//! else on `train`. `mod foo;` and a parent's relative paths into the children it declares
//! (`use foo::Bar`, a facade's re-exports) are structure, not dependencies. Comments and string literals
//! are skipped, so a doc link to `crate::x` is no edge.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Circles not fixed yet: crate directory, target root under `src/`, and the circle's modules
/// (sorted). Remove an entry when its circle is broken; never add one to silence a new circle.
const KNOWN: &[(&str, &str, &[&str])] = &[];

/// One crate target's modules and the edges between them.
#[derive(Default)]
struct ModuleGraph {
    /// Module path (segments; empty for the crate root) → file.
    files: BTreeMap<Vec<String>, PathBuf>,
    /// Module → modules it depends on (never itself).
    edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
}

/// A circle found in a target: `(crate dir, target root, sorted members, one concrete path)`.
type Circle = (String, String, Vec<String>, String);

#[test]
fn no_new_module_circles() {
    let root = workspace_root();
    let mut found: Vec<Circle> = Vec::new();
    let mut crates_read = 0;
    for member in workspace_members(&root) {
        let src = root.join(&member).join("src");
        // A member being moved or created by a concurrent change may not exist yet.
        if !src.is_dir() {
            continue;
        }
        crates_read += 1;
        for target in target_roots(&src) {
            let graph = ModuleGraph::read(&target);
            let target_name = target.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            for scc in graph.circles() {
                let members: Vec<String> = scc.iter().map(|m| display(m)).collect();
                let path = graph.example_cycle(&scc);
                found.push((member.clone(), target_name.clone(), members, path));
            }
        }
    }
    assert!(crates_read >= 3, "read only {crates_read} crates from {}", root.display());

    let known: BTreeSet<(String, String, Vec<String>)> = KNOWN
        .iter()
        .map(|(c, t, m)| (c.to_string(), t.to_string(), m.iter().map(|s| s.to_string()).collect()))
        .collect();
    let mut problems = Vec::new();
    for (krate, target, members, path) in &found {
        if !known.contains(&(krate.clone(), target.clone(), members.clone())) {
            problems.push(format!(
                "new import circle in {krate}/src/{target}: {path} (modules in the circle: {})",
                members.join(", ")
            ));
        }
    }
    for (krate, target, members) in &known {
        let still = found.iter().any(|(c, t, m, _)| (c, t, m) == (krate, target, members));
        if !still {
            problems.push(format!(
                "known circle {members:?} in {krate}/src/{target} is gone (or changed): \
                 update KNOWN in tests/tests/module_cycles.rs"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checker_sees_circles_and_ignores_comments_and_strings() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |rel: &str, text: &str| {
        let path = src.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    };
    write("lib.rs", "pub mod a;\npub mod b;\npub mod c;\npub mod d;\npub use a::A;\n");
    write("a.rs", "use crate::{b::{self, B}, c::C as _};\npub struct A;\n");
    write("b.rs", "//! See [`crate::d`].\npub struct B;\nfn f() { crate::c::g(); }\n");
    write("c/mod.rs", "pub mod inner;\npub use self::inner::h;\npub fn g() {}\n");
    write(
        "c/inner.rs",
        "fn h() { let s = \"crate::d::x\"; let c = '{'; super::super::a::A; }\n\
         #[cfg(test)]\nmod tests { use super::*; }\n",
    );
    write("d.rs", "pub fn x() {}\n");
    let graph = ModuleGraph::read(&src.join("lib.rs"));
    let deps = |m: &str| -> Vec<String> {
        graph.edges.get(&segments(m)).into_iter().flatten().map(|d| display(d)).collect()
    };
    assert_eq!(deps("a"), ["b", "c"]);
    assert_eq!(deps("b"), ["c"]);
    assert_eq!(deps("c::inner"), ["a"]);
    assert_eq!(deps("d"), Vec::<String>::new());
    assert_eq!(deps("c"), ["c::inner"]);
    // A facade's re-export through its declared child is structure, not an edge.
    assert_eq!(deps("crate"), Vec::<String>::new());
    let circles: Vec<Vec<String>> =
        graph.circles().iter().map(|scc| scc.iter().map(|m| display(m)).collect()).collect();
    assert_eq!(circles, [["a", "b", "c", "c::inner"]]);
    let scc = &graph.circles()[0];
    assert_eq!(graph.example_cycle(scc), "a -> c -> c::inner -> a");
}

fn segments(display: &str) -> Vec<String> {
    if display == "crate" { Vec::new() } else { display.split("::").map(String::from).collect() }
}

fn display(module: &[String]) -> String {
    if module.is_empty() { "crate".into() } else { module.join("::") }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `members` of the root `Cargo.toml`'s `[workspace]`, read by hand: the list is one array
/// of plain strings.
fn workspace_members(root: &Path) -> Vec<String> {
    let text = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let start = text.find("members").expect("root Cargo.toml has workspace members");
    let open = start + text[start..].find('[').unwrap();
    let close = open + text[open..].find(']').unwrap();
    text[open + 1..close]
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The crate roots under `src/`: the library, the default binary and `src/bin/` binaries.
fn target_roots(src: &Path) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> =
        ["lib.rs", "main.rs"].iter().map(|f| src.join(f)).filter(|p| p.is_file()).collect();
    if let Ok(entries) = fs::read_dir(src.join("bin")) {
        let mut bins: Vec<PathBuf> = entries
            .map(|e| e.unwrap().path())
            .filter_map(|p| {
                if p.extension().is_some_and(|e| e == "rs") {
                    Some(p)
                } else {
                    Some(p.join("main.rs")).filter(|m| m.is_file())
                }
            })
            .collect();
        bins.sort();
        roots.extend(bins);
    }
    roots
}

impl ModuleGraph {
    /// Reads the target rooted at `root`, following `mod` declarations from it.
    fn read(root: &Path) -> Self {
        let mut graph = ModuleGraph::default();
        // First the module tree, so that paths can be resolved to the modules that exist.
        let mut parsed = Vec::new();
        let mut stack = vec![(Vec::<String>::new(), root.to_path_buf())];
        while let Some((module, file)) = stack.pop() {
            let text =
                fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let tokens = tokenize(&text);
            for (inline, child) in file_children(&tokens) {
                let dir = child_dir(&file, root);
                let dir = inline.iter().fold(dir, |d, m| d.join(m));
                let candidates = [dir.join(format!("{child}.rs")), dir.join(&child).join("mod.rs")];
                if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
                    let mut path = module.clone();
                    path.extend(inline);
                    path.push(child);
                    stack.push((path, found));
                }
            }
            graph.files.insert(module.clone(), file);
            parsed.push((module, tokens));
        }
        for (module, tokens) in parsed {
            let deps: BTreeSet<Vec<String>> = paths(&tokens)
                .into_iter()
                .filter_map(|(scope, path)| graph.resolve(&module, &scope, &path))
                .filter(|dep| *dep != module)
                .collect();
            graph.edges.insert(module, deps);
        }
        graph
    }

    /// The file module a path written in `module` (inside its inline modules `scope`) reaches,
    /// or `None` for a path outside the crate.
    fn resolve(&self, module: &[String], scope: &[String], path: &[String]) -> Option<Vec<String>> {
        let mut here: Vec<String> = module.iter().chain(scope).cloned().collect();
        let mut rest = path;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                here.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            Some("super") => {
                while rest.first().is_some_and(|s| s == "super") {
                    here.pop()?;
                    rest = &rest[1..];
                }
            }
            // A bare first segment is an external crate, or a parent reaching into a child it
            // declares: structure (a facade's re-exports), not a circle-forming dependency.
            _ => return None,
        }
        here.extend(rest.iter().cloned());
        (0..=here.len()).rev().map(|n| here[..n].to_vec()).find(|m| self.files.contains_key(m))
    }

    /// Every strongly connected group of two or more modules, each sorted by display name.
    fn circles(&self) -> Vec<Vec<Vec<String>>> {
        let nodes: Vec<&Vec<String>> = self.files.keys().collect();
        let reach = |from: &Vec<String>| -> BTreeSet<Vec<String>> {
            let mut seen = BTreeSet::new();
            let mut stack = vec![from.clone()];
            while let Some(m) = stack.pop() {
                for dep in self.edges.get(&m).into_iter().flatten() {
                    if seen.insert(dep.clone()) {
                        stack.push(dep.clone());
                    }
                }
            }
            seen
        };
        let reaches: BTreeMap<&Vec<String>, BTreeSet<Vec<String>>> =
            nodes.iter().map(|n| (*n, reach(n))).collect();
        let mut done = BTreeSet::new();
        let mut out = Vec::new();
        for n in &nodes {
            if done.contains(*n) || !reaches[n].contains(*n) {
                continue;
            }
            let mut scc: Vec<Vec<String>> = nodes
                .iter()
                .filter(|m| reaches[n].contains(**m) && reaches[**m].contains(*n))
                .map(|m| (*m).clone())
                .collect();
            scc.sort_by_key(|m| display(m));
            done.extend(scc.iter().cloned());
            out.push(scc);
        }
        out.sort_by_key(|scc| display(&scc[0]));
        out
    }

    /// A shortest cycle through the first module of `scc`, as `a -> b -> a`.
    fn example_cycle(&self, scc: &[Vec<String>]) -> String {
        let start = &scc[0];
        let mut previous: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start.clone()]);
        'search: while let Some(m) = queue.pop_front() {
            for dep in self.edges.get(&m).into_iter().flatten() {
                if previous.contains_key(dep) || !scc.contains(dep) {
                    continue;
                }
                previous.insert(dep.clone(), m.clone());
                if dep == start {
                    break 'search;
                }
                queue.push_back(dep.clone());
            }
        }
        let mut cycle = vec![display(start)];
        let mut at = previous[start].clone();
        while at != *start {
            cycle.push(display(&at));
            at = previous[&at].clone();
        }
        cycle.push(display(start));
        cycle.reverse();
        cycle.join(" -> ")
    }
}

/// The directory holding the files of `module`'s children.
fn child_dir(file: &Path, root: &Path) -> PathBuf {
    let dir = file.parent().unwrap().to_path_buf();
    let owns_dir = file == root || file.file_name().is_some_and(|n| n == "mod.rs");
    if owns_dir { dir } else { dir.join(file.file_stem().unwrap()) }
}

/// A token: an identifier or keyword, `::`, or one punctuation character.
type Token = String;

/// Tokens of Rust source without comments, string, byte-string and character literals.
fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let ident_char = |c: char| c.is_alphanumeric() || c == '_';
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&chars, i + 1);
        } else if c == '\'' {
            if next == Some('\\') {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                // A lifetime or label: its name follows as an identifier, harmless.
                i += 1;
            }
        } else if ident_char(c) {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let raw_prefix = matches!(word.as_str(), "r" | "br" | "cr");
            if raw_prefix && matches!(chars.get(i), Some('"') | Some('#')) {
                let mut hashes = 0;
                while chars.get(i) == Some(&'#') {
                    hashes += 1;
                    i += 1;
                }
                if chars.get(i) == Some(&'"') {
                    i = skip_raw_string(&chars, i + 1, hashes);
                } else {
                    // `r#ident`: a raw identifier; the identifier follows.
                }
            } else if matches!(word.as_str(), "b" | "c") && chars.get(i) == Some(&'"') {
                i = skip_string(&chars, i + 1);
            } else {
                tokens.push(word);
            }
        } else if c == ':' && next == Some(':') {
            tokens.push("::".into());
            i += 2;
        } else {
            tokens.push(c.to_string());
            i += 1;
        }
    }
    tokens
}

/// Index after the `"` closing a string whose content starts at `i`.
fn skip_string(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Index after the `"###` closing a raw string whose content starts at `i`.
fn skip_raw_string(chars: &[char], mut i: usize, hashes: usize) -> usize {
    while i < chars.len() {
        if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        i += 1;
    }
    i
}

/// The `mod name;` declarations of a file, each with the inline modules it sits in.
fn file_children(tokens: &[Token]) -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    walk_scopes(tokens, |scope, i| {
        if tokens[i] == "mod" && tokens.get(i + 2).is_some_and(|t| t == ";") {
            out.push((scope.to_vec(), tokens[i + 1].clone()));
        }
    });
    out
}

/// Calls `visit(scope, i)` for each token index with the inline modules it sits in.
fn walk_scopes(tokens: &[Token], mut visit: impl FnMut(&[String], usize)) {
    let mut scope: Vec<String> = Vec::new();
    // Brace depth at which each open inline module's block started.
    let mut opened: Vec<usize> = Vec::new();
    let mut depth = 0;
    for i in 0..tokens.len() {
        visit(&scope, i);
        match tokens[i].as_str() {
            "{" => {
                if i >= 2 && tokens[i - 2] == "mod" {
                    scope.push(tokens[i - 1].clone());
                    opened.push(depth);
                }
                depth += 1;
            }
            "}" => {
                depth = depth.saturating_sub(1);
                if opened.last() == Some(&depth) {
                    opened.pop();
                    scope.pop();
                }
            }
            _ => {}
        }
    }
}

/// Every path that may name a module of the crate, with the inline modules it is written in:
/// the expanded trees of `use` items, and `a::b` paths elsewhere.
fn paths(tokens: &[Token]) -> Vec<(Vec<String>, Vec<String>)> {
    let mut out = Vec::new();
    let mut skip_until = 0;
    walk_scopes(tokens, |scope, i| {
        if i < skip_until {
            return;
        }
        if tokens[i] == "use" {
            let end = (i..tokens.len()).find(|&j| tokens[j] == ";").unwrap_or(tokens.len());
            let mut trees = Vec::new();
            expand_use(&tokens[i + 1..end], &[], &mut trees);
            out.extend(trees.into_iter().map(|p| (scope.to_vec(), p)));
            skip_until = end;
            return;
        }
        let starts_path = i + 1 < tokens.len()
            && tokens[i + 1] == "::"
            && tokens[i].chars().all(|c| c.is_alphanumeric() || c == '_')
            && (i == 0 || (tokens[i - 1] != "::" && tokens[i - 1] != "$"));
        if starts_path {
            let mut path = vec![tokens[i].clone()];
            let mut j = i + 1;
            while tokens.get(j).is_some_and(|t| t == "::")
                && tokens
                    .get(j + 1)
                    .is_some_and(|t| t.chars().all(|c| c.is_alphanumeric() || c == '_'))
            {
                path.push(tokens[j + 1].clone());
                j += 2;
            }
            out.push((scope.to_vec(), path));
            skip_until = j;
        }
    });
    out
}

/// Expands a use tree (`a::{b, c::{self, D}}`) into full paths.
fn expand_use(tokens: &[Token], prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    let mut i = 0;
    if tokens.first().is_some_and(|t| t == "::") {
        // `use ::name`: an external crate.
        return;
    }
    while i < tokens.len() {
        match tokens[i].as_str() {
            "::" => i += 1,
            "{" => {
                let close = matching_brace(tokens, i);
                for item in split_top_level(&tokens[i + 1..close]) {
                    expand_use(item, &path, out);
                }
                return;
            }
            "*" => break,
            "as" => break,
            "self" if !path.is_empty() => i += 1,
            word => {
                path.push(word.to_string());
                i += 1;
            }
        }
    }
    if !path.is_empty() {
        out.push(path);
    }
}

fn matching_brace(tokens: &[Token], open: usize) -> usize {
    let mut depth = 0;
    for (j, t) in tokens.iter().enumerate().skip(open) {
        match t.as_str() {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if depth == 0 {
                    return j;
                }
            }
            _ => {}
        }
    }
    tokens.len()
}

fn split_top_level(tokens: &[Token]) -> Vec<&[Token]> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (j, t) in tokens.iter().enumerate() {
        match t.as_str() {
            "{" => depth += 1,
            "}" => depth -= 1,
            "," if depth == 0 => {
                items.push(&tokens[start..j]);
                start = j + 1;
            }
            _ => {}
        }
    }
    items.push(&tokens[start..]);
    items.into_iter().filter(|item| !item.is_empty()).collect()
}
