#!/usr/bin/env bash
# One device call (~6 minutes): the test suite and `flashsdpa check` on CUDA, side by side
# (both are mostly kernel compiles, which use the host's cores). Run from the repo root on
# the GPU machine; full logs go to $OUT, a summary last.
# Usage: bash scripts/device_validate.sh [pytest args...]
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/device.txt"
(timeout 280 python3 -m flashsdpa.cli check > "$OUT/check.log" 2>&1; echo "check rc=$?" >> "$OUT/check.log") &
timeout 300 python3 -m pytest -q -p no:cacheprovider -n 10 --durations=10 "$@" tests > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"
wait
grep -E "^FAILED|^ERROR" "$OUT/pytest.log" | head -30
tail -1 "$OUT/pytest.log"
grep -E "^grad.*triton|FAIL" "$OUT/check.log" | head -40
tail -2 "$OUT/check.log"
