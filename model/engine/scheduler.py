"""Continuous batching (the scheduler): a fixed number of slots decode together, and a slot whose row ends takes the
next waiting row.

A static batch runs until its longest answer ends, so on real jobs (answers of very different lengths) most of its
steps go to rows that already finished. Here each step runs the slots at one of a few fixed widths (a compiled step
and CUDA graph per width: model_runner.py); rows end where model/text/stopping.py says, and freed slots are refilled
between steps: waiting rows are prefilled together (packed end to end: model_runner.py; a few rows padded, replayed
as a CUDA graph: prefill_graphs.py) into cache blocks of their own (paged: block_pool.py, kv_cache.py), as many as
the free blocks hold, a burst of long prompts spread over several advances. When the queue is empty and few rows are
left, they are moved into the first slots (block tables move, no key is copied) and the steps run at the narrowest
width that holds them (every slot busy on an H200: 11.7 ms a step at 256 slots, 6.6 ms at 64).

The host never waits for the device's newest work: each `advance` queues `sync_every` steps, then reads the state the
device had after the previous advance's steps (copied out behind them) and prefills the slots that state shows free,
behind the queued steps. The host's bookkeeping and the prefill's launches (eager, tens of milliseconds) thus overlap
the device's decoding instead of leaving it idle; the price is that a freed slot is refilled one batch of steps later.
For this the prefill never reads the device: lengths come from the host and host values go over as queued copies
(a plain copy to the device, or reading a device value, waits for every step queued before it).

Greedy answers equal one-row `generate` (model/generate/base.py). Sampling draws each row's tokens from its own
counter-based stream (sampler.py), so a sampled answer does not depend on the batch. Sizes: sizing.py; the host's
per-row state: sequence.py; the device's: slot_state.py."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from itertools import islice
from typing import Any

import torch
from peft import PeftModel

from model.config import GenerationConfig
from model.engine.compile_cache import compile_cache_dir, trace_once
from model.engine.kv_cache import BLOCK, Kernel, PagedKV, slot_attention_on
from model.engine.model_runner import SlotStep, packed_prefill, prefill_layer_for, prefill_pass
from model.engine.prefill_graphs import GRAPH_ROWS, PrefillGraphs, padded_width
from model.engine.sequence import Request, Row, Update
from model.engine.sizing import engine_size, fits_slot
from model.engine.slot_state import HostCopies, SlotState, StateCopy
from model.io.transfer import to_device
from model.network.deepresonance import DeepResonance
from model.text.stopping import StopRule

# decode steps per advance: a row that ends waits up to twice this for its slot's reuse; 4 beat 8 and 16 on the
# realistic-length job in both H200 profiles (benchmarks/README.md, runs 3 and 4: +1.6%, +2.0% over 8)
SYNC_EVERY = 4
PREFILL_CHUNK = 16384  # prompt positions a (packed) prefill call runs, bounding its activations: ~2 GB on a 7B model
# prompt positions an advance prefills while other rows decode (13.4 GFLOP a position on a 7B model: 16384 are about
# 0.3 s on an H100); a job's steady refills (a few rows an advance) stay under it, bursts of long prompts are spread
PREFILL_POSITIONS = 16384
WAIT = object()  # what a request source yields for "none ready yet" (Engine.run)
# narrower widths the step also runs at, each a trace of one layer and a CUDA graph in every process: a 256 width
# would save a job less than its build (benchmarks/results/2026-12-08-cpu-occupancy-widths/)
NARROW = (64,)


def prefill_chunks(requests: Sequence[Request], positions: int = PREFILL_CHUNK) -> list[list[Request]]:
    """`requests`, in order, as prefill calls of at most `positions` prompt positions each (at least one row a call)."""
    chunks: list[list[Request]] = []
    total = 0
    for r in requests:
        if not chunks or total + r.size > positions:
            chunks.append([])
            total = 0
        chunks[-1].append(r)
        total += r.size
    return chunks


class Engine:
    def __init__(
        self,
        model: DeepResonance,
        slots: int,
        length: int,
        max_new_tokens: int,
        k_cap: int = GenerationConfig.top_k,
        kernel: Kernel | None = None,
        compile: bool | None = None,
        compile_prefill: bool | None = None,
        sync_every: int = SYNC_EVERY,
        refill_min: int | None = None,
        stream: bool = False,
        graph_prefill: bool | None = None,
        narrow: Sequence[int] = NARROW,
        blocks: int | None = None,
        block: int = BLOCK,
    ) -> None:
        """`slots` rows decode together, each of at most `length` positions (prompt + answer) and `max_new_tokens`
        new tokens; `k_cap` bounds top-k (the vocabulary size allows top-k off). On CUDA the step is compiled with
        CUDA graphs and attends with FlexAttention by default, and prefills of a few rows replay CUDA graphs
        (`graph_prefill`; prefill_graphs.py), larger ones a compiled layer (`compile_prefill`; by default where the
        step is compiled), elsewhere eagerly with SDPA. The step also runs at the `narrow` widths under `slots`, for
        the last rows of a job. `stream`: report unfinished rows' ids at every sync too.
        The cache is a pool of `blocks` blocks of `block` positions (block_pool.py; by default enough for every slot's
        longest row, so no row is ever preempted); rows are admitted while their blocks fit, and when a growing row
        finds the pool empty the youngest row is preempted: its blocks freed, the row queued again in front, to be
        decoded afresh (greedy and sampled ids do not depend on when a row runs)."""
        self.model, self.llm = model, model.llama_model
        self.lm = self.llm.get_base_model() if isinstance(self.llm, PeftModel) else self.llm
        device, on_cuda = model.device, model.device.type == "cuda"
        self.rule = StopRule.of(model.tokenizer)
        self.slots, self.length, self.max_new_tokens = slots, length, max_new_tokens
        self.k_cap, self.sync_every, self.stream = k_cap, sync_every, stream
        self.refill_min = refill_min or max(1, slots // 8)
        per_row = -(-length // block)
        kernel = kernel or ("flex" if on_cuda else "sdpa")
        blocks = blocks or slots * per_row + 1
        self.kv = PagedKV(self.llm.config, slots, per_row, blocks, model.dtype, device, kernel, block)
        self.book = self.kv.book
        self.preempted = 0  # rows sent back to the queue for want of blocks
        self.stop_tensors = [torch.tensor(s, device=device) for s in self.rule.stops]
        self.state = SlotState.empty(slots, max_new_tokens, device)
        self.widths = sorted({slots, *(w for w in narrow if w < slots)})
        self.copies = HostCopies(slots, max_new_tokens, pinned=on_cuda)
        self.in_flight: StateCopy | None = None  # the state copy queued behind the last advance's steps
        self.advances = 0
        self.rows: list[Row | None] = [None] * slots  # each slot's row, None when free
        self.queue: deque[Request] = deque()
        compiled = on_cuda if compile is None else compile
        if compiled:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
            trace_once()  # before a caller's threads run modules beside the compile
        with slot_attention_on(self.llm), torch.inference_mode():
            self.step = SlotStep(
                self.lm, self.kv, self.state, self.rule.eos, self.stop_tensors, k_cap, self.widths, compiled,
                graphs=compiled and on_cuda,
            )  # fmt: skip
            layer = prefill_layer_for(self.lm, self.kv, compiled if compile_prefill is None else compile_prefill)
        self.prefill_pass = partial(prefill_pass, self.lm, self.kv)
        self.packed_prefill = partial(packed_prefill, self.lm, self.kv, layer=layer)
        graphs = compiled and on_cuda if graph_prefill is None else graph_prefill
        self.graphs = PrefillGraphs(self.prefill_pass, capture=on_cuda) if graphs else None

    @classmethod
    def sized(
        cls, model: DeepResonance, longest_prompt: int, max_new_tokens: int, most_slots: int, **options: Any
    ) -> Engine:
        """An engine for prompts of up to `longest_prompt` positions and answers of up to `max_new_tokens`, with as
        many slots as fit in the device's memory (at most `most_slots`; model/engine/sizing.py)."""
        slots, length, blocks = engine_size(model, longest_prompt, max_new_tokens, most_slots)
        return cls(model, slots, length, max_new_tokens, blocks=blocks, **options)

    @property
    def handles(self) -> list[Any]:
        """Each slot's row's handle, None when free."""
        return [row and row.handle for row in self.rows]

    @property
    def active(self) -> int:
        return sum(row is not None for row in self.rows)

    @property
    def pending(self) -> int:
        """Rows queued or decoding."""
        return len(self.queue) + self.active

    def submit(self, requests: Iterable[Request]) -> list[Update]:
        """Queues requests; those that can never run here come back at once as errors."""
        refused = []
        for r in requests:
            if problem := self._refusal(r):
                refused.append(Update(r.handle, [], True, problem))
            else:
                self.queue.append(r)
        return refused

    def _refusal(self, r: Request) -> str | None:
        r.size = self.model.example_length(r.example)
        if not fits_slot(r.size, r.gen.max_new_tokens, self.length):
            return (
                f"its prompt ({r.size} positions) and {r.gen.max_new_tokens} new tokens do not fit "
                f"the engine's {self.length} positions per row"
            )
        if self.book.blocks_for(r.size + r.gen.max_new_tokens - 1) > self.book.blocks - 1:
            return f"its prompt ({r.size} positions) and {r.gen.max_new_tokens} new tokens do not fit the cache"
        if r.gen.max_new_tokens > self.max_new_tokens:
            return f"max_new_tokens {r.gen.max_new_tokens} is over this engine's {self.max_new_tokens}"
        if r.gen.do_sample and not 0 <= r.gen.top_k <= self.k_cap:
            return f"top_k {r.gen.top_k} is over this engine's {self.k_cap}"
        if r.gen.do_sample and r.gen.top_k == 0 and self.k_cap < len(self.model.tokenizer):
            return "top_k 0 (off) needs an engine built with k_cap = the vocabulary size"
        return None

    def cancel(self, handle: Any) -> None:
        """Drops a queued or decoding row (a client that went away); its slot is freed at the next sync."""
        self.queue = deque(r for r in self.queue if r.handle is not handle)
        for row in self.rows:
            if row is not None and row.handle is handle:
                row.cancelled = True

    def advance(self) -> list[Update]:
        """Queues `sync_every` decode steps, then reports the rows that the previous advance's steps ended (and,
        when streaming, the others' progress) and refills free slots behind the queued steps. The host waits only
        for the previous advance's copy of the state, never for the steps just queued."""
        self.advances += 1
        with slot_attention_on(self.llm), torch.inference_mode():  # one switch for the steps and the prefills
            self._grow()
            if any(row is not None and row.steps_left > 0 for row in self.rows):
                self.kv.sync()
                width = self._width()
                for _ in range(self.sync_every):
                    self.step(width)
                for row in self.rows:
                    if row is not None:
                        row.steps_left -= self.sync_every
            previous, self.in_flight = self.in_flight, self.copies.queue(self.state, self.advances)
            updates = self._collect(previous) if previous else []
            self._refill()
            if not self.queue:
                self._gather()
        return updates

    def _width(self) -> int:
        """The narrowest step width that covers every slot holding a row."""
        need = max((s + 1 for s, row in enumerate(self.rows) if row is not None), default=1)
        return min(w for w in self.widths if w >= need)

    def _gather(self) -> None:
        """Moves rows into free slots in front so that the narrowest width that can hold them all does (a job's last
        rows). The state copy already in flight shows the moved rows where they were, so they are read from the next."""
        active = [s for s, row in enumerate(self.rows) if row is not None]
        target = min(w for w in self.widths if w >= len(active))
        movers = [s for s in active if s >= target]
        if not movers:
            return
        free = [s for s in range(target) if self.rows[s] is None][: len(movers)]
        src, dst = self._on_device(movers, torch.long), self._on_device(free, torch.long)
        self.state.move(src, dst)
        self.kv.move(movers, free)
        self.state.done.index_fill_(0, src, True)  # free: a wide step reads none of its cache
        for s, d in zip(movers, free, strict=True):
            self.rows[d], self.rows[s] = self.rows[s], None
            self.rows[d].filled_at = self.advances

    def run(self, requests: Iterable[Request | object]) -> Iterator[list[Update]]:
        """Every request's final update, in the order rows end, as the lists that end together (one journal write
        each); `requests` is read lazily (two engine-fulls ahead), so it may load media as it goes, and may yield WAIT
        for "none ready yet": the engine then decodes what it has and asks again after the next advance."""
        source = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(self.queue) < 2 * self.slots:
                nxt = next(source, None)
                if nxt is WAIT and self.pending:
                    break
                if nxt is None:
                    exhausted = True
                elif nxt is not WAIT:
                    refused = self.submit([nxt])
                    if refused:
                        yield refused
            if not self.pending:
                return
            ended = [u for u in self.advance() if u.done]
            if ended:
                yield ended

    def _refill(self) -> None:
        free = [s for s, row in enumerate(self.rows) if row is None]
        take = self._admissible(min(len(free), len(self.queue)))
        if not take or (take < self.refill_min and take < len(self.queue) and self.active):
            return
        take = self._interleaved(take) if self.active else take
        start = 0
        for chunk in prefill_chunks([self.queue.popleft() for _ in range(take)], PREFILL_CHUNK):
            self._prefill(chunk, free[start : start + len(chunk)])
            start += len(chunk)

    def _interleaved(self, most: int) -> int:
        """While rows decode, an advance prefills at most PREFILL_POSITIONS prompt positions (at least one row): a
        prefill stalls the decoding rows for as long as it runs, and the rows left over go in at the next advance."""
        total = 0
        for n, r in enumerate(islice(self.queue, most)):
            total += r.size
            if total > PREFILL_POSITIONS and n:
                return n
        return most

    def _need(self, size: int, max_new_tokens: int, steps: int) -> int:
        """Positions a row of `size` prompt positions holds once `steps` decode steps ran (its budget bounds them)."""
        return size + min(steps, max_new_tokens - 1)

    def _admissible(self, most: int) -> int:
        """How many of the first `most` queued rows to admit: in order, while their prompts and first two advances fit
        in the free blocks beside what the rows decoding need for their next two (so that admitting rarely makes a
        row be preempted). A streaming engine counts whole budgets instead and never preempts: text already streamed
        cannot be taken back, and a row decoded again in another batch may, in low precision, take another path."""
        book = self.book
        ahead = self.max_new_tokens if self.stream else 2 * self.sync_every
        spare = book.available
        for s, row in enumerate(self.rows):
            if row is not None:
                need = self._need(row.size, row.request.gen.max_new_tokens, row.issued + ahead)
                spare -= max(0, book.blocks_for(need) - book.held[s])
        for n, r in enumerate(islice(self.queue, most)):
            spare -= book.blocks_for(self._need(r.size, r.gen.max_new_tokens, ahead))
            if spare < 0:
                return n
        return most

    def _grow(self) -> None:
        """Gives each decoding row the blocks its next `sync_every` steps write; where the pool is short, the youngest
        rows are preempted until it is not."""
        active = [s for s, row in enumerate(self.rows) if row is not None]
        for s in sorted(active, key=lambda s: self.rows[s].filled_at):
            row = self.rows[s]
            if row is None or row.steps_left <= 0:
                continue
            gen = row.request.gen
            need = self._need(row.size, gen.max_new_tokens, row.issued + self.sync_every)
            while not self.book.grow(s, need):
                youngest = max(
                    (v for v, other in enumerate(self.rows) if other is not None), key=lambda v: self.rows[v].filled_at
                )
                self._preempt(youngest)
                if youngest == s:
                    break

    def _preempt(self, s: int) -> None:
        """Frees slot `s` and its blocks, its row queued again in front."""
        self.queue.appendleft(self.rows[s].request)
        self.rows[s] = None
        self.book.release(s)
        self.state.done.index_fill_(0, self._on_device([s], torch.long), True)
        self.preempted += 1

    @torch.inference_mode()
    def _prefill(self, requests: Sequence[Request], slots: Sequence[int]) -> None:
        """Prefills `requests` into `slots` and draws their first tokens. Nothing here reads the device (host lengths,
        queued copies), so the launches overlap the decode steps queued before them."""
        batch = self.model.prepare([r.example for r in requests])
        sizes = batch.sizes
        grown = [self.book.grow(s, n) for s, n in zip(slots, sizes, strict=False)]
        if not all(grown):  # prepare measured more than _admissible counted: the rest wait in front
            keep = grown.index(False)
            for s in slots[keep : len(requests)]:
                self.book.release(s)
            self.queue.extendleft(reversed(requests[keep:]))
            requests, sizes = requests[:keep], sizes[:keep]
            if not requests:
                return
        self.kv.sync()
        slots = slots[: len(requests)]
        width = max(sizes)
        graph = self.graphs is not None and len(requests) <= GRAPH_ROWS
        embeds = batch.embeds[: len(requests), :width]
        index = self.book.prefill_index(slots, sizes, padded_width(width, self.length) if graph else width)
        rows = self._on_device(slots, torch.long)
        lengths = self._on_device(sizes, torch.long)
        with slot_attention_on(self.llm):
            if graph:  # a few rows: one CUDA graph per shape, so padded
                logits = self.graphs(embeds, to_device(index, self.kv.device), lengths - 1)
            else:
                logits = self.packed_prefill(embeds, index, sizes)
        self.state.start(rows, [r.gen for r in requests], [r.key for r in requests])
        self.state.first(rows, logits, self.k_cap, self.rule.eos, self.stop_tensors)
        self.kv.pos[rows] = lengths
        for s, r, n in zip(slots, requests, sizes, strict=True):
            self.rows[s] = Row(r, self.advances, r.gen.max_new_tokens - 1, n)

    def _on_device(self, values: Sequence, dtype: torch.dtype) -> torch.Tensor:
        return to_device(torch.tensor(values, dtype=dtype), self.kv.device)

    def _collect(self, copy: StateCopy) -> list[Update]:
        """Updates from a state copy (once it has landed); slots refilled in or after its advance are not in it."""
        state = copy.landed()
        updates, freed = [], []
        for s, row in enumerate(self.rows):
            if row is None:
                continue
            if row.cancelled:
                self.rows[s] = None
                self.book.release(s)
                freed.append(s)
                continue
            if row.filled_at >= copy.advance:
                continue
            done, count = bool(state[s, 0]), int(state[s, 1])
            # the whole rule on the newest ids: the device saw only its id part, not the text's end
            first = max(0, row.checked - self.rule.lookback)
            end = self.rule.end(state[s, 2 + first : 2 + count].tolist(), row.checked - first)
            row.checked = count
            if end is not None:
                count = first + end
                if not done:
                    freed.append(s)  # the device decodes on until told
                done = True
            if done or self.stream:
                updates.append(Update(row.handle, state[s, 2 : 2 + count].tolist(), done))
            if done:
                self.rows[s] = None
                self.book.release(s)
        if freed:
            self.state.done.index_fill_(0, self._on_device(freed, torch.long), True)
        return updates
