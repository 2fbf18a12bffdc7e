#!/usr/bin/env bash
# GPU checks in one timed pass: run on a machine with an NVIDIA GPU, with a dsopt binary built
# elsewhere (nothing is compiled here). Every step has its own time limit, so a step that stalls
# (kernel compilation, autotune) costs its own time limit and not the whole run; whatever finished
# is kept under $OUT.
#
# Build the binary on the development machine (no CUDA toolkit needed to build):
#   CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=/tmp/cudacheck \
#       cargo build --release --features cuda --bin dsopt
#   strip /tmp/cudacheck/release/dsopt && gzip -c /tmp/cudacheck/release/dsopt > dsopt.gz
# then, on the GPU machine, from the repository root:
#   DSOPT_GZ=dsopt.gz OUT=/some/dir bash scripts/gpu-check.sh [STEP...]
#
# Steps (default: all, in this order; each prints one line with its exit code and seconds):
#   info        dsopt info --json (which backends answer, which dtypes the report will use)
#   cal         calibration on CUDA (timing and memory chain)
#   mla-smoke   MLA smoke on CUDA in bf16 and on wgpu (Vulkan) in f16: equivalence in half precision
#   moe-smoke   MoE smoke on CUDA in bf16 (offload + prefetch, equivalence)
#   mla         the GPU MLA scenario (V2-Lite attention dims, 27 layers, bf16, 16 GiB budget)
#   moe         the GPU MoE scenario (13.0B total / 1.35B active, bf16, 24 GiB model offloaded under 8 GiB)
#   mtp         SC-002 on CUDA (batch 8, D = 3, the D x batch sweep). Training runs on the CPU
#               inside the binary (Autodiff<Flex>, ~4-5 min on 2 cores); to skip it on the GPU
#               machine, bring a checkpoint trained elsewhere: MTP_CACHE=<dir holding mtp-<hash>/>
#               (e.g. a copy of ~/.cache/dsopt, ~9 MB per checkpoint)
#   mtp-cpu     the same SC-002 benchmark on flex, on this machine's CPU cores (same checkpoint; not
#               in the default list). On a 2-core machine (one physical core) a batch-8 verify
#               step (32 rows) is far past the ridge (~6-10 rows); a many-core CPU moves the
#               ridge, and this step measures whether SC-002 then passes on a CPU.
#
# Environment: STEP_LIMIT_S (default 150) per step, MLA_LIMIT_S and MOE_LIMIT_S (default 240)
# for the two big scenarios; AUTOTUNE (default "balanced"; "minimal" sets
# CUBECL_AUTOTUNE_LEVEL=minimal, fewer candidate kernels to compile on first use). CubeCL's
# compilation and autotune log goes to $OUT/cubecl.log, DSOPT_TRACE lines to each step's log.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu-out}
mkdir -p "$OUT/reports"
BIN=${DSOPT_BIN:-}
if [ -z "$BIN" ]; then
    if [ -n "${DSOPT_GZ:-}" ]; then
        BIN=$(mktemp -d)/dsopt
        gunzip -c "$DSOPT_GZ" > "$BIN" && chmod +x "$BIN"
    else
        BIN=target/release/dsopt
    fi
fi
[ -x "$BIN" ] || { echo "no dsopt binary at $BIN (set DSOPT_BIN or DSOPT_GZ)" >&2; exit 2; }

export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH="$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
export DSOPT_TRACE=1
export CUBECL_DEBUG_LOG="$OUT/cubecl.log"
if [ "${AUTOTUNE:-balanced}" = minimal ]; then
    export CUBECL_AUTOTUNE_LEVEL=minimal
fi
STEP_LIMIT_S=${STEP_LIMIT_S:-150}
MLA_LIMIT_S=${MLA_LIMIT_S:-240}
MOE_LIMIT_S=${MOE_LIMIT_S:-240}

# step NAME LIMIT_S ARGS...: runs dsopt with a time limit, logs to $OUT/NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$BIN" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
}

run_step() {
    local r="--out $OUT/reports"
    case $1 in
        info) step info 60 info --json ;;
        cal) step cal "$STEP_LIMIT_S" bench calibrate --backend cuda $r ;;
        mla-smoke)
            step mla-smoke-cuda-bf16 "$STEP_LIMIT_S" bench mla --backend cuda --dtype bf16 \
                --scenario scenarios/gpu/sc001-mla-pool-smoke.toml $r
            step mla-smoke-wgpu-f16 "$STEP_LIMIT_S" bench mla --backend wgpu --dtype f16 \
                --scenario scenarios/gpu/sc001-mla-pool-smoke.toml $r
            ;;
        moe-smoke)
            step moe-smoke-cuda-bf16 "$STEP_LIMIT_S" bench moe --backend cuda --dtype bf16 \
                --scenario scenarios/smoke/sc003-moe-smoke.toml $r
            ;;
        mla) step mla-gpu "$MLA_LIMIT_S" bench mla --backend cuda --scenario scenarios/gpu/sc001-mla-gpu.toml $r ;;
        moe) step moe-gpu "$MOE_LIMIT_S" bench moe --backend cuda --scenario scenarios/gpu/sc003-moe-gpu.toml $r ;;
        mtp)
            DSOPT_CACHE=${MTP_CACHE:-$OUT/mtp-cache} step mtp-cuda "$MOE_LIMIT_S" bench mtp \
                --backend cuda $r
            ;;
        mtp-cpu)
            DSOPT_CACHE=${MTP_CACHE:-$OUT/mtp-cache} step mtp-flex "$STEP_LIMIT_S" bench mtp \
                --backend flex $r
            ;;
        *) echo "unknown step $1" >&2; return 2 ;;
    esac
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(info cal mla-smoke moe-smoke mla moe mtp)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1
for s in "${steps[@]}"; do
    run_step "$s"
done
echo "reports: $(ls "$OUT/reports" | wc -l) files in $OUT/reports"
