#!/usr/bin/env bash
# One device call for the hopper backend (issue 14): its tests, then timings; logs to $OUT, a short table last.
# Usage (repo root, GPU machine): bash scripts/hopper_device_run.sh [baseline|backward] [pytest args...]
#   baseline: tests/test_hopper.py, the forward's spec variants at the headline rows, `flashsdpa bench --quick`
#   backward: tests/test_hopper.py, the hopper backward against triton's and cuDNN's at the headline rows
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODE=${1:-baseline}; shift || true
git log -1 --oneline 2>/dev/null | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/device.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 --durations=5 "$@" tests/test_hopper.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"
case $MODE in
baseline)
  timeout 200 python3 scripts/bench_hopper_gpu.py --variants per-tile,persistent,pingpong --no-flex > "$OUT/forward.log" 2>&1
  timeout 150 python3 -m flashsdpa.cli bench --quick --flex off --out "$OUT/bench" > "$OUT/bench.log" 2>&1
  ;;
backward)
  timeout 240 python3 scripts/bench_hopper_gpu.py --backward --no-flex > "$OUT/backward.log" 2>&1
  ;;
esac
grep -E "^FAILED|^ERROR" "$OUT/pytest.log" | head -20
tail -1 "$OUT/pytest.log"
for log in forward backward bench; do [ -f "$OUT/$log.log" ] && { echo "== $log"; tail -40 "$OUT/$log.log"; }; done
