#!/usr/bin/env python3
"""llama.cpp beside M31R on the same weights (issue 10), driven by `m31r bench --gguf --json`.

For each bundle that `m31r bench` measured, loads `<bundle>.gguf` with llama-cpp-python and
1. checks that llama.cpp tokenizes the parity prompts into our ids and that its top logits at the
   last position match ours (so both run the same model);
2. measures prefill tokens/s on as many tokens as M31R's cold prefill, and decode ms/token over as
   many single-token steps at about the same context as M31R's decode, with the same thread count;
3. prints one table: M31R and llama.cpp side by side, each beside the physical bounds that
   `m31r bench` measured in the same run (f32 matmul FLOP/s, memory bandwidth).

With --load N (issue 18) it then measures llama.cpp's keystroke step and decode per token five
times quiet and five times with N CPU-bound competitor processes (the busy loop `m31r bench
--load` uses), and prints its worst loaded run over its quiet median beside M31R's, which the
same `m31r bench --load N` wrote to RESULTS.json earlier in the run.

Usage: llamacpp_bench.py RESULTS.json [--threads N] [--reps N] [--load N [--load-reps R]]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import llama_cpp


def load(path, threads, n_ctx):
    return llama_cpp.Llama(
        model_path=path,
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=n_ctx,
        n_batch=512,
        n_ubatch=512,
        verbose=False,
    )


def last_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    # `llm.scores` is only filled with logits_all; read the context's last row directly.
    row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return [row[i] for i in range(llm.n_vocab())]


def parity(llm, cases):
    """Returns (all ok, lines)."""
    ok, lines = True, []
    for case in cases:
        ours = case["ids"]
        theirs = llm.tokenize(case["text"].encode("utf-8"), add_bos=False, special=False)
        same_tokens = list(theirs) == list(ours)
        logits = last_logits(llm, ours)
        top = sorted(range(len(logits)), key=lambda i: -logits[i])[:8]
        our_top = [i for i, _ in case["top"]]
        diff = max(abs(logits[i] - v) for i, v in case["top"])
        scale = max(abs(v) for _, v in case["top"]) or 1.0
        overlap = len(set(top) & set(our_top))
        # Random weights leave near-ties at the top: llama.cpp's top-1 counts as agreeing when
        # our logits put it within twice the largest logit difference of our own top-1.
        our_logit = dict(case["top"])
        margin = our_logit[our_top[0]] - our_logit.get(top[0], float("-inf"))
        if top[0] == our_top[0]:
            top1 = "same"
        elif margin <= 2 * diff:
            top1 = f"near-tie (our margin {margin:.4f})"
        else:
            top1 = "DIFFERENT"
        good = same_tokens and top1 != "DIFFERENT" and diff <= 0.02 * max(scale, 1.0)
        ok &= good
        lines.append(
            f"    {case['name']:<10} tokens {'same' if same_tokens else 'DIFFERENT'} "
            f"({len(ours)}) · top-1 {top1} · "
            f"top-8 overlap {overlap}/8 · max |Δlogit| {diff:.4f} (scale {scale:.2f})"
        )
    return ok, lines


def bench(llm, ids, prefill_n, decode_ctx, decode_steps, reps):
    prefill = float("inf")
    for _ in range(reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:prefill_n])
        prefill = min(prefill, time.perf_counter() - t)
    decode = float("inf")
    for _ in range(reps):
        decode = min(decode, decode_ms(llm, ids, decode_ctx, decode_steps))
    return prefill_n / prefill, decode


def decode_ms(llm, ids, ctx, steps):
    """Mean ms per single-token step over `steps` steps after `ctx` tokens of context."""
    llm.reset()
    llm.eval(ids[:ctx])
    t = time.perf_counter()
    for tok in ids[ctx : ctx + steps]:
        llm.eval([tok])
    return (time.perf_counter() - t) / steps * 1e3


def keystroke_ms(llm, ids, ctx, keystrokes):
    """Median ms of `keystrokes` single-token steps at `ctx` tokens of cached context: what a
    keystroke costs llama.cpp's forward (M31R's keystroke also encodes the prompt and samples)."""
    llm.reset()
    llm.eval(ids[:ctx])
    times = []
    for tok in ids[ctx : ctx + keystrokes]:
        t = time.perf_counter()
        llm.eval([tok])
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# The same busy loop as `m31r bench --load` (cli/src/bench/mod.rs, `Load::LOOP`): it polls
# this script's pid and ends once the script is gone.
LOOP = 'parent=$1; while kill -0 "$parent" 2>/dev/null; do i=0; while [ $i -lt 5000 ]; do i=$((i+1)); done; done'


def start_load(n):
    return [subprocess.Popen(["sh", "-c", LOOP, "sh", str(os.getpid())],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(n)]


def stop_load(procs):
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def load_rows(llm, r, ids, reps, load):
    """llama.cpp's keystroke step and decode per token, `reps` runs quiet and then `reps` runs
    with `load` competitor processes; each run as M31R's bench worker measures them."""
    steps = max(8, r["decode_tokens"] - 1)
    decode_ctx = max(1, int(r["decode_context"] - steps / 2))
    steps = min(steps, r["context"] - decode_ctx - 1)
    key_ctx = min(r["keystroke"]["prompt_tokens"], r["context"] - 16)
    runs = {}
    for phase in ("quiet", "loaded"):
        procs = start_load(load) if phase == "loaded" else []
        try:
            runs[phase] = [(keystroke_ms(llm, ids, key_ctx, 12), decode_ms(llm, ids, decode_ctx, steps))
                           for _ in range(reps)]
        finally:
            stop_load(procs)
    return runs


