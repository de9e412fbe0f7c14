//! An in-process LSP client: runs `m31r_lsp::server::serve` over pipes with real JSON-RPC framing
//! (`Content-Length` headers) and collects the server's notifications.

use std::collections::HashMap;
use std::time::Duration;

use m31r_lsp::server::{Options, serve};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::mpsc;

/// Longest wait for any one message: a hang guard, not a timing assertion.
const HANG: Duration = Duration::from_secs(60);

pub struct LspClient {
    to_server: DuplexStream,
    from_server: mpsc::UnboundedReceiver<Value>,
    next_id: i64,
    responses: HashMap<i64, Value>,
    /// Notifications received so far, in order.
    pub notifications: Vec<Value>,
}

/// Reads one framed message.
pub async fn read_message<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Option<Value> {
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            length = Some(v.parse::<usize>().unwrap());
        }
    }
    let mut body = vec![0; length.expect("Content-Length header")];
    reader.read_exact(&mut body).await.ok()?;
    Some(serde_json::from_slice(&body).unwrap())
}

/// Frames one message.
pub fn frame(message: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(message).unwrap();
    let mut out = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend(body);
    out
}

impl LspClient {
    /// Starts a server with `options`.
    pub fn start(options: Options) -> Self {
        let (to_server, server_in) = tokio::io::duplex(1 << 20);
        let (server_out, from_server_raw) = tokio::io::duplex(1 << 20);
        tokio::spawn(serve(server_in, server_out, options));
        let (tx, from_server) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(from_server_raw);
            while let Some(message) = read_message(&mut reader).await {
                if tx.send(message).is_err() {
                    break;
                }
            }
        });
        Self {
            to_server,
            from_server,
            next_id: 1,
            responses: HashMap::new(),
            notifications: vec![],
        }
    }

    /// `initialize` + `initialized`; returns the initialize result.
    pub async fn initialize(&mut self, params: Value) -> Value {
        let result = self.request("initialize", params).await;
        self.notify("initialized", json!({})).await;
        result["result"].clone()
    }

    async fn write(&mut self, message: Value) {
        self.to_server.write_all(&frame(&message)).await.unwrap();
    }

    /// Sends a request and returns its id without waiting.
    pub async fn send_request(&mut self, method: &str, params: Value) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        self.write(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})).await;
        id
    }

    /// Sends a notification.
    pub async fn notify(&mut self, method: &str, params: Value) {
        self.write(json!({"jsonrpc": "2.0", "method": method, "params": params})).await;
    }

    /// Sends a request and waits for its response (the whole message: `result` or `error`).
    pub async fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.send_request(method, params).await;
        self.response(id).await
    }

    /// Waits for the response to request `id`.
    pub async fn response(&mut self, id: i64) -> Value {
        loop {
            if let Some(r) = self.responses.remove(&id) {
                return r;
            }
            self.pump().await;
        }
    }

    /// Waits until a notification satisfies `pred`; returns it.
    pub async fn wait_notification(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            if let Some(n) = self.notifications.iter().find(|n| pred(n)) {
                return n.clone();
            }
            self.pump().await;
        }
    }

    async fn pump(&mut self) {
        let message = tokio::time::timeout(HANG, self.from_server.recv())
            .await
            .expect("the server answered within the hang guard")
            .expect("the server is running");
        match message.get("id").and_then(Value::as_i64) {
            Some(id) if message.get("method").is_none() => {
                self.responses.insert(id, message);
            }
            _ => self.notifications.push(message),
        }
    }

    /// Messages of `method` received so far.
    pub fn count(&self, method: &str) -> usize {
        self.notifications.iter().filter(|n| n["method"] == method).count()
    }

    /// `textDocument/didOpen`.
    pub async fn open(&mut self, uri: &str, language: &str, text: &str) {
        let item = json!({"uri": uri, "languageId": language, "version": 1, "text": text});
        self.notify("textDocument/didOpen", json!({"textDocument": item})).await;
    }

    /// `textDocument/inlineCompletion` at `line:character`; returns the whole response.
    pub async fn inline(&mut self, uri: &str, line: u32, character: u32) -> Value {
        let id = self.send_inline(uri, line, character).await;
        self.response(id).await
    }

    /// Sends `textDocument/inlineCompletion` without waiting.
    pub async fn send_inline(&mut self, uri: &str, line: u32, character: u32) -> i64 {
        let params = json!({
            "textDocument": {"uri": uri},
            "position": {"line": line, "character": character},
            "context": {"triggerKind": 2}
        });
        self.send_request("textDocument/inlineCompletion", params).await
    }
}
