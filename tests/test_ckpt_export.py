"""`dr ckpt tiny` gives a set doctor passes; `dr ckpt export` gives a standalone model with the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from deepresonance_cli.app import app
from model.config import GenerationConfig
from model.generate.base import generate_ids
from model.network.checkpoint import DeltaError, load_model
from model.network.deepresonance import Example

runner = CliRunner()
GREEDY = GenerationConfig(max_new_tokens=8, do_sample=False)


def rows() -> list[Example]:
    g = torch.Generator().manual_seed(2)
    return [
        Example("<Audio>", "Describe the music.", [("audio", torch.randn(3, 1, 128, 204, generator=g))]),
        Example("Look: <Image>", "What colour?", [("image", torch.randn(3, 224, 224, generator=g))]),
    ]


def test_tiny_set_passes_doctor(tmp_path):
    assert runner.invoke(app, ["ckpt", "tiny", str(tmp_path / "t")]).exit_code == 0
    result = runner.invoke(app, ["ckpt", "doctor", "--root", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    assert "missing" not in result.output and "corrupt" not in result.output


def test_export_round_trip_gives_the_same_greedy_tokens(tiny_root, tiny_layout, tmp_path):
    for variant in ("alpha", "beta"):
        out = tmp_path / variant
        args = [
            "ckpt",
            "export",
            "--variant",
            variant,
            "--out",
            str(out),
            "--root",
            str(tiny_root),
        ]  # the default dtype must keep the pair's answers
        assert runner.invoke(app, args).exit_code == 0
        assert (out / "llm" / "model.safetensors").is_file() and not list(out.rglob("*lora*"))
        reference = load_model(tiny_layout.vicuna, tiny_layout.delta_dir(variant), tiny_layout.imagebind)
        exported = load_model(None, out, None, variant=variant)  # no base folder needed
        assert exported.config.variant == variant
        assert generate_ids(exported, rows(), GREEDY) == generate_ids(reference, rows(), GREEDY)


def test_exported_model_rejects_the_other_variant(tiny_root, tmp_path):
    out = tmp_path / "alpha"
    runner.invoke(app, ["ckpt", "export", "--variant", "alpha", "--out", str(out), "--root", str(tiny_root)])
    with pytest.raises(DeltaError, match="exported alpha model, not beta"):
        load_model(None, out, None, variant="beta")
