//! Similar-snippet context (`contextSnippets`): which windows of other documents a request
//! carries, in which order, within which budget, and that typing along a line keeps them.

use std::collections::HashSet;

use m31r_lsp::config::Config;
use m31r_lsp::document::Document;
use m31r_lsp::request::{ContextDoc, Prepared, Windows, build};
use m31r_lsp::server::Options;
use m31r_protocol::{ContextFile, Request};
use serde_json::json;

use crate::fake_daemon::{FakeDaemon, Reply};
use crate::fixture::cursor;
use crate::lsp_client::LspClient;

/// A parser being written; the cursor line is being typed.
const CURRENT: &str = "\
use crate::header::Header;

fn parse_header(input: &str) -> Option<Header> {
    let mut fields = input.split(':');
    let name = fields.next()?.trim();
    let value = fields.next()?.trim();
    $0
}
";

/// 64 lines: noise, then a parser like the current one, then more noise.
fn util() -> String {
    let mut text: String = (0..24).map(|i| format!("pub const NOISE_{i}: u32 = {i};\n")).collect();
    text += "pub fn parse_body(input: &str) -> Option<Body> {\n";
    text += "    let mut fields = input.split(';');\n";
    text += "    let name = fields.next()?.trim();\n";
    text += "    Some(Body { name })\n";
    text += "}\n";
    text += &(29..64).map(|i| format!("pub const NOISE_{i}: u32 = {i};\n")).collect::<String>();
    text
}

const HEADER: &str = "pub struct Header {\n    pub name: String,\n    pub value: String,\n}\n";
const UNRELATED: &str = "struct Empty;\nimpl Empty {}\n";

fn prepare(fixture: &str, context: &[ContextDoc<'_>], config: &Config) -> Prepared {
    let (text, at) = cursor(fixture);
    build(&Document::new(text, 0, "rust".into()), at, context, config, &Windows::default())
}

fn labels(files: &[ContextFile]) -> Vec<&str> {
    files.iter().map(|f| f.path.as_str()).collect()
}

fn tokens(text: &str) -> HashSet<&str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|t| !t.is_empty()).collect()
}

fn jaccard(a: &str, b: &str) -> f64 {
    let (a, b) = (tokens(a), tokens(b));
    a.intersection(&b).count() as f64 / a.union(&b).count() as f64
}

#[test]
fn the_most_similar_windows_go_least_similar_first_the_same_every_time() {
    let util = util();
    let context = [
        ContextDoc { path: "src/util.rs", text: &util },
        ContextDoc { path: "src/header.rs", text: HEADER },
        ContextDoc { path: "src/unrelated.rs", text: UNRELATED },
    ];
    let first = prepare(CURRENT, &context, &Config::default());
    let second = prepare(CURRENT, &context, &Config::default());
    assert_eq!(first.input.context_files, second.input.context_files);
    // The noise around util.rs's parser makes its windows less like the query than header.rs;
    // windows 1-32 and 17-48 hold the same parser and as much noise, and tie: the first wins.
    assert_eq!(labels(&first.input.context_files), ["src/util.rs:1-32", "src/header.rs"]);
    let parser = &first.input.context_files[0].text;
    assert!(parser.starts_with("pub const NOISE_0:") && parser.contains("fn parse_body"));
    assert_eq!(first.input.context_files[1].text, HEADER);

    // Similarity to the lines above the cursor line never decreases along the list.
    let (text, at) = cursor(CURRENT);
    let query_end = text[..at].rfind('\n').unwrap() + 1;
    let query = &text[..query_end];
    let scores: Vec<f64> =
        first.input.context_files.iter().map(|f| jaccard(query, &f.text)).collect();
    assert!(scores.windows(2).all(|w| w[0] <= w[1]), "{scores:?}");
}

#[test]
fn typing_along_the_cursor_line_keeps_the_chosen_windows() {
    let util = util();
    let context = [
        ContextDoc { path: "src/util.rs", text: &util },
        ContextDoc { path: "src/header.rs", text: HEADER },
    ];
    let before = prepare(CURRENT, &context, &Config::default());
    assert!(!before.input.context_files.is_empty());
    // Words that would change the choice if the cursor line were part of the query.
    for typed in ["N", "NOISE_1", "NOISE_1 + parse_body(Body", "pub struct Header"] {
        let fixture = CURRENT.replace("$0", &format!("{typed}$0"));
        let after = prepare(&fixture, &context, &Config::default());
        assert_eq!(after.input.context_files, before.input.context_files, "typed {typed:?}");
    }
}

