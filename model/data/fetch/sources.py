"""The sources table: which URL (and which segment of it) each media path comes from, and its checks.

A CSV with columns `path,url` and optionally `start,end` (seconds) and `kind` (audio|image|video, else from the
path's extension). Every bad row is one `file:line: reason` line and is skipped; the rest goes on.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from model.io.files import write_atomically
from model.media.bounds import EXTENSIONS
from model.media.preprocess import MODALITIES

COLUMNS = ("path", "url", "start", "end", "kind")
REQUIRED = ("path", "url")
HF_URL = re.compile(r"^hf://datasets/(?P<repo>[^/]+/[^/]+)/(?P<file>[^#]+)(?:#(?P<member>.+))?$")
YOUTUBE_HOSTS = ("youtube.com", "youtu.be", "youtube-nocookie.com")


class SourcesError(ValueError):
    """A sources table that cannot be read at all; one-line message naming the file."""


@dataclass(frozen=True)
class Source:
    """One usable row of the table. `line` is its line in the file (the header is line 1)."""

    path: str
    url: str
    kind: str
    start: float | None = None
    end: float | None = None
    line: int = 0

    @property
    def segment(self) -> tuple[float, float | None] | None:
        return None if self.start is None and self.end is None else (self.start or 0.0, self.end)


def kind_of(path: str) -> str | None:
    """The modality a file extension names, or None."""
    ext = PurePosixPath(path).suffix.lower()
    return next((kind for kind, exts in EXTENSIONS.items() if ext in exts), None)


def is_youtube(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in YOUTUBE_HOSTS)


def normal_path(path: str) -> str:
    """The comparable form of a media path as rows and tables write it (`./a//b.wav` is `a/b.wav`)."""
    return os.path.normpath(path).replace(os.sep, "/")


def _check_path(path: str) -> str:
    if not path:
        raise ValueError("empty path")
    if os.path.isabs(path) or PurePosixPath(path).is_absolute() or re.match(r"^[A-Za-z]:[\\/]", path):
        raise ValueError(f"path {path!r} is absolute: it must be relative to the media root")
    if ".." in PurePosixPath(path.replace("\\", "/")).parts:
        raise ValueError(f"path {path!r} leaves the media root ('..')")
    return normal_path(path)


def _check_url(url: str) -> str:
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https") and urlparse(url).hostname:
        return url
    if scheme == "hf":
        if not HF_URL.match(url):
            raise ValueError(f"url {url!r}: an hf:// URL is hf://datasets/OWNER/REPO/FILE[#MEMBER OF A ZIP]")
        return url
    raise ValueError(f"url {url!r}: scheme {scheme + '://' if scheme else '(none)'} is not http(s):// or hf://")


def _seconds(text: str, column: str) -> float | None:
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{column} {text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{column} {text!r} is not a time of 0 seconds or more")
    return value


def parse_source(raw: dict[str, str | None], line: int) -> Source:
    """One raw row (column -> text) -> Source, or ValueError saying what is wrong."""
    path = _check_path((raw.get("path") or "").strip())
    url = _check_url((raw.get("url") or "").strip())
    start, end = _seconds(raw.get("start") or "", "start"), _seconds(raw.get("end") or "", "end")
    if start is not None and end is not None and start >= end:
        raise ValueError(f"start {start:g} is not before end {end:g}")
    by_ext = kind_of(path)
    kind = (raw.get("kind") or "").strip().lower() or by_ext
    if kind is None:
        raise ValueError(f"path {path!r}: no kind column and its extension names no media kind")
    if kind not in MODALITIES:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(MODALITIES)}")
    if by_ext != kind:
        raise ValueError(f"path {path!r}: a {kind} file needs one of {', '.join(sorted(EXTENSIONS[kind]))}")
    return Source(path, url, kind, start, end, line)


def read_sources(path: str | Path) -> tuple[list[Source], list[str]]:
    """Read a sources table -> (usable rows, one `file:line: reason` per bad row). A path listed twice keeps its
    first row. Raises SourcesError if the file is unreadable or lacks a required column."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = [(c or "").strip().lower() for c in reader.fieldnames or []]
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise SourcesError(
                    f"{path}:1: missing column(s) {', '.join(missing)} (the columns are path,url[,start,end,kind])"
                )
            reader.fieldnames = header
            sources: list[Source] = []
            errors: list[str] = []
            first: dict[str, int] = {}
            for raw in reader:
                line = reader.line_num
                try:
                    source = parse_source(raw, line)
                except ValueError as e:
                    errors.append(f"{path}:{line}: {e}")
                    continue
                if source.path in first:
                    errors.append(f"{path}:{line}: path {source.path!r} again (line {first[source.path]} is used)")
                    continue
                first[source.path] = line
                sources.append(source)
    except FileNotFoundError as e:
        raise SourcesError(f"{path}: no such file") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SourcesError(f"{path}: not a readable CSV ({e})") from e
    return sources, errors


def write_sources(path: str | Path, sources: list[Source]) -> None:
    """Write a sources table whole (temp-then-rename)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for s in sources:
        writer.writerow(
            [s.path, s.url, "" if s.start is None else f"{s.start:g}", "" if s.end is None else f"{s.end:g}", s.kind]
        )
    write_atomically(path, buffer.getvalue())


def select(sources: list[Source], wanted: dict[str, str], table: Path) -> tuple[list[Source], list[str]]:
    """The rows of the table whose path the dataset names (`wanted`: normal path -> modality), and one line per row
    it does not name or names as another kind (those are ignored)."""
    kept, errors = [], []
    for s in sources:
        if s.path not in wanted:
            errors.append(f"{table}:{s.line}: path {s.path!r} is not named by the dataset's rows (ignored)")
        elif wanted[s.path] != s.kind:
            errors.append(f"{table}:{s.line}: path {s.path!r} is a {wanted[s.path]} in the dataset, not a {s.kind}")
        else:
            kept.append(s)
    return kept, errors
