"""`dr eval` on multiple-choice rows (prediction files, --mode with the tiny model, controls, reference rows) and
the report's chart: value labels, visible zeros, "n/a", CIDEr on its own axis."""

from __future__ import annotations

import json

import pytest
import synth
from typer.testing import CliRunner

from deepresonance_cli.app import app
from eval import report
from model.data.benchmarks import convert

MMAU = [
    {
        "id": f"m{i}",
        "audio_id": f"./test-mini-audios/m{i}.wav",
        "question": "What is the genre?",
        "choices": ["Jazz", "Rock", "Pop"],
        "answer": ["Jazz", "Rock", "Pop"][i % 3],
        "task": "music",
        "category": "Information Extraction",
        "sub-category": ["Genre", "Mood"][i % 2],
    }
    for i in range(4)
]


@pytest.fixture
def bench(tmp_path):
    source = tmp_path / "mmau-test-mini.json"
    source.write_text(json.dumps(MMAU))
    convert("mmau_music", source, tmp_path / "mmau_music_test.json")
    for i in range(4):
        synth.write_wav(tmp_path / "MMAU" / "test-mini-audios" / f"m{i}.wav", 1.0, 200 + 100 * i)
    return tmp_path


def test_prediction_files_are_parsed_to_options(bench):
    # m0 Jazz (A), m1 Rock (B), m2 Pop (C), m3 Jazz (A): right, right by text, wrong, unparsed
    answers = {"m0": "A", "m1": "It is rock.", "m2": "(A) Jazz", "m3": "no idea"}
    rows = json.loads((bench / "mmau_music_test.json").read_text())
    (bench / "mine.json").write_text(json.dumps({r["id"]: {r["instruction"]: answers[r["id"]]} for r in rows}))
    args = ["eval", str(bench / "mine.json"), "--dataset", "mmau_music", "--data-root", str(bench)]
    result = CliRunner().invoke(app, [*args, "--out", str(bench / "out" / "r.json")])
    assert result.exit_code == 0, result.output
    got = json.loads((bench / "out" / "r.json").read_text())
    gen = got["multiple_choice"]["results"]["mine"]["generative"]
    assert (gen["accuracy"], gen["n"], gen["unparsed"], gen["chance"]) == (0.5, 4, 1, pytest.approx(1 / 3))
    assert gen["categories"]["sub-category: Genre"]["accuracy"] == 0.5  # m0 right, m2 wrong
    assert got["runs"] == {}  # a benchmark is scored by accuracy, not by text metrics
    assert "multiple choice: mmau_music" in result.output and "50.0%" in result.output


def test_modes_controls_and_reference_rows_with_the_tiny_model(bench, tiny_root, engine_builds):
    out = bench / "out" / "r.json"
    args = [
        "eval", "--dataset", "mmau_music", "--data-root", str(bench), "--ckpt-root", str(tiny_root),
        "--mode", "likelihood", "--mode", "generative", "--control", "silence", "--max-new-tokens", "4",
        "--answers-dir", str(bench / "answers"), "--reference-table", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())["multiple_choice"]
    modes = got["results"]["alpha"]
    assert list(modes) == [
        "likelihood",
        "likelihood (norm)",
        "generative",
        "likelihood, silence audio",
        "likelihood (norm), silence audio",
        "generative, silence audio",
    ]
    assert all(m["n"] + m["missing"] == 4 and m["missing"] == 0 for m in modes.values())
    assert len(engine_builds) == 1  # the silence control's answers through the real audio's engine (one shape)
    assert "Qwen2-Audio-Instruct" in [r["model"] for r in got["reference"]]
    assert all(r["computed_here"] is False and r["dataset"] == "mmau_music" for r in got["reference"])
    md = out.with_suffix(".md").read_text()
    assert "published (check the source), not computed here" in md and "MMAU, arXiv:2410.19168" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert (bench / "answers" / "mmau_music_alpha_choice_silence.json").is_file()
    # a rerun resumes the generative answers instead of answering again
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and json.loads(out.read_text())["multiple_choice"]["results"]["alpha"] == modes


