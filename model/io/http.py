"""HTTP that never hangs and retries what may pass: timeouts on huggingface_hub's client, backoff, one-line reasons.

Shared by every download (`dr ckpt download`, `dr data download`, `dr data media`).
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
from collections.abc import Callable
from typing import TypeVar

from model.io.errors import CkptError

T = TypeVar("T")
TRANSFER_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)
# A host that accepts connections and never answers must not hang a download: every request gets these bounds
# (seconds; DR_HTTP_TIMEOUT overrides both), then a failed attempt is retried after 2, 4, 8 ... s (DR_HTTP_BACKOFF).
CONNECT_TIMEOUT, READ_TIMEOUT = 20.0, 60.0
TIMEOUT_ENV, BACKOFF_ENV = "DR_HTTP_TIMEOUT", "DR_HTTP_BACKOFF"


def timeouts() -> tuple[float, float]:
    """(connect, read) timeouts in seconds."""
    forced = os.environ.get(TIMEOUT_ENV)
    return (float(forced), float(forced)) if forced else (CONNECT_TIMEOUT, READ_TIMEOUT)


def backoff(attempt: int) -> None:
    """Wait before retry `attempt` (0-based): 2 s, 4 s, 8 s ... capped at a minute."""
    time.sleep(min(60.0, float(os.environ.get(BACKOFF_ENV) or 2.0) * 2**attempt))


def _bound_request(request) -> None:  # an httpx request hook
    connect, read = timeouts()
    bounds = dict(request.extensions.get("timeout") or {})
    wanted = {"connect": connect, "read": read, "write": read, "pool": connect}
    request.extensions = {**request.extensions, "timeout": {k: bounds.get(k) or v for k, v in wanted.items()}}


def bounded_hub() -> None:
    """Give huggingface_hub's shared HTTP client connect/read timeouts: it is built with none, and several of its
    calls (repo info, tree listings) pass none either, so a silent host would hang them forever."""
    from huggingface_hub import get_session

    hooks = get_session().event_hooks
    if _bound_request not in hooks.get("request", []):
        get_session().event_hooks = {**hooks, "request": [*hooks.get("request", []), _bound_request]}


def retrying(call: Callable[[], T], retries: int = 3) -> T:
    """`call()` with huggingface_hub's HTTP client bounded in time, retried with backoff on what may pass (timeouts,
    resets, 5xx); a CkptError or a 4xx answer is final. The last failure propagates."""
    bounded_hub()
    for attempt in range(retries):
        try:
            return call()
        except CkptError:
            raise
        except Exception as e:
            if _permanent(e):
                raise
            backoff(attempt)
    return call()


def failure(err: BaseException) -> str:
    """`Type: first line` of a failed transfer, for the one-line message."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def _permanent(err: Exception) -> bool:
    """An answer that a retry will not change (404, 401/403: wrong repo or no access)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    return status is not None and 400 <= status < 500 and status != 429
