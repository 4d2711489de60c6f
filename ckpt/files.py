"""What every checkpoint command shares: its error type, sha256 manifests and rich byte progress bars."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

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


class _RichTqdm:
    """The slice of tqdm's interface huggingface_hub calls on `tqdm_class`, drawn as a rich task instead."""

    progress: Progress

    def __init__(self, *, desc: str = "", total: int | None = None, initial: int = 0, **_: Any) -> None:
        name = desc.rsplit("/", 1)[-1]
        self.task: TaskID = self.progress.add_task(name, total=total, completed=initial)

    def __enter__(self) -> _RichTqdm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int | float | None = 1) -> None:
        self.progress.advance(self.task, float(n or 0))

    def close(self) -> None:
        self.progress.refresh()


def hub_tqdm(progress: Progress) -> type[_RichTqdm]:
    """A `tqdm_class` for huggingface_hub downloads that draws into `progress`."""
    return type("HubRichTqdm", (_RichTqdm,), {"progress": progress})
