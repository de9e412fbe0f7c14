#!/usr/bin/env python3
"""llama.cpp beside M31R on the same weights (issue 10), driven by `m31r bench --gguf --json`.

For each bundle that `m31r bench` measured, loads `<bundle>.gguf` with llama-cpp-python and
1. checks that llama.cpp tokenizes the parity prompts into our ids and that its top logits at the
   last position match ours (so both run the same model);
2. measures prefill tokens/s on as many tokens as M31R's cold prefill, and decode ms/token over as
   many single-token steps at about the same context as M31R's decode, with the same thread count;
3. prints one table: M31R and llama.cpp side by side, each beside the physical bounds that
   `m31r bench` measured in the same run (f32 matmul FLOP/s, memory bandwidth).

Usage: llamacpp_bench.py RESULTS.json [--threads N] [--reps N]
"""

import argparse
import json
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
        llm.reset()
        llm.eval(ids[:decode_ctx])
        t = time.perf_counter()
        for tok in ids[decode_ctx : decode_ctx + decode_steps]:
            llm.eval([tok])
        decode = min(decode, (time.perf_counter() - t) / decode_steps)
    return prefill_n / prefill, decode * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    doc = json.load(open(args.results))
    threads = args.threads or doc["threads"]
    gflops, bw = doc["matmul_gflops"], doc["bandwidth_gbs"]
    print(f"llama-cpp-python {llama_cpp.__version__}, {threads} threads; machine (measured by "
          f"m31r bench in this run): f32 matmul {gflops:.1f} GFLOP/s, memory {bw:.1f} GB/s")
    rows, all_ok = [], True
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
    if not all_ok:
        print("PARITY MISMATCH: the numbers above may not compare the same model", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
