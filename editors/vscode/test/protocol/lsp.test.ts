// Protocol test: drives the real m31r-lsp binary over stdio with vscode-jsonrpc, sending exactly the
// initializationOptions and didChangeConfiguration the extension sends. Without a daemon it checks the
// unreachable path; with m31rd serving the tiny bundle it checks real inline completions and status.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import * as path from "node:path";
import {
  createMessageConnection,
  type MessageConnection,
  StreamMessageReader,
  StreamMessageWriter,
} from "vscode-jsonrpc/node";
import { readSettings, serverConfiguration } from "../../src/config";
import { parseStatus } from "../../src/status";
import { binaries, startDaemon, tempDir } from "../support";

const bins = binaries();
// scripts/editor-tests.sh sets M31R_REQUIRE_REAL=1: there a missing binary is a failure, not a skip.
if (process.env.M31R_REQUIRE_REAL === "1" && (bins.lspMissing || bins.daemonMissing)) {
  throw new Error(`M31R_REQUIRE_REAL=1: ${bins.lspMissing ?? bins.daemonMissing}`);
}
if (bins.lspMissing) console.log(`# SKIP protocol tests: ${bins.lspMissing}`);
if (!bins.lspMissing && bins.daemonMissing) console.log(`# SKIP daemon-backed protocol tests: ${bins.daemonMissing}`);

const URI = "file:///tmp/m31r-protocol/src/main.rs";
// Ends in an identifier: the tiny random model repeats the last token, which post-processing keeps
// (after blanks it generates blanks, which m31r-lsp suppresses).
const TEXT = "use std::collections::HashMap;\n\nfn main() {\n    let mut map = HashMap::new();\n    map.in";
// The tiny seeded model's text is gibberish (" y y y y"): the tests that expect ghost text turn off the
// confidence gate and the degenerate-output filters, which would rightly hide it.
const SHOW_GIBBERISH = { minConfidence: 0, degenerateFilters: false };

interface Session {
  proc: ChildProcess;
  conn: MessageConnection;
  messages: { type: number; message: string }[];
  logs: string[];
  init: { capabilities: Record<string, any> };
}

async function startServer(overrides: Record<string, unknown>): Promise<Session> {
  const { settings } = readSettings((k) => overrides[k]);
  const proc = spawn(bins.lsp, [], { stdio: ["pipe", "pipe", "inherit"] });
  const conn = createMessageConnection(new StreamMessageReader(proc.stdout!), new StreamMessageWriter(proc.stdin!));
  const messages: Session["messages"] = [];
  const logs: string[] = [];
  conn.onNotification("window/showMessage", (p: { type: number; message: string }) => {
    messages.push(p);
  });
  conn.onNotification("window/logMessage", (p: { type: number; message: string }) => {
    logs.push(p.message);
  });
  conn.onRequest("workspace/configuration", (p: { items: { section?: string }[] }) =>
    p.items.map((i) => (i.section === "m31r" ? serverConfiguration(settings.server) : null)),
  );
  conn.onRequest("client/registerCapability", () => null);
  conn.onRequest("window/workDoneProgress/create", () => null);
  conn.listen();
  const init = (await conn.sendRequest("initialize", {
    processId: process.pid,
    rootUri: null,
    capabilities: {
      general: { positionEncodings: ["utf-8", "utf-16"] },
      textDocument: {
        synchronization: { didSave: true },
        inlineCompletion: { dynamicRegistration: false },
        completion: { completionItem: { snippetSupport: false } },
      },
      window: { showMessage: {} },
      workspace: { configuration: true },
    },
    initializationOptions: serverConfiguration(settings.server),
  })) as Session["init"];
  await conn.sendNotification("initialized", {});
  return { proc, conn, messages, logs, init };
}

async function stopServer(s: Session): Promise<number | null> {
  const exited = new Promise<number | null>((r) => s.proc.once("exit", (code) => r(code)));
  await s.conn.sendRequest("shutdown");
  await s.conn.sendNotification("exit");
  const code = await exited;
  s.conn.dispose();
  return code;
}

const open = (s: Session, text = TEXT) =>
  s.conn.sendNotification("textDocument/didOpen", {
    textDocument: { uri: URI, languageId: "rust", version: 1, text },
  });

const endOf = (text: string) => {
  const lines = text.split("\n");
  return { line: lines.length - 1, character: Buffer.byteLength(lines[lines.length - 1], "utf8") };
};

const inline = (s: Session, position: { line: number; character: number }, triggerKind = 1) =>
  s.conn.sendRequest("textDocument/inlineCompletion", {
    textDocument: { uri: URI },
    position,
    context: { triggerKind },
  }) as Promise<{ items: { insertText: string; range?: unknown }[] }>;

const status = async (s: Session) => parseStatus(await s.conn.sendRequest("m31r/status"));

