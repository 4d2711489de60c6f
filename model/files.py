"""File permissions shared by everything `dr` writes: results, deltas, exports."""

from __future__ import annotations

import os
from pathlib import Path


def umask_mode(path: str | Path) -> None:
    """Gives a written file the mode an ordinary `open` would (0666 less the umask): safetensors' writer and
    `tempfile.mkstemp` create files as 0600, which hides deltas and results from the rest of a lab's group."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
