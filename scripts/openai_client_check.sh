#!/usr/bin/env bash
# Checks m31rd's OpenAI-compatible HTTP API with the official `openai` Python client (PyPI):
# models, a plain completion, FIM through `suffix`, streaming (equal to the whole answer), chat
# (whole and streamed) and an error. Not part of CI: it needs PyPI the first time.
#
# The client goes into a virtual environment outside the repository ($M31R_OPENAI_VENV, default
# $TMPDIR/m31r-openai-venv, reused between runs). The daemon serves $M31R_BUNDLE if set, else a
# tiny bundle with seeded random weights (`cargo run --example tiny_bundle`): its text is
# gibberish, but deterministic, which is what the checks need.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=${TMPDIR:-/tmp}
venv=${M31R_OPENAI_VENV:-$tmp/m31r-openai-venv}

step() { printf '\n==> %s\n' "$*"; }

step "build m31rd and the tiny-bundle example"
cargo build --locked -q -p m31r-daemon --bin m31rd --example tiny_bundle

step "python client in $venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade openai
"$venv/bin/python" -c 'import openai; print("openai", openai.__version__)'

work=$(mktemp -d "$tmp/m31r-openai.XXXXXX")
daemon=
cleanup() {
    if [ -n "$daemon" ]; then kill "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

bundle=${M31R_BUNDLE:-}
if [ -z "$bundle" ]; then
    step "tiny bundle"
    bundle="$work/bundle"
    cargo run --locked -q -p m31r-daemon --example tiny_bundle -- "$bundle"
fi

step "start m31rd with HTTP on a free loopback port"
target/debug/m31rd --bundle "$bundle" --socket "$work/m31rd.sock" --config "$work/none.toml" \
    --http 127.0.0.1:0 --http-addr-file "$work/http.addr" 2>"$work/m31rd.log" &
daemon=$!
for _ in $(seq 1 300); do
    [ -s "$work/http.addr" ] && break
    if ! kill -0 "$daemon" 2>/dev/null; then cat "$work/m31rd.log"; exit 1; fi
    sleep 0.1
done
addr=$(cat "$work/http.addr")
echo "m31rd HTTP API at http://$addr"

step "openai client checks"
if ! "$venv/bin/python" scripts/openai_client_check.py "http://$addr/v1"; then
    echo "--- m31rd log"
    cat "$work/m31rd.log"
    exit 1
fi
