python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo wheels failed; exit 1; }
export PYTHONPATH=/tmp/site:.:tests PYTHONUNBUFFERED=1
step() { local name=$1 lim=$2; shift 2; local t0=$SECONDS; timeout $lim "$@" > $OUT/$name.txt 2>&1; local rc=$?; echo "$name rc=$rc $((SECONDS - t0)) s: $*" | tee -a $OUT/steps.txt; }
job() { local name=$1 lim=$2; shift 2; step $name $lim python3 -m deepresonance_cli.app bench job --out $OUT/$name.json "$@"; grep -E "whole job|engine alone|first" $OUT/$name.txt | head -8; }
use() { cp .dev/$1/features.py model/media/; cp .dev/$1/encoder.py model/media/; cp .dev/$1/job.py model/infer/; }
