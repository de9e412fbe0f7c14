#!/usr/bin/env bash
# Trains, evaluates and exports a model on one NVIDIA GPU in a fixed wall-clock budget, from a
# carry directory small enough for a lent machine (docs/gpu.md has the whole sequence).
#
#   bash scripts/gpu-train.sh pack [DATA] [CARRY]   # here: the CUDA binary + the data, compressed
#   bash scripts/gpu-train.sh run CARRY OUT         # there: prepare, train, eval, export into OUT
#   bash scripts/gpu-train.sh unpack OUT BUNDLE     # here: reassemble the returned bundle
#
# pack: CARRY (default runs/gpu/carry) gets bin/m31r-train.xz and bin/m31r.xz (target/cuda/,
#   from scripts/cuda-build.sh, stripped) and data.tar.xz: the data directory DATA (default
#   runs/gpu/data) without its shards, which `run` rebuilds (u16 shards hardly compress; the
#   corpus text does, 6-7 times).
# run: unpacks, runs `prepare`, times a few training steps, sizes the run to TRAIN_SECONDS,
#   trains with checkpoints, exports a quantized bundle, then evaluates the f32 one and runs
#   `m31r bench` on it (the serving engine's keystroke latency and decode speed on the device);
#   every stage's output and a log go to OUT (at most 8 files of at most 15 MiB: the bundle is
#   split). A stage that fails stops the run with what was done so far in OUT.
# unpack: joins the bundle's parts and checks the bundle's checksums (`m31r-train` verifies
#   them when it loads).
#
# Environment for `run` (defaults for an H100/H200 and the `small` preset):
#   CONFIG=small  DEVICE=cuda  PRECISION=bf16  TRAIN_SECONDS=330  EVAL_ITEMS=400  EVAL_SECONDS=150
#   BENCH_SECONDS=90  QUANTIZE=q4_k  WORK=(a new temporary directory)
#   BIN, CLI_BIN=(m31r-train and m31r from CARRY/bin, unpacked)
#   STOP_AFTER=calibrate: stop after timing the step. With the same WORK, a later `run` reuses
#   the prepared data and the timing.
# The same script runs on a CPU (DEVICE=cpu CONFIG=tiny BIN=target/release/m31r-train CLI_BIN=...)
# up to the device boundary: that is how it is tested.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
start=$(date +%s)
log() { printf '[gpu-train %4ds] %s\n' "$(($(date +%s) - start))" "$*" | tee -a "${LOG:-/dev/null}" >&2; }
die() { log "error: $*"; exit 1; }

pack() {
    local data="${1:-$root/runs/gpu/data}" carry="${2:-$root/runs/gpu/carry}"
    local bin="${BIN:-$root/target/cuda/m31r-train}" cli="${CLI_BIN:-$root/target/cuda/m31r}"
    [ -x "$bin" ] && [ -x "$cli" ] || die "no CUDA binaries at $bin and $cli: run scripts/cuda-build.sh first"
    [ -f "$data/documents.bin" ] && [ -f "$data/tokenizer.json" ] ||
        die "$data is not a data directory with a tokenizer (corpus, then tokenizer --config small)"
    rm -rf "$carry"
    mkdir -p "$carry/bin"
    # Stripped, a CUDA binary is about 67 MB, most of it candle's kernels; xz takes it to 9.
    cp "$bin" "$carry/bin/m31r-train"
    cp "$cli" "$carry/bin/m31r"
    strip "$carry/bin/m31r-train" "$carry/bin/m31r"
    xz -T0 -6 "$carry/bin/m31r-train" "$carry/bin/m31r"
    log "packing $data (without shards) with xz"
    tar -C "$data" --exclude=./shards -cf - . | xz -T0 -6 >"$carry/data.tar.xz"
    du -ab "$carry" | sort -n | tail -n 4 >&2
    local total
    total=$(du -sb "$carry" | cut -f1)
    [ "$total" -le $((60 << 20)) ] || die "carry is $((total >> 20)) MiB, over the 60 MiB a lent machine takes"
    log "carry ready: $carry ($((total >> 20)) MiB)"
}

