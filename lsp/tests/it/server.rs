//! The server over real JSON-RPC framing against the fake daemon: completions and their ranges,
//! cancellation forwarding, an absent daemon, a restarted daemon, settings, status.

use std::path::Path;

use m31r_lsp::server::Options;
use m31r_protocol::Request;
use serde_json::{Value, json};

use crate::fake_daemon::{FakeDaemon, Reply};
use crate::lsp_client::LspClient;

const MAIN: &str = "file:///w/src/main.rs";
const UTIL: &str = "file:///w/src/util.rs";

/// A client initialised with a workspace at `/w`, these settings and no UTF-8 offer. Request
/// timeouts and the first-line budget not in `settings` are long: a busy test machine must not
/// turn answers into timeouts or whole answers into their first lines.
async fn client(socket: &Path, mut settings: Value) -> (LspClient, Value) {
    for key in ["inlineTimeoutMs", "completionTimeoutMs", "firstLineBudgetMs"] {
        settings.as_object_mut().unwrap().entry(key).or_insert(json!(30_000));
    }
    let mut client = LspClient::start(Options { socket: Some(socket.to_path_buf()) });
    let result = client
        .initialize(json!({
            "processId": null, "rootUri": "file:///w", "capabilities": {},
            "initializationOptions": settings
        }))
        .await;
    (client, result)
}

fn items(response: &Value) -> &Vec<Value> {
    response["result"]["items"].as_array().unwrap_or_else(|| panic!("no items in {response}"))
}

#[tokio::test]
async fn inline_completion_lands_on_utf16_columns_after_incremental_edits() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |_| Reply::Text("a, b);".into()));
    let (mut lsp, init) = client(&fake.socket, json!({})).await;
    let caps = &init["capabilities"];
    assert_eq!(caps["positionEncoding"], "utf-16");
    assert_eq!(caps["inlineCompletionProvider"], json!({}));
    assert_eq!(caps["textDocumentSync"]["change"], 2);
    assert_eq!(caps["textDocumentSync"]["openClose"], true);
    assert!(caps["completionProvider"].is_object());

    lsp.open(UTIL, "rust", "pub fn util() {}\n").await;
    lsp.open(MAIN, "rust", "fn main() {\n    let é😀 = run();\n}\n").await;
    // Insert 中 after `let ` (UTF-16 column 8) and then `x` right after the emoji.
    for (col, text) in [(8, "中"), (12, "x")] {
        let change = json!({"range": {"start": {"line": 1, "character": col},
            "end": {"line": 1, "character": col}}, "text": text});
        lsp.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": MAIN, "version": 2}, "contentChanges": [change]}),
        )
        .await;
    }
    // `    let 中é😀x = run(|);`: the cursor is at UTF-16 column 4+4+1+1+2+1+7 = 20.
    let response = lsp.inline(MAIN, 1, 20).await;
    assert_eq!(
        items(&response),
        &vec![json!({"insertText": "a, b);", "range": {
            "start": {"line": 1, "character": 20}, "end": {"line": 1, "character": 22}}})]
    );
    let fim = fake.wait_for(|r| matches!(r, Request::Fim { .. })).await;
    let Request::Fim { input, params, .. } = fim else { unreachable!() };
    assert_eq!(input.prefix, "fn main() {\n    let 中é😀x = run(");
    assert_eq!(input.suffix, ");\n}\n");
    assert_eq!(input.context_files.len(), 1);
    assert_eq!(input.context_files[0].path, "src/util.rs");
    assert_eq!(params.max_tokens, 128);
    // Both opens warmed the daemon's cache.
    let warms = fake.requests().iter().filter(|r| matches!(r, Request::Warm { .. })).count();
    assert_eq!(warms, 2);

    // The completion fallback gives the same edit as one item.
    let response = lsp
        .request(
            "textDocument/completion",
            json!({"textDocument": {"uri": MAIN}, "position": {"line": 1, "character": 20}}),
        )
        .await;
    let item = &response["result"]["items"][0];
    assert_eq!(item["textEdit"]["newText"], "a, b);");
    assert_eq!(item["textEdit"]["range"]["end"], json!({"line": 1, "character": 22}));

    let status = lsp.request("m31r/status", Value::Null).await["result"].clone();
    assert_eq!(status["connected"], true);
    assert_eq!(status["model"], "fake-model");
    assert_eq!(status["socket"], fake.socket.display().to_string());
    assert_eq!((status["requests"].as_u64(), status["suppressed"].as_u64()), (Some(2), Some(0)));
    assert_eq!(status["cacheHitRate"], 0.4);
    assert!(status["lastLatencyMs"].as_f64().unwrap() >= 0.0);
    fake.stop().await;
}