def test_mode_needs_choice_rows(tmp_path):
    rows = [synth.make_row(f"r{i}", [("audio", "a.wav")], "Describe it.", f"free text {i}") for i in range(3)]
    path = synth.write_dataset(tmp_path, rows)
    result = CliRunner().invoke(app, ["eval", "--dataset", str(path), "--mode", "likelihood"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "no multiple-choice or label-set rows" in result.output
    assert CliRunner().invoke(app, ["eval", "--dataset", str(path)]).exit_code == 2


RUNS = {
    "alpha": {
        "counts": {"scored": 3, "missing": 0},
        "metrics": {"coco": {"bleu1": 0.5, "bleu2": 0.0, "bleu3": 0.1, "bleu4": 0.05, "meteor_1_5": 0.3,
                             "rouge_l": 0.4, "cider": 7.5, "bertscore_f1": None}},
    },
}  # fmt: skip


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_chart_labels_every_bar_and_keeps_cider_apart():
    choice = {
        "dataset": "mmau_music",
        "results": {"alpha": {"likelihood": {"accuracy": 0.5, "ci95": [0.3, 0.7], "chance": 1 / 3, "n": 4,
                                              "unparsed": 0, "missing": 0, "categories": {}}}},
        "reference": [{"model": "Other", "accuracy": 60.0, "source": "paper"}],
    }  # fmt: skip
    fig = report.figure(RUNS, choice)
    main, side, mc = fig.axes
    assert [t.get_text() for t in main.get_xticklabels()] == [
        "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR 1.5", "ROUGE-L", "BERTScore (F1)",
    ]  # fmt: skip
    assert [t.get_text() for t in side.get_xticklabels()] == ["CIDEr"]
    assert main.get_ylim()[1] < 1.5 and side.get_ylim()[1] > 7.5  # CIDEr does not squash the 0-1 metrics
    assert texts(main) == ["0.500", "0.000", "0.100", "0.050", "0.300", "0.400", "n/a"] and texts(side) == ["7.50"]
    zero = main.patches[1]
    assert zero.get_height() == 0 and zero.get_visible() and zero.get_linewidth() > 0  # drawn as an outline
    assert len(main.patches) == 6  # BERTScore unavailable: no bar, "n/a" in its place
    assert "0.500" in texts(mc) and "0.600" in texts(mc) and any(line.get_ydata()[0] == 1 / 3 for line in mc.lines)
    assert any("published" in t.get_text() for t in mc.get_xticklabels())
    assert [t.get_text() for t in mc.get_legend().get_texts()] == [
        "alpha",
        "published (check the source), not computed here",
        "chance (33.3%)",
    ]


def test_classification_set_gets_accuracy_next_to_text_metrics(tmp_path, tiny_root):
    labels = ["The genre is jazz.", "The genre is rock.", "The genre is pop."]
    rows = [synth.make_row(f"g{i}", [("audio", f"g{i}.wav")], "What genre is it?", labels[i % 3]) for i in range(6)]
    for i in range(6):
        synth.write_wav(tmp_path / f"g{i}.wav", 1.0, 200 + 50 * i)
    path = synth.write_dataset(tmp_path, rows)
    predictions = {f"g{i}": {"What genre is it?": labels[0]} for i in range(6)}  # always jazz: right on g0, g3
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    out = tmp_path / "out" / "r.json"
    args = ["eval", str(tmp_path / "pred.json"), "--dataset", str(path), "--mode", "likelihood"]
    result = CliRunner().invoke(app, [*args, "--ckpt-root", str(tiny_root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["runs"]["pred"]["metrics"]["music-llm"]["bleu_u_char"] is not None  # today's text metrics
    results = got["multiple_choice"]["results"]
    assert results["pred"]["generative"]["accuracy"] == pytest.approx(2 / 6)
    assert results["alpha"]["likelihood"]["n"] == 6 and results["alpha"]["likelihood"]["chance"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
        ('{"dataset": "mmau_music"}', "expected a JSON list of {dataset, model, accuracy, source} objects"),
    ],
)
def test_a_bad_reference_file_is_one_line_naming_it(bench, content, expected):
    rows = json.loads((bench / "mmau_music_test.json").read_text())
    (bench / "mine.json").write_text(json.dumps({r["id"]: {r["instruction"]: "A"} for r in rows}))
    (bench / "refs.json").write_text(content)
    args = ["eval", str(bench / "mine.json"), "--dataset", "mmau_music", "--data-root", str(bench)]
    args += ["--reference-file", str(bench / "refs.json"), "--out", str(bench / "r.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    error = f"{result.output} {result.exception}"  # fail()'s line, or the DatasetError main prints as one line
    assert f"{bench / 'refs.json'}: {expected}" in error
