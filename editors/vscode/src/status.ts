// Owns the meaning of the status bar: parsing m31r-lsp's `m31r/status` answer and turning the client's
// state into text, tooltip and severity. No `vscode` import, so the unit tests run under plain Node.

/** The `m31r/status` result, per the m31r-lsp contract. */
export interface StatusReport {
  connected: boolean;
  socket: string;
  model: string | null;
  lastLatencyMs: number | null;
  cacheHitRate: number | null;
  requests: number;
  suppressed: number;
}

/** What the extension knows: its own lifecycle first, the server's report once it has one. */
export type ClientState =
  | { kind: "starting" }
  | { kind: "failed"; error: string }
  | { kind: "stopped" }
  | { kind: "disabled" }
  | { kind: "running"; report: StatusReport | null; error?: string };

/** The status bar item's content; `icon` is a codicon id. */
export interface StatusView {
  label: "ready" | "loading" | "unreachable" | "disabled" | "stopped" | "error";
  text: string;
  tooltip: string;
  severity: "ok" | "warning" | "error";
}

const isNullableNumber = (v: unknown) => v === null || (typeof v === "number" && Number.isFinite(v));

/** Validates an `m31r/status` answer; throws an Error naming the field at fault. */
export function parseStatus(value: unknown): StatusReport {
  if (typeof value !== "object" || value === null) {
    throw new Error(`m31r/status: expected an object, got ${JSON.stringify(value)}`);
  }
  const v = value as Record<string, unknown>;
  const checks: [keyof StatusReport, boolean][] = [
    ["connected", typeof v.connected === "boolean"],
    ["socket", typeof v.socket === "string"],
    ["model", v.model === null || typeof v.model === "string"],
    ["lastLatencyMs", isNullableNumber(v.lastLatencyMs)],
    ["cacheHitRate", isNullableNumber(v.cacheHitRate)],
    ["requests", typeof v.requests === "number"],
    ["suppressed", typeof v.suppressed === "number"],
  ];
  for (const [key, ok] of checks) {
    if (!ok) throw new Error(`m31r/status: field ${key} has invalid value ${JSON.stringify(v[key])}`);
  }
  return {
    connected: v.connected as boolean,
    socket: v.socket as string,
    model: v.model as string | null,
    lastLatencyMs: v.lastLatencyMs as number | null,
    cacheHitRate: v.cacheHitRate as number | null,
    requests: v.requests as number,
    suppressed: v.suppressed as number,
  };
}

/** Formats a latency for the status bar: whole milliseconds below 10 s, seconds with one decimal above. */
export function formatLatency(ms: number): string {
  return ms < 10_000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function reportTooltip(r: StatusReport): string {
  const lines = [
    `daemon: ${r.connected ? "connected" : "unreachable"} (${r.socket})`,
    `model: ${r.model ?? "none loaded"}`,
    `last latency: ${r.lastLatencyMs === null ? "n/a" : formatLatency(r.lastLatencyMs)}`,
    `cache hit rate: ${r.cacheHitRate === null ? "n/a" : `${Math.round(r.cacheHitRate * 100)}%`}`,
    `requests: ${r.requests} (suppressed ${r.suppressed})`,
  ];
  return lines.join("\n");
}

/**
 * ready = daemon connected with a model; loading = server starting or daemon connected without a model
 * yet; unreachable = server running, daemon not reachable.
 */
export function statusView(state: ClientState): StatusView {
  switch (state.kind) {
    case "starting":
      return { label: "loading", text: "$(sync~spin) M31R", tooltip: "M31R: starting m31r-lsp", severity: "ok" };
    case "failed":
      return { label: "error", text: "$(error) M31R", tooltip: `M31R: ${state.error}`, severity: "error" };
    case "stopped":
      return { label: "stopped", text: "$(circle-slash) M31R", tooltip: "M31R: m31r-lsp is not running", severity: "warning" };
    case "disabled":
      return { label: "disabled", text: "$(circle-slash) M31R", tooltip: "M31R: inline completions disabled (click to enable)", severity: "ok" };
    case "running": {
      const r = state.report;
      if (r === null) {
        const why = state.error ? `\nlast status error: ${state.error}` : "";
        return { label: "loading", text: "$(sync~spin) M31R", tooltip: `M31R: waiting for m31r-lsp status${why}`, severity: "ok" };
      }
      const tooltip = `M31R\n${reportTooltip(r)}`;
      if (!r.connected) {
        return { label: "unreachable", text: "$(warning) M31R unreachable", tooltip, severity: "warning" };
      }
      if (r.model === null) {
        return { label: "loading", text: "$(sync~spin) M31R loading", tooltip, severity: "ok" };
      }
      const latency = r.lastLatencyMs === null ? "" : ` ${formatLatency(r.lastLatencyMs)}`;
      return { label: "ready", text: `$(check) M31R${latency}`, tooltip, severity: "ok" };
    }
  }
}
