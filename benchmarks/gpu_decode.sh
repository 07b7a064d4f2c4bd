#!/usr/bin/env bash
# The decode study of docs/benchmarks.md on a GPU machine whose python3 has jax (CUDA) and transformers:
#   benchmarks/gpu_decode.sh [OUT_DIR]
# XLA's defaults with the parts timed apart, a profile and the decode variants; then the loop with
# command buffers for the whole loop (WHILE, CONDITIONAL) and with cuBLAS for every product (no Triton
# GEMMs), each its own process (XLA flags are read once a process). Writes OUT_DIR/decode.md, the
# traces and the decode loop's HLO.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/decode.md"
buffers=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION
study() {
    local seconds=$1 flags=$2; shift 2
    XLA_FLAGS="$flags" timeout "$seconds" python3 benchmarks/gpu_decode.py "$@" 2>&1 | grep -v "^W0000\|^I0000" \
        | tee -a "$out/decode.md"
}
study 260 "--xla_dump_to=/tmp/hlo --xla_dump_hlo_module_re=.*decode_program.*" \
    --micro --variants rows2 rows1 rows4 --profile "$out" --label base
study 120 "--xla_gpu_enable_command_buffer=$buffers,WHILE,CONDITIONAL" \
    --variants rows2 rows1 --profile "$out" --label while
study 100 "--xla_gpu_enable_triton_gemm=false" --variants rows2 rows1 --label cublas
(cd /tmp/hlo && tar czf "$out/hlo.tar.gz" $(ls | grep -e "after_optimizations.txt" -e thunk | head -20))
ls -la "$out"
