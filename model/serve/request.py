"""A chat request -> the original's prompt: the instruction, the media it carries (from base64 and data URLs, the
only sources taken) and the sampling settings over the server's defaults."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, replace

from model.config import GenerationConfig
from model.serve.limits import Limits
from model.serve.wire import ApiError, AudioPart, ChatRequest, ImagePart, TextPart
from model.serve.worker import K_CAP
from model.text.prompt import TAGS

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


@dataclass(frozen=True)
class MediaItem:
    """One media part: its modality, the file suffix its type calls for, its bytes, and where the request has it
    (`messages[0].content[1] (input_audio)`, the name every error about it gives)."""

    modality: str
    suffix: str
    data: bytes
    where: str


@dataclass
class Prompt:
    """One user turn: the instruction and the media, in order."""

    instruction: str
    media: list[MediaItem]

    @property
    def input(self) -> str:
        return "".join(TAGS[m.modality] for m in self.media)


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
    texts: list[str] = []
    media: list[MediaItem] = []
    for i, part in enumerate(parts):
        if isinstance(part, TextPart):
            texts.append(part.text)
            continue
        what = f"messages[0].content[{i}] ({part.type})"
        if len(media) == limits.max_media:
            raise ApiError(400, f"more than {limits.max_media} media items in one prompt", "too_many_media")
        if isinstance(part, AudioPart):
            fmt = part.input_audio.format.lower()
            if fmt not in AUDIO_FORMATS:
                raise ApiError(
                    400,
                    f"{what}: unsupported audio format {fmt[:20]!r} (expected wav, mp3, flac or ogg)",
                    "unsupported_media",
                )
            media.append(MediaItem("audio", AUDIO_FORMATS[fmt], _b64(part.input_audio.data, what), what))
        elif isinstance(part, ImagePart):
            media.append(MediaItem("image", *_data_url(part.image_url.url, IMAGE_TYPES, what), what))
        else:
            media.append(MediaItem("video", *_data_url(part.video_url.url, VIDEO_TYPES, what), what))
    instruction = "\n".join(texts)
    if not instruction.strip():
        raise ApiError(400, "the user message has no text: ask something about the media", param="messages")
    return Prompt(instruction, media)


def generation_config(body: ChatRequest, defaults: GenerationConfig, most_tokens: int) -> GenerationConfig:
    """A request's sampling settings over the server's defaults (`dr ask`'s): temperature 0 or top_p 0 means greedy."""
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
    greedy = temperature == 0 or body.top_p == 0 or (body.temperature is None and not defaults.do_sample)
    return replace(
        defaults,
        max_new_tokens=tokens,
        do_sample=not greedy,
        temperature=temperature if not greedy else defaults.temperature,
        top_p=defaults.top_p if body.top_p is None or greedy else body.top_p,
        top_k=top_k,
        seed=defaults.seed if body.seed is None else body.seed,
    )
