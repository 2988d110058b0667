"""Conversations with a loaded model: history, a system prompt, and replies streamed token by token.

The reasoning block (the model's own think markers) is streamed apart from the answer, so a
terminal can show it dimmed and keep only the answer in the history, as chat templates expect.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refusal_lab.core.generate import encode, stop_ids, think_markers
from refusal_lab.core.model import Loaded


@dataclass
class Conversation:
    system: str = ""
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, {"role": "user", "content": user}]

    def add(self, user: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.turns.clear()

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"system": self.system, "messages": self.turns}, indent=1) + "\n")


@dataclass(frozen=True)
class Piece:
    text: str
    reasoning: bool  # inside the think block


def stream(m: Loaded, messages: list[dict[str, str]], max_new_tokens: int = 256) -> Iterator[Piece]:
    """Greedy reply pieces as they are generated, marked as reasoning or answer."""
    from transformers import TextIteratorStreamer

    tok = m.tokenizer
    markers = think_markers(tok)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=markers is None)
    batch = encode(tok, [messages], next(m.model.parameters()).device)
    kwargs = {**batch, "max_new_tokens": max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
              "top_k": None, "eos_token_id": stop_ids(m.model, tok), "streamer": streamer,
              "pad_token_id": tok.pad_token_id}  # fmt: skip
    worker = threading.Thread(target=lambda: torch.inference_mode()(m.model.generate)(**kwargs), daemon=True)
    worker.start()
    inside = False
    specials = [t for t in tok.all_special_tokens if not markers or t not in markers]
    for text in streamer:
        for s in specials:
            text = text.replace(s, "")
        if markers and markers[0] in text:
            before, _, text = text.partition(markers[0])
            if before.strip():
                yield Piece(before, False)
            inside = True
        if markers and inside and markers[1] in text:
            head, _, text = text.partition(markers[1])
            yield Piece(head, True)
            inside = False
        if text:
            yield Piece(text, inside)
    worker.join()


def reply(m: Loaded, messages: list[dict[str, str]], max_new_tokens: int = 256) -> tuple[str, str]:
    """(answer, reasoning) in one go."""
    answer, reasoning = [], []
    for p in stream(m, messages, max_new_tokens):
        (reasoning if p.reasoning else answer).append(p.text)
    return "".join(answer).strip(), "".join(reasoning).strip()
