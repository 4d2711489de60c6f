"""Signals that stop a long run at its next safe point instead of wherever they land."""

from __future__ import annotations

import signal
from collections.abc import Sequence


class StopOnSignal:
    """Inside the block the given signals set `signal` (their name) instead of raising KeyboardInterrupt or killing
    the process; the run checks it at its own safe points. A KeyboardInterrupt raised where the signal lands can be
    lost: inside a finalizer Python prints "Exception ignored" and runs on. Main thread only; elsewhere a no-op."""

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.signal: str | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> StopOnSignal:
        try:
            self._old = {s: signal.signal(s, self._handle) for s in self.signals}
        except ValueError:  # not the main thread
            self._old = {}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
