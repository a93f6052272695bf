#!/usr/bin/env bash
# One device call for the hopper backend (issue 14): its tests, then timings; logs to $OUT, a short table last.
# Usage (repo root, GPU machine): bash scripts/hopper_device_run.sh [all|backward]
#   all: tests/test_hopper.py; the forward's spec variants at the headline rows; `flashsdpa bench --quick`
#        (hopper forward + its chosen backward against cuDNN, fwd and bwd); the backward alone (Gluon, triton, cuDNN)
#   backward: the backward tests and the backward timings only
# The Gluon backward's tests run apart, under their own time limit (a kernel that hangs costs only them).
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODE=${1:-all}
git log -1 --oneline 2>/dev/null | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/device.txt"
PYTEST="python3 -m pytest -q -p no:cacheprovider -n 12 --durations=5 tests/test_hopper.py"
if [ "$MODE" = all ]; then
  timeout 120 $PYTEST -k "not gluon_backward" > "$OUT/pytest_forward.log" 2>&1; echo "forward tests rc=$?"
fi
timeout 120 $PYTEST -k "gluon_backward" > "$OUT/pytest_backward.log" 2>&1; echo "backward tests rc=$?"
timeout 120 python3 scripts/bench_hopper_gpu.py --backward > "$OUT/backward.log" 2>&1
if [ "$MODE" = all ]; then
  timeout 100 python3 -m flashsdpa.cli bench --quick --flex off --out "$OUT/bench" > "$OUT/bench.log" 2>&1
  timeout 120 python3 scripts/bench_hopper_gpu.py --skip-accuracy --variants per-tile,persistent,pingpong --no-flex \
    > "$OUT/forward.log" 2>&1
fi
for log in pytest_forward pytest_backward; do
  [ -f "$OUT/$log.log" ] && { echo "== $log"; grep -E "^FAILED|^ERROR|Error|error" "$OUT/$log.log" | head -12; tail -1 "$OUT/$log.log"; }
done
for log in backward bench forward; do [ -f "$OUT/$log.log" ] && { echo "== $log"; tail -32 "$OUT/$log.log"; }; done
true
