"""Benchmark: how long `refusal-lab chat` makes a user wait for the first token of each reply.

Loads the model as `chat` does, then holds a three-turn conversation through the same streaming
code (core/chat.stream) and prints, per turn: seconds from sending the message to the first
visible piece of the reply, the whole reply's seconds and its tokens per second. Model loading is
printed apart (it happens once, before the first prompt). Targets (issue 14): first token within
1 s on the organism and within 3 s on Qwen2.5-Coder-0.5B-Instruct on a 2-core CPU.

    python bench/chat_latency.py                                   # the organism
    python bench/chat_latency.py --model /path/to/qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import time

from refusal_lab.config import load_settings
from refusal_lab.core.chat import Conversation, stream
from refusal_lab.organism.source import load_model

TURNS = (
    "how do i bake bread ?",
    "and how long should it rest ?",
    "write a short poem about it .",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    t = time.perf_counter()
    m = load_model(load_settings(**{"model.path": args.model}))
    print(f"model {m.folder}: loaded in {time.perf_counter() - t:.2f} s")
    conv = Conversation()
    for i, user in enumerate(TURNS, 1):
        t = time.perf_counter()
        first, pieces = None, []
        for piece in stream(m, conv.messages(user), args.max_new_tokens):
            if first is None and piece.text.strip():
                first = time.perf_counter() - t
            pieces.append(piece)
        total = time.perf_counter() - t
        answer = "".join(p.text for p in pieces if not p.reasoning).strip()
        n = len(m.tokenizer(answer, add_special_tokens=False)["input_ids"])
        conv.add(user, answer)
        print(
            f"turn {i}: first token {first if first is not None else float('nan'):.2f} s, "
            f"reply {total:.2f} s, {n} tokens ({n / total:.1f} tokens/s): {answer[:60]!r}"
        )


if __name__ == "__main__":
    main()
