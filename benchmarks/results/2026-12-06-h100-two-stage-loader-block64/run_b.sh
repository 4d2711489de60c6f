. .dev/common.sh
patch -p1 < .dev/b64.patch > $OUT/patch.txt || exit 1
grep -n "^BLOCK" model/engine/kv_cache.py
step gpu_tests_block64 python3 -m pytest -q tests/test_gpu.py; tail -1 $OUT/gpu_tests_block64.txt
bench_job job_block64_first
bench_job job_block64_warm
