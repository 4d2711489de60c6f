source .dev/common.sh
use new
step phases_musiccaps 100 python3 benchmarks/profiling/job_phases.py $OUT/phases_musiccaps.json --mix musiccaps
step engine 200 python3 -m deepresonance_cli.app bench engine --rows 2048 --only-engine --prompts short,long,varied --out $OUT/engine.json
cd $OUT && tar czf all.tgz --remove-files $(ls | grep -v all.tgz); cd - >/dev/null
