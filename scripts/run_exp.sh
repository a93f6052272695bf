export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_gradient_precision.py tests/test_backward.py tests/test_masks.py > $OUT/pytest.log 2>&1; tail -1 $OUT/pytest.log; grep -E "^FAILED" $OUT/pytest.log | head
python3 scripts/bench_forward_gpu.py --decode-sweep --rows none --skip-correctness 2>&1 | grep "decode sweep" 