#[tokio::test]
async fn utf8_positions_when_the_client_offers_them() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |_| Reply::Text("1)".into()));
    let mut lsp = LspClient::start(Options { socket: Some(fake.socket.clone()) });
    let init = lsp
        .initialize(json!({
            "capabilities": {"general": {"positionEncodings": ["utf-8", "utf-16"]}},
            "initializationOptions": {"inlineTimeoutMs": 30_000, "firstLineBudgetMs": 30_000}
        }))
        .await;
    assert_eq!(init["capabilities"]["positionEncoding"], "utf-8");
    lsp.open(MAIN, "rust", "let é = f();").await;
    // `let é = f(` is 11 bytes.
    let response = lsp.inline(MAIN, 0, 11).await;
    assert_eq!(items(&response)[0]["range"]["end"], json!({"line": 0, "character": 12}));
    fake.stop().await;
}

#[tokio::test]
async fn a_newer_request_cancels_the_older_at_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |input| {
        if input.prefix.ends_with("slow") { Reply::Hold } else { Reply::Text(" = 1;".into()) }
    });
    let (mut lsp, _) = client(&fake.socket, json!({})).await;
    lsp.open(MAIN, "rust", "fn f() {\n    slow\n}\n").await;
    let first = lsp.send_inline(MAIN, 1, 8).await;
    let held = fake
        .wait_for(|r| matches!(r, Request::Fim { input, .. } if input.prefix.ends_with("slow")))
        .await;
    let change = json!({"range": {"start": {"line": 1, "character": 8},
        "end": {"line": 1, "character": 8}}, "text": "er"});
    lsp.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": MAIN, "version": 2}, "contentChanges": [change]}),
    )
    .await;
    let second = lsp.send_inline(MAIN, 1, 10).await;
    let second = lsp.response(second).await;
    assert_eq!(items(&second)[0]["insertText"], " = 1;");
    let first = lsp.response(first).await;
    assert_eq!(items(&first), &Vec::<Value>::new(), "the older request is answered, empty");
    let held_id = held.id().unwrap().to_string();
    fake.wait_for(|r| matches!(r, Request::Cancel { id } if *id == held_id)).await;
    lsp.wait_notification(|n| {
        n["method"] == "window/logMessage"
            && n["params"]["message"].as_str().unwrap().contains("suppressed superseded")
    })
    .await;
    fake.stop().await;
}

#[tokio::test]
async fn cancel_request_is_forwarded_to_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |_| Reply::Hold);
    let (mut lsp, _) = client(&fake.socket, json!({})).await;
    lsp.open(MAIN, "rust", "fn f() {\n    \n}\n").await;
    let id = lsp.send_inline(MAIN, 1, 4).await;
    let held = fake.wait_for(|r| matches!(r, Request::Fim { .. })).await;
    lsp.notify("$/cancelRequest", json!({"id": id})).await;
    let response = lsp.response(id).await;
    assert_eq!(response["error"]["code"], -32800, "cancelled requests get RequestCancelled");
    let held_id = held.id().unwrap().to_string();
    fake.wait_for(|r| matches!(r, Request::Cancel { id } if *id == held_id)).await;
    fake.stop().await;
}

#[tokio::test]
async fn an_absent_daemon_gives_empty_results_and_one_notification() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let (mut lsp, _) = client(&socket, json!({"autoStart": false})).await;
    lsp.open(MAIN, "rust", "fn f() {\n    \n}\n").await;
    for _ in 0..3 {
        let response = lsp.inline(MAIN, 1, 4).await;
        assert_eq!(items(&response), &Vec::<Value>::new());
    }
    let shown = lsp.wait_notification(|n| n["method"] == "window/showMessage").await;
    assert!(shown["params"]["message"].as_str().unwrap().contains("nobody.sock"), "{shown}");
    let status = lsp.request("m31r/status", Value::Null).await["result"].clone();
    assert_eq!(status["connected"], false);
    assert_eq!((status["requests"].as_u64(), status["suppressed"].as_u64()), (Some(3), Some(3)));
    assert_eq!(lsp.count("window/showMessage"), 1);
    lsp.wait_notification(|n| {
        n["params"]["message"].as_str().is_some_and(|m| m.contains("suppressed daemon_unavailable"))
    })
    .await;
}

