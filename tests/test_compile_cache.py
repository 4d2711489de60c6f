"""Compiled forms kept on disk (model/engine/compile_cache.py `Precompiled`): a later process loads what an earlier
one compiled instead of tracing it again, and uses it only where it still fits (the same sources, arguments its
guards pass, a readable file)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch

from model.engine.compile_cache import Precompiled


class Shift(NamedTuple):
    scale: torch.Tensor
    offset: float


def scaled(layer: torch.nn.Linear, x: torch.Tensor, shift: Shift) -> torch.Tensor:
    """A module, a tensor and a named tuple in, as the engine's compiled layers take them."""
    return torch.relu(layer(x)) * shift.scale + shift.offset


def _inputs(rows: int = 3):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 5)
    return layer, torch.randn(rows, 4), Shift(torch.randn(5), 0.5)


def _by_hand(layer, x, shift) -> torch.Tensor:
    """The same arithmetic written out, independent of `scaled` and of torch.compile."""
    return (x @ layer.weight.T + layer.bias).clamp(min=0) * shift.scale + shift.offset


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@torch.no_grad()
def test_a_stored_form_serves_a_later_compile_without_a_trace(tmp_path):
    args = _inputs()
    first = Precompiled(scaled, dynamic=False, folder=tmp_path)
    before = _graphs()
    assert torch.allclose(first(*args), _by_hand(*args), atol=1e-6)
    assert _graphs() == before + 1 and not first.loaded and first.stored and len(list(tmp_path.iterdir())) == 1
    second = Precompiled(scaled, dynamic=False, folder=tmp_path)
    assert torch.allclose(second(*args), _by_hand(*args), atol=1e-6)
    assert second.loaded and _graphs() == before + 1  # loaded, not traced again
    other = _inputs(rows=7)  # other shapes: another stored form beside the first
    assert torch.allclose(Precompiled(scaled, dynamic=False, folder=tmp_path)(*other), _by_hand(*other), atol=1e-6)
    assert len(list(tmp_path.iterdir())) == 2


@torch.no_grad()
def test_a_form_is_stored_and_loaded_where_dynamos_aot_compile_is_off_by_default(tmp_path):
    """torch 2.10-2.11 leave torch._dynamo.config.enable_aot_compile off, and torch.compile's wrapper then has no
    aot_compile: on an H100 with torch 2.11 every form compiled for its process only."""
    args = _inputs()
    with torch._dynamo.config.patch(enable_aot_compile=False):
        first = Precompiled(scaled, dynamic=False, folder=tmp_path)
        first(*args)
        second = Precompiled(scaled, dynamic=False, folder=tmp_path)
        assert torch.allclose(second(*args), _by_hand(*args), atol=1e-6)
    assert first.stored and not first.loaded and second.loaded


@torch.no_grad()
def test_arguments_its_guards_refuse_are_compiled_for_afresh(tmp_path):
    """A form compiled for 3 rows, then called with 6 (static shapes): the call goes through a compile for them,
    not through the 3-row form."""
    compiled = Precompiled(scaled, dynamic=False, folder=tmp_path)
    layer, x, shift = _inputs()
    compiled(layer, x, shift)
    wider = torch.randn(6, 4)
    assert torch.allclose(compiled(layer, wider, shift), _by_hand(layer, wider, shift), atol=1e-6)


def test_forms_of_one_call_under_other_process_settings_are_stored_side_by_side(tmp_path):
    """Stored under no_grad, wanted with gradients on (a setting every form's guards check): a form of its own,
    stored beside the first rather than over it, so a process under either setting loads its own."""
    args = _inputs()
    with torch.no_grad():
        Precompiled(scaled, dynamic=False, folder=tmp_path)(*args)
    graded = Precompiled(scaled, dynamic=False, folder=tmp_path)
    assert torch.allclose(graded(*args), _by_hand(*args), atol=1e-6)
    assert not graded.loaded and graded.refused is None and len(list(tmp_path.iterdir())) == 2
    again = Precompiled(scaled, dynamic=False, folder=tmp_path)
    again(*args)
    with torch.no_grad():
        first_again = Precompiled(scaled, dynamic=False, folder=tmp_path)
        first_again(*args)
    assert again.loaded and first_again.loaded


