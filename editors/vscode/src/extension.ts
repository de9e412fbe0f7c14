// Owns the VS Code side of M31R: starts m31r-lsp over stdio with vscode-languageclient (whose LSP 3.18
// inline-completion feature provides the ghost text), keeps its configuration in sync, and runs the status
// bar item and the commands. All completion logic lives in m31r-lsp.

import * as vscode from "vscode";
import {
  LanguageClient,
  type LanguageClientOptions,
  type ServerOptions,
  State,
} from "vscode-languageclient/node";
import {
  type ExtensionSettings,
  documentSelector,
  needsRestart,
  readSettings,
  resolveServerPath,
  serverConfiguration,
} from "./config";
import { type ClientState, parseStatus, statusView } from "./status";

const SECTION = "m31r";

let client: LanguageClient | undefined;
let settings: ExtensionSettings;
let state: ClientState = { kind: "stopped" };
let statusItem: vscode.StatusBarItem;
let log: vscode.LogOutputChannel;
let pollTimer: NodeJS.Timeout | undefined;
let refreshPending = false;

function loadSettings(): ExtensionSettings {
  const config = vscode.workspace.getConfiguration(SECTION);
  const { settings: s, warnings } = readSettings((key) => config.get(key));
  for (const w of warnings) log.warn(w);
  return s;
}

function render(): void {
  const next: ClientState = !settings.server.enabled && state.kind === "running" ? { kind: "disabled" } : state;
  const view = statusView(next);
  statusItem.text = view.text;
  statusItem.tooltip = view.tooltip;
  statusItem.command = view.label === "disabled" ? "m31r.enable" : "m31r.showStatus";
  statusItem.backgroundColor =
    view.severity === "error"
      ? new vscode.ThemeColor("statusBarItem.errorBackground")
      : view.severity === "warning"
        ? new vscode.ThemeColor("statusBarItem.warningBackground")
        : undefined;
  statusItem.show();
}

function setState(next: ClientState): void {
  state = next;
  render();
}

async function refreshStatus(): Promise<void> {
  const c = client;
  if (!c || c.state !== State.Running) return;
  try {
    const report = parseStatus(await c.sendRequest("m31r/status"));
    if (c === client) setState({ kind: "running", report });
  } catch (err) {
    const error = err instanceof Error ? err.message : String(err);
    log.warn(`m31r/status failed: ${error}`);
    if (c === client) setState({ kind: "running", report: state.kind === "running" ? state.report : null, error });
  }
}

/** Asks for status soon after a completion, at most one request in flight. */
function scheduleRefresh(): void {
  if (refreshPending) return;
  refreshPending = true;
  setTimeout(() => {
    refreshPending = false;
    void refreshStatus();
  }, 100);
}

function restartPolling(): void {
  if (pollTimer) clearInterval(pollTimer);
  pollTimer = undefined;
  if (settings.statusPollSeconds > 0) {
    pollTimer = setInterval(() => void refreshStatus(), settings.statusPollSeconds * 1000);
  }
}

