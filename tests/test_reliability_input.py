"""Issue 14, cases 4 and 11, and the media half of 6: text that is not valid Unicode is a row error everywhere, bad
choices are usage errors, a decompression bomb is one media problem among others."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from synth import make_row, write_image, write_wav
from typer.testing import CliRunner

from deepresonance_cli.app import app
from model.data.catalog import load_rows
from model.text.tokenizer import PromptTokenizer

runner = CliRunner()
LONE = "\ud800"


def surrogate_dataset(folder: Path, n: int = 3) -> Path:
    """n rows, the second with a lone surrogate in its instruction: valid JSON (`"\\ud800"`), not valid Unicode."""
    folder.mkdir(parents=True, exist_ok=True)
    write_wav(folder / "a.wav", 1.0)
    rows = [make_row(f"r{i}", [("audio", "a.wav")]) for i in range(n)]
    rows[1]["instruction"] = f"Describe {LONE} the music."
    path = folder / "rows.json"
    path.write_text(json.dumps(rows))  # ensure_ascii: the surrogate is written as the escape \ud800
    return path


def test_lone_surrogate_is_a_row_error_in_data_check(tmp_path):
    dataset = surrogate_dataset(tmp_path)
    rows, errors = load_rows(dataset)
    assert [r.id for r in rows] == ["r0", "r2"]
    assert errors == [
        f"{dataset}:1: id 'r1': instruction is not valid Unicode (surrogates not allowed: '\\ud800' at character 9)"
    ]
    result = runner.invoke(app, ["data", "check", "--dataset", str(dataset)])
    assert result.exit_code == 1
    assert f"{dataset}:1: id 'r1': instruction is not valid Unicode" in " ".join(result.output.split())


def test_lone_surrogate_row_is_skipped_and_the_rest_answered_by_infer(tiny_root, tmp_path):
    dataset = surrogate_dataset(tmp_path / "data")
    out = tmp_path / "res" / "r.json"
    argv = ["infer", "--dataset", str(dataset), "--ckpt-root", str(tiny_root), "--out", str(out), "--greedy"]
    result = runner.invoke(app, [*argv, "--max-new-tokens", "3", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(out.read_text())) == ["r0", "r2"]
    assert "skipped invalid row" in result.output and "not valid Unicode" in result.output


def test_lone_surrogate_row_is_skipped_by_train(tiny_root, tmp_path):
    dataset = surrogate_dataset(tmp_path / "data")
    argv = ["train", "--variant", "alpha", "--stage", "1", "--ckpt-root", str(tiny_root), "--datasets", str(dataset)]
    argv += ["--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "skipped 1 row(s)" in result.output and "not valid Unicode" in " ".join(result.output.split())


def test_ask_with_a_question_that_is_not_utf8_is_a_usage_error(tmp_path):
    question = b"Describe \xff the music."  # a shell passing Latin-1 bytes: Python decodes them to a lone surrogate
    proc = subprocess.run(
        [sys.executable.encode(), b"-m", b"deepresonance_cli.app", b"ask", question, b"--ckpt-root", b"nowhere"],
        capture_output=True,
        timeout=120,
    )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr
    assert "the question is not valid Unicode" in stderr


def test_tokenizer_refuses_unencodable_text_with_a_value_error(tiny_layout):
    tokenizer = PromptTokenizer.from_dir(tiny_layout.vicuna)
    with pytest.raises(ValueError, match="not valid Unicode"):
        tokenizer.encode(f"a {LONE} b")


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG header claiming side x side pixels (400 megapixels) with almost no data: PIL refuses it on open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_decompression_bomb_is_one_media_problem_and_the_check_goes_on(tmp_path):
    bomb_png(tmp_path / "bomb.png")
    write_image(tmp_path / "ok.png")
    rows = [make_row("bomb", [("image", "bomb.png")]), make_row("ok", [("image", "ok.png")])]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    result = runner.invoke(app, ["data", "check", "--dataset", str(tmp_path / "rows.json")])
    assert result.exit_code == 1  # the check finished and reported, rather than aborting
    text = " ".join(result.output.split())
    assert f"{tmp_path / 'bomb.png'}: unreadable image" in text and "decompression bomb" in text.lower()


# ------------------------------------------------------------------------------------------------- case 11: choices
@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["infer", "--dataset", "musiccaps", "--variant", "gamma"], "--variant"),
        (["train", "--variant", "gamma", "--stage", "1", "--out", "x"], "--variant"),
        (["infer", "--dataset", "musiccaps", "--dtype", "fp16"], "--dtype"),
        (["ask", "Hi?", "--dtype", "fp16"], "--dtype"),
        (["train", "--variant", "alpha", "--stage", "1", "--out", "x", "--dtype", "float16"], "--dtype"),
        (["train", "--variant", "alpha", "--stage", "3", "--out", "x"], "--stage"),
        (["infer", "--dataset", "musiccaps", "--device", "tpu"], "--device"),
    ],
)
def test_bad_choices_are_usage_errors_naming_the_option(argv, option, tmp_path):
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and not isinstance(result.exception, (KeyError, RuntimeError)), result.output
    assert "Invalid value" in result.output and option in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize(
    "command", [["infer", "--dataset", "musiccaps"], ["train", "--variant", "alpha", "--stage", "1", "--out", "x"]]
)
def test_cuda_without_a_gpu_is_one_usage_line(command):
    result = runner.invoke(app, [*command, "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA GPU is visible here" in result.output
