"""Issue 14, cases 6, 7, 8 and 9: damaged, foreign and malicious files are one line naming the file (never a trace,
never torch's advice to load code), `dr ckpt doctor` agrees with the loader, NaN deltas and non-text answers are
reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ckpt.doctor import doctor
from ckpt.layout import CkptLayout, layout
from deepresonance_cli.app import KNOWN_ERRORS, app
from deepresonance_cli.errors import describe

runner = CliRunner()


class Payload:
    """A pickle that runs code when loaded without weights_only: it would create the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def code_pickle(path: Path, marker: Path) -> Path:
    torch.save({"llama_proj.weight": torch.zeros(2, 2), "hook": Payload(marker)}, path)
    return path


@pytest.fixture
def ckpt(tiny_root: Path, tmp_path: Path) -> CkptLayout:
    shutil.copytree(tiny_root, tmp_path / "ckpt")
    return layout(tmp_path / "ckpt")


def ask(paths: CkptLayout, *extra: str):
    argv = ["ask", "Name a genre.", "--ckpt-root", str(paths.root), "--greedy", "--max-new-tokens", "2", *extra]
    return runner.invoke(app, [*argv, "--device", "cpu"])


def one_line_failure(result, *fragments: str) -> str:
    """The command failed with an error `dr` prints as one line (main's KNOWN_ERRORS), holding every fragment."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, KNOWN_ERRORS), repr(result.exception)
    line = describe(result.exception)
    for fragment in fragments:
        assert fragment in line, line
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line
    return line


def alpha(paths: CkptLayout) -> Path:
    return paths.delta_dir("alpha")


def only_pickle(paths: CkptLayout) -> Path:
    """The alpha delta as its pickle only (the loader reads the safetensors first when both are there)."""
    (alpha(paths) / "delta.safetensors").unlink()
    return alpha(paths) / "pytorch_model.pt"


# --------------------------------------------------------------------------------------------------------- case 6
def test_corrupt_base_safetensors_header(ckpt):
    weights = ckpt.vicuna / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")  # a header length past the end of the file
    weights.write_bytes(bytes(data))
    one_line_failure(ask(ckpt), str(weights), "not a readable safetensors file")


def test_code_payload_base_bin_is_not_loaded(ckpt, tmp_path):
    (ckpt.vicuna / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    code_pickle(ckpt.vicuna / "pytorch_model.bin", marker)
    one_line_failure(ask(ckpt), str(ckpt.vicuna / "pytorch_model.bin"), "holds code", "was not loaded")
    assert not marker.exists()


def test_wrong_shaped_imagebind_tensor(ckpt):
    state = torch.load(ckpt.imagebind, weights_only=True)
    key = "modality_trunks.audio.blocks.0.attn.in_proj_weight"
    state[key] = torch.zeros(3, 3)
    torch.save(state, ckpt.imagebind)
    one_line_failure(ask(ckpt), str(ckpt.imagebind), key, "expects")


def test_empty_tokenizer_model(ckpt):
    (alpha(ckpt) / "tokenizer.model").write_bytes(b"")
    one_line_failure(ask(ckpt), str(alpha(ckpt) / "tokenizer.model"), "not a sentencepiece model")


@pytest.mark.parametrize("content", ["a non-tensor value", "a list"])
def test_delta_holding_something_else_than_tensors(ckpt, content):
    pickle = only_pickle(ckpt)
    state = torch.load(pickle, weights_only=True)
    torch.save({**state, "llama_proj.bias": 3} if content == "a non-tensor value" else list(state.values()), pickle)
    expected = "entry 'llama_proj.bias' is a int, not a tensor" if content == "a non-tensor value" else "holds a list"
    one_line_failure(ask(ckpt), str(pickle), expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[]", "got a list"),
        ('{"r0": "an answer"}', "id 'r0' holds a string"),
        ('"answers"', "got a string"),
        ("null", "got null"),
        ("", "empty file"),
        ("{not json", "not valid JSON"),
    ],
)
def test_eval_prediction_file_of_the_wrong_shape(tmp_path, text, expected):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"id": "r0", "instruction": "q", "output": "a"}]))
    preds = tmp_path / "preds.json"
    preds.write_text(text)
    result = runner.invoke(app, ["eval", str(preds), "--dataset", str(rows), "--out", str(tmp_path / "r.json")])
    one_line_failure(result, str(preds), expected)


# --------------------------------------------------------------------------------------------------------- case 7
def test_malicious_delta_pickle_says_it_holds_code(ckpt, tmp_path):
    marker = tmp_path / "ran"
    pickle = code_pickle(only_pickle(ckpt), marker)
    one_line_failure(ask(ckpt), str(pickle), "holds code or Python objects", "was not loaded")
    assert not marker.exists()


def test_garbled_dr_config(ckpt):
    config = alpha(ckpt) / "dr_config.json"
    config.write_text('{"variant": "alpha", ')
    one_line_failure(ask(ckpt), str(config), "not a dr model config")


def test_errors_print_one_line_from_the_real_command(ckpt, tmp_path):
    """Through `dr`'s own entry point: exit 1, one `error:` line, no traceback."""
    code_pickle(only_pickle(ckpt), tmp_path / "ran")
    proc = subprocess.run(
        [sys.executable, "-m", "deepresonance_cli.app", "ask", "Hi?", "--ckpt-root", str(ckpt.root), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "holds code" in lines[0], proc.stderr


# --------------------------------------------------------------------------------------------------------- case 8
def status(paths: CkptLayout) -> dict[str, tuple[str, str]]:
    return {c.piece: (c.status, c.detail) for c in doctor(paths.root, hashes=False).checks}


def test_tiny_set_is_ok_for_doctor_and_the_loader(ckpt):
    assert doctor(ckpt.root).ok
    assert ask(ckpt).exit_code == 0


def test_delta_with_an_extra_key_is_corrupt_to_doctor_as_to_the_loader(ckpt):
    st = alpha(ckpt) / "delta.safetensors"
    save_file({**load_file(st), "llama_proj.extra": torch.zeros(2)}, st)
    state, detail = status(ckpt)["alpha delta"]
    assert state == "corrupt" and "unexpected key 'llama_proj.extra'" in detail
    one_line_failure(ask(ckpt), "unexpected key 'llama_proj.extra'")


def test_imagebind_with_an_extra_key_is_corrupt_to_doctor_as_to_the_loader(ckpt):
    torch.save({**torch.load(ckpt.imagebind, weights_only=True), "extra.weight": torch.zeros(1)}, ckpt.imagebind)
    state, detail = status(ckpt)["ImageBind-huge"]
    assert state == "corrupt" and "unexpected key 'extra.weight'" in detail
    one_line_failure(ask(ckpt), str(ckpt.imagebind), "unexpected key 'extra.weight'")


def test_doctor_reads_the_pickle_beside_the_safetensors(ckpt, tmp_path):
    marker = tmp_path / "ran"
    code_pickle(alpha(ckpt) / "pytorch_model.pt", marker)  # the original loads this file, with pickle
    state, detail = status(ckpt)["alpha delta"]
    assert state == "corrupt" and "pytorch_model.pt" in detail and "holds code" in detail
    assert not marker.exists()


def test_code_payload_base_bin_is_corrupt_not_missing(ckpt, tmp_path):
    (ckpt.vicuna / "model.safetensors").unlink()
    code_pickle(ckpt.vicuna / "pytorch_model.bin", tmp_path / "ran")
    state, detail = status(ckpt)["base LLM (Vicuna-7B-v0)"]
    assert state == "corrupt" and "holds code" in detail


def test_wrong_shaped_imagebind_is_blamed_on_imagebind_not_the_delta(ckpt):
    state = torch.load(ckpt.imagebind, weights_only=True)
    state["modality_trunks.audio.blocks.0.attn.in_proj_weight"] = torch.zeros(5, 5)
    torch.save(state, ckpt.imagebind)
    checks = status(ckpt)
    assert checks["ImageBind-huge"][0] == "corrupt" and "in_proj_weight" in checks["ImageBind-huge"][1]
    assert checks["alpha delta"][0] == "OK" and "not checked against ImageBind" in checks["alpha delta"][1]


def test_old_format_pickle_loads_in_doctor_convert_and_infer(ckpt):
    pickle = only_pickle(ckpt)
    torch.save(torch.load(pickle, weights_only=True), pickle, _use_new_zipfile_serialization=False)
    assert status(ckpt)["alpha delta"][0] == "OK"
    assert ask(ckpt).exit_code == 0
    assert runner.invoke(app, ["ckpt", "convert", str(alpha(ckpt))]).exit_code == 0
    assert (alpha(ckpt) / "delta.safetensors").is_file()


# --------------------------------------------------------------------------------------------------------- case 9
def test_nan_delta_is_refused_by_the_loader_and_doctor(ckpt):
    st = alpha(ckpt) / "delta.safetensors"
    state = load_file(st)
    state["llama_proj.weight"] = torch.full_like(state["llama_proj.weight"], float("nan"))
    save_file(state, st)
    one_line_failure(ask(ckpt), "NaN or infinite", "llama_proj.weight")
    state_, detail = status(ckpt)["alpha delta"]
    assert state_ == "corrupt" and "NaN or infinite" in detail


def test_eval_says_why_non_text_answers_count_as_missing(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"id": f"r{i}", "instruction": "q", "output": "a b"} for i in range(3)]))
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"r0": {"q": "a b"}, "r1": {"q": 7}, "r2": {"q": None}}))
    result = runner.invoke(app, ["eval", str(preds), "--dataset", str(rows), "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"{preds}: 2 answer(s) are not text and count as missing (first: id 'r1' holds a int)" in text
    report = json.loads((tmp_path / "r.json").read_text())
    assert "not_text" in json.dumps(report)
