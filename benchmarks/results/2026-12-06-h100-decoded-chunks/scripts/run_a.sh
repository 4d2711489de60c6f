source .dev/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/device.txt; nproc | tee -a $OUT/device.txt
step transfer 120 python3 benchmarks/profiling/decoded_transfer.py $OUT/transfer.json --workers 16 --files 1024 --repeats 2
tail -8 $OUT/transfer.txt
new; job job_cold_new 200
new; job job_warm_new_1 130
old; job job_warm_old_1 130
new
