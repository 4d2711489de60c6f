"""A request's media -> ImageBind inputs, on a few decoding threads shared fairly between clients.

Decoding is the one CPU-heavy step before the engine, and a small file may take long to decode: so each request
decodes on one thread at a time, its time limit counts its own decoding only (never the wait for a thread), and
requests waiting for a thread take turns by client, so one client's heavy media delays another's by at most one
decode. Every failure is a one-line 400 naming the request's item; no server path or library text reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from model.media.preprocess import MediaError, load_media
from model.serve.request import Prompt
from model.serve.wire import ApiError

log = logging.getLogger(__name__)
T = TypeVar("T")


class FairThreads:
    """`workers` threads; a job runs as soon as it has one, so nothing queues inside the pool. Jobs waiting for a
    thread are kept per client and served round-robin over clients, oldest first within each. Lives on one event
    loop (a thread that ends hands itself on through it)."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="dr-media")
        self.free = workers
        self.waiting: dict[str, deque[asyncio.Future[None]]] = {}  # by client, in turn order

    async def run(self, client: str, job: Callable[[], T], timeout: float) -> T:
        """`job`'s result, once a thread is free for `client`'s turn; asyncio.TimeoutError if it runs over `timeout`
        seconds (its thread stays taken until the job ends: a decode cannot be stopped midway)."""
        await self._take(client)
        loop = asyncio.get_running_loop()
        future = self.pool.submit(job)
        future.add_done_callback(lambda _: self._ended(loop))
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    async def _take(self, client: str) -> None:
        if self.free and not self.waiting:
            self.free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(client, deque()).append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._hand_on()  # given a thread just as it was cancelled: pass it on
            elif client in self.waiting and turn in self.waiting[client]:
                self.waiting[client].remove(turn)
                if not self.waiting[client]:
                    del self.waiting[client]
            raise

    def _ended(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the job's thread: hands the thread on in the loop's."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server stopped, nobody waits
            loop.call_soon_threadsafe(self._hand_on)

    def _hand_on(self) -> None:
        """A thread came free: the next client in turn gets it, else it is free."""
        while self.waiting:
            client = next(iter(self.waiting))
            turns = self.waiting.pop(client)
            turn = turns.popleft()
            if turns:
                self.waiting[client] = turns  # to the back of the round
            if not turn.done():
                turn.set_result(None)
                return
        self.free += 1

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _reason(err: Exception, modality: str, folder: str) -> str:
    """What went wrong, in the server's own words: a MediaError's reason unless it wraps a library's error (whose
    text may name the temporary file or be FFmpeg's), anything else as undecodable."""
    if isinstance(err, MediaError) and err.__cause__ is None:
        return err.reason.replace(folder, "")
    return f"unreadable {modality}"


async def decode_media(
    prompt: Prompt, threads: FairThreads, client: str, timeout: float
) -> list[tuple[str, torch.Tensor]]:
    """ImageBind inputs of the prompt's media, decoded from a private temporary folder (deleted after) on one of
    `threads` within `timeout` seconds of decoding; ApiError(400) naming the item that failed or ran out of time."""
    current = [prompt.media[0].where] if prompt.media else []

    def load_all() -> list[tuple[str, torch.Tensor]]:
        with tempfile.TemporaryDirectory(prefix="dr-serve-") as folder:
            out = []
            for i, item in enumerate(prompt.media):
                current[0] = item.where
                path = Path(folder) / f"{i}{item.suffix}"
                path.write_bytes(item.data)
                try:
                    out.append((item.modality, load_media(item.modality, path)))
                except Exception as err:  # whatever a hostile file makes a decoder raise is this item's 400
                    if not isinstance(err, MediaError):
                        log.warning("%s: decoding failed: %s", item.where, type(err).__name__)
                    raise ApiError(
                        400, f"{item.where}: {_reason(err, item.modality, folder)}", "invalid_media"
                    ) from None
            return out

    if not prompt.media:
        return []
    try:
        return await threads.run(client, load_all, timeout)
    except asyncio.TimeoutError:
        raise ApiError(400, f"{current[0]}: decoding took over {timeout:g} s", "decode_timeout") from None
