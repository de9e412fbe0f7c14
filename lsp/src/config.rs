//! Settings from the editor (`initializationOptions` and `workspace/didChangeConfiguration`'s
//! `settings.m31r`), the same camelCase keys in both, applied key by key over the defaults.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// `minConfidence`'s default, chosen by typing replay on held-out files (docs/lsp.md,
/// "Confidence gate").
pub const DEFAULT_MIN_CONFIDENCE: f64 = 0.7;

/// The server's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Completions on at all (`enabled`).
    pub enabled: bool,
    /// Language ids served (`languages`).
    pub languages: Vec<String>,
    /// Most lines of one completion (`maxLines`, at least 1).
    pub max_lines: u32,
    /// Most tokens the daemon generates for one completion (`maxTokens`, 1..=4096).
    pub max_tokens: u32,
    /// Daemon socket (`socketPath`; `None` = the daemon's default).
    pub socket_path: Option<PathBuf>,
    /// Start the daemon when its socket does not answer (`autoStart`).
    pub auto_start: bool,
    /// Daemon executable (`daemonPath`).
    pub daemon_path: String,
    /// Extra daemon arguments (`daemonArgs`); `--socket` is always added.
    pub daemon_args: Vec<String>,
    /// Send other open documents as context (`contextFiles`).
    pub context_files: bool,
    /// Send the windows of those documents most similar to the lines above the cursor instead of
    /// the documents whole (`contextSnippets`).
    pub context_snippets: bool,
    /// Most bytes of context snippets, labels included (`contextSnippetBytes`, 256..=1048576).
    pub context_snippet_bytes: u32,
    /// Longest wait for the daemon's answer to an inline completion, in ms (`inlineTimeoutMs`).
    pub inline_timeout_ms: u32,
    /// How long an inline completion waits for the daemon's whole answer before it shows what is
    /// complete of it (its whole lines, else its whole words), in ms (`firstLineBudgetMs`).
    pub first_line_budget_ms: u32,
    /// After showing a daemon completion, ask the daemon in the background for the one after it
    /// as if it were accepted (`speculativeNext`).
    pub speculative_next: bool,
    /// Longest wait for the daemon's answer to a `textDocument/completion`, in ms
    /// (`completionTimeoutMs`).
    pub completion_timeout_ms: u32,
    /// Longest wait for one connection attempt (connect and `hello`), in ms (`connectTimeoutMs`).
    pub connect_timeout_ms: u32,
    /// The least geometric-mean probability of a line's tokens but its least likely one that
    /// the line needs to be shown (`minConfidence`, 0..=1; 0 shows everything): a first line below it suppresses the
    /// completion (`low_confidence`), a later one cuts it there ([`crate::gate`]).
    pub min_confidence: f64,
    /// Drop degenerate output: repeated n-grams, a repeat of the line above, unbalanced closers
    /// (`degenerateFilters`; docs/lsp.md, "Filters").
    pub degenerate_filters: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: true,
            languages: vec!["rust".into()],
            max_lines: 8,
            max_tokens: 128,
            socket_path: None,
            auto_start: true,
            daemon_path: "m31rd".into(),
            daemon_args: Vec::new(),
            context_files: true,
            context_snippets: true,
            // Leaves most of a 512–2048-token context to the prefix and suffix.
            context_snippet_bytes: 4 * 1024,
            // An inline suggestion later than this is rarely still wanted; the daemon is told a
            // shorter deadline, so a slow one answers with what it has instead of nothing.
            inline_timeout_ms: 500,
            // About one keystroke interval: a short answer arrives whole, a long one's first line
            // is shown while the rest is generated in the background.
            first_line_budget_ms: 100,
            speculative_next: true,
            completion_timeout_ms: 1000,
            connect_timeout_ms: 2000,
            min_confidence: DEFAULT_MIN_CONFIDENCE,
            degenerate_filters: true,
        }
    }
}

