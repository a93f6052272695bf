#!/usr/bin/env bash
# session 5, device call 5: validation at the final code, then the headline rows once more
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/site OUT=$OUT timeout 250 bash scripts/device_validate.sh > $OUT/validate.log 2>&1
PYTHONPATH=$PWD/src timeout 280 python -m flashsdpa.cli bench --cases 'main/bf16-d128-L4096,main/bf16-d128-L16384-causal,main/bf16-d64-L4096,main/bf16-d128-L1024,fp32/*' --flex static --budget-s 0 --out $OUT/bench > $OUT/bench.log 2>&1; echo bench rc=$?
tail -4 $OUT/validate.log
grep -E "^│|^┃|  main|  fp32" $OUT/bench.log
