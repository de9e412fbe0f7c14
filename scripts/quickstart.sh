#!/usr/bin/env bash
# From a fresh clone to a completion in one command: build, then `m31r-train quickstart` (collect a
# corpus from the local Cargo registry, or this repository when there is none; train the tokenizer,
# shard, pick the model size and steps for the training budget by measuring candidate shapes on
# this machine, train, evaluate, export a release bundle carrying the eval), verify the bundle's
# checksums, start m31rd on a private socket, complete inside examples/sample.rs, print the
# timings and daemon status, stop the daemon. Everything stays under $M31R_WORK (the subcommand
# alone would write to the per-user model directory).
#
# Environment: M31R_MINUTES (training budget in minutes, measuring included; default 10, the
# CLI's DEFAULT_QUICKSTART_MINUTES), M31R_STEPS (instead: train the `tiny` preset for this many
# steps, no sizing), M31R_WORK (default runs/quickstart), M31R_EVAL_ITEMS (masked lines in the
# completion benchmark, default 400).
# An existing bundle in $M31R_WORK/bundle is reused; delete it to retrain.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${M31R_STEPS:-}" ]; then
    length=(--steps "$M31R_STEPS")
    what="tiny, $M31R_STEPS steps"
else
    length=(--minutes "${M31R_MINUTES:-10}")
    what="sized for ${M31R_MINUTES:-10} min"
fi
work=${M31R_WORK:-runs/quickstart}
bin=target/release

step() { printf '\n==> %s\n' "$*"; }

step "build (release)"
cargo build --release --locked -p m31r-train -p m31r-daemon -p m31r-cli

if [ ! -f "$work/bundle/checksum.txt" ]; then
    inputs=()
    if [ ! -d "${CARGO_HOME:-$HOME/.cargo}/registry/src" ]; then
        inputs=(.)
    fi
    step "m31r-train quickstart: corpus, tokenizer, prepare, train ($what), eval, export"
    "$bin/m31r-train" quickstart "${inputs[@]}" "${length[@]}" --eval-items "${M31R_EVAL_ITEMS:-400}" \
        --work "$work/work" --out "$work/bundle" --force
fi
step "verify the bundle's checksums"
(cd "$work/bundle" && sha256sum -c checksum.txt)

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
