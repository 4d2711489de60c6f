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


def test_bench_infer_writes_the_report_and_prints_every_measure(monkeypatch, tmp_path):
    """The shell around `bench_infer` (which needs a GPU): the JSON goes where asked and the table shows each path."""
    import json

    import model.benchmark as benchmark

    row = dict(name="dr static", batch=64, seconds=0.5, tokens_per_s=8192.0, rows_per_s=128.0, clips_per_s=0.0)
    report = {
        "device": "a test GPU",
        "results": [{**row, "ratio_to_original": 300.0, "first_call_seconds": 57.0}],
        "musiccaps_job_seconds_steady": {"dr": 13.4, "original": 7070.2, "dr_batch": 512},
    }
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(benchmark, "bench_infer", lambda *batches: asked.append(batches) or report)
    out = tmp_path / "infer.json"
    result = runner.invoke(app, ["bench", "infer", "--out", str(out), "--batches", "1,512", "--static-batches", "64"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == report and asked == [((1, 512), (64,))]
    for shown in ("a test GPU", "8192.0", "128.0", "300.0", "57.0", "7070.2"):
        assert shown in result.output
