//! Typing along a shown suggestion: the next request at the new cursor is answered with the
//! rest of it, without a `fim` to the daemon; any other edit sends the next request to the daemon.

use std::path::Path;

use m31r_lsp::server::Options;
use m31r_protocol::Request;
use serde_json::{Value, json};

use crate::fake_daemon::{FakeDaemon, Reply};
use crate::lsp_client::LspClient;

const MAIN: &str = "file:///w/src/main.rs";
const UTIL: &str = "file:///w/src/util.rs";
/// The cursor line of [`MAIN`]'s text: `    ` then the cursor, nothing after it.
const BODY: &str = "fn f() {\n    \n}\n";

/// A client with long request timeouts (a busy test machine must not turn answers into timeouts),
/// without speculative next completions, so that every `fim` counted is a request's.
async fn client(socket: &Path) -> LspClient {
    let mut client = LspClient::start(Options { socket: Some(socket.to_path_buf()) });
    client
        .initialize(json!({
            "processId": null, "rootUri": "file:///w", "capabilities": {},
            "initializationOptions": {"inlineTimeoutMs": 30_000, "completionTimeoutMs": 30_000,
                "speculativeNext": false}
        }))
        .await;
    client
}

/// `didChange` replacing `start..end` (line, character) of `uri` with `text`.
async fn change(lsp: &mut LspClient, uri: &str, start: (u32, u32), end: (u32, u32), text: &str) {
    let change = json!({"range": {"start": {"line": start.0, "character": start.1},
        "end": {"line": end.0, "character": end.1}}, "text": text});
    lsp.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri, "version": 2}, "contentChanges": [change]}),
    )
    .await;
}

/// Types `text` at `at` in `uri`.
async fn type_at(lsp: &mut LspClient, uri: &str, at: (u32, u32), text: &str) {
    change(lsp, uri, at, at, text).await;
}

/// The one item of an inline completion response: (insertText, range start, range end).
fn item(response: &Value) -> (String, Value, Value) {
    let items = response["result"]["items"].as_array().unwrap_or_else(|| panic!("{response}"));
    assert_eq!(items.len(), 1, "{response}");
    let range = &items[0]["range"];
    (items[0]["insertText"].as_str().unwrap().into(), range["start"].clone(), range["end"].clone())
}

fn pos(line: u32, character: u32) -> Value {
    json!({"line": line, "character": character})
}

#[tokio::test]
async fn typing_along_a_suggestion_is_answered_without_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |input| {
        if input.prefix.ends_with("foo(bar)") {
            Reply::Text(";".into())
        } else {
            Reply::Text("foo(bar)".into())
        }
    });
    let mut lsp = client(&fake.socket).await;
    lsp.open(UTIL, "rust", "pub fn util() {}\n").await;
    lsp.open(MAIN, "rust", BODY).await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 4).await).0, "foo(bar)");
    assert_eq!(fake.fims(), 1);

    type_at(&mut lsp, MAIN, (1, 4), "fo").await;
    // Another document's edit changes nothing here.
    type_at(&mut lsp, UTIL, (0, 0), "// util\n").await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 6).await), ("o(bar)".into(), pos(1, 6), pos(1, 6)));
    assert_eq!(fake.fims(), 1, "answered from the shown suggestion");
    // The daemon's cache is kept warm up to the cursor meanwhile.
    fake.wait_for(|r| matches!(r, Request::Warm { input, .. } if input.prefix.ends_with("    fo")))
        .await;

    // Typing more of it, still.
    type_at(&mut lsp, MAIN, (1, 6), "o(b").await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 9).await).0, "ar)");
    assert_eq!(fake.fims(), 1);

    // Typing the whole rest leaves nothing to type along: the daemon is asked again.
    type_at(&mut lsp, MAIN, (1, 9), "ar)").await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 12).await).0, ";");
    assert_eq!(fake.fims(), 2);

    let status = lsp.request("m31r/status", Value::Null).await["result"].clone();
    assert_eq!(status["requests"], 4, "{status}");
    assert_eq!(status["servedLocally"], 2, "{status}");
    assert_eq!(status["servedByDaemon"], 2, "{status}");
    assert_eq!(status["suppressed"], 0, "{status}");
    fake.stop().await;
}

#[tokio::test]
async fn text_that_does_not_match_sends_the_next_request_to_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |input| {
        Reply::Text(if input.prefix.ends_with("fox") { "y".into() } else { "foo(bar)".into() })
    });
    let mut lsp = client(&fake.socket).await;
    lsp.open(MAIN, "rust", BODY).await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 4).await).0, "foo(bar)");
    type_at(&mut lsp, MAIN, (1, 4), "fo").await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 6).await).0, "o(bar)");
    type_at(&mut lsp, MAIN, (1, 6), "x").await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 7).await).0, "y");
    assert_eq!(fake.fims(), 2);
    // The daemon's new answer is typed along in turn... only once something of it is typed.
    assert_eq!(item(&lsp.inline(MAIN, 1, 7).await).0, "y");
    assert_eq!(fake.fims(), 3, "nothing typed since it was shown: the daemon answers again");
    let status = lsp.request("m31r/status", Value::Null).await["result"].clone();
    assert_eq!(
        (status["servedLocally"].as_u64(), status["servedByDaemon"].as_u64()),
        (Some(1), Some(3))
    );
    fake.stop().await;
}

