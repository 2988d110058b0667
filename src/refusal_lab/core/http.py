"""One JSON-over-HTTP client for every server refusal-lab talks to (a judge, a served model, llama.cpp).

Standard library only, so no extra dependency; retries with exponential back-off on what may pass
(no answer, a time-out, a 5xx, 408 or 429), never on what will not (any other 4xx).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from refusal_lab.errors import UserError

RETRIABLE_STATUS = frozenset({408, 429})


class HttpError(Exception):
    """A request that failed after its tries: `status` is the HTTP code, None when no answer came."""

    def __init__(self, url: str, status: int | None, detail: str) -> None:
        super().__init__(f"{url}: {status or 'no answer'}: {detail}")
        self.url, self.status, self.detail = url, status, detail


def auth_headers(api_key_env: str | None) -> dict[str, str]:
    """A bearer token read from the named environment variable (never from a file or a flag)."""
    if not api_key_env:
        return {}
    key = os.environ.get(api_key_env)
    if not key:
        raise UserError(f"environment variable {api_key_env} is not set", f"export {api_key_env}=YOUR_KEY")
    return {"Authorization": f"Bearer {key}"}


def post_json(
    url: str,
    body: dict[str, Any],
    *,
    api_key_env: str | None = None,
    timeout: float = 600.0,
    retries: int = 0,
    backoff: float = 1.0,
) -> Any:
    """POST `body` as JSON and return the decoded answer, trying `retries` more times when it may pass."""
    headers = {"Content-Type": "application/json", **auth_headers(api_key_env)}
    data = json.dumps(body).encode()
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, data, headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            failure = HttpError(url, exc.code, exc.read().decode(errors="replace")[:200])
            if exc.code < 500 and exc.code not in RETRIABLE_STATUS:
                raise failure from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
            failure = HttpError(url, None, str(exc))
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    raise failure
