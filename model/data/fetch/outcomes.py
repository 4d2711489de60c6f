"""What happened to each media path: the fsync'd journal a rerun resumes from, the media root's lock, the report.

The journal (`<media root>/.dr-media/journal.jsonl`) holds one JSON line per outcome, appended and fsync'd before the
next file counts; the last line of a path wins. A line torn by a kill or a full disk is skipped when read.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from model.io.files import write_atomically, write_failure

STATE_DIR = ".dr-media"
FETCHED, PRESENT, UNAVAILABLE, FAILED = "fetched", "present", "unavailable", "failed"
NO_SOURCE = "no source"  # a path the rows name and the sources table does not list


class MediaJobError(RuntimeError):
    """The job cannot go on (the root is locked, the disk is full, a tool is missing); one-line message."""


@dataclass(frozen=True)
class Outcome:
    path: str
    status: str  # FETCHED, PRESENT, UNAVAILABLE, FAILED or NO_SOURCE
    reason: str = ""
    url: str = ""


def state_dir(media_root: Path) -> Path:
    return Path(media_root) / STATE_DIR


class MediaLock:
    """One `dr data media` per media root: a filelock on `<root>/.dr-media/lock`, with a note naming the holder. The
    OS drops the lock when its holder dies, so a kill leaves no stale lock."""

    def __init__(self, media_root: Path) -> None:
        self.folder = state_dir(media_root)
        self.note = self.folder / "lock.holder"
        self.lock = FileLock(self.folder / "lock", timeout=0)

    def __enter__(self) -> MediaLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except Timeout:
            holder = self.note.read_text(encoding="utf-8").strip() if self.note.is_file() else "another process"
            raise MediaJobError(
                f"{self.folder.parent}: another dr data media is fetching into it ({holder}); wait for it to finish"
            ) from None
        except OSError as e:
            raise MediaJobError(f"{self.folder}: cannot create the lock ({write_failure(e)})") from e
        try:
            write_atomically(self.note, f"pid {os.getpid()} on {socket.gethostname()}\n", fsync=False)
        except OSError:
            pass  # the lock holds without its note; the next process then says "another process"
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


class Journal:
    """Append-only outcomes of one media root. Held under MediaLock."""

    def __init__(self, media_root: Path) -> None:
        self.path = state_dir(media_root) / "journal.jsonl"
        self.last: dict[str, Outcome] = {}
        if self.path.is_file():
            for line in self.path.read_bytes().decode("utf-8", "replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.last[entry["path"]] = Outcome(
                        entry["path"], entry["status"], entry.get("reason", ""), entry.get("url", "")
                    )
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill or a full disk

    def record(self, outcome: Outcome) -> None:
        """Append one line and fsync it; a full disk is a MediaJobError (the lines before it stay whole)."""
        entry = {
            "path": outcome.path,
            "status": outcome.status,
            "reason": outcome.reason,
            "url": outcome.url,
            "time": round(time.time(), 3),
        }
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                if os.fstat(fd).st_size and not self._ends_with_newline():
                    data = b"\n" + data  # after a torn line, start a fresh one
                if os.write(fd, data) != len(data):
                    raise OSError(27, "File too large")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise MediaJobError(
                f"{self.path}: cannot journal {outcome.path} ({write_failure(e)}); rerun to resume"
            ) from e
        self.last[outcome.path] = outcome

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


@dataclass
class Report:
    """Per dataset: rows whose media are all there, and what happened to each file it names."""

    dataset: str
    media_root: str
    rows: int = 0
    rows_complete: int = 0
    counts: Counter = field(default_factory=Counter)  # by status
    reasons: dict[str, Counter] = field(default_factory=lambda: {UNAVAILABLE: Counter(), FAILED: Counter()})
    ignored_rows: int = 0  # table rows the dataset does not name
    input_errors: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.status] += 1
        if outcome.status in self.reasons:
            self.reasons[outcome.status][outcome.reason] += 1

    def as_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "media_root": self.media_root,
            "rows": self.rows,
            "rows_complete": self.rows_complete,
            "files": {k: self.counts[k] for k in (FETCHED, PRESENT, UNAVAILABLE, FAILED, NO_SOURCE)},
            "unavailable": dict(self.reasons[UNAVAILABLE]),
            "failed": dict(self.reasons[FAILED]),
            "ignored_table_rows": self.ignored_rows,
            "input_errors": self.input_errors,
            "missing": sorted(self.missing),
        }

    def write(self, path: str | Path) -> None:
        write_atomically(path, json.dumps(self.as_json(), indent=1, ensure_ascii=False) + "\n")
