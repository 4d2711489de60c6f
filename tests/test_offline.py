"""`hub_offline`, the one offline check of downloads, dataset fetches and BERTScore: it agrees with huggingface_hub's
own reading of the environment, and also sees a value set after huggingface_hub was imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import eval.bertscore as bertscore
from model.io.files import hub_offline

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _read_at_import(env: dict[str, str]) -> bool:
    """What a fresh huggingface_hub decides from this environment (the oracle: its own import-time rule)."""
    clean = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS} | env
    code = "import huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"HF_HUB_OFFLINE": "1"},
        {"HF_HUB_OFFLINE": "true"},
        {"HF_HUB_OFFLINE": "YES"},
        {"HF_HUB_OFFLINE": "0"},
        {"HF_HUB_OFFLINE": "false"},
        {"TRANSFORMERS_OFFLINE": "1"},
        {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"},
    ],
)
def test_a_value_set_after_import_is_read_as_huggingface_hub_reads_it(env, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # imported while online
    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hub_offline() is _read_at_import(env)


def test_offline_at_import_stays_offline(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    assert hub_offline()


def test_bertscore_offline_tries_no_connection(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "on")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(bertscore.socket, "create_connection", lambda *a, **k: pytest.fail("offline, yet it dialled"))
    assert bertscore._hub_reachable() is False
