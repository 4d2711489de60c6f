"""Files dr writes get the mode an ordinary open gives under the user's umask (safetensors and mkstemp give 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from model.infer.journal import write_results
from model.io.files import write_atomically, written_atomically
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


def test_a_failed_atomic_write_leaves_neither_temporary_nor_final_file(tmp_path, umask_022):
    path = tmp_path / "sub" / "out.json"
    with pytest.raises(RuntimeError, match="cut"), written_atomically(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("cut")
    assert list(tmp_path.rglob("*")) == [tmp_path / "sub"]
    write_atomically(path, "whole")
    assert path.read_text() == "whole" and mode(path) == 0o644 and os.listdir(path.parent) == ["out.json"]


def test_an_existing_file_survives_a_failed_rewrite(tmp_path):
    path = tmp_path / "out.json"
    write_atomically(path, b"old")
    with pytest.raises(OSError), written_atomically(path) as tmp:
        tmp.write_text("new, half")
        raise OSError(28, "No space left on device")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.json"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_the_umask_is_read_without_being_set(mask, monkeypatch):
    """Setting the umask to read it would, for an instant, give files other threads create (the feature cache
    stores in threads) the wrong mode, and two readers interleaving would leave a wrong one set."""
    import builtins

    from model.io import files

    old = os.umask(mask)
    try:
        monkeypatch.setattr(os, "umask", lambda _: pytest.fail("the umask was set"))
        assert files.current_umask() == mask
        monkeypatch.undo()
        real_open = builtins.open

        def no_proc(file, *args, **kwargs):
            if file == "/proc/self/status":
                raise OSError(file)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", no_proc)
        assert files.current_umask() == mask  # where /proc does not say it: set and set back
        assert os.umask(mask) == mask
    finally:
        monkeypatch.undo()
        os.umask(old)
