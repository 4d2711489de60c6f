"""A request to the engine, the updates it sends back, and what the host keeps about each row while it decodes.

The device holds a slot's tokens and sampling settings (model/engine/slot_state.py); the host keeps one `Row` per busy
slot: whose row it is, since when the slot holds it (the state copies older than that show its previous row), how
many steps it may still take, its prompt's length (with the steps taken, what its cache blocks must hold), how far
its ids have been checked for an end, and whether it was cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.config import GenerationConfig
from model.network.deepresonance import Example


@dataclass
class Request:
    """One prompt for the engine; `handle` comes back with its updates (a dataset row, a server request)."""

    handle: Any
    example: Example
    gen: GenerationConfig
    key: int  # the row's random stream (model.engine.sampler.row_key)
    size: int = field(default=0, init=False)  # prompt positions, counted by the engine when queued


@dataclass
class Update:
    """A row's generated ids so far (cut at its end), and whether it ended; `error` when it could not run."""

    handle: Any
    ids: list[int]
    done: bool
    error: str | None = None


@dataclass
class Row:
    """A slot's row on the host."""

    request: Request
    filled_at: int  # the advance whose prefill or move gave the slot this row (its state shows in later copies)
    steps_left: int  # decode steps the row may still take (its max_new_tokens bounds it)
    size: int  # its prompt's positions
    checked: int = 0  # leading ids already found not to end the row (model.text.stopping.StopRule.end's `since`)
    cancelled: bool = False

    @property
    def handle(self) -> Any:
        return self.request.handle

    @property
    def issued(self) -> int:
        """Decode steps queued for the row so far."""
        return self.request.gen.max_new_tokens - 1 - self.steps_left
