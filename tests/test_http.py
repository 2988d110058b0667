"""The one HTTP client: retries what may pass, gives up at once on what will not, reads keys from the environment."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from refusal_lab.core.http import HttpError, post_json
from refusal_lab.errors import UserError


@contextmanager
def server(statuses: list[int]) -> Iterator[tuple[str, list[dict]]]:
    """A loopback server answering each POST with the next status (200 echoes the body); records requests."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"body": body, "auth": self.headers.get("Authorization")})
            status = statuses.pop(0) if statuses else 200
            payload = json.dumps({"echo": body}).encode() if status == 200 else b"nope"
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_args: object) -> None:
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/x", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_5xx_and_a_429_are_retried_then_the_answer_is_returned():
    with server([500, 429]) as (url, seen):
        assert post_json(url, {"a": 1}, retries=2, backoff=0.0) == {"echo": {"a": 1}}
    assert len(seen) == 3


def test_a_404_is_not_retried_and_names_its_status():
    with server([404, 200]) as (url, seen), pytest.raises(HttpError) as err:
        post_json(url, {}, retries=3, backoff=0.0)
    assert err.value.status == 404 and len(seen) == 1


def test_retries_run_out_with_the_last_failure():
    with server([503, 503]) as (url, seen), pytest.raises(HttpError) as err:
        post_json(url, {}, retries=1, backoff=0.0)
    assert err.value.status == 503 and len(seen) == 2


def test_no_server_is_a_failure_without_status():
    with server([]) as (url, _seen):
        dead = url.replace("/x", "")
    with pytest.raises(HttpError) as err:
        post_json(dead, {}, retries=0, timeout=2)
    assert err.value.status is None


def test_the_key_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("RL_TEST_KEY", "k123")
    with server([]) as (url, seen):
        post_json(url, {}, api_key_env="RL_TEST_KEY")
    assert seen[0]["auth"] == "Bearer k123"
    monkeypatch.delenv("RL_TEST_KEY")
    with pytest.raises(UserError, match="RL_TEST_KEY"):
        post_json(url, {}, api_key_env="RL_TEST_KEY")
