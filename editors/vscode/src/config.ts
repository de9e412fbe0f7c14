// Owns the extension's settings: reading `m31r.*` into typed values, the m31r-lsp configuration object
// (contract keys only), the document selector, and finding the server binary. No `vscode` import, so the
// unit tests run under plain Node.

import * as fs from "node:fs";
import * as path from "node:path";

/** The configuration m31r-lsp understands, camelCase, as in `initializationOptions` and `settings.m31r`. */
export interface ServerSettings {
  enabled: boolean;
  languages: string[];
  maxLines: number;
  maxTokens: number;
  socketPath: string | null;
  autoStart: boolean;
  daemonPath: string;
  daemonArgs: string[];
  contextFiles: boolean;
  contextSnippets: boolean;
  contextSnippetBytes: number;
  firstLineBudgetMs: number;
  speculativeNext: boolean;
  inlineTimeoutMs: number;
  completionTimeoutMs: number;
  connectTimeoutMs: number;
  minConfidence: number;
  degenerateFilters: boolean;
}

/** Everything the extension reads: the server's settings plus how to launch and poll it. */
export interface ExtensionSettings {
  server: ServerSettings;
  serverPath: string;
  serverArgs: string[];
  statusPollSeconds: number;
}

/** The contract's defaults; package.json declares the same ones (a unit test keeps them equal). */
export const SERVER_DEFAULTS: Readonly<ServerSettings> = Object.freeze({
  enabled: true,
  languages: ["rust"],
  maxLines: 8,
  maxTokens: 128,
  socketPath: null,
  autoStart: true,
  daemonPath: "m31rd",
  daemonArgs: [],
  contextFiles: true,
  contextSnippets: true,
  contextSnippetBytes: 4096,
  firstLineBudgetMs: 100,
  speculativeNext: true,
  inlineTimeoutMs: 500,
  completionTimeoutMs: 1000,
  connectTimeoutMs: 2000,
  // m31r-lsp's DEFAULT_MIN_CONFIDENCE (lsp/src/config.rs); keep the two and package.json equal.
  minConfidence: 0.7,
  degenerateFilters: true,
});

/** Extension-only settings' defaults. */
export const EXTENSION_DEFAULTS = Object.freeze({
  serverPath: "m31r-lsp",
  serverArgs: [] as string[],
  statusPollSeconds: 5,
});

/** Reads one setting by its key below `m31r.` (what `WorkspaceConfiguration.get` does). */
export type SettingGetter = (key: string) => unknown;

const isStringArray = (v: unknown): v is string[] =>
  Array.isArray(v) && v.every((x) => typeof x === "string");
const isPositiveInt = (v: unknown): v is number =>
  typeof v === "number" && Number.isInteger(v) && v > 0;
/** The range m31r-lsp accepts for its timeouts; outside it the server would ignore the value. */
const isTimeoutMs = (v: unknown): v is number =>
  typeof v === "number" && Number.isInteger(v) && v >= 50 && v <= 60000;

/**
 * Reads and validates every setting. A value of the wrong type falls back to its default and adds a
 * warning naming the key and the value, so a typo in settings.json never stops completions.
 */
