source .dev/common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/device.txt; nproc >> $OUT/device.txt; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> $OUT/device.txt; cat $OUT/device.txt
use new
step encoder_batch 150 python3 benchmarks/profiling/encoder_batch.py $OUT/encoder_batch.json
job job_cold 190
job job_warm_1 140
use old; job catalog_old_1 95 --mix catalog; use new
