"""`dr demo --quick` end to end: the tiny model must learn the held-out tasks, not merely run."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from deepresonance_cli.app import app


def test_demo_rejects_an_unknown_variant(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--variant", "gamma"])
    assert result.exit_code != 0
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_quick_demo_learns(tmp_path):
    from demo.pipeline import run_demo

    result = run_demo(tmp_path / "demo", quick=True, progress=False)
    before, after = result.metrics["untrained"], result.metrics["trained"]

    # character BLEU and ROUGE need nothing beyond Python packages: always checked
    assert after["music-llm"]["bleu_u_char"] > 0.6 > 0.1 > before["music-llm"]["bleu_u_char"]
    assert after["music-llm"]["rouge_l_recall"] > 0.6 > 0.1 > before["music-llm"]["rouge_l_recall"]
    if shutil.which("java"):  # coco BLEU-4 and METEOR 1.5 run pycocoevalcap's Java tools
        assert after["coco"]["bleu4"] > 0.5 > 0.05 > before["coco"]["bleu4"]
        assert after["coco"]["meteor_1_5"] > 0.3 > 0.05 > before["coco"]["meteor_1_5"]
    else:
        assert after["coco"]["bleu4"] is None and any("java" in n for n in result.notes)
    # answers name the right attributes well above chance (1/3 to 1/2 per attribute) and the untrained model
    assert after["attributes"]["all"] > 0.55 > 0.2 > before["attributes"]["all"]

    # multiple choice by likelihood on held-out clips: well above chance after training (chance: the mean of 1/3, 1/2
    # and 1/2 over the instrument, tempo and loudness questions), near it before, and near it again with silence
    # in place of the audio (the answer needs the audio)
    # (the margins are about two standard errors of the 144 held-out questions)
    chance = after["choice"]["chance"]
    assert chance == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert after["choice"]["likelihood"] > chance + 0.1
    assert before["choice"]["likelihood"] < chance + 0.15
    assert after["choice"]["likelihood, silence audio"] < after["choice"]["likelihood"] - 0.08

    # everything the printed commands point at exists
    for path in result.paths.values():
        assert path.exists(), path
    trained = json.loads((result.paths["answers"] / "trained_alpha.json").read_text())
    rows = json.loads((tmp_path / "demo" / "data" / "demo_test.json").read_text())
    assert sum(len(v) for v in trained.values()) == len(rows)
    assert set(result.seconds) == {
        "data",
        "tiny model",
        "answer (untrained)",
        "stage 1",
        "stage 2",
        "answer (trained)",
        "multiple choice",
        "evaluate",
    }