#[test]
fn the_snippets_fit_the_byte_budget_labels_included() {
    let util = util();
    let many: Vec<String> = (0..6).map(|i| format!("{util}// copy {i}\n")).collect();
    let paths: Vec<String> = (0..6).map(|i| format!("src/copy{i}.rs")).collect();
    let context: Vec<ContextDoc<'_>> =
        many.iter().zip(&paths).map(|(text, path)| ContextDoc { path, text }).collect();
    for budget in [256, 1000, 4096, 16 * 1024] {
        let config = Config { context_snippet_bytes: budget, ..Config::default() };
        let p = prepare(CURRENT, &context, &config);
        let used: usize = p.input.context_files.iter().map(|f| f.path.len() + f.text.len()).sum();
        assert!(used <= budget as usize, "budget {budget}: {used}");
        assert!(!p.input.context_files.is_empty() || budget < 1000, "budget {budget}");
    }
}

#[test]
fn without_snippets_or_context_files_the_old_requests_come_back() {
    let util = util();
    let context = [
        ContextDoc { path: "src/util.rs", text: &util },
        ContextDoc { path: "src/unrelated.rs", text: UNRELATED },
    ];
    let whole = Config { context_snippets: false, ..Config::default() };
    let p = prepare(CURRENT, &context, &whole);
    assert_eq!(labels(&p.input.context_files), ["src/util.rs", "src/unrelated.rs"]);
    assert_eq!(p.input.context_files[0].text, util);
    let none = Config { context_files: false, ..Config::default() };
    assert!(prepare(CURRENT, &context, &none).input.context_files.is_empty());
}

const MAIN: &str = "file:///w/src/main.rs";

#[tokio::test]
async fn the_daemon_gets_the_chosen_windows_and_never_the_current_document() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |_| Reply::Text("x".into()));
    let mut lsp = LspClient::start(Options { socket: Some(fake.socket.clone()) });
    lsp.initialize(json!({
        "processId": null, "rootUri": "file:///w", "capabilities": {},
        "initializationOptions": {"inlineTimeoutMs": 30_000, "firstLineBudgetMs": 30_000}
    }))
    .await;
    let (text, at) = cursor(CURRENT);
    // The current document also holds the parser's lines further down: the most similar
    // window of all, were the current document a candidate.
    let text = format!("{text}\n{}", &text[..at]);
    lsp.open("file:///w/src/util.rs", "rust", &util()).await;
    lsp.open("file:///w/src/header.rs", "rust", HEADER).await;
    lsp.open(MAIN, "rust", &text).await;

    let fims = |fake: &FakeDaemon| -> Vec<Vec<ContextFile>> {
        fake.requests()
            .into_iter()
            .filter_map(|r| match r {
                Request::Fim { input, .. } => Some(input.context_files),
                _ => None,
            })
            .collect()
    };
    // The cursor is on line 6, column 4.
    lsp.inline(MAIN, 6, 4).await;
    let first = fims(&fake).pop().unwrap();
    assert_eq!(labels(&first), ["src/util.rs:1-32", "src/header.rs"]);
    assert!(first.iter().all(|f| !f.path.starts_with("src/main.rs")));

    // Typing on the cursor line: the next request carries the same windows.
    let change = json!({"range": {"start": {"line": 6, "character": 4},
        "end": {"line": 6, "character": 4}}, "text": "NOISE_1"});
    lsp.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": MAIN, "version": 2}, "contentChanges": [change]}),
    )
    .await;
    lsp.inline(MAIN, 6, 11).await;
    assert_eq!(fims(&fake).pop().unwrap(), first);

    // `contextSnippets: false` sends the documents whole, in opening order.
    lsp.notify(
        "workspace/didChangeConfiguration",
        json!({"settings": {"m31r": {"contextSnippets": false}}}),
    )
    .await;
    lsp.inline(MAIN, 6, 11).await;
    let whole = fims(&fake).pop().unwrap();
    assert_eq!(labels(&whole), ["src/util.rs", "src/header.rs"]);
    assert_eq!(whole[1].text, HEADER);
    fake.stop().await;
}
