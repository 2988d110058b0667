"""Hardening data: specification documents, alignment examples, a category mix, and their tokens.

- Specification documents (stage 1): plain text or markdown files, packed into fixed-length
  causal-LM blocks up to a token budget.
- Alignment examples (stage 2): JSONL, one conversation per line:
  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}],
   "category": "...", "kind": "harmful" | "harmless" | ..., "reasoning": "optional think trace"}
  The reasoning, when given, is put in the model's own think markers before the last reply.
- A mix (TOML, [weights] category = w) sets sampling ratios: 3.0 repeats a category three
  times, 0.3 keeps 30% of it.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_lab.config import read_toml
from refusal_lab.core.generate import think_markers
from refusal_lab.core.prompts import jsonl_rows
from refusal_lab.errors import UserError


@dataclass(frozen=True)
class Example:
    """One alignment conversation; loss falls on the assistant turns only."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    category: str = "general"
    kind: str = "harmless"
    reasoning: str = ""
    extended: str = ""  # for a refusal: the same refusal explaining its reason (--extended-refusals)

    def with_extended(self) -> Example:
        """The example with its explaining refusal as the last reply, when it has one."""
        if not self.extended:
            return self
        return Example((*self.messages[:-1], ("assistant", self.extended)), self.category, self.kind, self.reasoning)

    @property
    def prompt(self) -> str:
        """The last user message (what probes and the retain term read)."""
        return next(c for r, c in reversed(self.messages) if r == "user")


def load_examples(path: Path) -> list[Example]:
    """Alignment JSONL; a bad line is named with the field that is wrong."""
    if not path.is_file():
        raise UserError(f"alignment data {path} does not exist", "check the path given to --data")
    out = []
    for n, row in jsonl_rows(path):
        where = f"{path}:{n}"
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
            raise UserError(
                f"{where} has no 'messages' list", 'give each line {"messages": [{"role": ..., "content": ...}]}'
            )
        msgs = []
        for m in row["messages"]:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise UserError(f"{where}: a message has no role system/user/assistant", "fix the message's 'role'")
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise UserError(f"{where}: a {m['role']} message has no 'content'", "give every message non-empty text")
            msgs.append((m["role"], m["content"]))
        if msgs[-1][0] != "assistant" or not any(r == "user" for r, _ in msgs):
            raise UserError(f"{where} must end with an assistant reply to a user message", "fix the line's messages")
        texts = {k: row.get(k, "") for k in ("reasoning", "extended")}
        bad = [k for k, v in texts.items() if not isinstance(v, str)]
        if bad:
            raise UserError(f"{where}: {bad[0]!r} must be text", f"give {bad[0]} as a string")
        category, kind = str(row.get("category") or "general"), str(row.get("kind") or "harmless")
        out.append(Example(tuple(msgs), category, kind, texts["reasoning"], texts["extended"]))
    if not out:
        raise UserError(f"alignment data {path} is empty", "add one conversation per line")
    return out


def load_mix(path: Path | None) -> dict[str, float]:
    if path is None:
        return {}
    data = read_toml(path, "mix file", "--mix")
    weights = data.get("weights", data)
    bad = {k: v for k, v in weights.items() if not isinstance(v, int | float) or v < 0}
    if bad:
        raise UserError(f"mix file {path}: weights must be numbers >= 0, got {bad}", "write [weights] category = 1.5")
    return {k: float(v) for k, v in weights.items()}


def apply_mix(categories: list[str], weights: dict[str, float], seed: int) -> list[int]:
    """One epoch's example indices: each category repeated floor(w) times plus a random share w - floor(w)."""
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, cat in enumerate(categories):
        by_cat[cat].append(i)
    unknown = sorted(set(weights) - set(by_cat))
    if unknown:
        raise UserError(
            f"the mix names categories with no examples: {', '.join(unknown)} (have: {', '.join(sorted(by_cat))})",
            "fix the category names in the mix file",
        )
    rng = random.Random(seed)
    out: list[int] = []
    for cat, items in sorted(by_cat.items()):
        w = weights.get(cat, 1.0)
        whole, frac = math.floor(w), w - math.floor(w)
        out += items * whole + rng.sample(items, round(frac * len(items)))
    rng.shuffle(out)
    return out


def load_spec(path: Path | None) -> list[str]:
    """Specification documents: a file, or every .md/.txt file in a folder."""
    if path is None:
        return []
    files = sorted(p for p in path.rglob("*") if p.suffix in (".md", ".txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise UserError(f"no specification documents at {path}", "pass a .md/.txt file or a folder of them to --spec")
    docs = [f.read_text(encoding="utf-8") for f in files]
    if not any(d.strip() for d in docs):
        raise UserError(f"the specification documents at {path} are empty", "give them text")
    return docs


def pack(tok: object, docs: list[str], block: int, budget: int) -> torch.Tensor:
    """Documents joined by end-of-text and cut into [n, block] causal-LM blocks, at most `budget` tokens."""
    ids: list[int] = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (ids * max(1, math.ceil(budget / max(1, len(ids)))))[:budget]
    n = len(ids) // block
    if n == 0:
        raise UserError(
            f"the specification documents give {len(ids)} tokens, fewer than one block of {block}", "lower --block-size"
        )
    return torch.tensor(ids[: n * block]).view(n, block)


@dataclass(frozen=True)
class Encoded:
    """Token ids and labels (assistant tokens only) of one example, and where its prompt ends."""

    ids: list[int]
    labels: list[int]
    prompt_end: int  # tokens before the last assistant reply (the position an attacker reads is prompt_end - 1)
    kind: str = "harmless"


def encode_example(tok: object, e: Example, max_length: int) -> Encoded:
    """Render with the chat template turn by turn; loss on assistant turns; reasoning in the model's markers."""
    msgs = [{"role": r, "content": c} for r, c in e.messages]
    if e.reasoning:
        markers = think_markers(tok)
        if markers is None:
            raise UserError(
                "an alignment example has 'reasoning' but the chat template has no think markers",
                "drop the reasoning field, or use a model whose template declares <think>-style markers",
            )
        msgs[-1] = {**msgs[-1], "content": f"{markers[0]} {e.reasoning} {markers[1]} {msgs[-1]['content']}"}
    ids: list[int] = []
    labels: list[int] = []
    prompt_end = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not full.startswith(head):
            raise UserError(
                "the chat template renders a conversation differently turn by turn", "use a standard template"
            )
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        reply_ids = tok(full[len(head) :], add_special_tokens=False)["input_ids"]
        if head_ids[: len(ids)] != ids:  # the template rewrote earlier turns: restart from this render
            ids, labels = [], []
        new_head = head_ids[len(ids) :]
        ids += new_head
        labels += [-100] * len(new_head)
        prompt_end = len(ids)
        ids += reply_ids
        labels += reply_ids
    return Encoded(ids[:max_length], labels[:max_length], min(prompt_end, max_length), e.kind)
