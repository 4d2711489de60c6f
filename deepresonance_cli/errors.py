"""How every `dr` command reports an error: `error: <one line>` on stderr, exit status 1. One place, so that every
path (a known exception reaching `main`, a command's own refusal) reads the same and a huge message (a 120 KB cell
of a hostile file) is cut to a readable length here instead of being echoed whole."""

from __future__ import annotations

from typing import NoReturn

import typer

# dr's own longest messages (where to put a checkpoint by hand: a URL and a path) run to about 400 characters; a longer
# message (a hostile file's cell quoted back) keeps its start (the file) and its end (the reason)
MAX_CHARS = 1000
HEAD, TAIL = 600, 300


def short(message: str) -> str:
    """`message` on one line (whitespace runs, newlines included, become one space), cut in the middle when longer
    than MAX_CHARS."""
    text = " ".join(message.split())
    if len(text) <= MAX_CHARS:
        return text
    return f"{text[:HEAD]} [... {len(text) - HEAD - TAIL} characters ...] {text[-TAIL:]}"


def describe(err: BaseException) -> str:
    """An exception as one readable message: the path first for OS errors, the exception's name when it says
    nothing (a parser's MemoryError has no message)."""
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in str(err.strerror or ""):
        return f"{err.filename}: {err.strerror or err}"
    text = " ".join(str(err).split())
    return text or f"{type(err).__name__} (no message)"


def fail(*messages: str) -> NoReturn:
    """Print one `error: ...` line per message (several for independent failures, e.g. one per checkpoint piece) to
    stderr and exit with status 1. SystemExit, not typer.Exit: it also ends `main`, outside the click context."""
    for message in messages:
        typer.echo(f"error: {short(message)}", err=True)
    raise SystemExit(1)
