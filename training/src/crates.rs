//! Which crate (name and version) a source file belongs to, and semantic-version ordering.
//!
//! A file belongs to the nearest enclosing directory named like a registry package
//! (`<name>-<semver>`, as Cargo unpacks crates under `registry/src/*/`); failing that, to the
//! nearest `Cargo.toml` with a `[package]`; failing that, to the input directory itself. The
//! registry name wins over a nested `Cargo.toml` because a published package's `fuzz/` or
//! `examples/` manifests are part of that package and must share its split.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A semantic version, ordered by the semver rules (build metadata breaks ties textually so the
/// order stays total and deterministic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    major: u64,
    minor: u64,
    patch: u64,
    pre: Vec<String>,
    text: String,
}

impl Version {
    /// Parses `MAJOR.MINOR.PATCH[-PRE][+BUILD]`; anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let (core, _build) = text.split_once('+').unwrap_or((text, ""));
        let (core, pre) = match core.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (core, None),
        };
        let mut parts = core.split('.');
        let mut number = || -> Option<u64> {
            let p = parts.next()?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let (major, minor, patch) = (number()?, number()?, number()?);
        if parts.next().is_some() {
            return None;
        }
        let pre: Vec<String> = match pre {
            Some(p) => p.split('.').map(str::to_owned).collect(),
            None => Vec::new(),
        };
        let valid_ident =
            |s: &String| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !pre.iter().all(valid_ident) {
            return None;
        }
        Some(Self { major, minor, patch, pre, text: text.to_owned() })
    }

    /// The placeholder version of code that declares none.
    pub fn zero() -> Self {
        Self { major: 0, minor: 0, patch: 0, pre: Vec::new(), text: "0.0.0".into() }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                // A release is newer than any of its pre-releases.
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => compare_pre(&self.pre, &other.pre),
            })
            .then_with(|| self.text.cmp(&other.text))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn compare_pre(a: &[String], b: &[String]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            // Numeric identifiers sort before alphanumeric ones.
            (Ok(_), Err(_)) => Ordering::Less,
            (Err(_), Ok(_)) => Ordering::Greater,
            (Err(_), Err(_)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    a.len().cmp(&b.len())
}

/// A crate's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CrateId {
    /// Package name.
    pub name: String,
    /// Package version.
    pub version: Version,
}

/// Splits a registry directory name `<name>-<semver>` at the first `-` followed by a valid
/// version. Crate names never contain `.`, so that is where the version starts even when the
/// version itself has dashes: `foo-sys-1.0.0-rc.1` is `foo-sys` at `1.0.0-rc.1`, and
/// `toml_edit-0.25.18+spec-1.1.0` is `toml_edit` at `0.25.18+spec-1.1.0`.
pub fn parse_dir_name(dir_name: &str) -> Option<CrateId> {
    dir_name.match_indices('-').map(|(i, _)| i).find_map(|i| {
        let (name, version) = (&dir_name[..i], &dir_name[i + 1..]);
        let starts_with_digit = version.as_bytes().first().is_some_and(u8::is_ascii_digit);
        if name.is_empty() || !starts_with_digit {
            return None;
        }
        Version::parse(version).map(|version| CrateId { name: name.to_owned(), version })
    })
}

/// Reads `[package] name` and `version` from a `Cargo.toml`; `None` for a virtual manifest or
/// one that does not parse. A version inherited from a workspace counts as `0.0.0`.
pub fn parse_manifest(path: &Path) -> Option<CrateId> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    let package = table.get("package")?.as_table()?;
    let name = package.get("name")?.as_str()?.to_owned();
    let version = package
        .get("version")
        .and_then(|v| v.as_str())
        .and_then(Version::parse)
        .unwrap_or_else(Version::zero);
    Some(CrateId { name, version })
}

/// Resolves files to crates, caching `Cargo.toml` lookups per directory.
#[derive(Default)]
pub struct CrateResolver {
    manifests: HashMap<PathBuf, Option<CrateId>>,
}

impl CrateResolver {
    /// The crate `file` (under input directory `root`) belongs to, and the directory that
    /// defines it (paths inside the crate are relative to it).
    pub fn resolve(&mut self, root: &Path, file: &Path) -> (CrateId, PathBuf) {
        let ancestors: Vec<&Path> =
            file.ancestors().skip(1).take_while(|dir| dir.starts_with(root)).collect();
        for dir in &ancestors {
            if let Some(id) = dir.file_name().and_then(|n| n.to_str()).and_then(parse_dir_name) {
                return (id, dir.to_path_buf());
            }
        }
        for dir in &ancestors {
            let found = self
                .manifests
                .entry(dir.to_path_buf())
                .or_insert_with(|| parse_manifest(&dir.join("Cargo.toml")));
            if let Some(id) = found {
                return (id.clone(), dir.to_path_buf());
            }
        }
        let name = root
            .file_name()
            .map(|n| crate::fsutil::path_text(Path::new(n)))
            .unwrap_or_else(|| "root".to_owned());
        (CrateId { name, version: Version::zero() }, root.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn semver_order_follows_the_spec() {
        let ordered = [
            "0.9.0",
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.0.1",
            "1.10.0",
            "2.0.0",
        ];
        for pair in ordered.windows(2) {
            assert!(v(pair[0]) < v(pair[1]), "{} < {}", pair[0], pair[1]);
        }
        for bad in ["1.0", "1.0.0.0", "a.b.c", "1.0.0-", "01x.0.0", ""] {
            assert!(Version::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn registry_dir_names_split_at_the_version() {
        let id = parse_dir_name("gamma-sys-0.3.0").unwrap();
        assert_eq!((id.name.as_str(), id.version.to_string().as_str()), ("gamma-sys", "0.3.0"));
        let id = parse_dir_name("zeta-1.2.3-beta.1+build.5").unwrap();
        assert_eq!(
            (id.name.as_str(), id.version.to_string().as_str()),
            ("zeta", "1.2.3-beta.1+build.5")
        );
        let id = parse_dir_name("toml_edit-0.25.18+spec-1.1.0").unwrap();
        assert_eq!(
            (id.name.as_str(), id.version.to_string().as_str()),
            ("toml_edit", "0.25.18+spec-1.1.0")
        );
        assert!(id.version > Version::parse("0.22.27").unwrap());
        let id = parse_dir_name("windows_x86_64_gnu-0.52.6").unwrap();
        assert_eq!(id.name, "windows_x86_64_gnu");
        assert!(parse_dir_name("src").is_none());
        assert!(parse_dir_name("my-crate").is_none());
        assert!(parse_dir_name("-1.0.0").is_none());
    }
}
