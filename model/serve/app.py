"""`dr serve`'s HTTP layer: OpenAI's Chat Completions wire format over the engine worker (model/serve/worker.py).

The `openai` client works unchanged. One user message is one prompt of the original: its media parts become the
`<Audio>/<Image>/<Video>` tags in the order they appear, its text parts (joined by newlines) the instruction, as
`dr ask` builds it. Parts:
- text: `{"type": "text", "text": "..."}`
- audio: OpenAI's `{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}` (wav, mp3, flac, ogg)
- image: OpenAI's `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`
- video: `{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}` (the shape vLLM accepts)
Only data URLs are taken: the server never fetches a URL nor reads a path named by a request.

Sampling follows `dr ask`: without `temperature` a request samples as the original does (temperature 0.1, top-k 50,
seed 1337); `temperature: 0` is greedy; `top_p`, `max_tokens` (or `max_completion_tokens`) and `seed` are honoured,
and `top_k` (up to 50) is taken as an extension. Errors are OpenAI's error object with a one-line message: 400 for a
request that cannot be answered (undecodable media, unsupported type, too many media items, a prompt that does not
fit), 401 without the API key, 413 for a body over the limit, 422 for a body that is not a chat request, 429 with
Retry-After when the server is full.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import re
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.config import CLIPS_PER_ITEM, GenerationConfig
from model.engine.sequence import Update
from model.engine.sizing import fits_slot
from model.media.preprocess import MediaError, load_media
from model.network.deepresonance import Example
from model.serve.worker import K_CAP, Busy, EngineWorker, Failed, TextStream
from model.text.prompt import TAGS, layout_row
from model.text.stopping import StopRule

AUDIO_FORMATS = {"wav": ".wav", "mp3": ".mp3", "flac": ".flac", "ogg": ".ogg"}
IMAGE_TYPES = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
}
VIDEO_TYPES = {
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "video/x-matroska": ".mkv",
    "video/x-msvideo": ".avi",
}
DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[\w.+-]+=[\w.+-]+)*;base64,(?P<data>.*)", re.DOTALL)
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_body_bytes: int = 32 * 2**20  # the whole request, base64 media included
    max_media: int = 4  # media items in one prompt (the original's prompts carry one of each at most)
    decode_timeout_s: float = 30.0  # per request, all its media decoded and preprocessed
    decode_workers: int = 2  # threads decoding media; a decode that timed out still holds its thread until it ends


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, " ".join(message.split()), code, param

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        kind = {401: "authentication_error", 429: "rate_limit_error", 503: "server_error"}
        kind = kind.get(self.status, "invalid_request_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# --- the request, as OpenAI's Chat Completions API defines it (the parts this model can use) ---------------------


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields this server has no use for (user, metadata...)


class TextPart(_Loose):
    type: Literal["text"]
    text: str


class InputAudio(_Loose):
    data: str
    format: str


class AudioPart(_Loose):
    type: Literal["input_audio"]
    input_audio: InputAudio


class Url(_Loose):
    url: str


class ImagePart(_Loose):
    type: Literal["image_url"]
    image_url: Url


class VideoPart(_Loose):
    type: Literal["video_url"]
    video_url: Url


Part = Annotated[TextPart | AudioPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None


class StreamOptions(_Loose):
    include_usage: bool = False


class ChatRequest(_Loose):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None


# --- request -> prompt ---------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One user turn: the instruction and the raw media, in order: (modality, file suffix, bytes)."""

    instruction: str
    media: list[tuple[str, str, bytes]]

    @property
    def input(self) -> str:
        return "".join(TAGS[m] for m, _, _ in self.media)


def _b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what}: not valid base64", "invalid_media") from None


def _data_url(url: str, types: dict[str, str], what: str) -> tuple[str, bytes]:
    if not url.startswith("data:"):
        raise ApiError(400, f"{what}: only data: URLs are accepted (this server fetches nothing)", "invalid_url")
    match = DATA_URL.fullmatch(url)
    if not match:
        raise ApiError(400, f"{what}: not a base64 data URL (data:<type>;base64,<data>)", "invalid_url")
    mime = match["mime"].lower()
    if mime not in types:
        raise ApiError(400, f"{what}: unsupported type {mime} (expected {', '.join(types)})", "unsupported_media")
    return types[mime], _b64(match["data"], what)


def parse_prompt(body: ChatRequest, limits: Limits) -> Prompt:
    """The single user turn of a request; raises ApiError(400) for what this model cannot take."""
    if any(m.role not in ("user", "system", "developer") for m in body.messages):
        raise ApiError(400, "one user message only: the model's prompt has a single Human turn", param="messages")
    users = [m for m in body.messages if m.role == "user"]
    if len(users) != 1 or len(body.messages) != 1:
        raise ApiError(
            400,
            "one user message only, no system message: the original's prompt has neither history nor a system prompt",
            param="messages",
        )
    content = users[0].content
    parts: list = [TextPart(type="text", text=content)] if isinstance(content, str) else list(content or [])
    texts, media = [], []
    for i, part in enumerate(parts):
        what = f"messages[0].content[{i}]"
        if isinstance(part, TextPart):
            texts.append(part.text)
            continue
        if len(media) == limits.max_media:
            raise ApiError(400, f"more than {limits.max_media} media items in one prompt", "too_many_media")
        if isinstance(part, AudioPart):
            fmt = part.input_audio.format.lower()
            if fmt not in AUDIO_FORMATS:
                raise ApiError(
                    400,
                    f"{what}: unsupported audio format {fmt!r} (expected wav, mp3, flac or ogg)",
                    "unsupported_media",
                )
            media.append(("audio", AUDIO_FORMATS[fmt], _b64(part.input_audio.data, what)))
        elif isinstance(part, ImagePart):
            media.append(("image", *_data_url(part.image_url.url, IMAGE_TYPES, what)))
        else:
            media.append(("video", *_data_url(part.video_url.url, VIDEO_TYPES, what)))
    instruction = "\n".join(texts)
    if not instruction.strip():
        raise ApiError(400, "the user message has no text: ask something about the media", param="messages")
    return Prompt(instruction, media)


