// Unit tests of the settings logic: validation, the contract-shaped server configuration, package.json's
// schema against the defaults, document selector, restart decisions and server path resolution.
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import {
  EXTENSION_DEFAULTS,
  SERVER_DEFAULTS,
  documentSelector,
  needsRestart,
  readSettings,
  resolveServerPath,
  serverConfiguration,
} from "../../src/config";

// Both test/unit (sources) and out-test/unit (bundles) sit two levels below the extension root.
const ROOT = path.resolve(__dirname, "..", "..");

const CONTRACT_KEYS = [
  "enabled", "languages", "maxLines", "maxTokens", "socketPath", "autoStart", "daemonPath", "daemonArgs", "contextFiles", "contextSnippets", "contextSnippetBytes",
  "firstLineBudgetMs", "speculativeNext",
  "inlineTimeoutMs", "completionTimeoutMs", "connectTimeoutMs", "minConfidence", "degenerateFilters",
];

test("unset settings give the contract defaults", () => {
  const { settings, warnings } = readSettings(() => undefined);
  assert.deepEqual(warnings, []);
  assert.deepEqual(settings.server, SERVER_DEFAULTS);
  assert.equal(settings.serverPath, "m31r-lsp");
  assert.equal(settings.statusPollSeconds, 5);
});

test("server configuration has exactly the contract keys", () => {
  const { settings } = readSettings(() => undefined);
  assert.deepEqual(Object.keys(serverConfiguration(settings.server)).sort(), [...CONTRACT_KEYS].sort());
});

test("valid values are taken as given", () => {
  const values: Record<string, unknown> = {
    enabled: false, languages: ["rust", "toml"], maxLines: 3, maxTokens: 40, socketPath: "/tmp/x.sock",
    autoStart: false, daemonPath: "/opt/m31rd", daemonArgs: ["--bundle", "/b"], contextFiles: false,
    contextSnippets: false, contextSnippetBytes: 256, firstLineBudgetMs: 0, speculativeNext: false,
    inlineTimeoutMs: 250, completionTimeoutMs: 60000, connectTimeoutMs: 50, minConfidence: 0.3,
    degenerateFilters: false, serverPath: "/opt/m31r-lsp", serverArgs: ["--log-file", "/tmp/l"], statusPollSeconds: 0,
  };
  const { settings, warnings } = readSettings((k) => values[k]);
  assert.deepEqual(warnings, []);
  assert.deepEqual(serverConfiguration(settings.server), Object.fromEntries(CONTRACT_KEYS.map((k) => [k, values[k]])));
  assert.equal(settings.serverPath, "/opt/m31r-lsp");
  assert.deepEqual(settings.serverArgs, ["--log-file", "/tmp/l"]);
  assert.equal(settings.statusPollSeconds, 0);
});

test("invalid values fall back to defaults with a warning naming key and value", () => {
  const values: Record<string, unknown> = { maxLines: 0, languages: "rust", enabled: "yes", serverPath: "  " };
  const { settings, warnings } = readSettings((k) => values[k]);
  assert.equal(settings.server.maxLines, 8);
  assert.deepEqual(settings.server.languages, ["rust"]);
  assert.equal(settings.server.enabled, true);
  assert.equal(settings.serverPath, "m31r-lsp");
  assert.equal(warnings.length, 4);
  assert.match(warnings.join("\n"), /m31r\.maxLines: invalid value 0/);
  assert.match(warnings.join("\n"), /m31r\.languages: invalid value "rust"/);
});

test("minConfidence: a number 0..=1, else the default with a warning", () => {
  const read = (v: unknown) => readSettings((k) => (k === "minConfidence" ? v : undefined));
  assert.equal(SERVER_DEFAULTS.minConfidence, 0.7, "m31r-lsp's DEFAULT_MIN_CONFIDENCE");
  for (const ok of [0, 0.3, 1]) {
    const { settings, warnings } = read(ok);
    assert.deepEqual(warnings, []);
    assert.equal(settings.server.minConfidence, ok);
    assert.equal(serverConfiguration(settings.server).minConfidence, ok);
  }
  for (const bad of [-0.1, 1.5, "0.3", null, Number.NaN, Number.POSITIVE_INFINITY]) {
    const { settings, warnings } = read(bad);
    assert.equal(settings.server.minConfidence, SERVER_DEFAULTS.minConfidence, `minConfidence ${String(bad)}`);
    assert.equal(warnings.length, 1);
    assert.match(warnings[0], /^m31r\.minConfidence: invalid value/);
  }
});

test("minConfidence's default is m31r-lsp's DEFAULT_MIN_CONFIDENCE", (t) => {
  // The extension always sends minConfidence, so a default that differs from the server's would override it.
  const rust = path.resolve(ROOT, "..", "..", "lsp", "src", "config.rs");
  if (!fs.existsSync(rust)) return t.skip(`${rust} not found`);
  const m = /pub const DEFAULT_MIN_CONFIDENCE: f64 = ([0-9.]+);/.exec(fs.readFileSync(rust, "utf8"));
  assert.ok(m, `DEFAULT_MIN_CONFIDENCE in ${rust}`);
  assert.equal(SERVER_DEFAULTS.minConfidence, Number(m[1]));
});

