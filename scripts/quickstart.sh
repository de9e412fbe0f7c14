#!/usr/bin/env bash
# From a fresh clone to a completion in one command: build, collect a corpus from the local Cargo
# registry (or this repository when there is none), train the tokenizer, shard, train the `tiny`
# model, export a release bundle, start m31rd on a private socket, complete inside
# examples/sample.rs, print the timings and daemon status, stop the daemon.
#
# Environment: M31R_STEPS (training steps, default 300), M31R_WORK (default runs/quickstart),
# M31R_EVAL_ITEMS (masked lines in the completion benchmark, default 40).
# An existing bundle in $M31R_WORK/bundle is reused; delete it to retrain.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${M31R_STEPS:-300}
work=${M31R_WORK:-runs/quickstart}
bin=target/release

step() { printf '\n==> %s\n' "$*"; }

step "build (release)"
cargo build --release --locked -p m31r-train -p m31r-daemon

if [ ! -f "$work/bundle/checksum.txt" ]; then
    inputs=()
    if [ ! -d "${CARGO_HOME:-$HOME/.cargo}/registry/src" ]; then
        inputs=(.)
    fi
    step "corpus"
    "$bin/m31r-train" corpus "${inputs[@]}" --out "$work/data" --force
    step "tokenizer"
    "$bin/m31r-train" tokenizer --data "$work/data"
    step "prepare"
    "$bin/m31r-train" prepare --data "$work/data"
    step "train tiny ($steps steps)"
    "$bin/m31r-train" train --data "$work/data" --run-dir "$work/run" --steps "$steps" --force
    step "export"
    "$bin/m31r-train" export "$work/run" --data "$work/data" --out "$work/bundle"
fi
(cd "$work/bundle" && sha256sum -c checksum.txt)
step "eval (test split)"
"$bin/m31r-train" eval --bundle "$work/bundle" --data "$work/data" --items "${M31R_EVAL_ITEMS:-40}" --out "$work/eval.json"

step "start m31rd"
sock_dir=$(mktemp -d)
socket="$sock_dir/m31rd.sock"
"$bin/m31rd" --bundle "$work/bundle" --socket "$socket" &
daemon=$!
trap 'kill "$daemon" 2>/dev/null || true; rm -rf "$sock_dir"' EXIT
for _ in $(seq 1 100); do
    [ -S "$socket" ] && break
    sleep 0.1
done

step "complete examples/sample.rs:9:9"
"$bin/m31r" --socket "$socket" complete examples/sample.rs:9:9 -n 32
echo
step "daemon status"
"$bin/m31r" --socket "$socket" status
"$bin/m31r" --socket "$socket" shutdown
wait "$daemon"
