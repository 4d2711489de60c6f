source .dev/common.sh
use new; job catalog_new_1 95 --mix catalog
use old; job catalog_old_2 95 --mix catalog
use new; job catalog_new_2 95 --mix catalog
use old; job catalog_old_3 95 --mix catalog
use new
step phases_catalog 100 python3 benchmarks/profiling/job_phases.py $OUT/phases_catalog.json --mix catalog
cd $OUT && tar czf all.tgz --remove-files $(ls | grep -v all.tgz); cd - >/dev/null