# The CUDA libraries candle links (cuBLAS, cuBLASLt, cuRAND, NVRTC, the runtime): a CUDA 13
# toolkit's or a PyTorch installation's wheels.
find_cuda_libs() {
    local dirs
    dirs=$(python3 -c 'import nvidia, os; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' 2>/dev/null || true)
    for d in $dirs /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/targets/x86_64-linux/lib; do
        if [ -e "$d/libcublas.so.13" ]; then
            echo "$d"
            return
        fi
    done
    find / -xdev -name 'libcublas.so.13' -printf '%h\n' -quit 2>/dev/null || true
}

run() {
    local carry="${1:?usage: gpu-train.sh run CARRY OUT}" out="${2:?usage: gpu-train.sh run CARRY OUT}"
    local config="${CONFIG:-small}" device="${DEVICE:-cuda}" precision="${PRECISION:-bf16}"
    local train_seconds="${TRAIN_SECONDS:-330}" items="${EVAL_ITEMS:-400}" quantize="${QUANTIZE:-q4_k}"
    local work="${WORK:-$(mktemp -d)}"
    local bin="${BIN:-$work/m31r-train}" cli="${CLI_BIN:-$work/m31r}"
    mkdir -p "$out" "$work"
    LOG="$out/gpu-train.log"
    : >"$LOG"
    if [ -z "${BIN:-}" ]; then
        xz -dc "$carry/bin/m31r-train.xz" >"$bin"
        chmod +x "$bin"
    fi
    if [ -z "${CLI_BIN:-}" ]; then
        xz -dc "$carry/bin/m31r.xz" >"$cli"
        chmod +x "$cli"
    fi
    log "config $config, device $device, precision $precision, $train_seconds s of training, work $work"
    if [ "$device" != cpu ]; then
        local libs
        libs=$(find_cuda_libs)
        [ -n "$libs" ] || die "no libcublas.so.13 on this machine (a CUDA 13 toolkit or PyTorch's nvidia wheels)"
        export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        log "CUDA libraries from $libs"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" >&2 || true
    fi
    local data="$work/data"
    if [ -f "$data/shards/index.json" ]; then
        log "reusing the prepared data in $data"
    else
        rm -rf "$data"
        mkdir -p "$data"
        xz -dc -T0 "$carry/data.tar.xz" | tar -C "$data" -xf -
        log "unpacked the data"
        "$bin" prepare --data "$data" --config "$config" 2>&1 | tail -n 3 | tee -a "$LOG" >&2
        log "prepared the shards"
    fi

    # The run's config: the preset's, on this device and precision, with steps set below.
    local base="$root/configs/train/$config.toml" cfg="$work/train.toml"
    [ -f "$base" ] || die "no config $base"
    make_config() { # steps warmup every log_every
        sed -e "s/^steps = .*/steps = $1/" -e "s/^warmup_steps = .*/warmup_steps = $2/" \
            -e "s/^device = .*/device = \"$device\"/" -e "s/^eval_every = .*/eval_every = $3/" \
            -e "s/^checkpoint_every = .*/checkpoint_every = $3/" -e "s/^log_every = .*/log_every = $4/" \
            -e "s/^eval_batches = .*/eval_batches = 8/" -e "/^precision = /d" "$base" >"$cfg"
        echo "precision = \"$precision\"" >>"$cfg"
    }

    # Time a few steps (the first pays for loading the kernels), then size the run to the rest.
    if [ ! -f "$work/calibrate/metrics.jsonl" ]; then
        make_config 8 2 8 2
        local t0
        t0=$(date +%s)
        rm -rf "$work/calibrate"
        "$bin" train --data "$data" --config "$cfg" --run-dir "$work/calibrate" 2>>"$LOG" >/dev/null ||
            die "the calibration run failed (see $LOG)"
        log "calibration took $(($(date +%s) - t0)) s"
    fi
    local rate tokens_per_step
    rate=$(tail -n 2 "$work/calibrate/metrics.jsonl" | python3 -c 'import json,sys
r=[json.loads(l).get("tokens_per_s") for l in sys.stdin]; print(int(min(x for x in r if x)))')
    tokens_per_step=$(python3 -c 'import json,sys; t=json.load(open(sys.argv[1]))["train"]; print(t["batch_size"]*t["seq_len"]*t["grad_accum"])' "$work/calibrate/run.json")
    local steps=$((train_seconds * rate / tokens_per_step))
    [ "$steps" -ge 20 ] || steps=20
    log "calibration: $rate tokens/s at $tokens_per_step tokens/step; $train_seconds s is $steps steps"
    if [ "${STOP_AFTER:-}" = calibrate ]; then
        log "stopping after the calibration (STOP_AFTER=calibrate)"
        return
    fi
    make_config "$steps" $((steps / 20 + 1)) $((steps / 4 + 1)) $((steps / 40 + 1))
    cp "$cfg" "$out/train.toml"

    local run_dir="$work/run"
    rm -rf "$run_dir"
    local t1
    t1=$(date +%s)
    "$bin" train --data "$data" --config "$cfg" --run-dir "$run_dir" 2>&1 |
        grep -v '^\s*$' | tail -n 25 | tee -a "$LOG" >&2 || true
    cp "$run_dir/metrics.jsonl" "$out/metrics.jsonl" 2>/dev/null || true
    [ -n "$(ls "$run_dir/checkpoints" 2>/dev/null)" ] || die "training left no checkpoint"
    log "trained in $(($(date +%s) - t1)) s"

    # The bundle first (the eval may run out of time), quantized to come back in parts.
    local q
    for q in "$quantize" q4_0 q8_0; do
        rm -rf "$work/bundle"
        if "$bin" export "$run_dir" --data "$data" --out "$work/bundle" --quantize "$q" >>"$LOG" 2>&1; then
            log "exported a $q bundle"
            break
        fi
        log "export --quantize $q failed; trying the next"
    done
    [ -d "$work/bundle" ] || die "no bundle exported"
    tar -C "$work" -cf - bundle | split -b 15M -d - "$out/bundle.tar.part-"

    "$bin" export "$run_dir" --data "$data" --out "$work/bundle-plain" 2>&1 | tail -n 2 | tee -a "$LOG" >&2
    timeout "${EVAL_SECONDS:-150}" "$bin" eval --bundle "$work/bundle-plain" --data "$data" \
        --items "$items" --device "$device" --out "$out/eval.json" 2>>"$LOG" | tee -a "$LOG" >&2 ||
        log "eval failed or ran out of its ${EVAL_SECONDS:-150} s (see above)"
    # The serving engine on the device: start-up, cold prefill, keystroke latency, decode.
    timeout "${BENCH_SECONDS:-90}" "$cli" bench --bundle "$work/bundle-plain" --device "$device" \
        --quick 2>&1 | tee -a "$LOG" >&2 || log "m31r bench failed or ran out of its ${BENCH_SECONDS:-90} s"
    ls -l "$out" | tee -a "$LOG" >&2
    log "done"
}

unpack() {
    local out="${1:?usage: gpu-train.sh unpack OUT BUNDLE}" dest="${2:?usage: gpu-train.sh unpack OUT BUNDLE}"
    [ ! -e "$dest" ] || die "$dest exists"
    local tmp
    tmp=$(mktemp -d)
    cat "$out"/bundle.tar.part-* | tar -C "$tmp" -xf -
    (cd "$tmp/bundle" && sha256sum -c --quiet checksum.txt) || die "the returned bundle fails its checksums"
    mv "$tmp/bundle" "$dest"
    log "bundle at $dest (checksums verified)"
}

case "${1:-}" in
    pack | run | unpack)
        cmd=$1
        shift
        "$cmd" "$@"
        ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | grep -v '^set' | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
