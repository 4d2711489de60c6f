"""What guards `dr serve`'s routes: who may call it (Host and Origin), how long a body may take to arrive (ASGI
middleware) and how many body bytes all requests together may hold.

Starlette's TrustedHostMiddleware answers in plain text and uvicorn bounds no request body in time, so both are
small middlewares here, answering with OpenAI's error object.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.serve.wire import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(host: str) -> str:
    """The name part of a Host header (`[::1]:8000` -> `::1`, `localhost:8000` -> `localhost`), lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class CallerGuard:
    """Refuses with 400 a request whose Host header names none of `hosts` (a page on another site reaching a keyless
    loopback server through DNS rebinding names its own site; None: any Host, for servers behind a key), and with
    403 a request from a browser page of another origin than the server's own, unless `origins` lists it (such
    requests then get CORS headers from Starlette's CORSMiddleware, inside this one)."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str] | None, origins: Iterable[str]) -> None:
        self.app = app
        self.hosts = None if hosts is None else {host_name(h) for h in hosts}
        self.origins = set(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            host = headers.get("host", "")
            origin = headers.get("origin")
            refusal = None
            if self.hosts is not None and host_name(host) not in self.hosts:
                refusal = ApiError(400, f"Host {host[:100]!r} is not this server's name", "wrong_host")
            elif origin is not None and origin not in self.origins and origin != f"{scope['scheme']}://{host}":
                refusal = ApiError(
                    403,
                    f"cross-origin request from {origin[:100]!r} refused (dr serve --cors-origin allows an origin)",
                    "cross_origin",
                )
            if refusal:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTimeout(ApiError):
    """The request body did not arrive in time (answered 408, and the connection closed)."""


class BodyDeadline:
    """A request's body must arrive within `seconds` of its start: a stalled upload raises BodyTimeout from the
    route's read, so its connection is answered and closed instead of held forever."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        received = False

        async def timed() -> Message:
            nonlocal received
            if received:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                late = f"the request body did not arrive within {self.seconds:g} s"
                raise BodyTimeout(408, late, "body_timeout") from None
            received = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


class BodyBudget:
    """Bytes of request bodies held at once, over all requests, from their first chunk until their media are decoded
    (a body is read whole into memory; without a total, many large uploads, slow or queued, would add up); a chunk
    over it is refused with 429."""

    def __init__(self, most: int) -> None:
        self.most, self.held = most, 0

    @contextmanager
    def holding(self) -> Iterator[Callable[[int], None]]:
        """Yields `take(n)`, which adds n bytes to what the block holds; all of it is given back when it ends."""
        taken = 0

        def take(n: int) -> None:
            nonlocal taken
            if self.held + n > self.most:
                raise ApiError(
                    429,
                    f"server busy: {self.held / 2**20:.0f} MiB of request bodies are being received or decoded; "
                    "retry later",
                    "bodies_held",
                )
            self.held += n
            taken += n

        try:
            yield take
        finally:
            self.held -= taken
