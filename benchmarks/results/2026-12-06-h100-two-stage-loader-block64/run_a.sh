. .dev/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/device.txt; command -v patch
step gpu_tests python3 -m pytest -q -x tests/test_gpu.py -k "engine or packed or stream"; tail -1 $OUT/gpu_tests.txt
bench_job job_cold
bench_job job_warm
patch -R -p1 < .dev/pipeline.patch > $OUT/patch.txt && bench_job job_warm_before_one_loader_thread
patch -p1 < .dev/pipeline.patch >> $OUT/patch.txt
