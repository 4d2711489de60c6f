python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
step() { local name=$1; shift; local t0=$(date +%s.%N); "$@" > $OUT/$name.txt 2>&1; local rc=$?; echo "$name rc=$rc $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s: $*" | tee -a $OUT/steps.txt; }
bench_job() { step $1 python3 -m deepresonance_cli.app bench job --out $OUT/$1.json; grep -E "whole job|engine alone" $OUT/$1.txt | head -4; }