describe("m31r-lsp without a daemon", { skip: bins.lspMissing ?? false }, () => {
  let s: Session;
  const tmp = tempDir("m31r-protocol-");
  const socket = path.join(tmp.dir, "absent.sock");
  before(async () => {
    s = await startServer({ socketPath: socket, autoStart: false });
  });
  after(async () => {
    if (s) assert.equal(await stopServer(s), 0, "m31r-lsp exits 0 after shutdown + exit");
    tmp.cleanup();
  });

  test("advertises the contract's capabilities", () => {
    const caps = s.init.capabilities;
    assert.ok(caps.inlineCompletionProvider, "inlineCompletionProvider");
    assert.ok(caps.completionProvider, "completionProvider (fallback)");
    const sync = caps.textDocumentSync;
    assert.equal(typeof sync === "object" ? sync.change : sync, 2, "incremental sync");
    assert.equal(caps.positionEncoding, "utf-8", "utf-8 when the client offers it");
  });

  test("answers inline completion with empty items, never an error", async () => {
    await open(s);
    const r = await inline(s, endOf(TEXT));
    assert.deepEqual(r.items, []);
  });

  test("reports the daemon unreachable on the configured socket", async () => {
    const st = await status(s);
    assert.equal(st.connected, false);
    assert.equal(st.socket, socket);
  });

  test("tells the user once that the daemon is unreachable", async () => {
    await inline(s, endOf(TEXT));
    for (let i = 0; i < 100 && s.messages.length === 0; i++) await new Promise((r) => setTimeout(r, 100));
    assert.equal(s.messages.length, 1, JSON.stringify(s.messages));
  });
});

describe("m31r-lsp with m31rd serving the tiny bundle", { skip: bins.lspMissing ?? bins.daemonMissing ?? false }, () => {
  let s: Session;
  let daemon: Awaited<ReturnType<typeof startDaemon>>;
  before(async () => {
    daemon = await startDaemon(bins);
    s = await startServer({ socketPath: daemon.socket, autoStart: false, ...SHOW_GIBBERISH });
    await open(s);
  });
  after(async () => {
    if (s) assert.equal(await stopServer(s), 0);
    if (daemon) await daemon.stop();
  });

  test("an invoked inline completion returns text with a range at the cursor", async () => {
    const pos = endOf(TEXT);
    const r = await inline(s, pos, 1);
    assert.ok(r.items.length >= 1, `expected a completion, got ${JSON.stringify(r)}; log: ${s.logs.join(" | ")}`);
    const item = r.items[0];
    assert.equal(typeof item.insertText, "string");
    assert.ok(item.insertText.length > 0);
    const range = item.range as { start: typeof pos; end: typeof pos };
    assert.ok(range.start.line <= pos.line && range.end.line >= pos.line, JSON.stringify(range));
  });

  test("status shows the connected daemon, its model and a latency", async () => {
    const st = await status(s);
    assert.equal(st.connected, true);
    assert.equal(st.socket, daemon.socket);
    assert.equal(typeof st.model, "string", "a loaded model");
    assert.ok(st.requests >= 1, `requests ${st.requests}`);
    assert.equal(typeof st.lastLatencyMs, "number");
  });

  test("incremental edits are applied before the next completion", async () => {
    const added = "sert(1, (self.x";
    await s.conn.sendNotification("textDocument/didChange", {
      textDocument: { uri: URI, version: 2 },
      contentChanges: [{ range: { start: endOf(TEXT), end: endOf(TEXT) }, text: added }],
    });
    const pos = endOf(TEXT + added);
    const r = await inline(s, pos, 2);
    assert.ok(Array.isArray(r.items));
    for (const item of r.items) {
      const range = item.range as { start: typeof pos };
      assert.equal(range.start.line, pos.line);
    }
  });

  test("minConfidence from didChangeConfiguration reaches the server: 1 suppresses (low_confidence)", async () => {
    const values: Record<string, unknown> = { socketPath: daemon.socket, autoStart: false, minConfidence: 1, degenerateFilters: false };
    const { settings } = readSettings((k) => values[k]);
    await s.conn.sendNotification("workspace/didChangeConfiguration", { settings: { m31r: serverConfiguration(settings.server) } });
    // A new position (the text after it changed), so nothing remembered answers it.
    const text = TEXT.replace("map.in", "let n = map.le");
    await s.conn.sendNotification("textDocument/didChange", {
      textDocument: { uri: URI, version: 3 },
      contentChanges: [{ text }],
    });
    const logged = s.logs.length;
    const r = await inline(s, endOf(text), 1);
    assert.deepEqual(r.items, [], JSON.stringify(r));
    for (let i = 0; i < 50 && !s.logs.slice(logged).some((l) => l.includes("low_confidence")); i++) {
      await new Promise((res) => setTimeout(res, 100));
    }
    assert.ok(
      s.logs.slice(logged).some((l) => l.includes("suppressed low_confidence")),
      `log: ${s.logs.slice(logged).join(" | ")}`,
    );
  });

  test("enabled=false from didChangeConfiguration suppresses completions", async () => {
    const { settings } = readSettings((k) => (k === "enabled" ? false : k === "socketPath" ? daemon.socket : k === "autoStart" ? false : undefined));
    await s.conn.sendNotification("workspace/didChangeConfiguration", { settings: { m31r: serverConfiguration(settings.server) } });
    const r = await inline(s, endOf(TEXT), 1);
    assert.deepEqual(r.items, []);
  });
});
