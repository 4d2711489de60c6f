"""model/io/worker_processes.py: pool processes that start without importing the program's main module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MAIN = """
import heavy_stand_in  # a researcher's script importing what the workers never need (transformers, peft)
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import probe
from model.io.worker_processes import WithoutMainContext

if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=WithoutMainContext()) as pool:
        ours = pool.submit(probe.imported, "heavy_stand_in").result()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
        stock = pool.submit(probe.imported, "heavy_stand_in").result()
    print(ours, stock)
"""


@pytest.mark.parametrize("run_as", ["script", "module"])
def test_a_worker_does_not_import_the_main_module_a_stock_forkserver_worker_does(tmp_path, run_as):
    """Run as `python main.py` or `python -m main`, a program whose main module imports `heavy_stand_in`: a worker of
    WithoutMainContext has not imported it, a stock forkserver worker started after it in the same program has (what
    multiprocessing does, unchanged by the launch before it)."""
    (tmp_path / "main.py").write_text(MAIN)
    (tmp_path / "heavy_stand_in.py").write_text("")
    (tmp_path / "probe.py").write_text("import sys\n\ndef imported(name):\n    return name in sys.modules\n")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(tmp_path)])}
    command = [sys.executable, "main.py"] if run_as == "script" else [sys.executable, "-m", "main"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]