def generation_config(body: ChatRequest, defaults: GenerationConfig, most_tokens: int) -> GenerationConfig:
    """A request's sampling settings over the server's defaults (`dr ask`'s): temperature 0 means greedy."""
    if body.n not in (None, 1):
        raise ApiError(400, "n > 1 is not supported: one answer per request", param="n")
    if body.stop:
        raise ApiError(400, "stop sequences are not supported: answers end where the original's do", param="stop")
    tokens = body.max_completion_tokens or body.max_tokens or most_tokens
    if tokens > most_tokens:
        raise ApiError(400, f"max_tokens {tokens} is over this server's {most_tokens}", param="max_tokens")
    top_k = body.top_k if body.top_k is not None else defaults.top_k
    if top_k > K_CAP:
        raise ApiError(400, f"top_k {top_k} is over this server's {K_CAP}", param="top_k")
    temperature = defaults.temperature if body.temperature is None else body.temperature
    greedy = temperature == 0 or (body.temperature is None and not defaults.do_sample)
    return replace(
        defaults,
        max_new_tokens=tokens,
        do_sample=not greedy,
        temperature=temperature if not greedy else defaults.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        top_k=top_k,
        seed=defaults.seed if body.seed is None else body.seed,
    )


async def decode_media(prompt: Prompt, pool: ThreadPoolExecutor, timeout: float) -> list[tuple[str, torch.Tensor]]:
    """ImageBind inputs of the prompt's media, decoded from temporary files in `pool` within `timeout` seconds."""

    def load_all(folder: Path) -> list[tuple[str, torch.Tensor]]:
        out = []
        for i, (modality, suffix, data) in enumerate(prompt.media):
            path = folder / f"{i}{suffix}"
            path.write_bytes(data)
            try:
                out.append((modality, load_media(modality, path)))
            except MediaError as err:
                raise ApiError(400, f"{modality} item {i + 1}: {err.reason}", "invalid_media") from None
        return out

    def in_temp_dir() -> list[tuple[str, torch.Tensor]]:
        with tempfile.TemporaryDirectory(prefix="dr-serve-") as folder:
            return load_all(Path(folder))

    if not prompt.media:
        return []
    try:
        return await asyncio.wait_for(asyncio.wrap_future(pool.submit(in_temp_dir)), timeout)
    except TimeoutError:
        raise ApiError(400, f"media decoding took over {timeout:g} s", "decode_timeout") from None


# --- the app ---------------------------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes is over this server's {limit}", "body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over this server's {limit} bytes", "body_too_large")
    return bytes(body)


def one_line(err: ValidationError) -> str:
    """A pydantic error as one line: where and what, for the first problem."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


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
) -> FastAPI:
    """The FastAPI app: the worker is warmed up and started with the app and stopped with it."""
    model = worker.model
    rule = StopRule.of(model.tokenizer)
    pool = ThreadPoolExecutor(limits.decode_workers, thread_name_prefix="dr-media")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="dr serve",
        summary="DeepResonance behind OpenAI's Chat Completions API",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's docs pages load their scripts from a CDN: nothing here reaches out
        redoc_url=None,
    )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 429 else headers
        return err.response(headers)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_api_key")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("model.serve").joinpath("web/index.html").read_text(encoding="utf-8"))

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

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        authorize(request)
        raw = await read_body(request, limits.max_body_bytes)
        try:
            body = ChatRequest.model_validate_json(raw)
        except ValidationError as err:
            raise ApiError(422, one_line(err), "invalid_request") from None
        if body.model != model_id:
            raise ApiError(
                404, f"model {body.model!r} is not served here (GET /v1/models: {model_id})", "model_not_found", "model"
            )
        prompt = parse_prompt(body, limits)
        gen = generation_config(body, defaults, worker.engine.max_new_tokens)
        clips = [CLIPS_PER_ITEM[m] for m, _, _ in prompt.media]
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
            media = await decode_media(prompt, pool, limits.decode_timeout_s)
        except BaseException:
            worker.release(ticket)
            raise
        updates = worker.run(ticket, Example(prompt.input, prompt.instruction, media), gen)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}

        def usage(ids: list[int]) -> dict:
            return {"prompt_tokens": positions, "completion_tokens": len(ids), "total_tokens": positions + len(ids)}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                sse_chunks(updates, model.answer, meta, gen.max_new_tokens, rule, usage if include_usage else None),
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