impl Config {
    /// Applies the keys present in `settings` (an object; `null` changes nothing). Returns one
    /// message per key that was unknown or had a bad value; those keys keep their old value, so
    /// one typo never resets the rest.
    pub fn apply(&mut self, settings: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        let map = match settings {
            Value::Null => return problems,
            Value::Object(map) => map,
            other => return vec![format!("m31r settings must be an object, got {other}")],
        };
        for (key, value) in map {
            let result = match key.as_str() {
                "enabled" => set(&mut self.enabled, value),
                "languages" => set(&mut self.languages, value),
                "maxLines" => set_ranged(&mut self.max_lines, value, 1, 1000),
                "maxTokens" => set_ranged(&mut self.max_tokens, value, 1, 4096),
                "socketPath" => set::<Option<String>>(&mut None, value).map(|_| {
                    self.socket_path = value.as_str().filter(|s| !s.is_empty()).map(PathBuf::from)
                }),
                "autoStart" => set(&mut self.auto_start, value),
                "daemonPath" => set(&mut self.daemon_path, value),
                "daemonArgs" => set(&mut self.daemon_args, value),
                "contextFiles" => set(&mut self.context_files, value),
                "contextSnippets" => set(&mut self.context_snippets, value),
                "contextSnippetBytes" => {
                    set_ranged(&mut self.context_snippet_bytes, value, 256, 1 << 20)
                }
                "inlineTimeoutMs" => set_ranged(&mut self.inline_timeout_ms, value, 50, 60_000),
                "firstLineBudgetMs" => set_ranged(&mut self.first_line_budget_ms, value, 0, 60_000),
                "speculativeNext" => set(&mut self.speculative_next, value),
                "completionTimeoutMs" => {
                    set_ranged(&mut self.completion_timeout_ms, value, 50, 60_000)
                }
                "connectTimeoutMs" => set_ranged(&mut self.connect_timeout_ms, value, 50, 60_000),
                "minConfidence" => set_fraction(&mut self.min_confidence, value),
                "degenerateFilters" => set(&mut self.degenerate_filters, value),
                _ => Err("unknown setting".to_string()),
            };
            if let Err(why) = result {
                problems.push(format!("m31r setting {key} = {value}: {why}"));
            }
        }
        problems
    }

    /// The socket to use: the setting, else the protocol's default, where `m31rd` listens unless
    /// told otherwise.
    pub fn socket(&self) -> PathBuf {
        self.socket_path.clone().unwrap_or_else(m31r_protocol::socket::default_socket_path)
    }
}

fn set<T: DeserializeOwned>(slot: &mut T, value: &Value) -> Result<(), String> {
    *slot = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    Ok(())
}

fn set_fraction(slot: &mut f64, value: &Value) -> Result<(), String> {
    let mut v = 0.0f64;
    set(&mut v, value)?;
    if !(0.0..=1.0).contains(&v) {
        return Err("outside 0..=1".into());
    }
    *slot = v;
    Ok(())
}

fn set_ranged(slot: &mut u32, value: &Value, min: u32, max: u32) -> Result<(), String> {
    let mut v = 0u32;
    set(&mut v, value)?;
    if !(min..=max).contains(&v) {
        return Err(format!("outside {min}..={max}"));
    }
    *slot = v;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn applies_known_keys_and_reports_bad_ones() {
        let mut config = Config::default();
        let problems = config.apply(&json!({
            "enabled": false, "languages": ["rust", "toml"], "maxLines": 3, "maxTokens": 0,
            "socketPath": "/tmp/x.sock", "autoStart": false, "daemonPath": "/bin/m31rd",
            "daemonArgs": ["--bundle", "b"], "contextFiles": "yes", "colour": 1,
            "inlineTimeoutMs": 300, "completionTimeoutMs": 10, "connectTimeoutMs": 700,
            "contextSnippets": false, "contextSnippetBytes": 100, "firstLineBudgetMs": 0,
            "minConfidence": 0.25, "degenerateFilters": false
        }));
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("contextSnippetBytes = 100: outside")));
        assert!(
            problems.iter().any(|p| p.contains("completionTimeoutMs = 10: outside 50..=60000"))
        );
        assert!(problems.iter().any(|p| p.contains("maxTokens = 0: outside 1..=4096")));
        assert!(problems.iter().any(|p| p.contains("contextFiles")));
        assert!(problems.iter().any(|p| p.contains("colour = 1: unknown setting")));
        let expected = Config {
            enabled: false,
            languages: vec!["rust".into(), "toml".into()],
            max_lines: 3,
            socket_path: Some("/tmp/x.sock".into()),
            auto_start: false,
            daemon_path: "/bin/m31rd".into(),
            daemon_args: vec!["--bundle".into(), "b".into()],
            inline_timeout_ms: 300,
            connect_timeout_ms: 700,
            first_line_budget_ms: 0,
            context_snippets: false,
            min_confidence: 0.25,
            degenerate_filters: false,
            ..Config::default()
        };
        assert_eq!(config, expected);
        let problems = config.apply(&json!({"minConfidence": 1.5}));
        assert!(problems[0].contains("minConfidence = 1.5: outside 0..=1"), "{problems:?}");
        assert_eq!(config.min_confidence, 0.25);
        assert!(config.apply(&json!({"socketPath": null})).is_empty());
        assert_eq!(config.socket_path, None);
        assert!(config.socket().ends_with("m31rd.sock"));
    }
}
