#!/usr/bin/env bash
# The runs benchmarks/README.md's Pending list asks for, most wanted first, each a device call on one warm machine:
# `auto` (`targets` on an H200, else `verify_rest`); `verify` (every GPU test, the catalog job's phases;
# `verify_rest` its steps after the first two, which ran 2026-12-07); `targets` (#25's figures, for an H200);
# `threads` (`dr bench job` with one compile thread, run 2026-12-07 after the default's); `next3` (2026-12-07's
# eighth session: the compile's FX trace, 16-position blocks, the catalog phases, a warm build's recompiles);
# `catalog` (`dr bench job --mix catalog`: the pool sized alike in its jobs); `stored` (2026-12-07's ninth session:
# start-up with compiled forms stored whole, model/engine/compile_cache.py, against Dynamo tracing again; the GPU
# tests; a warm `dr bench job`; then `load`); `load` (a full-size checkpoint set loaded from disk, as `dr infer`
# does, then `dr infer` itself in fresh processes on two datasets: benchmarks/profiling/second_process.py); `why`
# (2026-12-07's tenth session: the engine alone and its phases on long and varied prompts at 512 slots); `overhead`
# (2026-12-07's eleventh: a `dr infer` process's collector and teardown, benchmarks/profiling/process_overhead.py);
# `mended` (2026-12-08's twelfth and thirteenth: stored forms refused and why, the weights read early or copied in
# threads, `dr infer` again).
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
# Bytecode. A process that finds none for the modules it imports compiles them all: on this project's CPU the
# loader's imports took 10.8-13.5 s so against 4.0-5.5 s (results/2026-12-07-cpu-imports-bytecode/), the 11.4-12.9 s
# an H100's host took in every fresh process (results/2026-12-07-h100-load-second-process/). What the device has is
# recorded first (without importing anything); then every process reads and writes bytecode in a folder of its own,
# so only the first pays, as on a user's pip install (pip compiles at install).
python3 - >"$OUT/bytecode.txt" 2>&1 <<'PY'
import importlib.util, os, sys
print("dont_write_bytecode", sys.flags.dont_write_bytecode, "PYTHONDONTWRITEBYTECODE",
      os.environ.get("PYTHONDONTWRITEBYTECODE"), "pycache_prefix", sys.pycache_prefix, sys.version)
for name in ("torch", "transformers", "peft", "typer"):
    origin = importlib.util.find_spec(name).origin
    cached = importlib.util.cache_from_source(origin)
    print(name, origin, "bytecode:", os.path.exists(cached), "folder writable:", os.access(os.path.dirname(origin), os.W_OK))
PY
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
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
MODE=${1:-1}
if [[ $MODE == auto ]]; then
    MODE=stored
    echo "mode $MODE" | tee -a "$OUT/steps.txt"
fi
if [[ $MODE == next3 ]] && grep -q H200 "$OUT/device.txt"; then  # an H200's first use is #25's figures
    MODE=targets
    echo "mode $MODE" | tee -a "$OUT/steps.txt"
fi
case $MODE in
stored)
    # a fresh machine's first process compiles cold and stores each compiled function whole; the second loads them
    # (no Dynamo trace: 7.0 s of a warm build at 512 slots on an H100 before); then one that traces again
    # (STORE_FORMS False, Inductor's cache warm), so the warm build each way is timed on one machine; then every GPU
    # test (the new one first: a second process's loaded engine decodes the first's ids), then `load` if time is left
    step startup_cold 150 python3 benchmarks/profiling/startup.py "$OUT/startup_cold.json" --slots 512
    step startup_warm 80 python3 benchmarks/profiling/startup.py "$OUT/startup_warm.json" --slots 512
    step startup_traced 120 patched model.engine.compile_cache.STORE_FORMS False benchmarks.profiling.startup \
        "$OUT/startup_traced.json" --slots 512
    # the stored forms' own GPU test first (it failed on torch 2.11 before 2026-12-07's tenth session), then the
    # rest: 22 tests took 240 s on an H100
    step gpu_test_stored 150 pytest -q tests/test_gpu.py -k second_process_loads
    step gpu_tests 330 pytest -q tests/test_gpu.py -k "not second_process_loads"
    ;;&
mended)
    # 2026-12-08's twelfth and thirteenth sessions: why a warm process still compiled 2 of its 5 forms (its stored
    # forms refused: each refusal's reason, results/2026-12-08-h100-stored-and-load/); the LLaMA weights read onto the
    # card while the model's packages import (model/io/early_read.py) against read in the load and copied by 4 or 1
    # threads (model/io/transfer.py converted), in turns; then `dr infer` from a process's start
    # #25's 10 s first (it writes the full-size set the loads share), so that a call the device cuts short has it
    step second_process 260 python3 benchmarks/profiling/second_process.py "$OUT/second_process.json"
    step gpu_test_stored 150 pytest -q tests/test_gpu.py -k "second_process_loads or onto_the_card or early_read"
    step model_load 160 python3 benchmarks/profiling/model_load.py "$OUT/model_load.json" --repeats 2 \
        --arms early/4,late/4,early/8,late/1
    step startup_cold 100 python3 benchmarks/profiling/startup.py "$OUT/startup_cold.json" --slots 512
    step startup_warm 40 python3 benchmarks/profiling/startup.py "$OUT/startup_warm.json" --slots 512
    ;;