def times(x: torch.Tensor, factor: SimpleNamespace) -> torch.Tensor:
    return x * factor.value


@torch.no_grad()
def test_a_stored_form_whose_guards_refuse_the_arguments_is_compiled_afresh_and_says_why(tmp_path):
    """An argument the name knows by its type alone (a namespace) with another value: the same name, its guard
    refuses it, and the refusal names the failing guard (as a device's warm engine needs to report)."""
    x = torch.arange(4.0)
    Precompiled(times, dynamic=False, folder=tmp_path)(x, SimpleNamespace(value=2.0))
    other = Precompiled(times, dynamic=False, folder=tmp_path)
    assert torch.equal(other(x, SimpleNamespace(value=3.0)), x * 3)
    assert not other.loaded and other.refused.startswith("guards: ") and "value" in other.refused


@torch.no_grad()
def test_an_unreadable_store_is_compiled_afresh_and_replaced(tmp_path):
    args = _inputs()
    Precompiled(scaled, dynamic=False, folder=tmp_path)(*args)
    (stored,) = tmp_path.iterdir()
    stored.write_bytes(stored.read_bytes()[:100])  # a file cut short (a process killed mid-write by an older torch)
    again = Precompiled(scaled, dynamic=False, folder=tmp_path)
    assert torch.allclose(again(*args), _by_hand(*args), atol=1e-6) and not again.loaded
    assert again.refused.startswith("unreadable")
    third = Precompiled(scaled, dynamic=False, folder=tmp_path)
    third(*args)
    assert third.loaded  # the cut file was replaced by a whole one


@torch.no_grad()
def test_a_store_that_cannot_be_written_leaves_the_compile_working(tmp_path, caplog, monkeypatch):
    """...and says so once, however many forms of the function (an engine has one for each width)."""
    from model.engine import compile_cache

    monkeypatch.setattr(compile_cache, "_WARNED", set())
    blocked = tmp_path / "file"
    blocked.write_text("a file where the store's folder would go")
    args = _inputs()
    for _ in range(2):
        compiled = Precompiled(scaled, dynamic=False, folder=blocked)
        assert torch.allclose(compiled(*args), _by_hand(*args), atol=1e-6) and not compiled.stored
    assert sum("was not stored" in r.getMessage() for r in caplog.records) == 1


@torch.no_grad()
def test_with_storing_off_nothing_is_stored_or_loaded(tmp_path, monkeypatch):
    """STORE_FORMS False (the comparison arm of benchmarks/pending_gpu.sh `stored`): plain torch.compile, as before."""
    from model.engine import compile_cache

    args = _inputs()
    Precompiled(scaled, dynamic=False, folder=tmp_path)(*args)
    monkeypatch.setattr(compile_cache, "STORE_FORMS", False)
    before = _graphs()
    off = Precompiled(scaled, dynamic=False, folder=tmp_path)
    assert torch.allclose(off(*args), _by_hand(*args), atol=1e-6)
    assert not off.loaded and _graphs() == before + 1  # traced again beside the stored form
    wider = _inputs(rows=5)
    Precompiled(scaled, dynamic=False, folder=tmp_path)(*wider)
    assert len(list(tmp_path.iterdir())) == 1  # nothing stored for the new shapes


MODULE = textwrap.dedent(
    """
    import torch

    OFFSET = {offset}


    def shifted(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) + OFFSET
    """
)