#[tokio::test]
async fn a_deletion_or_a_replacement_drops_the_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |_| Reply::Text("foo(bar)".into()));
    let mut lsp = client(&fake.socket).await;
    lsp.open(MAIN, "rust", "fn f() {\n    \n}\n// end\n").await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 4).await).0, "foo(bar)");
    type_at(&mut lsp, MAIN, (1, 4), "f").await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 5).await).0, "oo(bar)");
    // A deletion after the cursor: the cursor is where it was, yet the daemon is asked.
    change(&mut lsp, MAIN, (3, 0), (3, 3), "").await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 5).await).0, "foo(bar)");
    assert_eq!(fake.fims(), 2);

    // A replacement at the cursor with the suggestion's next characters is no typing along.
    type_at(&mut lsp, MAIN, (1, 5), "f").await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 6).await).0, "oo(bar)");
    change(&mut lsp, MAIN, (1, 4), (1, 6), "ffo").await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 7).await).0, "foo(bar)");
    assert_eq!(fake.fims(), 3);

    // A full-text change too, even one that keeps the text as it is.
    type_at(&mut lsp, MAIN, (1, 7), "f").await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 8).await).0, "oo(bar)");
    let full = json!({"text": "fn f() {\n    ffof\n}\nend\n"});
    lsp.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": MAIN, "version": 3}, "contentChanges": [full]}),
    )
    .await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 8).await).0, "foo(bar)");
    assert_eq!(fake.fims(), 4);
    fake.stop().await;
}

#[tokio::test]
async fn the_remainder_is_cut_from_the_post_processed_text_the_editor_was_shown() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |input| {
        Reply::Text(match input.prefix.as_str() {
            p if p.ends_with("total = ") => "1 + values.len();".into(),
            p if p.ends_with("run(") => "a, b);".into(),
            _ => "let a = 1;\n\tlet b = 2;".into(),
        })
    });
    let mut lsp = client(&fake.socket).await;

    // The end that retypes the rest of the line was trimmed: it is not typed along either.
    lsp.open(MAIN, "rust", "let total = values.len();\n").await;
    assert_eq!(item(&lsp.inline(MAIN, 0, 12).await).0, "1 + ");
    type_at(&mut lsp, MAIN, (0, 12), "1").await;
    assert_eq!(item(&lsp.inline(MAIN, 0, 13).await), (" + ".into(), pos(0, 13), pos(0, 13)));

    // The range still covers the auto-closed punctuation right of the cursor.
    lsp.open(UTIL, "rust", "fn f() {\n    run();\n}\n").await;
    assert_eq!(item(&lsp.inline(UTIL, 1, 8).await), ("a, b);".into(), pos(1, 8), pos(1, 10)));
    type_at(&mut lsp, UTIL, (1, 8), "a,").await;
    assert_eq!(item(&lsp.inline(UTIL, 1, 10).await), (" b);".into(), pos(1, 10), pos(1, 12)));

    // Later lines stay in the remainder, with the document's indentation and line ends, and a
    // typed line break that matches them types along.
    let crlf = "file:///w/src/crlf.rs";
    lsp.open(crlf, "rust", "fn g() {\r\n    let z = 0;\r\n    \r\n}\r\n").await;
    let shown = "let a = 1;\r\n    let b = 2;";
    assert_eq!(item(&lsp.inline(crlf, 2, 4).await).0, shown);
    type_at(&mut lsp, crlf, (2, 4), "let a = 1;").await;
    assert_eq!(item(&lsp.inline(crlf, 2, 14).await).0, "\r\n    let b = 2;");
    type_at(&mut lsp, crlf, (2, 14), "\r\n    ").await;
    assert_eq!(item(&lsp.inline(crlf, 3, 4).await), ("let b = 2;".into(), pos(3, 4), pos(3, 4)));

    assert_eq!(fake.fims(), 3, "every typed-along request answered locally");
    fake.stop().await;
}

#[tokio::test]
async fn a_selected_popup_item_or_a_settings_change_goes_to_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDaemon::start(&dir.path().join("d.sock"), |_| Reply::Text("foo(bar)".into()));
    let mut lsp = client(&fake.socket).await;
    lsp.open(MAIN, "rust", BODY).await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 4).await).0, "foo(bar)");
    type_at(&mut lsp, MAIN, (1, 4), "f").await;
    let params = json!({
        "textDocument": {"uri": MAIN}, "position": {"line": 1, "character": 5},
        "context": {"triggerKind": 1, "selectedCompletionInfo": {
            "range": {"start": {"line": 1, "character": 4}, "end": {"line": 1, "character": 5}},
            "text": "format"}}
    });
    let response = lsp.request("textDocument/inlineCompletion", params).await;
    assert_eq!(item(&response).0, "formatfoo(bar)");
    assert_eq!(fake.fims(), 2);

    // The answer for a selected item is not typed along; the next plain request asks the
    // daemon, and its answer is typed along in turn until the settings change.
    assert_eq!(item(&lsp.inline(MAIN, 1, 5).await).0, "foo(bar)");
    type_at(&mut lsp, MAIN, (1, 5), "f").await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 6).await).0, "oo(bar)");
    lsp.notify("workspace/didChangeConfiguration", json!({"settings": {"m31r": {"maxLines": 1}}}))
        .await;
    assert_eq!(item(&lsp.inline(MAIN, 1, 6).await).0, "foo(bar)");
    assert_eq!(fake.fims(), 4);
    fake.stop().await;
}
