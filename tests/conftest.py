"""Shared fixtures: a tiny checkpoint set built once per test session (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DR_HTTP_BACKOFF", "0.05")  # download retries wait 0.05, 0.1, 0.2 s here, not 2, 4, 8


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
