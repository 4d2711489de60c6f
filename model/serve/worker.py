"""The engine behind `dr serve`: one worker thread owns the continuous-batching engine; asyncio handlers talk to it.

`model.engine.scheduler.Engine` is not thread-safe and every step needs the device, so a single thread owns it: it takes
commands (submit, cancel) from a queue, advances the engine while rows are pending and blocks on the queue when none
are. Updates go back to each request's asyncio queue with `loop.call_soon_threadsafe`, so handlers never touch the
engine and concurrent requests share the engine's running batch instead of taking turns on a lock.

Admission is bounded: at most `max_pending` requests are queued or decoding; one more is refused at once (`Busy`,
the HTTP layer's 429) instead of growing memory without bound. A request whose consumer goes away (a client that
disconnected) is cancelled, which frees its slot at the engine's next sync.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from model.config import GenerationConfig
from model.engine.sampler import row_key
from model.engine.scheduler import Engine
from model.engine.sequence import Request, Update
from model.network.deepresonance import DeepResonance, Example
from model.text.prompt import TARGET_END

log = logging.getLogger(__name__)

WATCH_S = 5.0  # how often a waiting request checks that the worker thread still runs
K_CAP = GenerationConfig.top_k  # the largest top-k a request may ask for: the engine's default cap


class Busy(Exception):
    """The worker already holds `max_pending` requests; the caller should retry later."""


class Failed(Exception):
    """The worker thread is not running (it failed, or was stopped): no request can be answered."""


@dataclass(eq=False)
class Ticket:
    """One request inside the worker: the engine's handle, and where its updates go (an asyncio queue on `loop`)."""

    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue[Update] = field(default_factory=asyncio.Queue)
    stream: bool = False
    ended: bool = False  # counted out of the worker's admissions (answered, cancelled, refused or failed)
    failed: bool = False  # ended by the engine's failure, not by anything in the request

    def deliver(self, update: Update) -> None:
        self.loop.call_soon_threadsafe(self.updates.put_nowait, update)


def request_key(gen: GenerationConfig, instruction: str) -> int:
    """The sampling stream of a served request: the key `dr ask` gives its single row (row 0 of
    `model.generate.base.run_examples`), so a sampled answer equals `dr ask` with the same seed and settings."""
    return row_key(gen.seed, "0", instruction)