async function startClient(): Promise<void> {
  const resolved = resolveServerPath(settings.serverPath, process.env);
  if ("error" in resolved) {
    log.error(resolved.error);
    setState({ kind: "failed", error: resolved.error });
    const choice = await vscode.window.showErrorMessage(`M31R: ${resolved.error}`, "Open Settings");
    if (choice) void vscode.commands.executeCommand("workbench.action.openSettings", "m31r.serverPath");
    return;
  }
  const serverOptions: ServerOptions = {
    command: resolved.path,
    args: settings.serverArgs,
    // No `transport`: TransportKind.stdio would append `--stdio`, which m31r-lsp (stdio only) rejects.
  };
  const clientOptions: LanguageClientOptions = {
    documentSelector: documentSelector(settings.server.languages),
    initializationOptions: serverConfiguration(settings.server),
    outputChannel: log,
    middleware: {
      // Disabling is immediate on the client side too; the server learns it via didChangeConfiguration.
      provideInlineCompletionItems: async (document, position, context, token, next) => {
        if (!settings.server.enabled) return undefined;
        const result = await next(document, position, context, token);
        scheduleRefresh();
        return result;
      },
      // The server asks for `m31r` through workspace/configuration: answer with the contract keys only.
      workspace: {
        configuration: async (params, token, next) => {
          const defaults = await next(params, token);
          if (!Array.isArray(defaults)) return defaults;
          return params.items.map((item, i) =>
            item.section === SECTION ? serverConfiguration(settings.server) : defaults[i],
          );
        },
      },
    },
  };
  const c = new LanguageClient("m31r", "M31R", serverOptions, clientOptions);
  client = c;
  c.onDidChangeState((e) => {
    if (c !== client) return;
    if (e.newState === State.Running) {
      setState({ kind: "running", report: null });
      void refreshStatus();
    } else if (e.newState === State.Starting) {
      setState({ kind: "starting" });
    } else {
      setState({ kind: "stopped" });
    }
  });
  setState({ kind: "starting" });
  log.info(`starting ${resolved.path} ${settings.serverArgs.join(" ")}`.trim());
  try {
    await c.start();
  } catch (err) {
    const error = `cannot start ${resolved.path}: ${err instanceof Error ? err.message : String(err)}`;
    log.error(error);
    if (c === client) setState({ kind: "failed", error });
  }
}

async function stopClient(): Promise<void> {
  const c = client;
  client = undefined;
  if (c && c.state !== State.Stopped) {
    try {
      await c.stop(2000);
    } catch (err) {
      log.warn(`stopping m31r-lsp: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
  setState({ kind: "stopped" });
}

async function setEnabled(enabled: boolean): Promise<void> {
  await vscode.workspace.getConfiguration(SECTION).update("enabled", enabled, vscode.ConfigurationTarget.Global);
}

async function onConfigurationChanged(): Promise<void> {
  const before = settings;
  settings = loadSettings();
  restartPolling();
  if (needsRestart(before, settings)) {
    await stopClient();
    await startClient();
    return;
  }
  if (client?.state === State.Running) {
    await client.sendNotification("workspace/didChangeConfiguration", {
      settings: { [SECTION]: serverConfiguration(settings.server) },
    });
  }
  render();
}

/** Extension entry point. */
export async function activate(context: vscode.ExtensionContext): Promise<void> {
  log = vscode.window.createOutputChannel("M31R", { log: true });
  statusItem = vscode.window.createStatusBarItem("m31r.status", vscode.StatusBarAlignment.Right, 100);
  statusItem.name = "M31R";
  settings = loadSettings();
  context.subscriptions.push(
    log,
    statusItem,
    vscode.commands.registerCommand("m31r.enable", () => setEnabled(true)),
    vscode.commands.registerCommand("m31r.disable", () => setEnabled(false)),
    vscode.commands.registerCommand("m31r.toggle", () => setEnabled(!settings.server.enabled)),
    vscode.commands.registerCommand("m31r.restartServer", async () => {
      await stopClient();
      await startClient();
    }),
    vscode.commands.registerCommand("m31r.showLogs", () => log.show(true)),
    vscode.commands.registerCommand("m31r.showStatus", async () => {
      await refreshStatus();
      const view = statusView(state);
      const choice = await vscode.window.showInformationMessage(view.tooltip, "Show Logs", "Restart Server");
      if (choice === "Show Logs") log.show(true);
      if (choice === "Restart Server") await vscode.commands.executeCommand("m31r.restartServer");
    }),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration(SECTION)) void onConfigurationChanged();
    }),
    { dispose: () => pollTimer && clearInterval(pollTimer) },
  );
  restartPolling();
  render();
  await startClient();
}

/** Extension exit point: stops the server so no m31r-lsp process outlives the window. */
export async function deactivate(): Promise<void> {
  await stopClient();
}
