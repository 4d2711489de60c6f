"""Shared fixtures: a tiny checkpoint set built once per test session (no downloads)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DR_HTTP_BACKOFF", "0.05")  # download retries wait 0.05, 0.1, 0.2 s here, not 2, 4, 8
# read before any test module is imported: importing Inductor sets $TORCHINDUCTOR_CACHE_DIR to its own default
# (/tmp/torchinductor_<user>), which then outlived every session and served a later one its stored compiled forms
EXPLICIT_COMPILE_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


@pytest.fixture(scope="session", autouse=True)
def session_compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Compiled kernels and stored compiled forms (model/engine/compile_cache.py) of this session only, in pytest's
    own temporary folders (it keeps the last few): a test neither loads what the user's jobs stored nor leaves its
    own there. An explicit $TORCHINDUCTOR_CACHE_DIR is kept."""
    if EXPLICIT_COMPILE_CACHE is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = EXPLICIT_COMPILE_CACHE
        yield
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("compile_cache"))
    yield
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny set in the original's layout (LLaMA + tokenizer, ImageBind, alpha and beta deltas).

    Tests must not modify it; copy it first when a test needs to.
    """
    from ckpt.tiny import write_tiny_set

    return write_tiny_set(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="session")
def tiny_layout(tiny_root: Path):
    from ckpt.layout import layout

    return layout(tiny_root)


@pytest.fixture(scope="session")
def stopping_root(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny set with an alpha delta whose answers end at different lengths: the lm_head row of EOS is made a
    slightly larger copy of the row of the token greedy answers produce most, so a row ends (EOS wins) where it would
    first have produced that token. Random tiny models otherwise never stop before max_new_tokens."""
    import shutil
    from collections import Counter

    import torch

    from ckpt.layout import layout
    from model.config import GenerationConfig
    from model.generate.base import generate_ids
    from model.network.checkpoint import load_model, save_delta
    from model.network.deepresonance import Example

    root = tmp_path_factory.mktemp("stopping") / "ckpt"
    shutil.copytree(tiny_root, root)
    paths = layout(root)
    model = load_model(paths.vicuna, paths.delta_dir("alpha"), paths.imagebind)
    prompts = [Example("", f"Question {i}?", []) for i in range(6)]
    greedy = GenerationConfig(max_new_tokens=24, do_sample=False, decoder="generate")
    counts = Counter(t for ids in generate_ids(model, prompts, greedy) for t in ids)
    frequent = counts.most_common(1)[0][0]
    with torch.no_grad():
        head = model.llama_model.get_output_embeddings().weight
        head[model.tokenizer.eos_id] = 1.05 * head[frequent]
    save_delta(model, paths.delta_dir("alpha"))
    return root


@pytest.fixture
def step_widths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The width of every decode step the engine runs in the test, in order."""
    from model.engine.model_runner import SlotStep

    widths: list[int] = []
    real = SlotStep.__call__
    monkeypatch.setattr(SlotStep, "__call__", lambda self, width: widths.append(width) or real(self, width))
    return widths


@pytest.fixture
def engine_builds(monkeypatch: pytest.MonkeyPatch) -> list:
    """A weak reference to every engine a job builds (model/infer/kept_engine.py), in order; weak, so that a test can
    see a dropped engine freed."""
    import weakref

    from model.infer import kept_engine

    built, real = [], kept_engine.Engine

    def counted(*args, **kwargs):
        engine = real(*args, **kwargs)
        built.append(weakref.ref(engine))
        return engine

    monkeypatch.setattr(kept_engine, "Engine", counted)
    return built


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many files' bytes were hashed in this process (model/media/file_hashes.py: hashlib.file_digest)."""
    from model.media import file_hashes

    count = [0]
    real = hashlib.file_digest

    def file_digest(f, name):
        count[0] += 1
        return real(f, name)

    monkeypatch.setattr(file_hashes.hashlib, "file_digest", file_digest)
    return count
