"""Issue 27 #12: media paths that leave the media root (absolute, `..`) are refused unless allowed, one line per row,
the other rows going on; and each row's media error names that row's own path, even when two rows' files have the
same content (the feature cache decodes such files once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synth import infer_args, make_row, write_dataset, write_wav
from typer.testing import CliRunner

from deepresonance_cli.app import app
from model.data.catalog import load_rows, outside_media_root

runner = CliRunner()


@pytest.mark.parametrize(
    ("path", "outside"),
    [
        ("a.wav", False),
        ("sub/../a.wav", False),
        ("..hidden/a.wav", False),  # a folder whose name starts with dots is inside
        ("../a.wav", True),
        ("sub/../../a.wav", True),
        ("/etc/passwd", True),
        ("sub/../../../../../../etc/passwd", True),
    ],
)
def test_outside_media_root(path, outside):
    assert (outside_media_root(path) is not None) == outside


def hostile_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """rows.json in ds/ (its media root): r0 reads ds/a.wav; r1 and r2 read the same file outside ds/, one through
    `..`, one by its absolute path. The file is text with an audio-free name, as /etc/passwd was."""
    write_wav(tmp_path / "ds" / "a.wav", 1.0)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    rows = [
        make_row("r0", [("audio", "a.wav")]),
        make_row("r1", [("audio", "../secret.txt")]),
        make_row("r2", [("audio", str(secret))]),
    ]
    return write_dataset(tmp_path / "ds", rows, "rows.json"), secret


def test_rows_leaving_the_media_root_are_invalid_unless_allowed(tmp_path):
    dataset, secret = hostile_dataset(tmp_path)
    rows, errors = load_rows(dataset)
    assert [r.id for r in rows] == ["r0"]
    assert errors == [
        f"{dataset}:1: id 'r1': mm_paths[0] '../secret.txt' is outside the media root (climbs out of it with '..'); "
        "--allow-outside-media-root reads it",
        f"{dataset}:2: id 'r2': mm_paths[0] '{secret}' is outside the media root (an absolute path); "
        "--allow-outside-media-root reads it",
    ]
    rows, errors = load_rows(dataset, allow_outside_media_root=True)
    assert [r.id for r in rows] == ["r0", "r1", "r2"] and errors == []


def test_data_check_refuses_them_and_reads_them_when_allowed(tmp_path):
    dataset, secret = hostile_dataset(tmp_path)
    refused = runner.invoke(app, ["data", "check", "--dataset", str(dataset)])
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1
    assert f"{dataset}:1: id 'r1': mm_paths[0] '../secret.txt' is outside the media root" in text
    assert f"{dataset}:2: id 'r2': mm_paths[0] '{secret}' is outside the media root" in text
    allowed = runner.invoke(app, ["data", "check", "--dataset", str(dataset), "--allow-outside-media-root"])
    text = " ".join(allowed.output.split())
    assert allowed.exit_code == 1 and "outside the media root" not in text
    assert f"{secret}: unsupported audio extension" in text


def journal_errors(out: Path) -> dict[str, str]:
    lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    return {e["id"]: e["error"] for e in lines if "error" in e}


def test_infer_refuses_them_row_by_row_and_answers_the_rest(tiny_root, tmp_path):
    dataset, _ = hostile_dataset(tmp_path)
    out = tmp_path / "res" / "r.json"
    result = runner.invoke(app, infer_args(tiny_root, dataset, out, max_new_tokens=2))
    assert result.exit_code == 0, result.output
    assert list(json.loads(out.read_text())) == ["r0"]
    text = " ".join(result.output.split())
    assert text.count("skipped invalid row") == 2 and text.count("is outside the media root") == 2
    assert journal_errors(out) == {}  # nothing was read from outside


def test_infer_allowed_reads_them_and_each_error_names_its_own_path(tiny_root, tmp_path):
    dataset, secret = hostile_dataset(tmp_path)
    out = tmp_path / "res" / "r.json"
    argv = [*infer_args(tiny_root, dataset, out, max_new_tokens=2), "--allow-outside-media-root"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert list(json.loads(out.read_text())) == ["r0"]
    errors = journal_errors(out)
    assert errors["r1"].startswith(f"{dataset.parent / '../secret.txt'}: unsupported audio extension")
    assert errors["r2"].startswith(f"{secret}: unsupported audio extension")
