#!/usr/bin/env bash
# One device call: the test suite and `flashsdpa check` on CUDA.
# Run from the repo root on the GPU machine; logs go to $OUT.
# Usage: bash scripts/device_validate.sh [pytest args...]
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/device.txt"
timeout 300 python3 -m pytest -q -x -p no:cacheprovider -n 4 "$@" tests 2>&1 | tee "$OUT/pytest.log" | tail -15
timeout 120 python3 -m flashsdpa.cli check 2>&1 > "$OUT/check.log"; echo "check rc=$?"
grep -E "grad|FAIL|passed" "$OUT/check.log" | tail -40
