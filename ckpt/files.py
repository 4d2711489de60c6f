"""What every checkpoint command shares: its error type, sha256 manifests and rich byte progress bars."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from tqdm import TqdmExperimentalWarning
from tqdm.rich import tqdm_rich

from ckpt.layout import MANIFEST_FILE

CHUNK = 8 << 20


class CkptError(RuntimeError):
    """A checkpoint problem the user can fix; the CLI prints its one-line message and exits non-zero."""


def byte_progress(console: Console | None = None) -> Progress:
    """A progress display with sizes, speed and ETA, for transfers, merges and hashing."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=False,
    )


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """Streamed sha256 (multi-GB files never sit in memory)."""
    digest = hashlib.sha256()
    task = progress.add_task(f"sha256 {path.name}", total=path.stat().st_size) if progress else None
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if progress is not None and task is not None:
                progress.advance(task, len(chunk))
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """The recorded {file name: {"size", "sha256"}} of a folder; empty when none was written."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["files"]


def record_manifest(folder: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Merge entries into the folder's manifest (download adds one piece at a time)."""
    files = read_manifest(folder) | entries
    text = json.dumps({"files": dict(sorted(files.items()))}, indent=1) + "\n"
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_text(text)
    tmp.replace(folder / MANIFEST_FILE)


def hub_tqdm(progress: Progress) -> type[tqdm_rich]:
    """A `tqdm_class` for huggingface_hub: tqdm's own rich bars, drawn on `progress`'s console so they nest in its
    live display (rich 15 stacks live displays per console), without tqdm's "experimental" warning on every bar."""

    class HubTqdm(tqdm_rich):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TqdmExperimentalWarning)
                super().__init__(*args, options={"console": progress.console}, **kwargs)

        def display(self, *args: Any, **kwargs: Any) -> None:
            """Also the total: snapshot_download grows its bars' totals file by file, and tqdm_rich draws only `n`."""
            super().display(*args, **kwargs)
            if hasattr(self, "_task_id"):
                self._prog.update(self._task_id, total=self.total)

    return HubTqdm
