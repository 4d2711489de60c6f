"""The inference journal: finished rows are never lost, whatever happens to the process, the disk or a second job.

`<out>.jsonl` (one per rank, `<out>.rankN.jsonl`, under torchrun) holds one JSON line per finished row, appended,
flushed and fsync'd as rows finish. Its first line records the run's identity (delta fingerprint, variant, dtype,
generation settings), so a rerun resumes only work the same model and settings would have produced.

What can go wrong, and what happens then:

- a kill, or a full disk, mid-write leaves a torn last line: on the next run every complete line is kept, the torn
  bytes are renamed aside (`<journal>.torn-<time>`) and reported in one line, and appending starts on a fresh line;
- a full disk during a write: the journal is cut back to its last complete line and the run stops with one line
  naming the file; only the rows of that write are redone;
- a second process on the same `--out`: an advisory lock (filelock's `flock` on `<out>.lock`) lets one in; the other
  says which process holds it (pid, host, start time) and exits before doing any work;
- another delta, variant, dtype or generation settings than the journal's: one line offering a new `--out` or
  `--overwrite`, nothing skipped wrongly.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from model.io.files import write_atomically, write_failure

log = logging.getLogger(__name__)

RUN_KEY = "run"  # the journal's first line: {"run": identity}
TORN_SUFFIX = ".torn-"
# GenerationConfig fields that change which answer a row gets only when sampling: greedy tokens are the same with
# every decoder (tested), while the engine draws from per-row streams that generate's do not match
SAMPLING_ONLY = ("temperature", "top_p", "top_k", "seed", "decoder")


class JournalError(ValueError):
    """A journal, result or lock file problem; the message is one line naming the file."""


class OutputLocked(JournalError):
    """Another process holds the lock of this `--out`."""


def disk_error(path: Path, err: OSError, what: str) -> JournalError:
    """One line for a failed write: which file, why (full disk, file-size limit, permissions), what was kept."""
    return JournalError(f"{path}: could not write ({write_failure(err)}); {what}")


def journal_paths(out_json: Path) -> list[Path]:
    """All journals of a result file: one per rank when several processes shared the job."""
    return sorted(p for p in out_json.parent.glob(out_json.stem + ".*jsonl") if p.is_file())


def journal_path(out_json: Path, rank: int = 0, world: int = 1) -> Path:
    suffix = ".jsonl" if world == 1 else f".rank{rank}.jsonl"
    return out_json.with_name(out_json.stem + suffix)


def lock_path(out_json: Path, rank: int = 0) -> Path:
    return out_json.with_name(out_json.name + (".lock" if rank == 0 else f".rank{rank}.lock"))


def run_identity(model: Any, gen: Any) -> dict:
    """What decides the answers: the delta (by content), its LoRA alpha (not in the original's deltas), variant, dtype
    and the generation settings.

    Speed-only options (batch size, slots) are not in it: they do not change which answer a row gets.
    """
    settings = asdict(gen)
    if not settings.get("do_sample", True):  # greedy: the sampling knobs change nothing
        settings = {k: v for k, v in settings.items() if k not in SAMPLING_ONLY}
    return {
        "delta": getattr(model, "delta_fingerprint", None),
        "variant": model.config.variant,
        "lora_alpha": model.config.lora_alpha,
        "dtype": str(model.llama_model.dtype).removeprefix("torch."),
        "generation": settings,
    }


def _differences(saved: dict, now: dict) -> list[str]:
    out = []
    for key in sorted(saved.keys() | now.keys()):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in _differences(a, b)]
        elif a != b:
            out.append(f"{key} {a!r} -> {b!r}")
    return out


def _read_lines(path: Path) -> tuple[list[bytes], bytes]:
    """(complete lines, torn tail): the tail is whatever follows the last newline."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], b""
    except OSError as e:
        raise JournalError(f"{path}: unreadable journal ({e.strerror or e})") from e
    *lines, tail = data.split(b"\n")
    return lines, tail


def _parse(path: Path, lines: Sequence[bytes]) -> tuple[dict | None, dict[tuple[str, str], str], int]:
    """(identity or None, answers, number of complete lines that are not journal entries)."""
    identity, done, bad = None, {}, 0
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad += 1
            continue
        if not isinstance(entry, dict):
            bad += 1
        elif RUN_KEY in entry:
            identity = identity if identity is not None else entry[RUN_KEY]
        elif isinstance(entry.get("answer"), str) and isinstance(entry.get("id"), str):
            done[(entry["id"], str(entry.get("instruction")))] = entry["answer"]
    if bad:
        log.warning("%s: %d damaged line(s) skipped", path, bad)
    return identity, done, bad


def read_journal(paths: Sequence[Path]) -> dict[tuple[str, str], str]:
    """(id, instruction) -> answer from journals. Only complete lines count: a torn tail (a kill or a full disk
    mid-write) is not an answer; nothing is modified here (recovery is `Journal`'s, under the lock)."""
    done: dict[tuple[str, str], str] = {}
    for path in paths:
        done.update(_parse(path, _read_lines(path)[0])[1])
    return done


def check_identity(out_json: Path, identity: dict) -> None:
    """Every journal of `out_json` that holds answers must come from this identity; else one line says what changed
    and offers a new --out or --overwrite."""
    for path in journal_paths(out_json):
        saved, done, _ = _parse(path, _read_lines(path)[0])
        if not done:  # no answers to keep or to mistake for this run's
            continue
        if saved is None:
            changes = "it records no run identity (written by an older dr)"
        elif saved == identity:
            continue
        else:
            changes = "changed: " + "; ".join(_differences(saved, identity))
        raise JournalError(
            f"{path}: holds answers of another run ({changes}); pass a new --out, or --overwrite to answer every row "
            "again"
        )


def remove_outputs(out_json: Path, world: int = 1) -> None:
    """--overwrite: the journals of other jobs, torn tails and the result file of `out_json` go. Journals of this
    job's ranks are each removed by their own rank (removing another rank's would race with its first write); the
    lock files stay (they are held)."""
    ours = {journal_path(out_json, r, world) for r in range(world)}
    for path in journal_paths(out_json):
        if path not in ours:
            path.unlink(missing_ok=True)
    for path in out_json.parent.glob(out_json.stem + ".*jsonl" + TORN_SUFFIX + "*"):
        path.unlink(missing_ok=True)
    out_json.unlink(missing_ok=True)


def recover(path: Path) -> int:
    """Make the journal end on a complete line: a torn tail is renamed aside and reported. Returns lines kept."""
    lines, tail = _read_lines(path)
    if not tail:
        return sum(1 for line in lines if line.strip())
    aside = path.with_name(path.name + TORN_SUFFIX + time.strftime("%Y%m%dT%H%M%S"))
    n = 1
    while aside.exists():  # never over an earlier tail
        aside, n = aside.with_name(f"{path.name}{TORN_SUFFIX}{time.strftime('%Y%m%dT%H%M%S')}.{n}"), n + 1
    keep = sum(len(line) + 1 for line in lines)
    try:
        aside.write_bytes(tail)
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    except OSError as e:
        raise disk_error(aside, e, "the journal was left as it was; free some space and rerun") from e
    log.warning(
        "%s: torn last line (%d bytes, a write cut short) set aside in %s; %d complete line(s) kept",
        path,
        len(tail),
        aside,
        sum(1 for line in lines if line.strip()),
    )
    return sum(1 for line in lines if line.strip())


class Journal:
    """Appends finished rows to one journal. Each `write` lands whole or not at all: a failed write (full disk) cuts
    the file back to where it was, so the journal always ends on a complete line."""

    def __init__(self, path: Path, identity: dict | None = None) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise disk_error(path, e, "nothing was journaled by this run") from e
        if identity is None:
            return
        saved, done, _ = _parse(path, _read_lines(path)[0])
        if not done and saved != identity:  # no answers yet: the file starts over under this run's identity
            os.ftruncate(self.fd, 0)
            self.write([{RUN_KEY: identity}])

    def write(self, entries: Sequence[dict]) -> None:
        """Append entries (one JSON line each) and fsync before returning."""
        if not entries:
            return
        data = b"".join(json.dumps(e, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n" for e in entries)
        start = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            os.fsync(self.fd)
        except OSError as e:
            try:
                os.ftruncate(self.fd, start)
            except OSError:
                log.warning("%s: could not cut back a partial write; the next run sets it aside", self.path)
            kept = f"these {len(entries)} row(s) were not journaled, every row before them is kept"
            raise disk_error(self.path, e, f"{kept}; free some space and rerun") from e

    def close(self) -> None:
        os.close(self.fd)


def open_journal(
    out_json: Path, identity: dict, *, overwrite: bool = False, rank: int = 0, world: int = 1
) -> tuple[Journal, dict[tuple[str, str], str]]:
    """The journal this process appends to and every answer journaled so far for `out_json` (all ranks).

    Call it holding `output_lock(out_json, rank)`. A journal from another run identity is a JournalError unless
    `overwrite`, which removes the old results first (rank 0; other ranks remove only their own journal).
    """
    out_json = Path(out_json)
    own = journal_path(out_json, rank, world)
    if overwrite:
        if rank == 0:
            remove_outputs(out_json, world)
        own.unlink(missing_ok=True)
    if own.exists():
        recover(own)  # before anything appends: the next line must not land on a fragment
    check_identity(out_json, identity)
    return Journal(own, identity), read_journal(journal_paths(out_json))


def write_results(out_json: Path, rows: Sequence[Any] | None = None) -> dict[str, dict[str, str]]:
    """Rebuilds `{id: {instruction: answer}}` from the journals, in dataset order, written atomically (a reader
    never sees half a file, a full disk leaves the old one)."""
    out_json = Path(out_json)
    done = read_journal(journal_paths(out_json))
    order = [(r.id, r.instruction) for r in rows] if rows is not None else list(done)
    results: dict[str, dict[str, str]] = {}
    for key in order:
        if key in done:
            results.setdefault(key[0], {})[key[1]] = done[key]
    text = json.dumps(results, indent=2, ensure_ascii=False).encode("utf-8", "backslashreplace")
    try:
        write_atomically(out_json, text)
    except OSError as e:
        raise disk_error(out_json, e, "every answer is kept in its journal; rerun to write it") from e
    return results


class OutputLock:
    """One process per result file: filelock's FileLock (flock) on `<out>.lock`, taken without waiting. The lock file
    names its holder (pid, host, start time) for the one line the next process prints. Re-entrant within a process
    (the CLI takes it before loading the model, run_inference again: one FileLock instance per path counts the
    holds); the OS drops it when the holder dies, so a kill leaves no stale lock."""

    _held: set[FileLock] = set()  # held locks stay referenced: a caller may drop its handle and keep the lock

    def __init__(self, out_json: Path, rank: int = 0) -> None:
        self.path = lock_path(Path(out_json), rank)
        self.out = Path(out_json)
        self.lock = FileLock(self.path, blocking=False, is_singleton=True, thread_local=False, on_acquired=_note_holder)

    def acquire(self) -> OutputLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except Timeout:
            raise OutputLocked(
                f"{self.out}: another dr process is writing it ({self._holder()}; lock {self.path}); wait for it to "
                "finish, or pass another --out (several GPUs: torchrun shards one job)"
            ) from None
        except OSError as e:
            raise JournalError(f"{self.path}: cannot create the lock of {self.out} ({e.strerror or e})") from e
        self._held.add(self.lock)
        return self

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_bytes()[:4096] or b"{}")
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if not self.lock.is_locked:
            return
        self.lock.release()
        if not self.lock.is_locked:
            self._held.discard(self.lock)  # the file stays (others may wait on it)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _note_holder(fd: int) -> None:
    """Write this process into the lock file it has just locked (filelock's on_acquired hook)."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
    except OSError:
        pass  # the lock holds without its note; the next process then names only the lock file


def output_lock(out_json: str | Path, rank: int = 0) -> OutputLock:
    return OutputLock(Path(out_json), rank)
