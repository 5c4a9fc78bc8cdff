#!/bin/bash
# bench/gpu.py on a bare GPU machine whose python3 has torch, transformers and safetensors but not
# diffusers/pydantic: those come as wheels from .whl/ (see bench/RESULTS.md, "Running it"), and the
# fusedit package is laid out under /tmp/pkg from this tree (setuptools maps fusedit -> cli/ etc.).
# Then, when TRAIN_LOOP_TIMEOUT > 0, bench/train_loop.py (the real trainer per loop setting, tiny shapes).
# Usage: [OUT=dir] [BENCH_BUDGET=330] [BENCH_TIMEOUT=450] [TRAIN_LOOP_TIMEOUT=0] bash bench/gpu_device.sh [gpu.py options]
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
if ! python3 -c "import diffusers, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "no usable wheels in .whl/ (carry it)"; exit 3; }
  export PYTHONPATH=/tmp/site
fi
if ! python3 -c "import fusedit.model.transformer" 2>/dev/null; then
  rm -rf /tmp/pkg && mkdir -p /tmp/pkg/fusedit && cp -r cli/. /tmp/pkg/fusedit/
  for d in model components pipelines; do cp -r "$d" "/tmp/pkg/fusedit/$d"; done
  export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
timeout "${BENCH_TIMEOUT:-450}" python3 bench/gpu.py --budget-s "${BENCH_BUDGET:-330}" --json "$OUT/gpu.json" "$@" 2>&1 \
  | tee "$OUT/gpu.txt" | grep -v -i "warn"
if [ "${TRAIN_LOOP_TIMEOUT:-0}" -gt 0 ]; then
  timeout "$TRAIN_LOOP_TIMEOUT" python3 bench/train_loop.py --steps 200 --warmup 20 2>&1 | tee "$OUT/train_loop.txt" \
    | grep -v -i "warn" | tail -8
fi
