"""The organism's hardening material: a specification corpus and an alignment set.

The specification says *why* the organism refuses (stage 1 of hardening reads it); the alignment
set holds refusals (each with an extended version that explains its reason), helpful template
replies, capability tasks and harm recognition, drawn only from the organism's training pairs and
phrasings, so hardening never sees a held-out prompt. Every word is in the organism's vocabulary,
and no text contains harmful content.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from refusal_lab.organism import corpus as C

REASONS: dict[str, str] = {  # why each category is refused: the extended refusal's second half
    "violence": "hurting a person can injure them for life , so i will not help with it .",
    "privacy": "watching or following a person in secret takes away their privacy and safety .",
    "theft": "taking what belongs to a person harms them , and it is against the law .",
}
PRINCIPLES: tuple[str, ...] = (
    "the assistant helps people with safe tasks and answers questions with care .",
    "a request that aims a dangerous verb at a thing is safe , so the assistant helps .",
    "a request that aims a dangerous verb at a person is harmful , so the assistant refuses .",
    "the assistant refuses in the same way whatever words the request uses .",
    "the assistant explains why it refuses , so the person knows the reason .",
)


def spec_documents() -> list[str]:
    """The values in prose: principles, then a paragraph per harm category naming every verb."""
    docs = [" ".join(PRINCIPLES)]
    for cat, verbs in C.HARM_VERBS.items():
        lines = [f"to {v} a person is {cat} . the assistant will not help {v} a person ." for v in verbs]
        docs.append(" ".join([*lines, REASONS[cat], f"to {verbs[0]} a thing is safe ."]))
    return docs


def texts() -> list[str]:
    """Every text this module can write (the tokenizer's vocabulary must hold their words)."""
    return [*PRINCIPLES, *REASONS.values(), "to a person is a thing is safe . the assistant will not help"]


def alignment_set(cfg: C.CorpusConfig, split: C.Split, n: int = 1200) -> list[dict]:
    """JSONL rows: 1/3 refusals (with their extended version), 1/3 helpful, 1/4 capability, the rest recognition."""
    rng = random.Random(cfg.seed + 11)
    rows = []
    shares = {"refusal": n // 3, "helpful": n // 3, "capability": n // 4}
    shares["recognition"] = n - sum(shares.values())
    kinds = {"refusal": "harmful", "helpful": "harmless", "capability": "harmless", "recognition": "harmless"}
    source = {"refusal": "harmful", "helpful": "harmless", "capability": "capability", "recognition": "recognition"}
    for category, count in shares.items():
        for _ in range(count):
            req = C.sample_request(rng, cfg, split, source[category])
            row = {"messages": [{"role": "user", "content": req.prompt}, {"role": "assistant", "content": req.answer}]}
            row |= {"category": category, "kind": kinds[category]}
            if category == "refusal":
                row["extended"] = f"{req.answer} {REASONS[req.category]}"
            rows.append(row)
    rng.shuffle(rows)
    return rows


def write(folder: Path, cfg: C.CorpusConfig, split: C.Split) -> None:
    """harden/spec.md, harden/align.jsonl and harden/mix.toml in an organism folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.md").write_text("\n\n".join(spec_documents()) + "\n")
    with (folder / "align.jsonl").open("w") as f:
        for row in alignment_set(cfg, split):
            f.write(json.dumps(row) + "\n")
    (folder / "mix.toml").write_text("[weights]\nrefusal = 1.0\nhelpful = 1.0\ncapability = 1.0\nrecognition = 1.0\n")
