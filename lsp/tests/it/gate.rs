//! The confidence gate (`minConfidence`) and the degenerate-output filters in the server: a
//! completion whose first line the model was unsure of is not shown (`low_confidence`), a later
//! unsure line cuts it there, a streamed first line is judged as soon as it is complete (its
//! generation is then cancelled), and `0` / `degenerateFilters: false` show everything.

use std::path::Path;
use std::sync::Arc;

use m31r_lsp::server::Options;
use m31r_protocol::Request;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::fake_daemon::{FakeDaemon, Reply, confidence};
use crate::lsp_client::LspClient;

const MAIN: &str = "file:///w/src/main.rs";
/// The cursor goes at the end of line 1 (`    `): a multi-line completion.
const BODY: &str = "fn f() {\n    \n}\n";

async fn client(socket: &Path, settings: Value) -> LspClient {
    let mut client = LspClient::start(Options { socket: Some(socket.to_path_buf()) });
    let mut options = json!({"inlineTimeoutMs": 30_000, "completionTimeoutMs": 30_000,
        "speculativeNext": false});
    options.as_object_mut().unwrap().extend(settings.as_object().unwrap().clone());
    client
        .initialize(json!({
            "processId": null, "rootUri": "file:///w", "capabilities": {},
            "initializationOptions": options
        }))
        .await;
    client.open(MAIN, "rust", BODY).await;
    client
}

/// The shown text, `None` when nothing is shown.
fn shown(response: &Value) -> Option<String> {
    let items = response["result"]["items"].as_array().unwrap_or_else(|| panic!("{response}"));
    items.first().map(|item| item["insertText"].as_str().unwrap().to_string())
}

async fn suppressed_by(lsp: &mut LspClient, reason: &str) -> u64 {
    let status = lsp.request("m31r/status", Value::Null).await["result"].clone();
    status["suppressedBy"][reason].as_u64().unwrap_or(0)
}

/// A daemon answering `text` with every token of line `i` at log-probability `logprobs[i]`.
fn scored(dir: &Path, text: &'static str, logprobs: &'static [f64]) -> FakeDaemon {
    FakeDaemon::start(&dir.join("d.sock"), move |_| Reply::Scored {
        text: text.into(),
        lines: confidence(text, logprobs),
    })
}

#[tokio::test]
async fn an_unsure_first_line_is_not_shown_unless_the_gate_is_off() {
    let dir = tempfile::tempdir().unwrap();
    // exp(-3) ≈ 0.05 per token.
    let fake = scored(dir.path(), "let a = 1;", &[-3.0]);
    let mut lsp = client(&fake.socket, json!({"minConfidence": 0.2})).await;
    assert_eq!(shown(&lsp.inline(MAIN, 1, 4).await), None);
    assert_eq!(suppressed_by(&mut lsp, "low_confidence").await, 1);
    // A sure one passes the same gate.
    lsp.notify(
        "workspace/didChangeConfiguration",
        json!({"settings": {"m31r": {"minConfidence": 0.04}}}),
    )
    .await;
    assert_eq!(shown(&lsp.inline(MAIN, 1, 4).await).as_deref(), Some("let a = 1;"));
    lsp.notify(
        "workspace/didChangeConfiguration",
        json!({"settings": {"m31r": {"minConfidence": 0}}}),
    )
    .await;
    assert_eq!(shown(&lsp.inline(MAIN, 1, 4).await).as_deref(), Some("let a = 1;"));
    fake.stop().await;
}

#[tokio::test]
async fn an_unsure_later_line_cuts_the_completion_there() {
    let dir = tempfile::tempdir().unwrap();
    let fake =
        scored(dir.path(), "let a = 1;\n    let b = 2;\n    let c = 3;", &[-0.1, -0.2, -4.0]);
    let mut lsp = client(&fake.socket, json!({"minConfidence": 0.5})).await;
    assert_eq!(shown(&lsp.inline(MAIN, 1, 4).await).as_deref(), Some("let a = 1;\n    let b = 2;"));
    fake.stop().await;
}

#[tokio::test]
async fn a_streamed_unsure_first_line_is_refused_at_once_and_its_generation_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let release = Arc::new(Notify::new());
    let held = release.clone();
    let first = "let a = 1;\n";
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), move |_| Reply::Staged {
        first: first.into(),
        first_lines: confidence(first, &[-3.0, 0.0]),
        rest: "    let b = 2;".into(),
        release: held.clone(),
    });
    // The budget would never pass: the answer can only come from the complete first line.
    let mut lsp =
        client(&fake.socket, json!({"minConfidence": 0.2, "firstLineBudgetMs": 60_000})).await;
    assert_eq!(shown(&lsp.inline(MAIN, 1, 4).await), None);
    assert_eq!(suppressed_by(&mut lsp, "low_confidence").await, 1);
    let fim = fake.requests().into_iter().find_map(|r| match r {
        Request::Fim { id, .. } => Some(id),
        _ => None,
    });
    fake.wait_for(|r| matches!(r, Request::Cancel { id } if Some(id) == fim.as_ref())).await;
    fake.stop().await;
}

#[tokio::test]
async fn degenerate_output_is_not_shown_unless_the_filters_are_off() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |_| {
        Reply::Text("let mut buf = [0; 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0".into())
    });
    let mut lsp = client(&fake.socket, json!({})).await;
    assert_eq!(shown(&lsp.inline(MAIN, 1, 4).await), None);
    assert_eq!(suppressed_by(&mut lsp, "repetitive").await, 1);
    lsp.notify(
        "workspace/didChangeConfiguration",
        json!({"settings": {"m31r": {"degenerateFilters": false}}}),
    )
    .await;
    assert!(shown(&lsp.inline(MAIN, 1, 4).await).is_some());
    fake.stop().await;
}

#[tokio::test]
async fn a_streamed_degenerate_first_line_is_refused_at_once_and_its_generation_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let release = Arc::new(Notify::new());
    let held = release.clone();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), move |_| Reply::Staged {
        first: "let v = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];\n".into(),
        first_lines: Vec::new(),
        rest: "    let b = 2;".into(),
        release: held.clone(),
    });
    let mut lsp = client(&fake.socket, json!({"firstLineBudgetMs": 60_000})).await;
    assert_eq!(shown(&lsp.inline(MAIN, 1, 4).await), None);
    assert_eq!(suppressed_by(&mut lsp, "repetitive").await, 1);
    let fim = fake.requests().into_iter().find_map(|r| match r {
        Request::Fim { id, .. } => Some(id),
        _ => None,
    });
    fake.wait_for(|r| matches!(r, Request::Cancel { id } if Some(id) == fim.as_ref())).await;
    fake.stop().await;
}
