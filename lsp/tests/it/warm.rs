//! Cache warm-ups: at most one in flight per document. They are never cancelled (what they
//! evaluate stays useful), so a warm-up per event while one runs would pile up at the daemon;
//! `m31r/status` counts the documents warming.

use std::sync::Arc;

use m31r_lsp::server::Options;
use m31r_protocol::Request;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::fake_daemon::{FakeDaemon, Reply};
use crate::lsp_client::LspClient;

const MAIN: &str = "file:///w/src/main.rs";

fn warms(fake: &FakeDaemon) -> usize {
    fake.requests().iter().filter(|r| matches!(r, Request::Warm { .. })).count()
}

async fn warming(lsp: &mut LspClient) -> u64 {
    lsp.request("m31r/status", Value::Null).await["result"]["warming"].as_u64().unwrap()
}

#[tokio::test]
async fn a_document_has_at_most_one_warm_up_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |_| Reply::Text("x".into()));
    let gate = Arc::new(Notify::new());
    *fake.warm_gate.lock().unwrap() = Some(gate.clone());
    let mut lsp = LspClient::start(Options { socket: Some(fake.socket.clone()) });
    lsp.initialize(json!({"processId": null, "rootUri": "file:///w", "capabilities": {}})).await;
    lsp.open(MAIN, "rust", "fn main() {}\n").await;
    fake.wait_for(|r| matches!(r, Request::Warm { .. })).await;
    for _ in 0..3 {
        lsp.notify("textDocument/didSave", json!({"textDocument": {"uri": MAIN}})).await;
    }
    // A completion request after the saves: its `fim` reaches the daemon after anything the
    // saves sent.
    lsp.inline(MAIN, 0, 12).await;
    fake.wait_for(|r| matches!(r, Request::Fim { .. })).await;
    assert_eq!(warming(&mut lsp).await, 1);
    assert_eq!(warms(&fake), 1, "a second warm-up was sent while the first ran");

    *fake.warm_gate.lock().unwrap() = None;
    gate.notify_one();
    let poll = async {
        while warming(&mut lsp).await != 0 {
            tokio::task::yield_now().await;
        }
    };
    // A hang guard, not a timing assertion.
    tokio::time::timeout(std::time::Duration::from_secs(60), poll).await.expect("warm-up ended");
    lsp.notify("textDocument/didSave", json!({"textDocument": {"uri": MAIN}})).await;
    let second = async {
        while warms(&fake) < 2 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), second)
        .await
        .expect("a save after the warm-up ended warms again");
    fake.stop().await;
}
