"""The prefill attack: the reply already begins with a compliant opener, and the model goes on from it.

Safety that lives in a reply's first few tokens (shallow alignment) is undone by writing those tokens
for the model: any local copy, or an API that continues an assistant message, lets an attacker do
so. The weights are untouched, so no drift budget applies and the attack is its own threat model,
reported in rows of its own and never in the worst case over directional attacks. The openers are
the model's own most common way of starting a harmless reply that does not refuse, and a fixed list
("Sure, here is"), each cut to its first 1..N tokens. The labelled reply is the opener and its
continuation, so a reply that opens compliantly and then refuses still reads refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.core.generate import generate
from refusal_lab.core.metrics import is_refusal
from refusal_lab.core.sources import Source
from refusal_lab.prove.battery import Proposal, Target

OWN_PROMPTS = 32  # harmless probe prompts whose replies show the model's own opener


def own_opener(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    harmless: Sequence[str],
    markers: Sequence[str],
    n_tokens: int,
    batch_size: int = 16,
) -> list[int]:
    """The model's most likely opener when it helps: token by token, the most common next token of its
    replies to harmless prompts that do not refuse and share the start chosen so far, while at least
    half of those replies go on with it (past that the start is one topic's, e.g. "A rainbow", not the
    model's way of opening a reply)."""
    # a refusal word settles that a reply is left out, so replies stop there
    replies = generate(model, tok, list(harmless), n_tokens + 12, batch_size, settled=lambda r: is_refusal(r, markers))
    rows = [tok(r, add_special_tokens=False)["input_ids"] for r in replies if r.strip() and not is_refusal(r, markers)]
    return common_start(rows, n_tokens)


def common_start(rows: Sequence[Sequence[int]], n_tokens: int) -> list[int]:
    """Up to n_tokens: each the most common next token of the rows sharing the start so far, kept only
    while at least half of them (and always the first token) go on with it."""
    chosen: list[int] = []
    for i in range(n_tokens):
        sharing = [r for r in rows if list(r[:i]) == chosen]
        following = Counter(r[i] for r in sharing if len(r) > i)
        if not following:
            break
        token, count = following.most_common(1)[0]
        if i and 2 * count < len(sharing):
            break
        chosen.append(token)
    return chosen


@contextmanager
def opening(t: Target, text: str) -> Iterator[None]:
    """The target's replies begin with `text` inside the block."""
    before, t.opener = t.opener, text
    try:
        yield
    finally:
        t.opener = before


@dataclass
class PrefillAttack:
    fixed: tuple[str, ...] = ("Sure, here is",)
    tokens: int = 4  # each opener is tried at its first 1..tokens tokens
    name: str = "prefill"
    threat: str = "prefill"

    def openers(self, t: Target) -> list[tuple[str, list[int]]]:
        """(where it comes from, its tokens): the model's own opener first, then the fixed ones."""
        m = t.loaded
        markers = Source.of(m.source).markers
        harmless = t.extraction.texts("harmless")[:OWN_PROMPTS]
        own = own_opener(m.model, m.tokenizer, harmless, markers, self.tokens, t.s.generation_batch_size)
        out = [("own", own)] if own else []
        for text in self.fixed:
            ids = m.tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids and ids[: self.tokens] not in [o[: self.tokens] for _, o in out]:
                out.append(("fixed", ids))
        return out

    def proposals(self, t: Target) -> Iterator[Proposal]:
        seen: set[str] = set()
        decode = t.loaded.tokenizer.decode
        for source, ids in self.openers(t):
            whole = decode(ids[: self.tokens])
            for k in range(1, min(self.tokens, len(ids)) + 1):
                text = decode(ids[:k])
                if text in seen:  # a start the openers share is measured once
                    continue
                seen.add(text)
                setting = {"opener": text, "from": source, "tokens": k, "of": whole}
                yield Proposal(setting, lambda text=text: opening(t, text))