test("degenerateFilters: a boolean, on by default", () => {
  const read = (v: unknown) => readSettings((k) => (k === "degenerateFilters" ? v : undefined));
  assert.equal(read(undefined).settings.server.degenerateFilters, true);
  assert.equal(serverConfiguration(read(false).settings.server).degenerateFilters, false);
  const { settings, warnings } = read("off");
  assert.equal(settings.server.degenerateFilters, true);
  assert.deepEqual(warnings, ['m31r.degenerateFilters: invalid value "off", using true']);
});

test("package.json bounds minConfidence to 0..1", () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, "package.json"), "utf8"));
  const p = pkg.contributes.configuration.properties["m31r.minConfidence"];
  assert.deepEqual([p.type, p.minimum, p.maximum], ["number", 0, 1]);
  assert.equal(p.default, SERVER_DEFAULTS.minConfidence, "the settings UI shows the default sent");
  assert.equal(pkg.contributes.configuration.properties["m31r.degenerateFilters"].type, "boolean");
});

test("an empty socketPath means the daemon default", () => {
  const { settings } = readSettings((k) => (k === "socketPath" ? "" : undefined));
  assert.equal(settings.server.socketPath, null);
});

test("package.json declares every setting with the same default", () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, "package.json"), "utf8"));
  const props = pkg.contributes.configuration.properties as Record<string, { default: unknown }>;
  const expected: Record<string, unknown> = { ...SERVER_DEFAULTS, ...EXTENSION_DEFAULTS };
  assert.deepEqual(Object.keys(props).sort(), Object.keys(expected).map((k) => `m31r.${k}`).sort());
  for (const [key, value] of Object.entries(expected)) {
    assert.deepEqual(props[`m31r.${key}`].default, value, `default of m31r.${key}`);
  }
});

test("package.json contributes every command the extension registers", () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, "package.json"), "utf8"));
  const declared = pkg.contributes.commands.map((c: { command: string }) => c.command).sort();
  const source = fs.readFileSync(path.join(ROOT, "src", "extension.ts"), "utf8");
  const registered = [...source.matchAll(/registerCommand\("([^"]+)"/g)].map((m) => m[1]).sort();
  assert.deepEqual(registered, declared);
  assert.ok(declared.includes("m31r.restartServer") && declared.includes("m31r.showLogs"));
});

test("document selector covers files and unsaved buffers of each language", () => {
  assert.deepEqual(documentSelector(["rust"]), [
    { scheme: "file", language: "rust" },
    { scheme: "untitled", language: "rust" },
  ]);
});

test("only launch settings and languages need a restart", () => {
  const base = readSettings(() => undefined).settings;
  const changed = (k: string, v: unknown) => readSettings((key) => (key === k ? v : undefined)).settings;
  assert.equal(needsRestart(base, changed("maxLines", 2)), false);
  assert.equal(needsRestart(base, changed("enabled", false)), false);
  assert.equal(needsRestart(base, changed("socketPath", "/s")), false);
  assert.equal(needsRestart(base, changed("serverPath", "/x/m31r-lsp")), true);
  assert.equal(needsRestart(base, changed("serverArgs", ["-v"])), true);
  assert.equal(needsRestart(base, changed("languages", ["rust", "c"])), true);
});

test("server path: PATH lookup, explicit paths, home expansion, errors name the value", () => {
  const exec = new Set(["/usr/bin/m31r-lsp", "/home/u/bin/m31r-lsp", "/opt/m31r/m31r-lsp"]);
  const isExec = (f: string) => exec.has(f);
  assert.deepEqual(resolveServerPath("m31r-lsp", { PATH: "/nope:/usr/bin" }, isExec), { path: "/usr/bin/m31r-lsp" });
  assert.deepEqual(resolveServerPath("/opt/m31r/m31r-lsp", {}, isExec), { path: "/opt/m31r/m31r-lsp" });
  assert.deepEqual(resolveServerPath("~/bin/m31r-lsp", { HOME: "/home/u" }, isExec), { path: "/home/u/bin/m31r-lsp" });
  const missing = resolveServerPath("m31r-lsp", { PATH: "/nope" }, isExec);
  assert.ok("error" in missing && missing.error.includes('"m31r-lsp" was not found on PATH'));
  const bad = resolveServerPath("/opt/other", {}, isExec);
  assert.ok("error" in bad && bad.error.includes('"/opt/other" is not an executable file'));
});

test("server path: the real file system check accepts this node binary", () => {
  assert.deepEqual(resolveServerPath(process.execPath, process.env), { path: process.execPath });
});
