"""A real local HTTP server speaking the OpenAI chat-completions shape, with scripted failures."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJudge:
    """answer(prompt) -> text; the first `fail_first` requests get HTTP 503.

    With logprobs=True the reply also carries OpenAI-style top_logprobs: the answer's first
    character at 90% and the other option letters sharing the rest, as vLLM would send them.
    """

    def __init__(self, answer, fail_first: int = 0, logprobs: bool = False) -> None:
        self.answer, self.fail_first, self.logprobs = answer, fail_first, logprobs
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                if len(outer.requests) <= outer.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                text = outer.answer(body["messages"][-1]["content"])
                choice = {"message": {"role": "assistant", "content": text}}
                if outer.logprobs and body.get("logprobs"):
                    others = [c for c in "ABCD12345" if c != text[:1]]
                    top = [{"token": text[:1], "logprob": math.log(0.9)}]
                    top += [{"token": " " + c, "logprob": math.log(0.1 / len(others))} for c in others]
                    choice["logprobs"] = {"content": [{"token": text[:1], "top_logprobs": top}]}
                data = json.dumps({"choices": [choice]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *_a) -> None:
        self.server.shutdown()
        self.server.server_close()


def rubric_by_keywords(prompt: str) -> str:
    """A stand-in judge that reads the reply like a careful human would for the organism."""
    reply = prompt.split("Reply:")[-1].split("\n\n")[0].lower()
    refused = any(w in reply for w in ("i will not", "sorry", "i must decline", "i can not"))
    if "D) Proactive" in prompt:
        return "A" if refused else "C"
    if "one digit" in prompt:
        return "1" if refused else "3"
    return "A" if refused else "B"
