#!/usr/bin/env bash
# The runs benchmarks/README.md's Pending list asks for, most wanted first, each a device call on one warm machine:
# `next` (warm catalog jobs in turns with the loader's stream ahead of the engine's, the catalog job's phases, the GPU
# tests not reached yet), then `next2` (every GPU test, `dr bench job`, the engine alone, 32- against 16-position
# blocks in the step's kernels).
# Older runs: `1` and `2 [SECONDS]` (`1b`: 1 without the prefill alone), `fresh` (a cold job, then both warm jobs of
# 2) and `rest` (the rest of 2). Carry the wheels in .whl (the device's README). Each step has a time limit (H100
# timings of 2026-12-06/07), and a step that would run past the call's own limit (570 s, or the second argument) is
# skipped and listed as such. Results go to $OUT, one file a command, with steps.txt timing each, all of them packed
# into $OUT/all.tgz after each step (a call brings back at most 8 files).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.:tests PYTHONUNBUFFERED=1
LIMIT=${2:-570}
dr() { python3 -m deepresonance_cli.app "$@"; }
# `patched MODULE.NAME VALUE MODULE2 ARGS...`: MODULE2 run as __main__ with MODULE.NAME set to VALUE first
patched() {
    local setting=$1 value=$2 module=$3
    shift 3
    python3 -c "import runpy, ${setting%.*} as m; m.${setting##*.} = $value; runpy.run_module('$module', run_name='__main__')" "$@"
}
# packed prefills through one compiled layer (a job of any size: COMPILE_PREFILL_POSITIONS 0), or through the eager
# layers (COMPILE_PREFILL False)
compiled_prefill() { patched model.engine.model_runner.COMPILE_PREFILL_POSITIONS 0 "$@"; }  # a job of any size
eager_prefill() { patched model.engine.model_runner.COMPILE_PREFILL False "$@"; }
step() {
    local name=$1 most=$2 start=$SECONDS
    shift 2
    if ((SECONDS + most > LIMIT)); then
        echo "$name skipped: $most s would pass the call's $LIMIT s ($SECONDS s gone): $*" | tee -a "$OUT/steps.txt"
        return
    fi
    timeout "$most" bash -c '"$@"' bash "$@" >"$OUT/$name.txt" 2>&1
    echo "$name rc=$? $((SECONDS - start)) s: $*" | tee -a "$OUT/steps.txt"
    pack
}
# every file so far in $OUT/all.tgz, after each step: a call cut short by the device still brings back the steps done
pack() { (cd "$OUT" && tar czf /tmp/all.tgz --exclude all.tgz . ; mv /tmp/all.tgz all.tgz); }
export -f dr patched compiled_prefill eager_prefill
ENGINE=(bench engine --rows 2048 --only-engine --prompts short,long,varied)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
case ${1:-1} in
queue)
    # the encoder's calls queued one ahead of their read-back (model/media/encoding.py) against each read back at
    # once, warm catalog jobs in turns (REPEATS a side, default 2), each run's loader clocks and groups' times; its
    # GPU test first
    step gpu_tests_queue 70 pytest -q -x tests/test_gpu.py -k queued
    step job_order_queue $((90 + 80 * ${REPEATS:-2})) python3 benchmarks/profiling/job_order.py \
        "$OUT/job_order_queue.json" --repeats "${REPEATS:-2}" --arm default \
        --arm "read_back_each:model.media.encoding.QUEUE_AHEAD=False"
    ;;
next)
    # warm catalog jobs in turns, three a side: the loader's stream at a higher priority than the engine's against
    # the defaults (model/infer/job.py LOADER_PRIORITY; the last media came 20.6-25.6 s into 27-32 s jobs on
    # 2026-12-07 whatever thread or process did the loader's host work, each encoder call waiting for its GPU work
    # on a GPU the engine's steps share: results/2026-12-07-h100-loader-processes/); on a fresh machine its first job
    # compiles the step cold (about 40 s). The catalog mix's phases, with the lock probe; the GPU tests that
    # 32-position blocks have not reached (the paged engine's growth and preemption, the packed prefill) and the
    # job's own
    step job_order 320 python3 benchmarks/profiling/job_order.py "$OUT/job_order.json" --repeats 3 --arm default \
        --arm "loader_first:model.infer.job.LOADER_PRIORITY=-1"
    step phases_catalog 120 python3 benchmarks/profiling/job_phases.py "$OUT/phases_catalog.json" --mix catalog
    step gpu_tests 110 pytest -q -x tests/test_gpu.py -k "paged or packed or media_load or engine_job"
    ;;
next2)
    # every GPU test; `dr bench job`, both mixes (its second figure, the job with its features cached, is where the
    # loader's work in the decoding processes should show); the engine alone on every shape with 32-position blocks,
    # one slot included; the 512-row steps' kernels with blocks of 32 against 16
    step gpu_tests 240 pytest -q -x tests/test_gpu.py
    step job 180 dr bench job --out "$OUT/job.json"
    step engine 130 dr "${ENGINE[@]}" --out "$OUT/engine.json"
    step paged_step_512 70 python3 benchmarks/profiling/paged_step.py --slots 512 --prompt 17 --budget 64 \
        --kernels flex,flex/16
    step paged_step_long 80 python3 benchmarks/profiling/paged_step.py --slots 512 --prompt 170 --budget 96 \
        --kernels flex,flex/16
    ;;
1)
    # the prefill alone, eager against compiled: the first process compiles the layer cold, the second loads it
    step prefill_speed_cold 150 python3 benchmarks/profiling/prefill_speed.py "$OUT/prefill_speed_cold.json"
    step prefill_speed_warm 100 python3 benchmarks/profiling/prefill_speed.py "$OUT/prefill_speed_warm.json"
    ;;&
1 | 1b)
    step gpu_tests 120 compiled_prefill pytest -q -x tests/test_gpu.py -k "packed or refill or engine_job"
    # on a fresh machine the first 7B engine process: its start-up compiles the step from a cold cache
    step engine 160 compiled_prefill deepresonance_cli.app "${ENGINE[@]}" --out "$OUT/engine.json"
    step engine_eager_prefill 160 eager_prefill deepresonance_cli.app "${ENGINE[@]}" --out "$OUT/engine_eager_prefill.json"
    step job 220 compiled_prefill deepresonance_cli.app bench job --out "$OUT/job.json"
    ;;
fresh)
    # on a fresh machine: the first job process compiles the step and the prefill's layer (cold), then a warm job
    # process each way
    step job_cold 220 compiled_prefill deepresonance_cli.app bench job --out "$OUT/job_cold.json"
    ;;&
2 | fresh)
    step job_eager_prefill 150 eager_prefill deepresonance_cli.app bench job --out "$OUT/job_eager_prefill.json"
    step job_2 150 compiled_prefill deepresonance_cli.app bench job --out "$OUT/job_2.json"
    ;;&
2 | rest)
    step engine 160 dr "${ENGINE[@]}" --out "$OUT/engine.json"
    step phases_musiccaps 70 python3 benchmarks/profiling/job_phases.py "$OUT/phases_musiccaps.json"
    step engine_phases_long 120 compiled_prefill benchmarks.profiling.engine_phases "$OUT/engine_phases_long.json" \
        --prompts long --slots 512
    step engine_phases_long_eager_prefill 120 eager_prefill benchmarks.profiling.engine_phases \
        "$OUT/engine_phases_long_eager_prefill.json" --prompts long --slots 512
    ;;
esac
pack
(cd "$OUT" && find . -mindepth 1 -not -name all.tgz -delete)
