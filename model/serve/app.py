"""`dr serve`'s HTTP layer: OpenAI's Chat Completions routes over the engine worker (model/serve/worker.py).

The `openai` client works unchanged. The wire format is model/serve/wire.py, a request's prompt and sampling
settings model/serve/request.py (one user message is one prompt of the original, as `dr ask` builds it; only data
URLs are taken: the server never fetches a URL nor reads a path named by a request), media decoding
model/serve/decoding.py, the limits model/serve/limits.py, the Host/Origin checks, the body's time limit and the
budget of body bytes held at once model/serve/guards.py.

Errors are OpenAI's error object with a one-line message: 400 for a request that cannot be answered (undecodable
media, unsupported type or field, too many items, a prompt that does not fit, a wrong Host), 401 without the API key,
403 from a browser page of another origin, 408 for a body that does not arrive in time, 413 for a body over the
limit, 422 for a body that is not a chat request, 429 with Retry-After when the server is full (requests or body
bytes), 500 for a bug (never plain text).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from model.config import CLIPS_PER_ITEM, GenerationConfig
from model.engine.sequence import Update
from model.engine.sizing import fits_slot
from model.network.deepresonance import Example
from model.serve.decoding import FairThreads, decode_media
from model.serve.guards import LOOPBACK_NAMES, BodyBudget, BodyDeadline, CallerGuard
from model.serve.limits import Limits
from model.serve.request import generation_config, parse_prompt
from model.serve.wire import ApiError, parse_body
from model.serve.worker import Busy, EngineWorker, Failed, TextStream, Ticket
from model.text.prompt import layout_row
from model.text.stopping import StopRule

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_AFTER_S = 1


@dataclass
class Admitted:
    """A request ready for the engine: its ticket, its prompt with decoded media, its settings, its prompt's length
    and whether it streams (with the usage chunk)."""

    ticket: Ticket
    example: Example
    gen: GenerationConfig
    positions: int
    stream: bool
    usage: bool


async def read_body(request: Request, limit: int, take: Callable[[int], None]) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over `limit` bytes; each chunk is `take`n from
    the server's body budget as it arrives."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes is over this server's {limit}", "body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        take(len(chunk))
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over this server's {limit} bytes", "body_too_large")
    return bytes(body)


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (after the body was read, the next ASGI message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(
    worker: EngineWorker,
    model_id: str,
    api_key: str | None = None,
    limits: Limits = Limits(),
    defaults: GenerationConfig = GenerationConfig(),
    host: str = "127.0.0.1",
    cors_origins: Iterable[str] = (),
) -> FastAPI:
    """The FastAPI app: the worker is warmed up and started with the app and stopped with it. `host` is the address
    the server binds: without an API key, requests must name it or a loopback name as their Host; browser pages of
    other origins may call it only if `cors_origins` lists them. `defaults` are the sampling settings of a request
    that names none (GenerationConfig's: the original's)."""
    model = worker.model
    rule = StopRule.of(model.tokenizer)
    threads = FairThreads(limits.decode_workers)
    bodies = BodyBudget(limits.max_held_bytes)
    created = int(time.time())
    cors_origins = list(cors_origins)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            threads.shutdown()

    app = FastAPI(
        title="dr serve",
        summary="DeepResonance behind OpenAI's Chat Completions API",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's docs pages load their scripts from a CDN: nothing here reaches out
        redoc_url=None,
        openapi_url=None,  # served below, behind the API key
    )
    app.add_middleware(BodyDeadline, seconds=limits.body_timeout_s)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(CallerGuard, hosts=None if api_key else {*LOOPBACK_NAMES, host}, origins=cors_origins)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 429 else headers
        unread = err.code in ("body_timeout", "body_too_large", "bodies_held")
        headers = {**(headers or {}), "Connection": "close"} if unread else headers  # the rest of the body is not read
        return err.response(headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return ApiError(err.status_code, str(err.detail), "not_found" if err.status_code == 404 else None).response()

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, err: ClientDisconnect) -> Response:
        log.info("%s left before its request was admitted", request.client.host if request.client else "a client")
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> JSONResponse:
        return ApiError(500, "internal server error (the server's log has the details)", "internal_error").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("model.serve").joinpath("web/index.html").read_text(encoding="utf-8"))

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(app.openapi())

    @app.get("/health")
    async def health() -> JSONResponse:
        status = {
            "status": "ok" if worker.alive else "failed",
            "model": model_id,
            "slots": worker.engine.slots,
            "pending": worker.pending,
            "max_pending": worker.max_pending,
            **worker.stats,
        }
        if worker.error:
            status["error"] = worker.error
        return JSONResponse(status, status_code=200 if worker.alive else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "dr"}]}

    async def admitted(request: Request) -> Admitted:
        """The request read, checked, admitted and its media decoded. Its body is held within the server's body
        budget until then, and dropped on return: only the decoded inputs stay while it is answered."""
        with bodies.holding() as take:
            body = parse_body(await read_body(request, limits.max_body_bytes, take), limits)
            if body.model != model_id:
                raise ApiError(
                    404,
                    f"model {body.model!r} is not served here (GET /v1/models: {model_id})",
                    "model_not_found",
                    "model",
                )
            prompt = parse_prompt(body, limits)
            gen = generation_config(body, defaults, worker.engine.max_new_tokens)
            clips = [CLIPS_PER_ITEM[m.modality] for m in prompt.media]
            positions = len(layout_row(model.tokenizer, prompt.input, prompt.instruction, clips).ids)
            if positions > model.config.max_length:
                raise ApiError(
                    400,
                    f"the prompt takes {positions} positions; the model takes at most {model.config.max_length}",
                    "prompt_too_long",
                    "messages",
                )
            if not fits_slot(positions, gen.max_new_tokens, worker.engine.length):
                raise ApiError(
                    400,
                    f"the prompt ({positions} positions) and max_tokens {gen.max_new_tokens} do not fit "
                    f"this server's {worker.engine.length} positions per answer",
                    "prompt_too_long",
                )
            try:
                ticket = worker.admit(body.stream)
            except Busy as err:
                raise ApiError(429, f"server busy: {err}; retry later", "server_busy") from None
            except Failed as err:
                raise ApiError(503, str(err), "engine_failed") from None
            try:
                client = request.client.host if request.client else ""
                media = await unless_gone(request, decode_media(prompt, threads, client, limits.decode_timeout_s))
            except BaseException:
                worker.release(ticket)
                raise
        usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        example = Example(prompt.input, prompt.instruction, media)
        return Admitted(ticket, example, gen, positions, body.stream, usage)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        authorize(request)
        req = await admitted(request)
        ticket, gen, positions = req.ticket, req.gen, req.positions
        updates = worker.run(ticket, req.example, gen)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}

        def usage(ids: list[int]) -> dict:
            return {"prompt_tokens": positions, "completion_tokens": len(ids), "total_tokens": positions + len(ids)}

        if req.stream:
            return StreamingResponse(
                sse_chunks(updates, model.answer, meta, gen.max_new_tokens, rule, usage if req.usage else None),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        final = await until_done(updates, request)
        if final is None:
            return Response(status_code=499)  # the client went away; nobody reads this
        if final.error:
            raise ApiError(503, final.error, "engine_failed") if ticket.failed else ApiError(400, final.error)
        message = {"role": "assistant", "content": model.answer(final.ids)}
        choice = {"index": 0, "message": message, "finish_reason": rule.finish_reason(final.ids, gen.max_new_tokens)}
        return JSONResponse({**meta, "object": "chat.completion", "choices": [choice], "usage": usage(final.ids)})

    return app


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled (a request waiting for a decode thread
    leaves the queue) and ClientDisconnect raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_disconnect(request))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnect


async def until_done(updates: AsyncIterator[Update], request: Request) -> Update | None:
    """The final update, or None if the client disconnects first (which cancels the request: its slot is freed)."""

    async def last() -> Update | None:
        async for u in updates:
            if u.done:
                return u

    answer = asyncio.ensure_future(last())
    gone = asyncio.ensure_future(wait_disconnect(request))
    await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if answer.done():
        return answer.result()
    answer.cancel()
    await asyncio.gather(answer, return_exceptions=True)
    await updates.aclose()
    return None


async def sse_chunks(
    updates: AsyncIterator[Update],
    answer: Callable[[list[int]], str],
    meta: dict,
    max_new_tokens: int,
    rule: StopRule,
    usage: Callable[[list[int]], dict] | None,
) -> AsyncIterator[bytes]:
    """OpenAI's chunk stream: the role, text deltas as they settle, the finish reason, usage if asked, [DONE]. An
    engine refusal after the stream started is sent as an error event (the status line is already out)."""

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        body = {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return format_sse_event(data_str=_json(body))

    text = TextStream(answer)
    yield chunk({"role": "assistant", "content": ""})
    try:
        async for u in updates:
            if u.error:
                yield format_sse_event(data_str=_json({"error": {"message": u.error, "type": "invalid_request_error"}}))
                return
            piece = text.delta(u.ids, u.done)
            if piece:
                yield chunk({"content": piece})
            if u.done:
                yield chunk({}, rule.finish_reason(u.ids, max_new_tokens))
                if usage:
                    yield format_sse_event(
                        data_str=_json(
                            {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage(u.ids)}
                        )
                    )
        yield format_sse_event(data_str="[DONE]")
    finally:
        await updates.aclose()


def _json(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 120.0) -> Iterator[str]:
    """Serves `app` with uvicorn in a background thread (port 0: a free one) and yields its base URL; stops it on
    exit. For tests and benchmarks; `dr serve` runs uvicorn in the foreground."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
