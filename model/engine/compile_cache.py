"""Where compiled kernels persist between processes."""

from __future__ import annotations

import os
from pathlib import Path


def compile_cache_dir() -> Path:
    """$TORCHINDUCTOR_CACHE_DIR if set, else the user's cache directory (a second `dr infer` then loads the compiled
    step instead of compiling it again)."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dr" / "inductor"