class EngineWorker:
    """Owns an Engine in one thread; `admit` then `run` streams a request's updates to asyncio code."""

    def __init__(self, model: DeepResonance, engine: Engine, max_pending: int) -> None:
        """`engine`: one sized for the model's longest prompt (`Engine.sized(model, model.config.max_length, ...)`)
        with top-k up to K_CAP; the worker has it report unfinished rows too (streaming)."""
        self.model, self.engine, self.max_pending = model, engine, max_pending
        engine.stream = True
        self.commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.admitted = 0  # requests submitted and not yet ended (read and written under `lock`)
        self.lock = threading.Lock()
        self.stats = {"answered": 0, "cancelled": 0, "refused": 0, "failed": 0}
        self.error: str | None = None  # set if the worker thread died: /health reports it
        self.ready = threading.Event()  # set once the thread has warmed the engine up (or failed to)
        self.thread = threading.Thread(target=self._run, name="dr-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    @property
    def pending(self) -> int:
        """Requests admitted and not ended (queued in the engine or decoding)."""
        return self.admitted

    def start(self) -> None:
        """Starts the thread and returns once it has warmed the engine up; raises RuntimeError if that failed."""
        self.thread.start()
        self.ready.wait()
        if self.error:
            raise RuntimeError(f"the engine's warm-up failed: {self.error}")

    def stop(self) -> None:
        self.commands.put(("stop", None))
        self.thread.join(timeout=30)

    def _warm_up(self) -> None:
        """Runs one short request to its end before serving, so that the first client does not pay for first-call work
        (on CUDA the one-row prefill's CUDA graph; the step's graphs are captured when the engine is built) or
        first-call allocations. It runs in the worker thread, the one that runs every later step."""
        gen = GenerationConfig(max_new_tokens=min(8, self.engine.max_new_tokens), do_sample=False)
        handle = object()
        self.engine.submit([Request(handle, Example("", "Warm up."), gen, 0)])
        while self.engine.pending:
            self.engine.advance()

    def admit(self, stream: bool = False) -> Ticket:
        """Reserves room for one request (raises Busy when `max_pending` are in flight); follow with `run` or
        `release`. Admission comes before media decoding, so a full server does no work for requests it refuses."""
        if not self.alive:
            raise Failed(f"the engine failed ({self.error}); restart the server" if self.error else "not running")
        with self.lock:
            if self.admitted >= self.max_pending:
                raise Busy(f"{self.admitted} requests are in flight (this server's limit)")
            self.admitted += 1
        return Ticket(asyncio.get_running_loop(), stream=stream)

    def release(self, ticket: Ticket) -> None:
        """Gives back an admitted ticket that will not run (its media could not be decoded)."""
        self._end(ticket, "refused")

    async def run(self, ticket: Ticket, example: Example, gen: GenerationConfig) -> AsyncIterator[Update]:
        """An admitted request's updates until its final one (`done`; streaming tickets get the unfinished ones
        too). Closing the iterator early (a client that went away) cancels the request and frees its slot."""
        self.commands.put(("submit", Request(ticket, example, gen, request_key(gen, example.instruction))))
        finished = False
        try:
            while not finished:
                try:
                    update = await asyncio.wait_for(ticket.updates.get(), WATCH_S)
                except TimeoutError:
                    if self.alive:
                        continue
                    ticket.failed = True
                    update = Update(ticket, [], True, f"the engine failed: {self.error}")
                finished = update.done
                yield update
        finally:
            if not finished:
                self.commands.put(("cancel", ticket))

    def _end(self, ticket: Ticket, outcome: str) -> bool:
        """Counts a ticket out once, whatever ends it first (False if something already had)."""
        with self.lock:
            if ticket.ended:
                return False
            ticket.ended = True
            self.admitted -= 1
            self.stats[outcome] += 1
            return True

    def _apply(self, kind: str, payload: Any) -> bool:
        """One command; False on stop."""
        if kind == "stop":
            return False
        if kind == "submit":
            for refused in self.engine.submit([payload]):
                self._end(refused.handle, "refused")
                refused.handle.deliver(refused)
        elif kind == "cancel" and self._end(payload, "cancelled"):  # not if it ended while the cancel was on its way
            self.engine.cancel(payload)
        return True

    def _run(self) -> None:
        try:
            self._warm_up()
        except Exception as err:
            self.error = f"{type(err).__name__}: {err}"
            return
        finally:
            self.ready.set()
        try:
            running = True
            while running:
                if not self.engine.pending:
                    running = self._apply(*self.commands.get())
                while running:
                    try:
                        running = self._apply(*self.commands.get_nowait())
                    except queue.Empty:
                        break
                if running and self.engine.pending:
                    self._deliver(self.engine.advance())
        except Exception as err:  # the engine is in an unknown state: fail every request it holds, then stop
            log.exception("engine worker failed")
            self.error = f"{type(err).__name__}: {err}"
            self._fail_all(self.error)

    def _deliver(self, updates: list[Update]) -> None:
        for u in updates:
            ticket: Ticket = u.handle
            if ticket.ended:  # cancelled while this update was on its way
                continue
            if u.done:
                self._end(ticket, "failed" if u.error else "answered")
                ticket.deliver(u)
            elif ticket.stream:
                ticket.deliver(u)

    def _fail_all(self, reason: str) -> None:
        tickets = [h for h in self.engine.handles if h is not None] + [r.handle for r in self.engine.queue]
        while True:
            try:
                kind, payload = self.commands.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                tickets.append(payload.handle)
        for ticket in tickets:
            self._end(ticket, "failed")
            ticket.failed = True
            ticket.deliver(Update(ticket, [], True, f"the engine failed: {reason}"))


class TextStream:
    """Answer text as ids grow, in deltas that never need taking back.

    The answer is `model.answer(ids)`: the decoded text cut at the first "\\n###". While a row decodes, its text may
    end in the start of that stop ("\\n", "\\n#", ...) or in a replacement character (a multi-byte character whose
    remaining bytes are still to come); both are held back until the next ids settle them, so the deltas add up to
    exactly the final answer."""

    HOLD = TARGET_END

    def __init__(self, answer: Callable[[list[int]], str]) -> None:
        self.answer = answer
        self.sent = ""

    def delta(self, ids: list[int], done: bool) -> str:
        text = self.answer(ids)
        if not done:
            text = text.rstrip("\ufffd")
            for k in range(len(self.HOLD) - 1, 0, -1):
                if text.endswith(self.HOLD[:k]):
                    text = text[:-k]
                    break
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        out, self.sent = text[len(self.sent) :], text
        return out
