"""File and hub helpers shared by everything `dr` writes or fetches: file modes, the one way to write a file whole
or not at all, the one wording of a failed write, the one way to keep a memo, and the one offline check."""

from __future__ import annotations

import errno
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def umask_mode(path: str | Path) -> None:
    """Gives a written file the mode an ordinary `open` would (0666 less the umask): safetensors' writer and
    `tempfile.mkstemp` create files as 0600, which hides deltas and results from the rest of a lab's group."""
    os.chmod(path, 0o666 & ~current_umask())


_UMASK_SWAP = threading.Lock()


def current_umask() -> int:
    """The process's umask. Linux tells it in /proc/self/status; elsewhere it can only be read by setting it and
    setting it back, which threads writing at once (the feature cache's stores) must not interleave."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration):
        with _UMASK_SWAP:
            mask = os.umask(0)
            os.umask(mask)
            return mask


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off limits: HF_HUB_OFFLINE (else TRANSFORMERS_OFFLINE) as the environment says
    now, by huggingface_hub's own rule, or as huggingface_hub read it at import. It reads it only once, so a value
    set later (`dr demo` sets it, tests do) would be missed; asking first also spares its retries on a dead network."""
    from huggingface_hub import constants, is_offline_mode

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return now.upper() in constants.ENV_VARS_TRUE_VALUES or is_offline_mode()


def temporary_name(path: Path) -> Path:
    """The one naming scheme of files being written: a hidden sibling, unique per process and call, so a crash
    leaves no file under a final name and two writers never share a temporary."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def temporary_folder(path: Path) -> Path:
    """The one naming scheme of folders being filled before a rename into place: a hidden sibling with a fixed name,
    unlike a file's, so that every rank of a job writes into the same one and the next attempt clears what a killed
    one left (a model or a checkpoint is gigabytes)."""
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def written_atomically(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yields a temporary path in `path`'s folder to write to; on success it is fsync'd, given the umask's mode
    and renamed over `path` (a reader sees the old file or the new one, never half); on failure it is removed and
    the error propagates. For writers that take a path (torch.save, safetensors, ffmpeg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: str | Path, data: str | bytes, fsync: bool = True) -> None:
    """`data` into `path` through `written_atomically`."""
    with written_atomically(path, fsync) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def write_failure(err: BaseException) -> str:
    """Why a write failed, in words, the same for every writer: the OS reports a full disk (or a quota, or a
    file-size limit) by errno, torch and safetensors as a bare 'write failed'."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "the disk is full"
    text = " ".join(str(err).split())
    if "write failed" in text or "No space left" in text or "File too large" in text:
        return "a write failed: is the disk full?"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {text[:200]}"


MEMO_BYTES = 64 << 20  # a larger memo is not read (the file-digest memo's 200,000 entries are about 30 MB)


def read_memo(path: Path, valid: Callable[[str, object], bool]) -> dict:
    """A JSON object of remembered results (digests, by whatever identifies what was digested), its entries that
    `valid(key, value)` accepts; empty when missing, unreadable or over MEMO_BYTES. A memo only saves time: a bad one
    costs a redo."""
    try:
        if path.stat().st_size > MEMO_BYTES:
            return {}
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(memo, dict):
        return {}
    return {k: v for k, v in memo.items() if isinstance(k, str) and valid(k, v)}


def write_memo(path: Path, memo: dict) -> None:
    """Atomically, so concurrent processes never read half a memo; a folder that cannot be written only loses the
    speed-up. Not fsync'd: a memo lost to a crash costs a redo."""
    with suppress(OSError):
        write_atomically(path, json.dumps(memo, separators=(",", ":")), fsync=False)


def file_identity(path: Path) -> dict[str, str | int]:
    """What tells one file on disk from another without reading it: replacing or rewriting it changes one of these
    (mtime alone can be set back by hand; the inode, ctime and device cannot)."""
    st = path.stat()
    return {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
    }
