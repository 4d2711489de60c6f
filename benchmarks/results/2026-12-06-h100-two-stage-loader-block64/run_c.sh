. .dev/common.sh
bench_job job_warm_again
step engine python3 -m deepresonance_cli.app bench engine --rows 2048 --only-engine --prompts short,long,varied --out $OUT/engine.json; tail -12 $OUT/engine.txt
patch -p1 < .dev/b64.patch > $OUT/patch.txt || exit 1
step engine_block64 python3 -m deepresonance_cli.app bench engine --rows 2048 --only-engine --prompts short,long,varied --out $OUT/engine_block64.json; tail -12 $OUT/engine_block64.txt
