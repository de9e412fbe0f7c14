//! Train/validation/test assignment by crate.
//!
//! The rule: a crate's score is the first 8 bytes of `sha256("m31r-split\0" + name)` read as a
//! big-endian integer and divided by 2^64, a number in `[0, 1)` that depends on the name alone.
//! Scores below `validation` go to validation, below `validation + test` to test, the rest to
//! train. So the same crates always give the same split, every version of a crate shares its
//! split, and adding a crate never moves another.
//!
//! Small corpora would often get no validation or test crate by that rule alone, so with 3 or
//! more crates an empty validation (then test) split takes the lowest-scoring crate of the
//! currently largest split (train on ties). Only then can adding a crate move another, and only
//! back to where its score puts it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::SplitConfig;
use crate::fsutil::by_name;

/// One of the three dataset splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Used to train the tokenizer and the model.
    Train,
    /// Held out: tokenizer bytes/token and model validation loss.
    Validation,
    /// Held out until the final evaluation.
    Test,
}

impl Split {
    /// The three splits, in report order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    /// The split's name in the manifest, the index and file names.
    pub const fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` honours width and alignment, which the summary tables use.
        f.pad(self.as_str())
    }
}

impl FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        by_name(&Self::ALL, Self::as_str, s, "split")
    }
}

/// The crate's position in `[0, 1)` that decides its split.
pub fn crate_score(name: &str) -> f64 {
    let digest =
        Sha256::new().chain_update(b"m31r-split\0").chain_update(name.as_bytes()).finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    // 2^-64 scaling keeps the score strictly below 1.
    u64::from_be_bytes(head) as f64 / 18_446_744_073_709_551_616.0
}

/// Assigns each crate name a split by the rule in the module docs.
pub fn assign<'a>(
    names: impl IntoIterator<Item = &'a str>,
    config: &SplitConfig,
) -> BTreeMap<String, Split> {
    let mut out: BTreeMap<String, Split> = names
        .into_iter()
        .map(|name| {
            let score = crate_score(name);
            let split = if score < config.validation {
                Split::Validation
            } else if score < config.validation + config.test {
                Split::Test
            } else {
                Split::Train
            };
            (name.to_owned(), split)
        })
        .collect();
    if out.len() >= 3 {
        for wanted in [Split::Validation, Split::Test] {
            if out.values().any(|&s| s == wanted) {
                continue;
            }
            let count = |s: Split| out.values().filter(|&&x| x == s).count();
            let donor = [Split::Train, Split::Validation, Split::Test]
                .into_iter()
                .filter(|&s| s != wanted)
                .max_by_key(|&s| (count(s), s == Split::Train))
                .unwrap_or(Split::Train);
            let moved = out
                .iter()
                .filter(|&(_, &s)| s == donor)
                .map(|(name, _)| name)
                .min_by(|a, b| crate_score(a).total_cmp(&crate_score(b)).then_with(|| a.cmp(b)))
                .cloned();
            if let Some(name) = moved {
                out.insert(name, wanted);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_round_trip() {
        for split in Split::ALL {
            assert_eq!(split.as_str().parse::<Split>(), Ok(split));
        }
        assert_eq!("held_out".parse::<Split>(), Err("unknown split \"held_out\"".to_owned()));
    }

    #[test]
    fn three_crates_fill_every_split() {
        let config = SplitConfig::default();
        let split = assign(["a", "b", "c"], &config);
        let mut seen: Vec<Split> = split.values().copied().collect();
        seen.sort();
        assert_eq!(seen, vec![Split::Train, Split::Validation, Split::Test]);
        // Below 3 crates only the hash rule applies: nothing is moved to fill a split.
        let two = assign(["a", "b"], &config);
        for (name, split) in &two {
            let by_score = if crate_score(name) < config.validation {
                Split::Validation
            } else if crate_score(name) < config.validation + config.test {
                Split::Test
            } else {
                Split::Train
            };
            assert_eq!(*split, by_score, "{name}");
        }
    }

    #[test]
    fn large_corpora_follow_the_ratios_and_stay_stable() {
        let config = SplitConfig::default();
        let names: Vec<String> = (0..4000).map(|i| format!("crate{i}")).collect();
        let split = assign(names.iter().map(String::as_str), &config);
        let val = split.values().filter(|&&s| s == Split::Validation).count();
        let test = split.values().filter(|&&s| s == Split::Test).count();
        assert!((150..250).contains(&val), "{val}");
        assert!((150..250).contains(&test), "{test}");
        let more = assign(names.iter().map(String::as_str).chain(["newcomer"]), &config);
        for (name, s) in &split {
            assert_eq!(more[name], *s, "{name} moved");
        }
    }
}
