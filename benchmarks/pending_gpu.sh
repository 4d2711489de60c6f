#!/usr/bin/env bash
# The runs benchmarks/README.md's Pending list asks for, in two device calls of under 600 s each (H100 timings of
# 2026-12-06): `bash benchmarks/pending_gpu.sh 1`, then `bash benchmarks/pending_gpu.sh 2` on the same warm machine.
# Carry the wheels in .whl (the device's README); results go to $OUT, one file a command, with steps.txt timing each,
# then all of them packed into $OUT/all.tgz (a call brings back at most 8 files).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.:tests PYTHONUNBUFFERED=1
dr() { python3 -m deepresonance_cli.app "$@"; }
# the same command with the decoding processes at the job's own priority (before 2026-12-06's fourth session)
nice0() { python3 -c "import runpy, model.media.decoders as d; d.DECODER_NICE = 0; runpy.run_module('$1', run_name='__main__')" "${@:2}"; }
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
    for i in 1 2; do
        step "musiccaps_nice_$i" dr bench job --mix musiccaps --out "$OUT/musiccaps_nice_$i.json"
        step "musiccaps_nice0_$i" nice0 deepresonance_cli.app bench job --mix musiccaps --out "$OUT/musiccaps_nice0_$i.json"
    done
    step phases_musiccaps_nice python3 benchmarks/profiling/job_phases.py "$OUT/phases_musiccaps_nice.json"
    step phases_musiccaps_nice0 nice0 benchmarks.profiling.job_phases "$OUT/phases_musiccaps_nice0.json"
    ;;
2)
    step job_warm dr bench job --out "$OUT/job_warm.json"
    step engine dr bench engine --rows 2048 --only-engine --prompts short,long,varied --out "$OUT/engine.json"
    step phases_catalog python3 benchmarks/profiling/job_phases.py "$OUT/phases_catalog.json" --mix catalog
    for i in 1 2; do  # the second process is the warm start (the first compiles this script's own shapes)
        step "startup_$i" python3 benchmarks/profiling/startup.py "$OUT/startup_$i.json" --slots 512
    done
    ;;
esac
(cd "$OUT" && tar czf all.tgz --remove-files $(ls | grep -v all.tgz))
