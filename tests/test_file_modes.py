"""Files dr writes get the mode an ordinary open gives under the user's umask (safetensors and mkstemp give 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from model.infer.journal import write_results
from model.network.checkpoint import export_model, load_model, save_delta


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_deltas_exports_and_results_are_readable_by_the_group(tiny_layout, tmp_path, umask_022):
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    delta = save_delta(model, tmp_path / "delta")
    assert mode(delta / "delta.safetensors") == mode(delta / "pytorch_model.pt") == 0o644
    export = export_model(model, tmp_path / "export", tiny_layout.imagebind)
    assert mode(export / "mm.safetensors") == 0o644
    assert [mode(p) for p in (export / "llm").glob("*.safetensors")] == [0o644]
    out = tmp_path / "res" / "r.json"
    write_results(out)
    assert mode(out) == 0o644