why)
    # where the engine alone's time goes on long and varied prompts at 512 slots, after its own figures (#25's
    # targets there: 12,000 useful tok/s; an H200 reached 8,883 and 11,103, its floor in benchmarks/README.md)
    step engine 170 dr "${ENGINE[@]}" --out "$OUT/engine.json"
    step engine_phases 200 python3 benchmarks/profiling/engine_phases.py "$OUT/engine_phases.json" \
        --prompts long,varied --slots 512
    ;;&
stored | load)
    # what loading a full-size checkpoint set from disk costs a `dr infer` process (18 GB written to /tmp once;
    # `dr bench job` builds its weights in place and leaves this out); then the real command in fresh processes on
    # that set: MusicCaps-shaped datasets A, B (another dataset: #25's second process, first answers within 10 s)
    # and A again with its features cached
    # what a `dr infer` process's imports spend their time on, each module's own and cumulative microseconds, twice:
    # 11.4-12.9 s on an H100's host before (results/2026-12-07-h100-load-second-process/); with PYTHONPYCACHEPREFIX
    # (above) the first process that imports them writes their bytecode and the second should take this CPU's 4-5 s
    for n in 1 2; do
        step importtime_$n 60 python3 -X importtime -c \
            "from deepresonance_cli.infer import load; from model.network import checkpoint, deepresonance"
    done
    step model_load 240 python3 benchmarks/profiling/model_load.py "$OUT/model_load.json" --repeats 3
    step second_process 300 python3 benchmarks/profiling/second_process.py "$OUT/second_process.json"
    ;;&
load | overhead)
    # dr's entry point (deepresonance_cli/process.py: the collector's threshold, exit_now) against Python's default
    # collector and teardown, each in fresh full-size `dr infer` processes on the set above (tiny on this project's
    # CPU: 7.61 s a process before, 4.83 s with both, results/2026-12-07-cpu-process-overhead/)
    step process_overhead 300 python3 benchmarks/profiling/process_overhead.py "$OUT/process_overhead.json" \
        --rows 128 --repeats 2
    ;;
verify)
    # the GPU tests 2026-12-07's `next` and `next2` left unrun (they stopped at the graphs' test: the host's
    # bfloat16 rounding) and those of the code the graphs' removal touched, an engine's start-up cold and warm, then
    # every GPU test, then the catalog job's phases (the second media group came 6.3-6.7 s after the first in results/2026-12-07-h100-next-b/)
    step gpu_tests_new 100 pytest -q tests/test_gpu.py -k "bfloat16_on_the_host or queued or engine_job or media_load"
    # a warm catalog job of job_order.py's, whose decoding processes no longer import its main module
    # (model/io/worker_processes.py): its second media group 6.3-6.7 s after the first before
    step job_order 130 python3 benchmarks/profiling/job_order.py "$OUT/job_order.json" --repeats 1 --arm default
    ;;&
verify | verify_rest)
    # where a process's engine build goes (a warm MusicCaps job's first rows came 7.2 s in, its engine's build in
    # them; every `dr infer` job is the first of its process): a fresh machine's first process compiles cold, the
    # second loads from the compile cache
    step startup_cold 150 python3 benchmarks/profiling/startup.py "$OUT/startup_cold.json" --slots 512
    step startup_warm 100 python3 benchmarks/profiling/startup.py "$OUT/startup_warm.json" --slots 512
    step gpu_tests 200 pytest -q tests/test_gpu.py
    step phases_catalog 130 python3 benchmarks/profiling/job_phases.py "$OUT/phases_catalog.json" --mix catalog
    ;;
targets)
    # #25's figures (its targets are an H200's): `dr bench job` whole, then the engine alone by prompt shape and one
    # slot
    step job 260 dr bench job --out "$OUT/job.json"
    step engine 170 dr "${ENGINE[@]}" --out "$OUT/engine.json"
    ;;
next3)
    # torch 2.11's first Inductor compile and FX's process-wide patches (model/engine/compile_cache.py: trace_once;
    # the catalog phases' run of 2026-12-07 failed on them); the engine alone with 32- and 16-position cache blocks
    # in turns on one machine; the catalog job's phases again; where a warm engine build recompiles
    step compile_threads 240 pytest -q -m "slow or not slow" tests/test_compile_threads.py
    step engine 170 dr "${ENGINE[@]}" --out "$OUT/engine.json"
    step engine_block16 170 patched model.engine.kv_cache.BLOCK 16 deepresonance_cli.app "${ENGINE[@]}" \
        --out "$OUT/engine_block16.json"
    step phases_catalog 130 python3 benchmarks/profiling/job_phases.py "$OUT/phases_catalog.json" --mix catalog
    step startup_recompiles 60 env TORCH_LOGS=recompiles python3 benchmarks/profiling/startup.py \
        "$OUT/startup_recompiles.json" --slots 512
    ;;
catalog)
    # the catalog job alone: with a pool sized from the card's memory beyond the weights, its run with features
    # cached loads the step its fresh run compiled (on an H200 the two pools had differed by a block step)
    step job_catalog 200 dr bench job --mix catalog --out "$OUT/job_catalog.json"
    ;;
threads)
    # what Inductor's compile workers cost a warm job (Pending 2): `dr bench job` with one compile thread, on the
    # machine that has just run `next2`'s `dr bench job` with the default (the compile cache warm for both)
    step job_threads1 280 env TORCHINDUCTOR_COMPILE_THREADS=1 python3 -m deepresonance_cli.app bench job \
        --out "$OUT/job_threads1.json"
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