export function readSettings(get: SettingGetter): { settings: ExtensionSettings; warnings: string[] } {
  const warnings: string[] = [];
  function pick<T>(key: string, fallback: T, ok: (v: unknown) => boolean): T {
    const value = get(key);
    if (value === undefined) return fallback;
    if (ok(value)) return value as T;
    warnings.push(`m31r.${key}: invalid value ${JSON.stringify(value)}, using ${JSON.stringify(fallback)}`);
    return fallback;
  }
  const d = SERVER_DEFAULTS;
  const server: ServerSettings = {
    enabled: pick("enabled", d.enabled, (v) => typeof v === "boolean"),
    languages: pick("languages", [...d.languages], isStringArray),
    maxLines: pick("maxLines", d.maxLines, isPositiveInt),
    maxTokens: pick("maxTokens", d.maxTokens, isPositiveInt),
    // An empty string in the settings UI means "not set", like null.
    socketPath: pick<string | null>("socketPath", d.socketPath, (v) => v === null || typeof v === "string") || null,
    autoStart: pick("autoStart", d.autoStart, (v) => typeof v === "boolean"),
    daemonPath: pick("daemonPath", d.daemonPath, (v) => typeof v === "string" && v.length > 0),
    daemonArgs: pick("daemonArgs", [...d.daemonArgs], isStringArray),
    contextFiles: pick("contextFiles", d.contextFiles, (v) => typeof v === "boolean"),
    contextSnippets: pick("contextSnippets", d.contextSnippets, (v) => typeof v === "boolean"),
    contextSnippetBytes: pick(
      "contextSnippetBytes",
      d.contextSnippetBytes,
      (v) => typeof v === "number" && Number.isInteger(v) && v >= 256 && v <= 1048576,
    ),
    firstLineBudgetMs: pick(
      "firstLineBudgetMs",
      d.firstLineBudgetMs,
      (v) => typeof v === "number" && Number.isInteger(v) && v >= 0 && v <= 60000,
    ),
    speculativeNext: pick("speculativeNext", d.speculativeNext, (v) => typeof v === "boolean"),
    inlineTimeoutMs: pick("inlineTimeoutMs", d.inlineTimeoutMs, isTimeoutMs),
    completionTimeoutMs: pick("completionTimeoutMs", d.completionTimeoutMs, isTimeoutMs),
    connectTimeoutMs: pick("connectTimeoutMs", d.connectTimeoutMs, isTimeoutMs),
    minConfidence: pick(
      "minConfidence",
      d.minConfidence,
      (v) => typeof v === "number" && Number.isFinite(v) && v >= 0 && v <= 1,
    ),
    degenerateFilters: pick("degenerateFilters", d.degenerateFilters, (v) => typeof v === "boolean"),
  };
  const e = EXTENSION_DEFAULTS;
  return {
    settings: {
      server,
      serverPath: pick("serverPath", e.serverPath, (v) => typeof v === "string" && v.trim().length > 0),
      serverArgs: pick("serverArgs", [...e.serverArgs], isStringArray),
      statusPollSeconds: pick("statusPollSeconds", e.statusPollSeconds, (v) => typeof v === "number" && v >= 0),
    },
    warnings,
  };
}

/** The object sent as `initializationOptions` and as `settings.m31r`: exactly the contract's keys. */
export function serverConfiguration(s: ServerSettings): Record<keyof ServerSettings, unknown> {
  return {
    enabled: s.enabled,
    languages: [...s.languages],
    maxLines: s.maxLines,
    maxTokens: s.maxTokens,
    socketPath: s.socketPath,
    autoStart: s.autoStart,
    daemonPath: s.daemonPath,
    daemonArgs: [...s.daemonArgs],
    contextFiles: s.contextFiles,
    contextSnippets: s.contextSnippets,
    contextSnippetBytes: s.contextSnippetBytes,
    firstLineBudgetMs: s.firstLineBudgetMs,
    speculativeNext: s.speculativeNext,
    inlineTimeoutMs: s.inlineTimeoutMs,
    completionTimeoutMs: s.completionTimeoutMs,
    connectTimeoutMs: s.connectTimeoutMs,
    minConfidence: s.minConfidence,
    degenerateFilters: s.degenerateFilters,
  };
}

/** Saved files and unsaved buffers of each configured language. */
export function documentSelector(languages: readonly string[]): { scheme: string; language: string }[] {
  return languages.flatMap((language) => [
    { scheme: "file", language },
    { scheme: "untitled", language },
  ]);
}

/** Which settings changes need a new server process (the rest travel as didChangeConfiguration). */
export function needsRestart(before: ExtensionSettings, after: ExtensionSettings): boolean {
  return (
    before.serverPath !== after.serverPath ||
    JSON.stringify(before.serverArgs) !== JSON.stringify(after.serverArgs) ||
    JSON.stringify(before.server.languages) !== JSON.stringify(after.server.languages)
  );
}

const isExecutable = (file: string): boolean => {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
};

/**
 * Resolves `serverPath` to an executable: a path with a slash is taken as is (relative to `home` when it
 * starts with `~/`), a bare name is searched on `PATH`. Returns an error message naming the value otherwise.
 */
export function resolveServerPath(
  serverPath: string,
  env: { PATH?: string; HOME?: string },
  executable: (file: string) => boolean = isExecutable,
): { path: string } | { error: string } {
  let p = serverPath.trim();
  if (p.startsWith("~/") && env.HOME) p = path.join(env.HOME, p.slice(2));
  if (p.includes("/")) {
    return executable(p)
      ? { path: path.resolve(p) }
      : { error: `m31r.serverPath: ${JSON.stringify(serverPath)} is not an executable file` };
  }
  for (const dir of (env.PATH ?? "").split(path.delimiter)) {
    if (!dir) continue;
    const candidate = path.join(dir, p);
    if (executable(candidate)) return { path: candidate };
  }
  return {
    error:
      `m31r.serverPath: ${JSON.stringify(serverPath)} was not found on PATH; ` +
      "install m31r-lsp (cargo install --path lsp) or set m31r.serverPath to its full path",
  };
}
