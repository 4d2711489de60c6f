"""Issue 14, cases 3, 12 and the training half of 6/7: checkpoints are whole or absent, carry one identity checked on
resume, are never silently overwritten, are kept by default and on Ctrl-C; failures are one line naming the file."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import synth
from typer.testing import CliRunner

from deepresonance_cli.app import app
from model.train.checkpoints import MARKER, STATE_FILE, CheckpointError, find_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rows")
    synth.write_wav(root / "a.wav", seconds=1.0)
    rows = [synth.make_row("0", [("audio", "a.wav")]), synth.make_row("1", text="Hi.", output="Hello.")]
    return synth.write_dataset(root, rows, "rows.json")


def train_args(tiny_root: Path, dataset: Path, out: Path, *extra: str, steps: int = 2) -> list[str]:
    return [
        "train",
        "--variant",
        "alpha",
        "--stage",
        "1",
        "--ckpt-root",
        str(tiny_root),
        "--datasets",
        str(dataset),
        "--max-steps",
        str(steps),
        "--no-progress",
        "--device",
        "cpu",
        "--cache-dir",
        str(dataset.parent / "cache"),
        "--out",
        str(out),
        *extra,
    ]


def dr(*argv: str, limit_bytes: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    def full_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "deepresonance_cli.app", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=full_disk if limit_bytes else None,
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    return last


def marker(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())


def test_fresh_run_into_an_out_holding_a_run_refuses_unless_overwrite(tiny_root, dataset, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, train_args(tiny_root, dataset, out)).exit_code == 0
    first = marker(out)["run_id"]
    again = runner.invoke(app, train_args(tiny_root, dataset, out))
    assert isinstance(again.exception, CheckpointError)
    assert "holds an earlier run" in str(again.exception) and "--overwrite" in str(again.exception)
    assert marker(out)["run_id"] == first  # nothing was touched
    fresh = runner.invoke(app, train_args(tiny_root, dataset, out, "--overwrite"))
    assert fresh.exit_code == 0, fresh.output
    assert marker(out)["run_id"] != first


def test_checkpoint_mixing_two_runs_is_refused_on_resume(tiny_root, dataset, tmp_path):
    for name in ("a", "b"):
        argv = train_args(tiny_root, dataset, tmp_path / name, "--stop-after", "1", steps=3)
        assert runner.invoke(app, argv).exit_code == 0
    a, b = tmp_path / "a" / "checkpoint-000001", tmp_path / "b" / "checkpoint-000001"
    shutil.copyfile(b / "delta.safetensors", a / "delta.safetensors")  # another run's delta, same size
    resumed = runner.invoke(
        app, train_args(tiny_root, dataset, tmp_path / "a", "--resume", str(tmp_path / "a"), steps=3)
    )
    assert isinstance(resumed.exception, CheckpointError)
    assert f"{a / 'delta.safetensors'}: from run" in str(resumed.exception) and "mixed" in str(resumed.exception)


KILL_MID_SAVE = """
import os, signal, sys
import model.train.loop as training
from model.config import TrainConfig
original = training.save_delta
def save_then_die(model, folder, metadata=None):
    original(model, folder, metadata)
    if metadata["step"] == "2":
        os.kill(os.getpid(), signal.SIGKILL)  # the delta is written, the optimizer state not yet
training.save_delta = save_then_die
root, data, out = sys.argv[1:]
cfg = TrainConfig.for_stage(1, datasets=[data], max_steps=4, save_every=1)
training.train(cfg, progress=False, variant="alpha", base=f"{root}/pretrained_ckpt/vicuna_ckpt/7b_v0",
               imagebind=f"{root}/pretrained_ckpt/imagebind_ckpt/huge/imagebind_huge.pth", out=out, device="cpu",
               cache_dir=f"{out}/../cache")
