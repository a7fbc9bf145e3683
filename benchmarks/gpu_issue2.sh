#!/usr/bin/env bash
# GPU acceptance run (issue 2 point 6, issue 4 point 5) on the device machine, after the stage bundle
# is unpacked and /tmp/zebra-stage/env.sh sourced. Writes everything under ${OUT:-runs/gpu}.
set -uo pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
export ZEBRA_CACHE=/tmp/zebra-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python -m pytest -q -m gpu tests/kernels tests/zebra 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
python -m jobs.cli convert --teacher default --mla-layers 0,14,29 --kv-rank 128 --qk-rope-dim 32 \
    --calib-tokens 1024 --out /tmp/hybrid --json > "$OUT/convert.json" 2> "$OUT/convert.err"
TEACHER=$(python -c "from zebra.teacher import teacher_folder; print(teacher_folder('default'))")
python -m benchmarks.decode --teacher "$TEACHER" --hybrid /tmp/hybrid --contexts ${CONTEXTS:-1024 8192 32768} \
    --batch ${BATCH:-8} --gen ${GEN:-64} --repeats 2 --out "$OUT/decode.json" 2>&1 | tail -8 | tee "$OUT/decode.txt"
