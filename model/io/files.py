"""File and hub helpers shared by everything `dr` writes or fetches: file modes, and the one offline check."""

from __future__ import annotations

import os
from pathlib import Path


def umask_mode(path: str | Path) -> None:
    """Gives a written file the mode an ordinary `open` would (0666 less the umask): safetensors' writer and
    `tempfile.mkstemp` create files as 0600, which hides deltas and results from the rest of a lab's group."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off limits: HF_HUB_OFFLINE (else TRANSFORMERS_OFFLINE) as the environment says
    now, by huggingface_hub's own rule, or as huggingface_hub read it at import. It reads it only once, so a value
    set later (`dr demo` sets it, tests do) would be missed; asking first also spares its retries on a dead network."""
    from huggingface_hub import constants, is_offline_mode

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return now.upper() in constants.ENV_VARS_TRUE_VALUES or is_offline_mode()
