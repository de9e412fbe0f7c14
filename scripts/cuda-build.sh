#!/usr/bin/env bash
# Builds m31r-train, m31rd and m31r with `--features cuda` on a machine that has no CUDA toolkit
# and no GPU, from PyPI's NVIDIA wheels.
#
#   bash scripts/cuda-build.sh            # toolkit into ~/.cache/m31r/cuda-13.0, binaries into target/cuda/
#
# Why CUDA 13.0: candle 0.11.1 pins cudarc 0.19.10, which knows CUDA 11.4 to 13.4 and reads the
# version from `nvcc --version` (candle enables cudarc's `cuda-version-from-build-system`). 13.0 is
# the oldest 13.x, so its PTX (ISA 9.0) loads on any driver from the r580 series on, and its
# libraries' sonames (libcublas.so.13, libnvrtc.so.13, libcurand.so.10, libcudart.so.13) are what
# a CUDA 13 PyTorch installs beside itself: the lent GPU machine has one.
#
# candle links the CUDA libraries dynamically (cudarc's `dynamic-linking`), so the linker needs
# libcuda.so, which only a driver installs. The wheels have none; this script compiles a stub with
# the same soname (libcuda.so.1) whose every entry point returns CUDA_ERROR_STUB_LIBRARY (34), the
# way the toolkit's own stubs/libcuda.so does. The stub is for linking only: at run time the
# driver's libcuda.so.1 is found by the loader, and a machine without a driver needs
# `LD_LIBRARY_PATH=$M31R_CUDA_HOME/lib/stubs` to start the binary at all (it then reports that no
# CUDA device is usable).
#
# Environment:
#   M31R_CUDA_HOME    where the toolkit goes (default ~/.cache/m31r/cuda-13.0); reused when present
#   CUDA_COMPUTE_CAP  GPU architecture the kernels are compiled for (default 90: H100/H200;
#                     80 for A100). candle's PTX is JIT-compiled for newer GPUs by the driver.
#   CARGO_TARGET_DIR  cargo's target directory (default target/); the binaries are copied to
#                     target/cuda/ so that a CPU build does not overwrite them.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
toolkit="${M31R_CUDA_HOME:-$HOME/.cache/m31r/cuda-13.0}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
out="$root/target/cuda"
start=$(date +%s)

log() { printf '[cuda-build %4ds] %s\n' "$(($(date +%s) - start))" "$*"; }

# PyPI wheels of the CUDA 13.0 toolkit: compiler (nvcc, nvvm/cicc, crt headers), CCCL headers, and
# the runtime libraries that candle links.
wheels=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-nvvm==13.0.88"
    "nvidia-cuda-crt==13.0.88"
    "nvidia-cuda-cccl==13.0.85"
    "nvidia-cuda-runtime==13.0.96"
    "nvidia-cuda-nvrtc==13.0.88"
    "nvidia-cublas==13.0.2.14"
    "nvidia-curand==10.4.5.25"
)

install_toolkit() {
    log "installing the CUDA 13.0 toolkit from PyPI into $toolkit"
    local tmp="$toolkit.partial"
    rm -rf "$tmp"
    mkdir -p "$tmp/wheels" "$tmp/unpacked"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --python-version 3.11 \
        -d "$tmp/wheels" "${wheels[@]}"
    for w in "$tmp"/wheels/*.whl; do
        python3 -m zipfile -e "$w" "$tmp/unpacked"
    done
    # Every wheel unpacks into nvidia/cu13/{bin,include,lib,nvvm}: that is the toolkit's layout.
    mv "$tmp/unpacked/nvidia/cu13" "$tmp/toolkit"
    chmod +x "$tmp"/toolkit/bin/* "$tmp"/toolkit/nvvm/bin/*
    # The linker looks for the unversioned names.
    for lib in cudart nvrtc cublas cublasLt curand; do
        local so
        so=$(cd "$tmp/toolkit/lib" && ls "lib$lib".so.* | grep -v alt | sort | head -n1)
        ln -sf "$so" "$tmp/toolkit/lib/lib$lib.so"
    done
    build_driver_stub "$tmp/toolkit"
    rm -rf "$tmp/wheels" "$tmp/unpacked"
    mv "$tmp/toolkit" "$toolkit"
    rm -rf "$tmp"
}

# libcuda.so.1 stub: one C function per driver entry point that cudarc declares.
build_driver_stub() {
    local dir="$1/lib/stubs"
    local sys
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs 2>/dev/null | head -n1)
    [ -f "$sys" ] || { echo "cuda-build: cudarc 0.19.10's driver bindings are not in cargo's registry (cargo fetch failed?)" >&2; exit 1; }
    mkdir -p "$dir"
    grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$sys" | sort -u |
        awk '{ printf "int %s(void) { return 34; }\n", $4 }' >"$dir/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/libcuda.so" "$dir/libcuda_stub.c"
    ln -sf libcuda.so "$dir/libcuda.so.1"
    log "driver stub: $(wc -l <"$dir/libcuda_stub.c") entry points in $dir/libcuda.so"
}

if [ ! -x "$toolkit/bin/nvcc" ]; then
    cargo fetch --locked
    install_toolkit
fi
export CUDA_HOME="$toolkit" CUDA_PATH="$toolkit"
export PATH="$toolkit/bin:$PATH"
export LIBRARY_PATH="$toolkit/lib:$toolkit/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
log "$(nvcc --version | tail -n2 | head -n1); kernels for sm_$CUDA_COMPUTE_CAP"

log "cargo build --release --features cuda (m31r-train, m31rd, m31r)"
cargo build --release --locked --features cuda \
    -p m31r-train -p m31r-daemon -p m31r-cli
mkdir -p "$out"
for bin in m31r-train m31rd m31r; do
    cp "$target_dir/release/$bin" "$out/$bin"
done
log "built in $(($(date +%s) - start)) s:"
ls -l "$out"
