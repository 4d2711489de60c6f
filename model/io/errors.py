"""Error types that several layers raise and the CLI prints as one line; kept free of heavy imports, so the CLI
can name them without loading torch."""

from __future__ import annotations


class CkptError(RuntimeError):
    """A checkpoint problem the user can fix; the CLI prints its one-line message and exits non-zero."""