"""


@pytest.mark.slow
def test_kill_mid_save_leaves_the_previous_checkpoint_whole_and_resume_goes_on(tiny_root, dataset, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_SAVE, str(tiny_root), str(dataset), str(out)], capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "checkpoint-000002").exists()  # the half-written save is not a checkpoint
    assert find_checkpoint(out) == out / "checkpoint-000001" and marker(out / "checkpoint-000001")["step"] == 1
    resumed = dr(*train_args(tiny_root, dataset, out, "--resume", str(out), "--save-every", "1", steps=4))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert marker(out)["step"] == 4 and not list(out.glob(".checkpoint-*"))


def test_full_disk_during_a_save_is_one_line_and_leaves_no_partial_checkpoint(tiny_root, dataset, tmp_path):
    out = tmp_path / "run"
    line = one_line_error(dr(*train_args(tiny_root, dataset, out), limit_bytes=15_000))
    assert f"{out / 'checkpoint-000001'}: could not write the step-1 checkpoint" in line and "disk" in line
    assert f"--resume {out}" in line
    assert not list(out.glob(".*.tmp")) and not (out / MARKER).exists()


@pytest.mark.parametrize("damage", ["truncated trainer_state.pt", "empty rng-0.pt"])
def test_damaged_checkpoint_file_on_resume_is_one_line_naming_it(tiny_root, dataset, tmp_path, damage):
    out = tmp_path / "run"
    assert runner.invoke(app, train_args(tiny_root, dataset, out, "--stop-after", "1", steps=3)).exit_code == 0
    ckpt = out / "checkpoint-000001"
    name = STATE_FILE if damage.startswith("truncated") else "rng-0.pt"
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2] if damage.startswith("truncated") else b"")
    line = one_line_error(dr(*train_args(tiny_root, dataset, out, "--resume", str(out), steps=3)))
    assert str(ckpt / name) in line


def test_damaged_state_behind_a_matching_marker_is_one_line(tiny_root, dataset, tmp_path):
    """Past the size check too: a state file of the recorded size that does not load is named, never 'Aborted.'."""
    out = tmp_path / "run"
    assert runner.invoke(app, train_args(tiny_root, dataset, out, "--stop-after", "1", steps=3)).exit_code == 0
    rng = out / "checkpoint-000001" / "rng-0.pt"
    rng.write_bytes(b"\0" * rng.stat().st_size)
    line = one_line_error(dr(*train_args(tiny_root, dataset, out, "--resume", str(out), steps=3)))
    assert f"{rng}: truncated or damaged torch file" in line


def test_sigint_checkpoints_before_stopping_and_resume_finishes(tiny_root, dataset, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepresonance_cli.app", *train_args(tiny_root, dataset, out, steps=100000)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "train_config.json").exists():
        time.sleep(0.1)
    time.sleep(2)  # some steps in, with no intermediate checkpoint due yet (a tenth of 100000 steps)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    [ckpt] = out.glob("checkpoint-*")
    step = marker(ckpt)["step"]
    assert 0 < step < 100000 and "--resume" in stderr
    argv = train_args(tiny_root, dataset, out, "--resume", str(out), "--stop-after", str(step + 2), steps=100000)
    assert runner.invoke(app, argv).exit_code == 0
    assert marker(out / f"checkpoint-{step + 2:06d}")["step"] == step + 2


def test_default_interval_keeps_the_newest_checkpoint(tiny_root, dataset, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, train_args(tiny_root, dataset, out, "--stop-after", "7", steps=20)).exit_code == 0
    # a tenth of 20 steps: checkpoints at 2, 4 and 6 were written, each replacing the one before; 7 is the stop's
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000007"]
    assert marker(out / "checkpoint-000007")["step"] == 7
    assert runner.invoke(app, train_args(tiny_root, dataset, out, "--resume", str(out), steps=20)).exit_code == 0
    assert marker(out)["step"] == 20 and not list(out.glob("checkpoint-*"))  # the final state replaces the spare
