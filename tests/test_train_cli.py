"""`dr train` stage 1 then stage 2 from the command line on the tiny set, then `dr infer` answers with the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import synth
from typer.testing import CliRunner

from deepresonance_cli.app import app
from model.network.checkpoint import read_delta


@pytest.mark.parametrize("variant", ["alpha", "beta"])
def test_two_stages_from_the_command_line_then_infer(tiny_root: Path, tmp_path: Path, variant: str):
    synth.write_wav(tmp_path / "a.wav", seconds=1.0)
    rows = [synth.make_row("0", [("audio", "a.wav")]), synth.make_row("1", text="Hi.", output="Hello.")]
    dataset = synth.write_dataset(tmp_path, rows, "rows.json")
    common = [
        "--variant",
        variant,
        "--ckpt-root",
        str(tiny_root),
        "--datasets",
        str(dataset),
        "--max-steps",
        "2",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    runner = CliRunner()

    first = runner.invoke(app, ["train", "--stage", "1", "--out", str(tmp_path / "s1"), *common])
    assert first.exit_code == 0, first.output
    assert not any(".lora_" in k for k in read_delta(tmp_path / "s1"))
    config = json.loads((tmp_path / "s1" / "train_config.json").read_text())
    assert config["stage"] == 1 and config["max_steps"] == 2 and config["epochs"] == 5  # stage-1 defaults kept

    second = runner.invoke(
        app,
        [
            "train",
            "--stage",
            "2",
            "--out",
            str(tmp_path / "s2"),
            "--init",
            str(tmp_path / "s1"),
            "--no-train-embeddings",
            *common,
        ],
    )
    assert second.exit_code == 0, second.output
    delta = read_delta(tmp_path / "s2")
    assert any(".lora_" in k for k in delta) and not any("embed_tokens" in k for k in delta)

    answers = tmp_path / "answers.json"
    infer = runner.invoke(
        app,
        [
            "infer",
            "--dataset",
            str(dataset),
            "--variant",
            variant,
            "--ckpt-root",
            str(tiny_root),
            "--delta",
            str(tmp_path / "s2"),
            "--greedy",
            "--max-new-tokens",
            "4",
            "--out",
            str(answers),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert infer.exit_code == 0, infer.output
    assert set(json.loads(answers.read_text())) == {"0", "1"}


def test_unknown_dataset_is_one_clear_error(tiny_root: Path, tmp_path: Path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--variant",
            "alpha",
            "--stage",
            "1",
            "--out",
            str(tmp_path),
            "--ckpt-root",
            str(tiny_root),
            "--datasets",
            "no_such_set",
            "--no-progress",
            "--local_rank=0",
        ],
    )  # as the deepspeed launcher passes it
    assert result.exit_code != 0
    assert "no_such_set: not a train dataset name" in str(result.exception)


def test_config_file_values_hold_unless_a_flag_overrides_them(tiny_root: Path, tmp_path: Path):
    dataset = synth.write_dataset(tmp_path, [synth.make_row("0", text="Hi.", output="Hello.")], "rows.json")
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"max_steps": 2, "lr": 0.001, "micro_batch_size": 1}))
    args = [
        "train",
        "--variant",
        "alpha",
        "--stage",
        "1",
        "--ckpt-root",
        str(tiny_root),
        "--datasets",
        str(dataset),
        "--config",
        str(options),
        "--lr",
        "0.002",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["max_steps"] == 2 and saved["micro_batch_size"] == 1  # from the file
    assert saved["lr"] == 0.002  # the flag wins


def test_the_originals_yaml_configs_set_the_recipe_and_the_lora_it_trains(tiny_root: Path, tmp_path: Path):
    """`--config base.yaml --config stage_2.yaml` as the original's users have them: the seed, epochs and LoRA rank and
    alpha they name are what trains (the delta holds rank-4 LoRA tensors and records alpha 8); a stage file of the
    other stage is refused in one line."""
    dataset = synth.write_dataset(tmp_path, [synth.make_row("0", text="Hi.", output="Hello.")], "rows.json")
    (tmp_path / "base.yaml").write_text("seed: 7\nmax_length: 512\nvicuna_version: 7b_v0\n")
    (tmp_path / "stage_2.yaml").write_text("lora_r: 4\nlora_alpha: 8\nfreeze_lm: false\ntrain:\n    epochs: 1\n")
    (tmp_path / "stage_1.yaml").write_text("freeze_lm: true\n")
    args = ["train", "--variant", "alpha", "--stage", "2", "--ckpt-root", str(tiny_root), "--datasets", str(dataset)]
    args += ["--max-steps", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    configs = ["--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "stage_2.yaml")]
    result = CliRunner().invoke(app, [*args, *configs, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["seed"] == 7 and saved["epochs"] == 1
    delta = read_delta(tmp_path / "run")
    lora_a = [v for k, v in delta.items() if k.endswith("q_proj.lora_A.default.weight")]
    assert lora_a and all(t.shape[0] == 4 for t in lora_a)
    assert json.loads((tmp_path / "run" / "dr_config.json").read_text())["lora_alpha"] == 8
    wrong = CliRunner().invoke(app, [*args, "--config", str(tmp_path / "stage_1.yaml"), "--out", str(tmp_path / "w")])
    assert wrong.exit_code != 0
    assert "stage_1.yaml: freeze_lm True is the original's stage-1 setting, but --stage is 2" in str(wrong.exception)
