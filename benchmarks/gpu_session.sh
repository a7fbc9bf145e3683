#!/usr/bin/env bash
# One device call for the kernel and speed work of issues 9 and 10 (no stage bundle needed: the GPU
# image's torch, transformers, triton and pytest suffice; models are random of the SmolLM2-135M shape).
#   bash benchmarks/gpu_session.sh        (on the device machine; everything lands under $OUT)
# Each part has its own time limit, so one slow part cannot take the others' results with it.
set -uo pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${T_TESTS:-100} python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/zebra/test_decode.py \
    tests/zebra/test_cache.py tests/zebra/test_mamba2.py tests/zebra/test_mla.py tests/zebra/test_modeling.py \
    tests/zebra/test_compile.py 2>&1 | grep -v "^SKIPPED\|PASSED" | tail -30 | tee "$OUT/gpu_tests.txt"
timeout ${T_TRAIN:-90} python3 -m benchmarks.train_step --out "$OUT/train_step.json" 2>&1 | tail -16 | tee "$OUT/train_step.txt"
timeout ${T_COMPILE:-140} python3 -m benchmarks.train_step --compile --models transformer hybrid_triton \
    --out "$OUT/train_step_compile.json" 2>&1 | tail -8 | tee "$OUT/train_step_compile.txt"
timeout ${T_DECODE:-220} python3 -m benchmarks.decode --random smollm2 --contexts 16384 --batch 16 --gen 64 --repeats 2 \
    --no-hf-compile --out "$OUT/decode.json" ${DECODE_ARGS:-} 2>&1 | tail -24 | tee "$OUT/decode.txt"
