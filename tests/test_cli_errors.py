"""Issue 27 #11 and issue 24: every error of `dr` is one `error: <line>` on stderr with exit status 1, from one place
(deepresonance_cli/errors.py); hostile inputs (a 120 KB category cell, JSON nested 100,000 deep) end there too,
naming the file, never in a traceback, never echoed whole and never as an empty `error: `."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepresonance_cli.app import app
from deepresonance_cli.errors import MAX_CHARS, describe, short

runner = CliRunner()
MUCHO_FIELDS = [
    "question",
    "correct_answer",
    "distractor_1_answer",
    "distractor_2_answer",
    "distractor_3_answer",
    "dataset",
    "dataset_identifier",
    "genre",
    "music_reasoning",
    "music_knowledge",
]


def mucho_csv(path: Path, reasoning: str) -> Path:
    """A MuChoMusic CSV of one question whose music_reasoning cell is `reasoning`."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(MUCHO_FIELDS)
        question = ["What plays?", "A piano.", "A drum.", "A flute.", "A choir."]
        writer.writerow([*question, "sdd", "1.json", "", reasoning, ""])
    return path


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def run_dr(*argv: str) -> subprocess.CompletedProcess:
    """`dr` through its own entry point (main), as a user runs it."""
    cmd = [sys.executable, "-m", "deepresonance_cli.app", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "cell",
    ["+".join(["1"] * 60_000), "-" * 120_000 + "1"],  # 120 KB: RecursionError (83 lines), then an empty MemoryError
    ids=["sum-chain", "minus-chain"],
)
def test_convert_with_a_huge_category_cell_is_one_line_naming_file_and_line(tmp_path, cell):
    source = mucho_csv(tmp_path / "muchomusic.csv", cell)
    proc = run_dr("data", "convert", "muchomusic", str(source), "--out", str(tmp_path / "out.json"))
    assert proc.returncode == 1 and proc.stdout == ""
    [line] = error_lines(proc.stderr)
    assert line.startswith(f"error: {source}:2: category cell of {len(cell)} characters"), line
    assert len(line) < MAX_CHARS and not (tmp_path / "out.json").exists()


def test_convert_error_is_plain_text_not_literal_markup(tmp_path):
    result = runner.invoke(app, ["data", "convert", "muchomusic", str(mucho_csv(tmp_path / "m.csv", "[melody"))])
    assert result.exit_code == 1
    [line] = error_lines(result.output)
    assert line == f"error: {tmp_path / 'm.csv'}:2: category cell '[melody' is not a list"


@pytest.mark.parametrize("which", ["predictions", "dataset"])
def test_eval_on_json_nested_100000_deep_is_one_line(tmp_path, which):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"id": "r0", "instruction": "q", "output": "a"}]))
    files = [str(deep), "--dataset", str(rows)] if which == "predictions" else [str(rows), "--dataset", str(deep)]
    proc = run_dr("eval", *files, "--out", str(tmp_path / "report.json"))
    assert proc.returncode == 1
    assert error_lines(proc.stderr) == [f"error: {deep}: JSON nested too deeply to read"]


def test_a_long_message_is_cut_keeping_its_start_and_end():
    message = "/data/rows.json:7: cell " + "x" * 120_000 + " is not a list"
    line = short(message)
    assert len(line) <= MAX_CHARS and line.startswith("/data/rows.json:7: cell xxx") and line.endswith("not a list")
    assert "characters ...]" in line
    assert short("two\nlines") == "two lines" and short("ok") == "ok"


def test_an_error_without_a_message_is_named():
    assert describe(MemoryError()) == "MemoryError (no message)"
    assert describe(FileNotFoundError(2, "No such file or directory", "/x/y")) == "/x/y: No such file or directory"


def test_a_row_id_that_looks_like_markup_is_printed_as_text(tmp_path):
    """An invalid row is reported with its id; `[/]` once made rich raise MarkupError before any work was done."""
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"id": "[/]", "instruction": "q"}]))
    argv = ["infer", "--dataset", str(rows), "--ckpt-root", str(tmp_path / "no_ckpt"), "--device", "cpu"]
    result = runner.invoke(app, [*argv, "--out", str(tmp_path / "r.json")])
    assert f"skipped invalid row {rows}:0: id '[/]': missing field(s)" in " ".join(result.output.split())
