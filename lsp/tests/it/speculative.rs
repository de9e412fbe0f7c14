//! Speculative next: after a daemon completion is shown, the completion after it (as if it were
//! accepted) is asked for in the background; accepting it and asking at the end of it is answered
//! from that, without another `fim`; any other edit leaves it unused.

use std::path::Path;
use std::time::Duration;

use m31r_lsp::server::Options;
use m31r_protocol::Request;
use serde_json::{Value, json};

use crate::fake_daemon::{FakeDaemon, Reply};
use crate::lsp_client::LspClient;

const MAIN: &str = "file:///w/src/main.rs";
const BODY: &str = "fn f() {\n    \n}\n";

async fn client(socket: &Path) -> LspClient {
    let mut client = LspClient::start(Options { socket: Some(socket.to_path_buf()) });
    client
        .initialize(json!({
            "processId": null, "rootUri": "file:///w", "capabilities": {},
            "initializationOptions": {"inlineTimeoutMs": 30_000, "completionTimeoutMs": 30_000}
        }))
        .await;
    client
}

fn daemon(dir: &Path) -> FakeDaemon {
    FakeDaemon::start(&dir.join("d.sock"), |input| {
        Reply::Text(if input.prefix.ends_with("foo(bar)") { ";".into() } else { "foo(bar)".into() })
    })
}

fn text(response: &Value) -> String {
    let items = response["result"]["items"].as_array().unwrap_or_else(|| panic!("{response}"));
    assert_eq!(items.len(), 1, "{response}");
    items[0]["insertText"].as_str().unwrap().into()
}

async fn status(lsp: &mut LspClient) -> Value {
    lsp.request("m31r/status", Value::Null).await["result"].clone()
}

/// Waits until `m31r/status` counts `n` speculative answers received.
async fn speculations_ready(lsp: &mut LspClient, n: u64) {
    let poll = async {
        while status(lsp).await["speculationsReady"].as_u64() != Some(n) {
            tokio::task::yield_now().await;
        }
    };
    // A hang guard, not a timing assertion.
    tokio::time::timeout(Duration::from_secs(60), poll).await.expect("the speculation ended");
}

/// Inserts `text` at `at` (line, character).
async fn insert(lsp: &mut LspClient, at: (u32, u32), text: &str) {
    let at = json!({"line": at.0, "character": at.1});
    lsp.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": MAIN, "version": 2},
            "contentChanges": [{"range": {"start": at, "end": at}, "text": text}]}),
    )
    .await;
}

#[tokio::test]
async fn an_accepted_completion_is_followed_by_the_speculative_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let fake = daemon(dir.path());
    let mut lsp = client(&fake.socket).await;
    lsp.open(MAIN, "rust", BODY).await;
    assert_eq!(text(&lsp.inline(MAIN, 1, 4).await), "foo(bar)");
    // The speculation saw the document as if the completion were accepted.
    fake.wait_for(
        |r| matches!(r, Request::Fim { input, .. } if input.prefix.ends_with("    foo(bar)")),
    )
    .await;
    speculations_ready(&mut lsp, 1).await;

    insert(&mut lsp, (1, 4), "foo(bar)").await;
    assert_eq!(text(&lsp.inline(MAIN, 1, 12).await), ";");
    assert_eq!(fake.fims(), 2, "the original and the speculation, nothing more");
    assert_eq!(status(&mut lsp).await["servedLocally"], 1);
    fake.stop().await;
}

#[tokio::test]
async fn another_edit_leaves_the_speculation_unused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = daemon(dir.path());
    let mut lsp = client(&fake.socket).await;
    lsp.open(MAIN, "rust", BODY).await;
    assert_eq!(text(&lsp.inline(MAIN, 1, 4).await), "foo(bar)");
    speculations_ready(&mut lsp, 1).await;
    insert(&mut lsp, (1, 4), "foo(baz)").await;
    assert_eq!(text(&lsp.inline(MAIN, 1, 12).await), "foo(bar)");
    assert!(fake.fims() >= 3, "asked the daemon");
    assert_eq!(status(&mut lsp).await["servedLocally"], 0);

    // The answer's own speculation ends before the setting changes, so no `fim` is in flight.
    speculations_ready(&mut lsp, 2).await;
    // Turned off, nothing is asked for in the background.
    lsp.notify(
        "workspace/didChangeConfiguration",
        json!({"settings": {"m31r": {"speculativeNext": false}}}),
    )
    .await;
    let before = fake.fims();
    assert_eq!(text(&lsp.inline(MAIN, 1, 12).await), "foo(bar)");
    insert(&mut lsp, (1, 12), "foo(bar)").await;
    assert_eq!(text(&lsp.inline(MAIN, 1, 20).await), ";");
    assert_eq!(fake.fims(), before + 2);
    fake.stop().await;
}
