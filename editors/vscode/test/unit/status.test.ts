// Unit tests of the status bar logic: parsing m31r/status and the ready/loading/unreachable views.
import { test } from "node:test";
import assert from "node:assert/strict";
import { type StatusReport, formatLatency, parseStatus, statusView } from "../../src/status";

const report = (over: Partial<StatusReport> = {}): StatusReport => ({
  connected: true, socket: "/run/m31r/m31rd.sock", model: "tiny-random", lastLatencyMs: 42.4,
  cacheHitRate: 0.75, requests: 10, suppressed: 2, ...over,
});

test("parseStatus accepts the contract's shape, nulls included", () => {
  assert.deepEqual(parseStatus(report()), report());
  const nulls = report({ model: null, lastLatencyMs: null, cacheHitRate: null });
  assert.deepEqual(parseStatus({ ...nulls, extra: 1 }), nulls);
});

test("parseStatus names the field at fault", () => {
  assert.throws(() => parseStatus(null), /expected an object, got null/);
  assert.throws(() => parseStatus({ ...report(), connected: "yes" }), /field connected has invalid value "yes"/);
  assert.throws(() => parseStatus({ ...report(), lastLatencyMs: "1" }), /field lastLatencyMs/);
  const { requests: _unused, ...noRequests } = report();
  assert.throws(() => parseStatus(noRequests), /field requests has invalid value undefined/);
});

test("ready shows the last latency", () => {
  const v = statusView({ kind: "running", report: report() });
  assert.equal(v.label, "ready");
  assert.equal(v.text, "$(check) M31R 42 ms");
  assert.match(v.tooltip, /model: tiny-random/);
  assert.match(v.tooltip, /cache hit rate: 75%/);
  assert.match(v.tooltip, /requests: 10 \(suppressed 2\)/);
  assert.equal(statusView({ kind: "running", report: report({ lastLatencyMs: null }) }).text, "$(check) M31R");
});

test("unreachable daemon, loading model, starting server", () => {
  const un = statusView({ kind: "running", report: report({ connected: false, model: null }) });
  assert.equal(un.label, "unreachable");
  assert.equal(un.severity, "warning");
  assert.match(un.tooltip, /daemon: unreachable \(\/run\/m31r\/m31rd.sock\)/);
  assert.equal(statusView({ kind: "running", report: report({ model: null }) }).label, "loading");
  assert.equal(statusView({ kind: "starting" }).label, "loading");
  assert.equal(statusView({ kind: "running", report: null }).label, "loading");
});

test("failures and disabled state", () => {
  const f = statusView({ kind: "failed", error: "m31r.serverPath: \"x\" was not found on PATH" });
  assert.equal(f.severity, "error");
  assert.match(f.tooltip, /serverPath/);
  assert.equal(statusView({ kind: "disabled" }).label, "disabled");
  assert.equal(statusView({ kind: "stopped" }).label, "stopped");
});

test("latency formatting", () => {
  assert.equal(formatLatency(0.4), "0 ms");
  assert.equal(formatLatency(9999), "9999 ms");
  assert.equal(formatLatency(12_345), "12.3 s");
});
