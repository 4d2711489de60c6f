python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.:tests PYTHONUNBUFFERED=1
step() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $OUT/$name.txt 2>&1; local rc=$?; echo "$name rc=$rc $((SECONDS - t0)) s: $*" | tee -a $OUT/steps.txt; }
job() { step $1 $2 python3 -m deepresonance_cli.app bench job --out $OUT/$1.json; grep -E "whole job|engine alone" $OUT/$1.txt | head -6; }
old() { cp .dev/decoders_old.py model/media/decoders.py; }
new() { cp .dev/decoders_new.py model/media/decoders.py; }
