"""What a training run reports: a Rich progress line (loss, token accuracy, lr, samples/s, ETA) and TensorBoard."""

from __future__ import annotations

import logging
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("model.train.loop")


class TrainLog:
    """Only the main process logs; `enabled=False` makes every call a no-op (the other ranks)."""

    def __init__(self, logdir: Path, start: int, total: int, enabled: bool = True, progress: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logdir), purge_step=start)  # a resumed run overwrites later points
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=not (enabled and progress),
        )
        self.task = self.bar.add_task("train", total=total, completed=start, stats="")

    def __enter__(self) -> TrainLog:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()
        if self.writer is not None:
            self.writer.close()

    def update(self, record: dict, log_line: bool = False) -> None:
        if not self.enabled:
            return
        step = record["step"]
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, step)
        stats = (
            f"loss {record['loss']:.4f}  acc {100 * record['accuracy']:.1f}%  lr {record['lr']:.2e}  "
            f"{record['samples_per_s']:.1f} samples/s"
        )
        self.bar.update(self.task, completed=step, stats=stats)
        if log_line:
            log.info("step %d  %s", step, stats)
