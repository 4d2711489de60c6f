"""The `dr` shell: its commands are listed, and a GPU-only command says so on a machine without one."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from deepresonance_cli import __version__
from deepresonance_cli.app import app

runner = CliRunner()


def test_help_lists_every_command_group():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("ckpt", "data", "infer", "ask", "train", "eval", "demo", "bench", "version"):
        assert f" {command} " in result.output


def test_version():
    assert runner.invoke(app, ["version"]).output.strip() == f"dr {__version__}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is visible")
@pytest.mark.parametrize("command", ["infer", "engine", "train", "job"])
def test_bench_help_needs_no_gpu(command):
    result = runner.invoke(app, ["bench", command, "--help"])
    assert result.exit_code == 0 and "--out" in result.output


def test_bench_without_a_gpu_is_one_clear_error():
    result = runner.invoke(app, ["bench", "infer"])
    assert result.exit_code == 1
    assert "CUDA GPU" in result.output and "Traceback" not in result.output


def test_the_cli_imports_no_heavy_library_before_a_command_runs():
    """`dr --help`, `dr version` and every `--help` answer without importing torch or transformers (6-10 s)."""
    import subprocess
    import sys

    probe = "import sys, deepresonance_cli.app; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_threads_option_sets_torchs_threads_before_it_loads():
    """1 thread, where torch's default is one per core (2 or more on every machine this runs on)."""
    import subprocess
    import sys

    probe = (
        "from deepresonance_cli.app import app; app(['--threads', '1', 'version'], standalone_mode=False); "
        "import torch; print(torch.get_num_threads())"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split()[-1] == "1", done.stdout + done.stderr
