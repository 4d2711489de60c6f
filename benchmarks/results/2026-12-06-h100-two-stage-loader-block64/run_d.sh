. .dev/common.sh
for mix in musiccaps catalog; do step phases_${mix}_two_stages python3 benchmarks/profiling/job_phases.py $OUT/phases_${mix}_two_stages.json --mix $mix --tag two-stages; done
patch -R -p1 < .dev/pipeline.patch > $OUT/patch.txt || exit 1
for mix in musiccaps catalog; do step phases_${mix}_one_thread python3 benchmarks/profiling/job_phases.py $OUT/phases_${mix}_one_thread.json --mix $mix --tag one-thread; done
