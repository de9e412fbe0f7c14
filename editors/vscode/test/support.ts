// Test support shared by the protocol and real-editor tests: finds the workspace's binaries, writes a tiny
// seeded bundle, starts m31rd on a temp socket and waits for it. Binaries come from env (M31R_LSP, M31RD,
// M31R_TINY_BUNDLE) or the workspace's target/debug.
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";

/** The repository root: editors/vscode is two levels down; test bundles live one level deeper still. */
export const REPO_ROOT = (() => {
  let dir = __dirname;
  while (dir !== path.dirname(dir)) {
    if (fs.existsSync(path.join(dir, "Cargo.toml")) && fs.existsSync(path.join(dir, "editors"))) return dir;
    dir = path.dirname(dir);
  }
  throw new Error(`cannot find the repository root above ${__dirname}`);
})();

function binary(envVar: string, relative: string): string {
  return process.env[envVar] || path.join(REPO_ROOT, "target", "debug", relative);
}

/** Paths of the binaries the real tests need, and which of them are missing. */
export function binaries() {
  const found = {
    lsp: binary("M31R_LSP", "m31r-lsp"),
    daemon: binary("M31RD", "m31rd"),
    tinyBundle: binary("M31R_TINY_BUNDLE", path.join("examples", "tiny_bundle")),
  };
  const missing = (p: string) => !fs.existsSync(p);
  return {
    ...found,
    lspMissing: missing(found.lsp)
      ? `m31r-lsp not found at ${found.lsp} (build it: cargo build -p m31r-lsp, or set M31R_LSP)`
      : null,
    daemonMissing:
      missing(found.daemon) || missing(found.tinyBundle)
        ? `m31rd or tiny_bundle not found (${found.daemon}, ${found.tinyBundle}); ` +
          "build them: cargo build -p m31r-daemon --bin m31rd --example tiny_bundle"
        : null,
  };
}

/** A fresh temp dir, removed by the returned cleanup. */
export function tempDir(prefix: string): { dir: string; cleanup: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/** Writes the seeded random-weight bundle (daemon/examples/tiny_bundle.rs) to `dir/bundle`. */
export function writeTinyBundle(tinyBundle: string, dir: string): string {
  const out = path.join(dir, "bundle");
  const r = spawnSync(tinyBundle, [out], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${tinyBundle} ${out} failed (${r.status}): ${r.stderr}`);
  return out;
}

/** Resolves once `socket` accepts a connection; rejects after `timeoutMs` or when the daemon exits. */
export async function waitForSocket(socket: string, daemon: ChildProcess, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (daemon.exitCode !== null) throw new Error(`m31rd exited with ${daemon.exitCode} before listening on ${socket}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(socket, () => {
        s.destroy();
        resolve(true);
      });
      s.on("error", () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`m31rd did not listen on ${socket} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** A running m31rd serving the tiny bundle on a temp socket; `stop` kills it and removes the temp dir. */
export async function startDaemon(bins: ReturnType<typeof binaries>): Promise<{
  socket: string;
  logFile: string;
  stop: () => Promise<void>;
}> {
  const { dir, cleanup } = tempDir("m31r-editor-test-");
  const bundle = writeTinyBundle(bins.tinyBundle, dir);
  const socket = path.join(dir, "m31rd.sock");
  const logFile = path.join(dir, "m31rd.log");
  const daemon = spawn(bins.daemon, ["--bundle", bundle, "--socket", socket, "--log-file", logFile], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  try {
    await waitForSocket(socket, daemon);
  } catch (err) {
    daemon.kill("SIGKILL");
    cleanup();
    throw err;
  }
  return {
    socket,
    logFile,
    stop: async () => {
      if (daemon.exitCode === null) {
        const exited = new Promise((r) => daemon.once("exit", r));
        daemon.kill("SIGTERM");
        await exited;
      }
      cleanup();
    },
  };
}
