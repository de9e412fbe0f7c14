// Real-editor test, as a person uses it: code-server (VS Code in a browser) with the packaged .vsix
// installed, m31rd serving the tiny bundle, the real m31r-lsp; headless Chromium via playwright-core opens
// a Rust file, types, waits for the ghost text, takes a screenshot, presses Tab, saves, and checks the file.
// Run by scripts/editor-tests.sh: node out-test/e2e/code-server.e2e.js with CODE_SERVER, CHROMIUM, M31R_VSIX
// and M31R_E2E_OUT (screenshots) set.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as path from "node:path";
import { chromium } from "playwright-core";
import { binaries, startDaemon, tempDir } from "../support";

function need(name: string): string {
  const v = process.env[name];
  if (!v) throw new Error(`environment variable ${name} is not set (scripts/editor-tests.sh sets it)`);
  return v;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

async function waitForHttp(url: string, proc: ChildProcess, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`code-server exited with ${proc.exitCode}`);
    try {
      const r = await fetch(url);
      if (r.ok) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`code-server did not answer ${url} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

const ORIGINAL = "use std::collections::HashMap;\n\nfn main() {\n    let mut map = HashMap::new();\n";

async function main(): Promise<void> {
  const codeServer = need("CODE_SERVER");
  const chromiumPath = need("CHROMIUM");
  const vsix = need("M31R_VSIX");
  const outDir = need("M31R_E2E_OUT");
  fs.mkdirSync(outDir, { recursive: true });
  const bins = binaries();
  const missing = bins.lspMissing ?? bins.daemonMissing;
  if (missing) throw new Error(missing);

  const tmp = tempDir("m31r-code-server-");
  const daemon = await startDaemon(bins);
  let server: ChildProcess | undefined;
  let browser: Awaited<ReturnType<typeof chromium.launch>> | undefined;
  let page: Awaited<ReturnType<Awaited<ReturnType<typeof chromium.launch>>["newPage"]>> | undefined;
  const userData = path.join(tmp.dir, "user-data");
  try {
    const work = path.join(tmp.dir, "proj");
    fs.mkdirSync(path.join(work, "src"), { recursive: true });
    fs.writeFileSync(path.join(work, "Cargo.toml"), '[package]\nname = "proj"\nversion = "0.1.0"\nedition = "2024"\n');
    const mainRs = path.join(work, "src", "main.rs");
    fs.writeFileSync(mainRs, ORIGINAL);
    const extensions = path.join(tmp.dir, "extensions");
    fs.mkdirSync(path.join(userData, "User"), { recursive: true });
    fs.writeFileSync(
      path.join(userData, "User", "settings.json"),
      JSON.stringify(
        {
          "m31r.serverPath": bins.lsp,
          "m31r.serverArgs": ["--log-file", path.join(outDir, "m31r-lsp.log")],
          "m31r.socketPath": daemon.socket,
          "m31r.autoStart": false,
          "m31r.statusPollSeconds": 1,
          // The tiny seeded model's ghost text is gibberish (" y y y y"), which the confidence gate and the
          // degenerate-output filters rightly hide; this test is about showing and accepting ghost text.
          "m31r.minConfidence": 0,
          "m31r.degenerateFilters": false,
          "editor.inlineSuggest.enabled": true,
          // The suggest widget would take Tab; this test is about inline completions.
          "editor.quickSuggestions": { other: "off", comments: "off", strings: "off" },
          "editor.suggestOnTriggerCharacters": false,
          "editor.wordBasedSuggestions": "off",
          "security.workspace.trust.enabled": false,
          "workbench.startupEditor": "none",
          "workbench.tips.enabled": false,
          "extensions.ignoreRecommendations": true,
          "telemetry.telemetryLevel": "off",
          "update.mode": "none",
        },
        null,
        2,
      ),
    );
    const common = ["--user-data-dir", userData, "--extensions-dir", extensions];
    const env = { ...process.env, XDG_CONFIG_HOME: path.join(tmp.dir, "config"), XDG_DATA_HOME: path.join(tmp.dir, "data") };
    const install = spawnSync(codeServer, [...common, "--install-extension", vsix], { encoding: "utf8", env });
    if (install.status !== 0) throw new Error(`installing ${vsix} failed: ${install.stdout}${install.stderr}`);
    console.log(`# installed ${vsix}`);

    const port = await freePort();
    const serverLog = fs.openSync(path.join(outDir, "code-server.log"), "w");
    server = spawn(
      codeServer,
      [...common, "--auth", "none", "--bind-addr", `127.0.0.1:${port}`, "--disable-telemetry", "--disable-update-check",
        "--disable-workspace-trust", "--disable-getting-started-override", work],
      { env, stdio: ["ignore", serverLog, serverLog] },
    );
    const base = `http://127.0.0.1:${port}`;
    await waitForHttp(`${base}/healthz`, server, 120_000);

    browser = await chromium.launch({
      executablePath: chromiumPath,
      headless: true,
      args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"],
    });
    page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    await page.goto(`${base}/?folder=${encodeURIComponent(work)}`);
    await page.waitForSelector(".monaco-workbench", { timeout: 120_000 });
    // Quick Open the file, like a user.
    await page.waitForTimeout(2000);
    await page.keyboard.press("Control+P");
    await page.waitForSelector(".quick-input-widget input", { timeout: 30_000 });
    await page.keyboard.type("main.rs");
    await page.waitForSelector(".quick-input-list .monaco-list-row", { timeout: 30_000 });
    await page.keyboard.press("Enter");
    const editor = page.locator(".editor-instance .monaco-editor").first();
    await editor.waitFor({ timeout: 60_000 });
    await page.locator(".editor-instance .view-line", { hasText: "HashMap::new()" }).first().waitFor({ timeout: 60_000 });
    // The extension activates on the Rust file; its status item appears once m31r-lsp runs.
    const status = page.locator(".statusbar-item", { hasText: "M31R" }).first();
    await status.waitFor({ timeout: 60_000 });

    await editor.click();
    await page.keyboard.press("Control+End");
    await page.keyboard.type("    map.in", { delay: 60 });
    const ghost = page.locator(".monaco-editor .ghost-text-decoration, .monaco-editor .ghost-text").first();
    await ghost.waitFor({ timeout: 90_000 });
    const shown = (
      await page.locator(".monaco-editor .ghost-text-decoration").allTextContents()
    ).join("").replace(/\u00a0/g, " ");
    const screenshot = path.join(outDir, "code-server-ghost-text.png");
    await page.screenshot({ path: screenshot });
    console.log(`# ghost text first line: ${JSON.stringify(shown)}; screenshot ${screenshot}`);

    await page.keyboard.press("Tab");
    await ghost.waitFor({ state: "detached", timeout: 30_000 }).catch(() => {
      // A new suggestion may already be showing at the new cursor position; the file decides.
    });
    // Save once the accepted text is in the editor (the line grows past what was typed), then read the file.
    const typed = ORIGINAL + "    map.in";
    const deadline = Date.now() + 30_000;
    let saved = fs.readFileSync(mainRs, "utf8");
    while (saved.length <= typed.length && Date.now() < deadline) {
      await page.keyboard.press("Control+S");
      await new Promise((r) => setTimeout(r, 500));
      saved = fs.readFileSync(mainRs, "utf8");
    }
    await page.screenshot({ path: path.join(outDir, "code-server-accepted.png") });
    if (!saved.startsWith(typed)) {
      throw new Error(`saved file does not start with the typed text:\n${saved}`);
    }
    const accepted = saved.slice(typed.length);
    if (accepted.length === 0) throw new Error("Tab inserted nothing");
    if (shown.length === 0 || !accepted.startsWith(shown)) {
      throw new Error(`inserted ${JSON.stringify(accepted)} does not start with the shown ghost text ${JSON.stringify(shown)}`);
    }
    const statusText = (await status.textContent()) ?? "";
    console.log(`# accepted ${JSON.stringify(accepted)}; status bar: ${JSON.stringify(statusText.trim())}`);
    if (/unreachable/.test(statusText)) throw new Error(`status bar says ${statusText}`);
    console.log("ok - code-server: typing shows ghost text, Tab inserts it, the saved file has it");
  } catch (err) {
    // Leave what a person would look at: the screen and the editor's logs (extension host, m31r output).
    await page?.screenshot({ path: path.join(outDir, "code-server-failure.png") }).catch(() => {});
    fs.cpSync(path.join(userData, "logs"), path.join(outDir, "code-server-logs"), { recursive: true });
    throw err;
  } finally {
    await browser?.close().catch(() => {});
    if (server && server.exitCode === null) server.kill("SIGTERM");
    await daemon.stop();
    tmp.cleanup();
  }
}

main().catch((err) => {
  console.error(`not ok - code-server real-editor test: ${err instanceof Error ? err.stack : String(err)}`);
  process.exit(1);
});
