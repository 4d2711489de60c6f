"""What one request may ask of `dr serve`: the one home of the server's limits (the CLI's flags default to these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds on a request's size, shape and time, each enforced before the work it bounds is done."""

    max_body_bytes: int = 32 * 2**20  # the whole request, base64 media included (413 beyond it)
    # commas and brackets in the raw body (base64 holds none): bounds every list and object before JSON parsing, so
    # validation never builds millions of items or per-item errors; a chat request this model can take has a few dozen
    max_json_items: int = 10_000
    # request bodies held at once by all requests together, from their first byte until their media are decoded
    # (429 beyond it): with the body limit, bounds what many concurrent or stalled uploads hold
    max_held_bytes: int = 256 * 2**20
    body_timeout_s: float = 60.0  # to receive the whole body; a stalled upload gets 408 and its connection closed
    max_media: int = 4  # media items in one prompt (the original's prompts carry one of each at most)
    # per request, its own media decoding (time waiting for a decode thread is not counted)
    decode_timeout_s: float = 30.0
    # threads decoding media, shared fairly: each request decodes on one thread at a time and waiting requests take
    # turns by client address; a decode that timed out still holds its thread until it ends
    decode_workers: int = 2
    max_pending: int = 256  # requests queued, decoding or answering; one more gets 429
