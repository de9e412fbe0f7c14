//! First line first: an inline completion whose generation is still running after
//! `firstLineBudgetMs` shows its first line, the generation carries on in the background, and its
//! full text is then served at the same position (or along what was typed) without another `fim`;
//! an edit or request elsewhere cancels it. The fake daemon holds the rest until the test
//! releases it, so "before the daemon finished" is a matter of ordering, not time.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use m31r_lsp::server::Options;
use m31r_protocol::Request;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::fake_daemon::{FakeDaemon, Reply};
use crate::lsp_client::LspClient;

const MAIN: &str = "file:///w/src/main.rs";
/// The cursor line of [`MAIN`]'s text: `    ` then the cursor, nothing after it.
const BODY: &str = "fn f() {\n    \n}\n";
const FIRST: &str = "let a = 1;\n";
const REST: &str = "    let b = 2;\n";
const FULL: &str = "let a = 1;\n    let b = 2;";

/// A client with long timeouts (a busy machine must not turn answers into timeouts) and the
/// default first-line budget.
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

/// A fake daemon that streams [`FIRST`] and holds [`REST`] until `release` is notified.
fn staged(dir: &Path, release: &Arc<Notify>) -> FakeDaemon {
    let release = release.clone();
    FakeDaemon::start(&dir.join("d.sock"), move |_| Reply::Staged {
        first: FIRST.into(),
        first_lines: Vec::new(),
        rest: REST.into(),
        release: release.clone(),
    })
}

fn text(response: &Value) -> String {
    let items = response["result"]["items"].as_array().unwrap_or_else(|| panic!("{response}"));
    assert_eq!(items.len(), 1, "{response}");
    items[0]["insertText"].as_str().unwrap().into()
}

/// Waits until `m31r/status` counts `n` generations ended in the background.
async fn finished_in_background(lsp: &mut LspClient, n: u64) {
    let poll = async {
        loop {
            let status = lsp.request("m31r/status", Value::Null).await["result"].clone();
            if status["finishedInBackground"].as_u64() == Some(n) {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    // A hang guard, not a timing assertion.
    tokio::time::timeout(Duration::from_secs(60), poll).await.expect("the generations ended");
}

/// Waits until the daemon got a `cancel` for the last `fim` it received.
async fn cancelled_last_fim(fake: &FakeDaemon) {
    let last = fake.requests().into_iter().rev().find_map(|r| match r {
        Request::Fim { id, .. } => Some(id),
        _ => None,
    });
    let last = last.expect("a fim was sent");
    fake.wait_for(|r| matches!(r, Request::Cancel { id } if *id == last)).await;
}

fn cancels(fake: &FakeDaemon) -> usize {
    fake.requests().iter().filter(|r| matches!(r, Request::Cancel { .. })).count()
}

#[tokio::test]
async fn the_first_line_is_shown_before_the_daemon_finishes_and_the_rest_served_after() {
    let dir = tempfile::tempdir().unwrap();
    let release = Arc::new(Notify::new());
    let fake = staged(dir.path(), &release);
    let mut lsp = client(&fake.socket).await;
    lsp.open(MAIN, "rust", BODY).await;
    // The daemon still holds the rest: this answer can only be the first line.
    assert_eq!(text(&lsp.inline(MAIN, 1, 4).await), "let a = 1;");
    assert_eq!(fake.fims(), 1);

    release.notify_one();
    finished_in_background(&mut lsp, 1).await;
    assert_eq!(text(&lsp.inline(MAIN, 1, 4).await), FULL);
    assert_eq!(fake.fims(), 1, "the rest came from the background generation");
    assert_eq!(cancels(&fake), 0);
    fake.stop().await;
}

#[tokio::test]
async fn typing_along_the_first_line_keeps_the_generation_and_gets_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let release = Arc::new(Notify::new());
    let fake = staged(dir.path(), &release);
    let mut lsp = client(&fake.socket).await;
    lsp.open(MAIN, "rust", BODY).await;
    assert_eq!(text(&lsp.inline(MAIN, 1, 4).await), "let a = 1;");
    let at = json!({"line": 1, "character": 4});
    lsp.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": MAIN, "version": 2},
            "contentChanges": [{"range": {"start": at, "end": at}, "text": "let"}]}),
    )
    .await;
    assert_eq!(text(&lsp.inline(MAIN, 1, 7).await), " a = 1;");

    release.notify_one();
    finished_in_background(&mut lsp, 1).await;
    assert_eq!(text(&lsp.inline(MAIN, 1, 7).await), " a = 1;\n    let b = 2;");
    assert_eq!((fake.fims(), cancels(&fake)), (1, 0));
    fake.stop().await;
}

#[tokio::test]
async fn another_edit_or_a_request_elsewhere_cancels_the_generation() {
    let dir = tempfile::tempdir().unwrap();
    let release = Arc::new(Notify::new());
    let fake = staged(dir.path(), &release);
    let mut lsp = client(&fake.socket).await;
    lsp.open(MAIN, "rust", BODY).await;
    assert_eq!(text(&lsp.inline(MAIN, 1, 4).await), "let a = 1;");
    // Text that is not the suggestion's: the generation is cancelled at the daemon.
    let at = json!({"line": 1, "character": 4});
    lsp.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": MAIN, "version": 2},
            "contentChanges": [{"range": {"start": at, "end": at}, "text": "x"}]}),
    )
    .await;
    cancelled_last_fim(&fake).await;

    // A request at another position supersedes the next one's generation.
    assert_eq!(text(&lsp.inline(MAIN, 1, 5).await), "let a = 1;");
    let second = fake.requests();
    assert_eq!(text(&lsp.inline(MAIN, 0, 0).await), "let a = 1;");
    let second = second.into_iter().rev().find_map(|r| match r {
        Request::Fim { id, .. } => Some(id),
        _ => None,
    });
    fake.wait_for(|r| matches!(r, Request::Cancel { id } if Some(id) == second.as_ref())).await;
    assert_eq!(fake.fims(), 3);

    // Both ended without extending anything: the same position asks the daemon.
    finished_in_background(&mut lsp, 2).await;
    assert_eq!(text(&lsp.inline(MAIN, 1, 5).await), "let a = 1;");
    assert_eq!(fake.fims(), 4);
    fake.stop().await;
}
