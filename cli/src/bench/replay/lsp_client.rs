//! A small synchronous LSP client for the typing replay: `m31r-lsp` as a child process, JSON-RPC
//! over its stdio with `Content-Length` framing, one request at a time.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Hang guard for one answer: far above any completion timeout, so only a stuck server trips it.
const HANG: Duration = Duration::from_secs(120);

/// A running `m31r-lsp` and a thread reading its messages.
pub struct LspClient {
    child: Child,
    stdin: ChildStdin,
    messages: mpsc::Receiver<Value>,
    next_id: i64,
    /// `window/showMessage` texts the server sent (a misconfiguration shows up here).
    pub shown_messages: Vec<String>,
}

impl LspClient {
    /// Starts `exe` talking to the daemon at `socket`, logging to `log`.
    pub fn spawn(exe: &Path, socket: &Path, log: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(exe)
            .arg("--socket")
            .arg(socket)
            .arg("--log-file")
            .arg(log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start the language server {}", exe.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("{} started without piped stdio", exe.display());
        };
        let (tx, messages) = mpsc::channel();
        // A reader thread, so a silent server is caught by the hang guard instead of blocking.
        std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            while let Some(message) = read_message(&mut stdout) {
                if tx.send(message).is_err() {
                    return;
                }
            }
        });
        Ok(Self { child, stdin, messages, next_id: 1, shown_messages: Vec::new() })
    }

    fn send(&mut self, message: &Value) -> anyhow::Result<()> {
        let body = serde_json::to_vec(message)?;
        write!(self.stdin, "Content-Length: {}\r\n\r\n", body.len())
            .and_then(|()| self.stdin.write_all(&body))
            .and_then(|()| self.stdin.flush())
            .context("cannot write to m31r-lsp (did it exit?)")
    }

    /// Sends the notification `method`.
    pub fn notify(&mut self, method: &str, params: Value) -> anyhow::Result<()> {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}))
    }

    /// Sends the request `method` and waits for its result, answering the server's own requests
    /// (with `null`) and keeping its `window/showMessage` texts meanwhile.
    pub fn request(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))?;
        let until = Instant::now() + HANG;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let message = match self.messages.recv_timeout(left) {
                Ok(message) => message,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("m31r-lsp did not answer {method} within {} s", HANG.as_secs())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("m31r-lsp closed its output before answering {method}")
                }
            };
            match (message.get("id"), message.get("method")) {
                (Some(got), None) if *got == json!(id) => {
                    if let Some(error) = message.get("error") {
                        bail!("m31r-lsp answered {method} with an error: {error}");
                    }
                    return Ok(message.get("result").cloned().unwrap_or(Value::Null));
                }
                // A request from the server (e.g. a progress token): the replay offers nothing.
                (Some(server_id), Some(_)) => {
                    let server_id = server_id.clone();
                    self.send(&json!({"jsonrpc": "2.0", "id": server_id, "result": null}))?;
                }
                (None, Some(m)) if m == "window/showMessage" => {
                    let text = message["params"]["message"].as_str().unwrap_or_default();
                    self.shown_messages.push(text.to_string());
                }
                _ => {}
            }
        }
    }

    /// `shutdown` then `exit`, and waits for the process to end.
    pub fn shut_down(mut self) -> anyhow::Result<()> {
        self.request("shutdown", Value::Null)?;
        self.notify("exit", Value::Null)?;
        let until = Instant::now() + HANG;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("m31r-lsp exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() > until {
                bail!("m31r-lsp did not exit within {} s of `exit`", HANG.as_secs());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LspClient {
    fn drop(&mut self) {
        // After a clean `shut_down` the process is gone and this does nothing.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads one framed message; `None` at the end of the stream or on a malformed frame.
fn read_message(input: &mut impl BufRead) -> Option<Value> {
    let mut length = None;
    loop {
        let mut line = String::new();
        if input.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let mut body = vec![0; length?];
    input.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_framed_messages_in_order() {
        let a = r#"{"id":1}"#;
        let b = r#"{"method":"x"}"#;
        let stream = format!(
            "Content-Length: {}\r\n\r\n{a}content-length: {}\r\nContent-Type: x\r\n\r\n{b}",
            a.len(),
            b.len()
        );
        let mut input = stream.as_bytes();
        assert_eq!(read_message(&mut input), Some(json!({"id": 1})));
        assert_eq!(read_message(&mut input), Some(json!({"method": "x"})));
        assert_eq!(read_message(&mut input), None);
    }
}