#[tokio::test]
async fn auto_start_failure_is_reported_once_too() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let settings = json!({"autoStart": true, "daemonPath": dir.path().join("no-such-m31rd")});
    let (mut lsp, _) = client(&socket, settings).await;
    lsp.open(MAIN, "rust", "fn f() {}\n").await;
    assert_eq!(items(&lsp.inline(MAIN, 0, 8).await), &Vec::<Value>::new());
    let shown = lsp.wait_notification(|n| n["method"] == "window/showMessage").await;
    assert!(shown["params"]["message"].as_str().unwrap().contains("no-such-m31rd"), "{shown}");
}

#[tokio::test]
async fn a_restarted_daemon_serves_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let fake = FakeDaemon::start(&socket, |_| Reply::Text("one".into()));
    let (mut lsp, _) = client(&socket, json!({"autoStart": false})).await;
    lsp.open(MAIN, "rust", "fn f() {\n    \n}\n").await;
    assert_eq!(items(&lsp.inline(MAIN, 1, 4).await)[0]["insertText"], "one");
    fake.stop().await;
    // The server notices the closed connection by itself.
    loop {
        let status = lsp.request("m31r/status", Value::Null).await;
        if status["result"]["connected"] == false {
            break;
        }
        tokio::task::yield_now().await;
    }
    let fake = FakeDaemon::start(&socket, |_| Reply::Text("two".into()));
    assert_eq!(items(&lsp.inline(MAIN, 1, 4).await)[0]["insertText"], "two");
    fake.stop().await;
}

#[tokio::test]
async fn settings_switch_completions_off_and_pick_languages() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |_| Reply::Text("x".into()));
    let (mut lsp, _) = client(&fake.socket, json!({"maxTokens": 7, "contextFiles": false})).await;
    lsp.open(UTIL, "rust", "pub fn util() {}\n").await;
    lsp.open("file:///w/a.py", "python", "def f():\n    \n").await;
    lsp.open(MAIN, "rust", "fn f() {\n    \n}\n").await;
    assert_eq!(items(&lsp.inline(MAIN, 1, 4).await).len(), 1);
    let Request::Fim { input, params, .. } =
        fake.wait_for(|r| matches!(r, Request::Fim { .. })).await
    else {
        unreachable!()
    };
    assert_eq!((params.max_tokens, input.context_files.len()), (7, 0));
    assert!(items(&lsp.inline("file:///w/a.py", 1, 4).await).is_empty());
    lsp.notify(
        "workspace/didChangeConfiguration",
        json!({"settings": {"m31r": {"enabled": false, "bogus": 1}}}),
    )
    .await;
    assert!(items(&lsp.inline(MAIN, 1, 4).await).is_empty());
    for needle in ["suppressed language", "suppressed disabled", "bogus = 1: unknown setting"] {
        lsp.wait_notification(|n| {
            n["params"]["message"].as_str().is_some_and(|m| m.contains(needle))
        })
        .await;
    }
    fake.stop().await;
}

#[tokio::test]
async fn a_selected_completion_item_is_extended_over_its_range() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |_| Reply::Text("()".into()));
    let (mut lsp, _) = client(&fake.socket, json!({})).await;
    lsp.open(MAIN, "rust", "fn f(v: Vec<u8>) {\n    v.le\n}\n").await;
    let params = json!({
        "textDocument": {"uri": MAIN}, "position": {"line": 1, "character": 8},
        "context": {"triggerKind": 1, "selectedCompletionInfo": {
            "range": {"start": {"line": 1, "character": 6}, "end": {"line": 1, "character": 8}},
            "text": "len"}}
    });
    let response = lsp.request("textDocument/inlineCompletion", params).await;
    assert_eq!(
        items(&response),
        &vec![json!({"insertText": "len()", "range": {
            "start": {"line": 1, "character": 6}, "end": {"line": 1, "character": 8}}})]
    );
    let Request::Fim { input, .. } = fake.wait_for(|r| matches!(r, Request::Fim { .. })).await
    else {
        unreachable!()
    };
    assert!(input.prefix.ends_with("v.len"), "{:?}", input.prefix);
    fake.stop().await;
}

#[tokio::test]
async fn shutdown_and_exit_end_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (mut lsp, _) = client(&dir.path().join("none.sock"), json!({"autoStart": false})).await;
    let response = lsp.request("shutdown", Value::Null).await;
    assert_eq!(response["result"], Value::Null);
    assert!(response.get("error").is_none());
    lsp.notify("exit", Value::Null).await;
}

