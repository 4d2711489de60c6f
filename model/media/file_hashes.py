"""sha256 of media files, remembered on disk by each file's identity, so that a job whose features are all cached
(a second checkpoint evaluated on the same set) neither reads nor hashes its media again.

A remembered digest is used only while the file's size, mtime, ctime, inode and device are all unchanged. Writing a
file always moves its ctime to the kernel's clock, which no tool can set back, so a rewritten file is hashed again
even where its size and mtime were restored. Clocks tick coarsely (some file systems keep seconds), so a file whose
ctime is within SETTLED_NS of its hashing could still change within the same tick: its digest is kept for this
process only (git treats its "racily clean" index entries the same way).
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

from model.io.files import read_memo, write_memo
from model.media.preprocess import MediaError

# in the feature cache's root: resolved path -> [size, mtime, ctime, inode, device, sha256]
HASHES_FILE = "file-hashes.json"
HASHES_KEPT = 200_000  # the most recent files remembered on disk (about 30 MB of JSON)
SETTLED_NS = 2_000_000_000  # a file's ctime must be this much older than its hashing for the digest to be kept on disk
# a job's lookups save the memo at most this often, and the job once more at its end: each save rewrites the whole
# memo (about 8 MB for a 55,000-file set), and a job looks up a group of files at a time
SAVE_EVERY_S = 10.0


def _is_record(key: str, record: object) -> bool:
    """[size, mtime, ctime, inode, device, sha256]"""
    return (
        isinstance(record, list)
        and len(record) == 6
        and all(isinstance(x, int) for x in record[:5])
        and isinstance(record[5], str)
        and len(record[5]) == 64
    )


def _identity(st: os.stat_result) -> list[int]:
    """[size, mtime, ctime, inode, device]: a record's first five fields."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def hash_file(path: Path) -> tuple[str, list, bool]:
    """sha256 of the file's bytes, as (memo key, record, settled): the key is the resolved path, the record
    [size, mtime, ctime, inode, device, sha256], and `settled` whether the record may be kept on disk (SETTLED_NS).
    Only a regular file is read (checked on the opened descriptor, which a FIFO or device cannot block in
    non-blocking mode). A module function, so the decoding processes hash beside the job's process
    (model/media/decoders.py) and hand the record back to its `FileHashes.remember`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise MediaError(path, "no such file") from e
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MediaError(path, "not a regular file")
        settled = time.time_ns() - st.st_ctime_ns > SETTLED_NS  # taken before the bytes are read
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return str(path.resolve()), [*_identity(st), digest], settled


class FileHashes:
    """Files' sha256, remembered for this object's life and, under `root`, across processes (`save`). Thread-safe:
    a job's lookups hash in several threads."""

    def __init__(self, root: Path | None) -> None:
        self.path = root / HASHES_FILE if root is not None else None
        self.lock = threading.Lock()
        self.memo: dict[str, list] | None = None  # read from disk at first use
        self.settled: dict[str, list] = {}  # hashed here and safe to keep on disk, not saved yet
        self.saved_at = -float("inf")  # time.monotonic() of the last save

    def _memo(self) -> dict[str, list]:
        """The remembered records, read from disk at first use. Called holding the lock."""
        if self.memo is None:
            self.memo = read_memo(self.path, _is_record) if self.path is not None else {}
        return self.memo

    def known(self, path: Path) -> str | None:
        """The remembered sha256 of a regular file whose identity (a stat: no byte read) is the one it was hashed
        with, else None (a file missing, changed or never hashed)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        key = str(path.resolve())
        with self.lock:
            record = self._memo().get(key)
        return record[5] if record is not None and record[:5] == _identity(st) else None

    def remember(self, key: str, record: list, settled: bool) -> None:
        """A `hash_file` result, for this process and, if `settled`, for the memo on disk at the next `save`."""
        with self.lock:
            self._memo()[key] = record
            if settled:
                self.settled[key] = record

    def digest(self, path: Path) -> str:
        """sha256 of the file's bytes: remembered, else hashed (`hash_file`) and remembered."""
        digest = self.known(path)
        if digest is not None:
            return digest
        key, record, settled = hash_file(path)
        self.remember(key, record, settled)
        return record[5]

    def save(self, at_most_every: float = 0.0) -> None:
        """Adds this process's settled digests to the memo on disk (merged with what other processes wrote there
        meanwhile; the most recent HASHES_KEPT kept), atomically, unless the last save was less than `at_most_every`
        seconds ago. Not fsync'd, and a root that cannot be written only loses the speed-up."""
        with self.lock:
            if self.path is None or not self.settled or time.monotonic() - self.saved_at < at_most_every:
                return
            new, self.settled, self.saved_at = self.settled, {}, time.monotonic()
        memo = read_memo(self.path, _is_record)
        for key in new:
            memo.pop(key, None)  # moved to the end: the most recent
        memo.update(new)
        write_memo(self.path, dict(list(memo.items())[-HASHES_KEPT:]))
