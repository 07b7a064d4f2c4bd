#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go, on a machine whose python3 has jax (CUDA), torch
# (CUDA), transformers and our other dependencies:   benchmarks/gpu.sh [OUT_DIR] [BATCH...]
# Writes OUT_DIR/generate_7b.md (7B-shaped bf16 generation, ours beside HF; batch 1 unless BATCH
# sizes are given), OUT_DIR/stream_7b.md (what streaming costs, 7B-shaped, batch 1) and
# OUT_DIR/attention.md (prefill attention, one layer). A generation run that fails with cuDNN
# attention is run again with LLAVA_NEXT_ATTENTION=xla.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
batches=${*:2}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__,
'torch', torch.__version__, 'transformers', transformers.__version__)"
generate() {
    timeout "$1" python3 benchmarks/generate_vs_hf.py --shape 7b --dtype bfloat16 --batch ${batches:-1} \
        --image-size 672 672 --new-tokens 128 --repeats 3 2>&1 | tee -a "$out/generate_7b.md"
}
generate 300 || { echo "# again with LLAVA_NEXT_ATTENTION=xla" | tee -a "$out/generate_7b.md" \
    && export LLAVA_NEXT_ATTENTION=xla && generate 200; }
timeout 180 python3 benchmarks/stream_overhead.py --shape 7b --dtype bfloat16 --image-size 672 672 --new-tokens 128 \
    --repeats 3 2>&1 | tee "$out/stream_7b.md"
timeout 90 python3 benchmarks/prefill_attention.py 2>&1 | tee "$out/attention.md"
