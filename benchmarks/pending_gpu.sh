#!/usr/bin/env bash
# The runs benchmarks/README.md's Pending list asks for, in two device calls of under 600 s each (H100 timings of
# 2026-12-06): `bash benchmarks/pending_gpu.sh 1`, then `bash benchmarks/pending_gpu.sh 2` on the same warm machine.
# Carry the wheels in .whl (the device's README); results go to $OUT, one file a command, with steps.txt timing each.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.:tests PYTHONUNBUFFERED=1
dr() { python3 -m deepresonance_cli.app "$@"; }
step() {
    local name=$1 start=$SECONDS
    shift
    "$@" >"$OUT/$name.txt" 2>&1
    echo "$name rc=$? $((SECONDS - start)) s: $*" | tee -a "$OUT/steps.txt"
}
case ${1:-1} in
1)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
    step job_cold dr bench job --out "$OUT/job_cold.json"
    step decoder_start python3 benchmarks/profiling/decoder_start.py "$OUT/decoder_start.json" --workers 16
    step job_warm dr bench job --out "$OUT/job_warm.json"
    step engine dr bench engine --rows 2048 --only-engine --prompts short,long,varied --out "$OUT/engine.json"
    ;;
2)
    step job_warm_2 dr bench job --out "$OUT/job_warm_2.json"
    step job_warm_3 dr bench job --out "$OUT/job_warm_3.json"
    for mix in musiccaps catalog; do
        step "phases_$mix" python3 benchmarks/profiling/job_phases.py "$OUT/phases_$mix.json" --mix "$mix"
    done
    ;;
esac
