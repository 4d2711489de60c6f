"""What every checkpoint command shares: its error type, sha256 manifests and rich byte progress bars."""

from __future__ import annotations

import warnings
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
