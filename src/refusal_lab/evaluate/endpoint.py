"""Replies from an OpenAI-compatible server (llama.cpp's server, vLLM) instead of a local model.

An exported GGUF is then measured where it will run, and a model too large for this machine is
measured on the engine built for it. Only what a chat endpoint gives is measured: replies and
their labels, capability by exact match, escalation; logit-based figures (KL, multiple choice,
separability) need the weights and are left out, saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from refusal_lab.core.generate import Reply
from refusal_lab.core.http import HttpError, post_json
from refusal_lab.errors import UserError


@dataclass
class Remote:
    """A model served at `url` under `name`; `source` is a local folder for its prompt sets, if any."""

    url: str
    name: str
    source: Path
    key_env: str | None = None
    workers: int = 4
    retries: int = 3

    def release(self) -> None:  # nothing held locally
        return None

    def _post(self, body: dict) -> dict:
        try:
            return post_json(
                f"{self.url.rstrip('/')}/chat/completions", body, api_key_env=self.key_env, retries=self.retries
            )
        except HttpError as exc:
            if exc.status is None:
                raise UserError(
                    f"the endpoint {self.url} cannot be reached ({exc.detail})", "start the server or fix --endpoint"
                ) from exc
            raise UserError(
                f"the endpoint {self.url} answered {exc.status}: {exc.detail}",
                "check --endpoint (a .../v1 base URL) and --endpoint-model",
            ) from exc

    def reply(self, prompt: str | list[dict[str, str]], max_tokens: int, sample: bool, seed: int) -> Reply:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        body: dict = {"model": self.name, "messages": messages, "max_tokens": max_tokens}
        body |= {"temperature": 0.7, "top_p": 0.9, "seed": seed} if sample else {"temperature": 0.0}
        choice = self._post(body)["choices"][0]
        message = choice["message"]
        # llama.cpp and vLLM put a split-off reasoning block in reasoning_content (or reasoning)
        reasoning = (message.get("reasoning_content") or message.get("reasoning") or "").strip()
        answer = (message.get("content") or "").strip()
        # the budget ran out while the model was still thinking: no answer to score (broken, not refused)
        still_thinking = bool(reasoning) and not answer and choice.get("finish_reason") == "length"
        return Reply(answer, reasoning, still_thinking)

    def replies(
        self,
        prompts: Sequence[str | list[dict[str, str]]],
        max_tokens: int,
        progress: Callable[[int], None] | None = None,
        sample: bool = False,
        seed: int = 0,
    ) -> list[Reply]:
        """One request per prompt, `workers` at a time, in the prompts' order."""

        def one(i: int) -> Reply:
            r = self.reply(prompts[i], max_tokens, sample, seed + i)
            if progress:
                progress(1)
            return r

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(one, range(len(prompts))))
