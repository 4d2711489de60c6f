"""OpenAI's Chat Completions wire format, the parts this model can use: the request's pydantic models, the error
object every refusal is answered with, and the reading of a raw body into a request."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from model.serve.limits import Limits

# fields of OpenAI's request that change nothing an answer of this server holds: taken and ignored
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, " ".join(message.split()), code, param

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        kind = "server_error" if self.status >= 500 else ERROR_TYPES.get(self.status, "invalid_request_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")  # inside messages, fields this server has no use for (name...)


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
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """The request's top level; other fields are kept (`model_extra`) to be refused by name (`unsupported`)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float | None = Field(None, ge=0, le=1, strict=True)  # 0 is greedy, as OpenAI allows
    top_k: StrictInt | None = Field(None, ge=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = None
    n: StrictInt | None = Field(None, ge=1)
    stop: str | list[str] | None = None


def unsupported(body: ChatRequest) -> list[str]:
    """The request's fields this server does not implement (logprobs, tools, response_format, ...), sorted; a field
    left at nothing (null, false, 0, empty) asks for nothing and is not one of them."""
    extra: dict[str, Any] = body.model_extra or {}
    return sorted(k for k, v in extra.items() if k not in IGNORED_FIELDS and v not in (None, False, 0, "", [], {}))


def one_line(err: ValidationError) -> str:
    """A pydantic error as one line: where and what, for the first problem."""
    first = err.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def parse_body(raw: bytes, limits: Limits) -> ChatRequest:
    """The chat request in a raw body: 400 for more JSON items than `limits.max_json_items` (counted on the raw
    bytes before anything is parsed) or for fields this server does not implement, 422 for one that is not a chat
    request."""
    items = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if items > limits.max_json_items:
        raise ApiError(
            400,
            f"the request holds {items} JSON items (commas and brackets); this server takes at most "
            f"{limits.max_json_items}",
            "too_many_items",
        )
    try:
        body = ChatRequest.model_validate_json(raw)
    except ValidationError as err:
        raise ApiError(422, one_line(err), "invalid_request") from None
    names = unsupported(body)
    if names:
        raise ApiError(
            400, f"unsupported field{'s' * (len(names) > 1)}: {', '.join(names[:8])}", "unsupported_field", names[0]
        )
    return body
