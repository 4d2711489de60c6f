# seconds for the loader's imports (as model_load.py's "imports"), Python's default collector, in fresh processes
imports() { python -c "
import time
t0 = time.perf_counter()
from deepresonance_cli.infer import load; from model.network import checkpoint, deepresonance
print(round(time.perf_counter() - t0, 2))"; }
export PYTHONPATH=.
for repeat in 1 2 3; do
    echo "repeat $repeat"
    echo "  bytecode as installed: $(PYTHONDONTWRITEBYTECODE=1 imports)"
    echo "  no bytecode anywhere (an empty PYTHONPYCACHEPREFIX, writes off): $(PYTHONDONTWRITEBYTECODE=1 PYTHONPYCACHEPREFIX=$(mktemp -d) imports)"
    prefix=$(mktemp -d)
    echo "  PYTHONPYCACHEPREFIX new, writes on, first process: $(unset PYTHONDONTWRITEBYTECODE; PYTHONPYCACHEPREFIX=$prefix imports)"
    echo "  the same PYTHONPYCACHEPREFIX, second process: $(unset PYTHONDONTWRITEBYTECODE; PYTHONPYCACHEPREFIX=$prefix imports)"
done