def ratio_line(what, quiet, loaded):
    q, w = statistics.median(quiet), max(loaded)
    return f"{what:<28} {q:>8.1f} ms {statistics.median(loaded):>8.1f} ms {w:>8.1f} ms {w / q:>6.1f}×"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--load", type=int, default=0,
                    help="also measure with N CPU-bound competitor processes (issue 18): llama.cpp's "
                         "worst loaded run over its quiet median, beside M31R's from RESULTS.json")
    ap.add_argument("--load-reps", type=int, default=5, help="runs quiet and loaded with --load")
    args = ap.parse_args()
    doc = json.load(open(args.results))
    threads = args.threads or doc["threads"]
    gflops, bw = doc["matmul_gflops"], doc["bandwidth_gbs"]
    print(f"llama-cpp-python {llama_cpp.__version__}, {threads} threads; machine (measured by "
          f"m31r bench in this run): f32 matmul {gflops:.1f} GFLOP/s, memory {bw:.1f} GB/s")
    rows, all_ok, load_tables = [], True, []
    for run in doc["runs"]:
        r, bundle = run["report"], run["bundle"]
        cases = json.load(open(bundle + ".parity.json"))
        llm = load(bundle + ".gguf", threads, r["context"])
        ok, lines = parity(llm, cases)
        all_ok &= ok
        print(f"{run['name']}: parity {'OK' if ok else 'MISMATCH'}")
        print("\n".join(lines))
        # Token ids to feed: the parity prompts' ids, repeated (speed does not depend on them).
        ids = []
        while len(ids) < r["context"]:
            for case in cases:
                ids.extend(case["ids"])
        prefill_n = r["prefill"]["prompt_tokens"]
        steps = max(8, r["decode_tokens"] - 1)
        decode_ctx = max(1, int(r["decode_context"] - steps / 2))
        steps = min(steps, r["context"] - decode_ctx - 1)
        tps, ms = bench(llm, ids, prefill_n, decode_ctx, steps, args.reps)
        if args.load:
            load_tables.append((run, load_rows(llm, r, ids, args.load_reps, args.load)))
        del llm
        ours_tps = prefill_n * 1e3 / r["prefill"]["prefill_ms"]
        prefill_bound = gflops * 1e9 / (2 * r["params"])
        decode_bound = (r["weight_bytes"] + r["kv_bytes_per_token"] * r["decode_context"]) / (bw * 1e9) * 1e3
        rows.append((run["name"], prefill_n, ours_tps, tps, prefill_bound,
                     r["decode_ms_per_token"], ms, decode_bound))
    print()
    print(f"{'model':<12} {'prefill':>7} {'M31R tok/s':>11} {'llama.cpp':>10} {'bound':>8}   "
          f"{'M31R ms/tok':>11} {'llama.cpp':>10} {'bound':>7} {'M31R×bound':>10} {'M31R÷llama':>10}")
    for name, n, ours_tps, tps, pb, ours_ms, ms, db in rows:
        print(f"{name:<12} {n:>7} {ours_tps:>11.0f} {tps:>10.0f} {pb:>8.0f}   "
              f"{ours_ms:>11.2f} {ms:>10.2f} {db:>7.2f} {ours_ms / db:>10.2f} {ours_ms / ms:>10.2f}")
    print("prefill bound = f32 matmul FLOP/s ÷ (2·params) (attention not counted); decode bound = "
          "(weight bytes at the precision + f16 KV bytes at the decode context) ÷ memory bandwidth. "
          "Both keep the KV cache in f16.")
    if load_tables:
        print()
        print(f"under load: {args.load} CPU-bound competitor processes; {args.load_reps} quiet and "
              f"{args.load_reps} loaded runs of each engine (M31R's from RESULTS.json, measured by "
              "m31r bench earlier in this run)")
        print(f"{'':<28} {'quiet med':>11} {'loaded med':>11} {'loaded WORST':>11} {'worst/quiet':>7}")
        for run, runs in load_tables:
            print(run["name"])
            for i, what in ((0, "keystroke"), (1, "decode per token")):
                print("  " + ratio_line(f"llama.cpp {what}", [x[i] for x in runs["quiet"]],
                                        [x[i] for x in runs["loaded"]]))
                if run.get("loaded_runs"):
                    get = (lambda rep: rep["keystroke"]["first_ms"]) if i == 0 else \
                          (lambda rep: rep["decode_ms_per_token"])
                    print("  " + ratio_line(f"M31R {what}", [get(x) for x in run["quiet_runs"]],
                                            [get(x) for x in run["loaded_runs"]]))
        print("keystroke: llama.cpp's is one single-token step at M31R's keystroke context (median of "
              "12); M31R's is submit to first event. worst/quiet = the worst loaded run over the "
              "quiet median.")
    if not all_ok:
        print("PARITY MISMATCH: the numbers above may not compare the same model", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
