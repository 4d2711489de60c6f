"""What the engine keeps on the device for each slot besides its keys and values: the row's last token, its ids so far,
its sampling settings and whether it ended; and the two rules every step and prefill apply to it: the next token
(written once here) and the end of a row (model/text/stopping.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from model.config import GenerationConfig
from model.engine.sampler import next_token, uniforms
from model.io.transfer import to_device
from model.text.stopping import ended_on_device


@dataclass
class SlotState:
    """Per slot [slots] (`out`: [slots, max_new_tokens]). A step over the first n slots uses `head(n)`, views of the
    same memory."""

    last: torch.Tensor  # the token the next step feeds in
    count: torch.Tensor  # ids generated so far
    max_new: torch.Tensor  # the row's own max_new_tokens
    keys: torch.Tensor  # the row's random stream (model.engine.sampler.row_key)
    top_k: torch.Tensor
    done: torch.Tensor
    greedy: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    out: torch.Tensor  # the ids generated so far, column n holding the n-th

    @classmethod
    def empty(cls, slots: int, max_new_tokens: int, device: torch.device) -> SlotState:
        """Every slot done (a free slot never decodes) and greedy."""

        def full(dtype, fill=0):
            return torch.full((slots,), fill, dtype=dtype, device=device)

        long, flag, real = torch.long, torch.bool, torch.float
        return cls(
            full(long), full(long), full(long), full(long), full(long), full(flag, True), full(flag, True),
            full(real, 1.0), full(real, 1.0), torch.zeros(slots, max_new_tokens, dtype=long, device=device),
        )  # fmt: skip

    def start(self, rows: torch.Tensor, gens: Sequence[GenerationConfig], keys: Sequence[int]) -> None:
        """Writes the sampling settings, budgets and random streams of new rows into slots `rows` (queued copies:
        the host does not wait for the device)."""

        def put(field: torch.Tensor, values: list) -> None:
            field[rows] = to_device(torch.tensor(values, dtype=field.dtype), rows.device)

        put(self.greedy, [not g.do_sample for g in gens])
        put(self.temperature, [g.temperature if g.do_sample else 1.0 for g in gens])
        put(self.top_k, [g.top_k for g in gens])
        put(self.top_p, [g.top_p for g in gens])
        put(self.keys, list(keys))
        put(self.max_new, [g.max_new_tokens for g in gens])

    def first(self, rows: torch.Tensor, logits: torch.Tensor, k_cap: int, eos: int, stops: list[torch.Tensor]) -> None:
        """Draws the first token of the new rows in slots `rows` from their prompts' `logits` [rows, vocab]."""
        token = choose(self, logits, rows, torch.zeros_like(rows), k_cap)
        self.out[rows, 0] = token
        self.last[rows] = token
        self.count.index_fill_(0, rows, 1)  # a Python value assigned by index is copied over first, waiting
        self.done[rows] = ended(self, eos, stops)[rows]

    def head(self, n: int) -> SlotState:
        return SlotState(**{f.name: getattr(self, f.name)[:n] for f in fields(self)})

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copies the rows of slots `src` into slots `dst`."""
        for f in fields(self):
            t = getattr(self, f.name)
            t[dst] = t[src]


def choose(
    state: SlotState, logits: torch.Tensor, rows: torch.Tensor, counters: torch.Tensor, k_cap: int
) -> torch.Tensor:
    """Next tokens of the slots `rows` (their n-th token drawn at counter n); with k_cap 1 every choice is the argmax,
    so no random draw is made."""
    if k_cap == 1:
        return logits.argmax(-1)
    u = uniforms(state.keys[rows], counters)
    return next_token(
        logits, state.greedy[rows], state.temperature[rows], state.top_k[rows], state.top_p[rows], u, k_cap
    )


def ended(state: SlotState, eos: int, stops: list[torch.Tensor]) -> torch.Tensor:
    """Slots whose row ended by the id part of model/text/stopping.py's rule (EOS, a stop sequence, the budget)."""
    return ended_on_device(state.out, state.count, state.max_new, eos, stops)


@dataclass
class StateCopy:
    """Every slot's done flag, count and ids [slots, 2 + max_new_tokens] on the host as of advance `advance`, once
    `event` (None on the CPU) has passed."""

    advance: int
    host: torch.Tensor
    event: torch.cuda.Event | None

    def landed(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


class HostCopies:
    """Two host buffers for the state, written in turn: each copy is queued behind the steps just launched, into the
    buffer the copy before it (the one the host reads next) does not use."""

    def __init__(self, slots: int, max_new_tokens: int, pinned: bool) -> None:
        self.buffers = [torch.zeros(slots, 2 + max_new_tokens, dtype=torch.long, pin_memory=pinned) for _ in "ab"]

    def queue(self, state: SlotState, advance: int) -> StateCopy:
        host = self.buffers[advance % 2]
        host.copy_(torch.cat([state.done.long().unsqueeze(-1), state.count.unsqueeze(-1), state.out], 1), True)
        event = None
        if host.is_pinned():
            event = torch.cuda.Event()
            event.record()
        return StateCopy(advance, host, event)