/// Waits until the server saw the daemon's connection close.
async fn wait_disconnected(lsp: &mut LspClient) {
    loop {
        let status = lsp.request("m31r/status", Value::Null).await;
        if status["result"]["connected"] == false {
            break;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_daemon_back_on_its_socket_is_used_despite_the_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let fake = FakeDaemon::start(&socket, |_| Reply::Text("one".into()));
    let (mut lsp, _) = client(&socket, json!({"autoStart": false})).await;
    lsp.open(MAIN, "rust", "fn f() {\n    \n}\n").await;
    assert_eq!(items(&lsp.inline(MAIN, 1, 4).await)[0]["insertText"], "one");
    fake.stop().await;
    wait_disconnected(&mut lsp).await;
    // Failed attempts while the daemon is away; waiting out each backoff grows the next one
    // (250 ms, 500 ms, then 1 s), so a request right after the restart falls inside a backoff.
    for wait_ms in [0, 300, 600] {
        tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
        assert!(items(&lsp.inline(MAIN, 1, 4).await).is_empty());
    }
    let status = lsp.request("m31r/status", Value::Null).await["result"].clone();
    assert_eq!(status["suppressedBy"]["daemon_unavailable"], 3, "{status}");
    let fake = FakeDaemon::start(&socket, |_| Reply::Text("two".into()));
    // The first request after the restart is served.
    assert_eq!(items(&lsp.inline(MAIN, 1, 4).await)[0]["insertText"], "two");
    fake.stop().await;
}

#[tokio::test]
async fn a_frozen_daemon_gets_a_timeout_and_a_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |_| Reply::Frozen);
    let settings = json!({"inlineTimeoutMs": 200, "completionTimeoutMs": 300});
    let (mut lsp, _) = client(&fake.socket, settings).await;
    lsp.open(MAIN, "rust", "fn f() {\n    \n}\n").await;
    assert_eq!(items(&lsp.inline(MAIN, 1, 4).await), &Vec::<Value>::new());
    let Request::Fim { id: fim_id, params, .. } =
        fake.wait_for(|r| matches!(r, Request::Fim { .. })).await
    else {
        unreachable!()
    };
    // The daemon is told to stop before the server gives up on it.
    assert_eq!(params.deadline_ms, 160);
    fake.wait_for(|r| matches!(r, Request::Cancel { id } if *id == fim_id)).await;
    lsp.wait_notification(|n| {
        n["params"]["message"].as_str().is_some_and(|m| m.contains("suppressed daemon_timeout"))
    })
    .await;

    let response = lsp
        .request(
            "textDocument/completion",
            json!({"textDocument": {"uri": MAIN}, "position": {"line": 1, "character": 4}}),
        )
        .await;
    assert_eq!(response["result"]["items"], json!([]));
    fake.wait_for(|r| matches!(r, Request::Cancel { id } if *id != fim_id)).await;
    let status = lsp.request("m31r/status", Value::Null).await["result"].clone();
    assert_eq!(status["suppressedBy"], json!({"daemon_timeout": 2}), "{status}");
    assert_eq!(status["connected"], true, "a slow answer is no reason to drop the connection");
    fake.stop().await;
}

#[tokio::test]
async fn a_daemon_that_never_says_hello_times_out_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    // Accepts connections (the kernel's backlog would too) and never reads or answers.
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let settings = json!({"autoStart": false, "connectTimeoutMs": 100, "inlineTimeoutMs": 30000});
    let (mut lsp, _) = client(&socket, settings).await;
    lsp.open(MAIN, "rust", "fn f() {\n    \n}\n").await;
    assert_eq!(items(&lsp.inline(MAIN, 1, 4).await), &Vec::<Value>::new());
    lsp.wait_notification(|n| {
        n["params"]["message"].as_str().is_some_and(|m| {
            m.contains("suppressed daemon_unavailable") && m.contains("no handshake within 100ms")
        })
    })
    .await;
    drop(listener);
}

#[tokio::test]
async fn a_completion_cut_by_its_deadline_keeps_its_whole_lines() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |_| {
        Reply::Deadline("let a = 1;\n    let b = 2;\n    let c".into())
    });
    let (mut lsp, _) = client(&fake.socket, json!({})).await;
    lsp.open(MAIN, "rust", "fn f() {\n    \n}\n").await;
    let response = lsp.inline(MAIN, 1, 4).await;
    assert_eq!(items(&response)[0]["insertText"], "let a = 1;\n    let b = 2;");
    let Request::Fim { params, .. } = fake.wait_for(|r| matches!(r, Request::Fim { .. })).await
    else {
        unreachable!()
    };
    assert_eq!(params.deadline_ms, 24_000, "four fifths of the 30 s timeout");
    fake.stop().await;
}