@torch.no_grad()
def test_a_changed_source_is_compiled_afresh(tmp_path, monkeypatch):
    """A module-level constant the function reads changes (its body does not): Dynamo's guards on globals are not
    kept with a stored form, so only the sources' check stands between the edit and the old constant's answers."""
    folder, code = tmp_path / "store", tmp_path / "code"
    code.mkdir()
    monkeypatch.syspath_prepend(str(code))
    (code / "dr_precompiled_probe.py").write_text(MODULE.format(offset=1.0))
    probe = importlib.import_module("dr_precompiled_probe")
    x = torch.linspace(0, 1, 8)
    assert torch.allclose(Precompiled(probe.shifted, dynamic=False, folder=folder)(x), x.sin() + 1.0)
    (code / "dr_precompiled_probe.py").write_text(MODULE.format(offset=2.0))
    importlib.invalidate_caches()
    probe = importlib.reload(probe)
    edited = Precompiled(probe.shifted, dynamic=False, folder=folder)
    assert torch.allclose(edited(x), x.sin() + 2.0) and not edited.loaded
    assert edited.refused == "a traced source changed"
    sys.modules.pop("dr_precompiled_probe")


# a fresh process builds a compiled engine on the tiny model, decodes three rows and prints their ids and how many
# graphs Dynamo traced (the tiny checkpoint's folder in argv[1], the device in argv[2])
ENGINE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from model.config import GenerationConfig
    from model.engine import model_runner
    from model.engine.kv_cache import slot_attention_on
    from model.engine.scheduler import Engine
    from model.engine.sequence import Request
    from model.network.checkpoint import load_model
    from model.network.deepresonance import Example
    from ckpt.layout import layout

    model_runner.COMPILE_PREFILL = True
    paths = layout(Path(sys.argv[1]))
    model = load_model(paths.vicuna, paths.delta_dir("alpha"), paths.imagebind, device=sys.argv[2])
    engine = Engine(model, 2, 64, 6, k_cap=1, compile=True, sync_every=2, refill_min=1, narrow=[1])
    # each width run once first, narrowest first, every slot free: the order a CUDA engine's captures compile them in
    # (a later process on an H100 refused the first width's forms, benchmarks/results/2026-12-08-h100-stored-and-load/)
    with slot_attention_on(engine.llm), torch.inference_mode():
        for width in engine.widths:
            engine.step(width)
    gen = GenerationConfig(max_new_tokens=6, do_sample=False, decoder="engine")
    rows = [Example("", text, []) for text in ("A calm piano piece.", "Loud drums", "What key is it in?")]
    ids = {}
    for batch in engine.run(Request(i, ex, gen, i) for i, ex in enumerate(rows)):
        ids.update((u.handle, u.ids) for u in batch)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    step = engine.step
    forms = [*step.layers.values(), *step.finishes.values(), engine.packed_prefill.keywords["layer"]]
    refused = [f"{f.fn.__qualname__}: {f.refused}" for f in forms if f.refused]
    settings = [f"{f.fn.__qualname__}: {f.settings}" for f in forms]
    print(json.dumps({"ids": [ids[i] for i in range(3)], "graphs": graphs, "refused": refused, "settings": settings}))
    """
)


def two_engine_processes(tiny_root: Path, cache: Path, device: str) -> None:
    """Two processes in turn, one compile cache: the first traces the prefill's layer and each width's layer and end
    (5 graphs), the second traces none and decodes the same ids."""
    # this process's import path whole: on a device, the carried packages too
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", ENGINE, str(tiny_root), device], capture_output=True, text=True, env=env, timeout=900
        )
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["graphs"] == 5 and runs[1]["graphs"] == 0, [run["refused"] + run["settings"] for run in runs]
    assert runs[1]["ids"] == runs[0]["ids"] and all(runs[0]["ids"])
    assert len(list((cache / "dr-precompiled").iterdir())) == 5


@pytest.mark.slow
def test_a_second_process_builds_its_engine_without_tracing(tiny_root, tmp_path):
    two_engine_processes(tiny_root, tmp_path, "cpu")
