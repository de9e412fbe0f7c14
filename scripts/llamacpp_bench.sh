#!/usr/bin/env bash
# M31R and llama.cpp side by side on the same weights (issue 10, docs/quantization.md).
#
# `m31r bench` builds random-weight tiny/small bundles at each precision, writes each as GGUF with a
# parity fixture, and measures M31R; then llama-cpp-python (in a virtualenv outside the repo; its
# install compiles llama.cpp, ~15 min on 2 cores) checks tokenization and top logits against ours
# and measures the same prefill and decode, with the same thread count, in the same run.
#
# Usage: scripts/llamacpp_bench.sh [OUT_DIR] [extra m31r bench flags, e.g. --quick, --load N]
#
# With --load N (issue 18), `m31r bench` measures each model quiet and with N CPU-bound
# competitor processes, and then llama.cpp is measured the same way (the same busy loops,
# started and stopped by llamacpp_bench.py), in the same run: each engine's worst loaded run
# over its quiet median, side by side.
# Env: M31R_LLAMACPP_VENV (default ~/.cache/m31r/llamacpp-venv), THREADS (default: all cores),
#      PRESETS (default tiny,small), PRECISIONS (default f32,f16,q8_0,q4_0).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/llamacpp-bench}
shift || true
venv=${M31R_LLAMACPP_VENV:-$HOME/.cache/m31r/llamacpp-venv}
threads=${THREADS:-$(nproc)}
load=0
prev=
for arg in "$@"; do
    case "$arg" in
        --load=*) load=${arg#--load=} ;;
        *) [ "$prev" = --load ] && load=$arg ;;
    esac
    prev=$arg
done
if ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    echo "installing llama-cpp-python into $venv (compiles llama.cpp; takes a while)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip cmake ninja
    PATH="$venv/bin:$PATH" "$venv/bin/pip" install --quiet llama-cpp-python
fi
cargo build --release --quiet -p m31r-cli --bin m31r
mkdir -p "$out"
RAYON_NUM_THREADS=$threads target/release/m31r bench \
    --presets "${PRESETS:-tiny,small}" --precisions "${PRECISIONS:-f32,f16,q8_0,q4_0}" \
    --keep "$out" --gguf --json "$out/m31r.json" "$@"
"$venv/bin/python" scripts/llamacpp_bench.py "$out/m31r.json" --threads "$threads" --load "$load"
