"""Benchmark: early-stopped replies, `model.generate` (finished rows padded) against the shrinking loop.

Same model, prompts and stopping rule (the model's scorer settles a reply once a refusal word
appears), greedy, in one run: seconds for each path, and whether their replies are identical.

    python bench/early_stop.py                                              # the organism
    python bench/early_stop.py --model DIR --harmful strongreject.csv --column forbidden_prompt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import refusal_lab.core.generate as G
from refusal_lab.config import load_settings
from refusal_lab.core.metrics import is_refusal
from refusal_lab.core.prompts import load_prompts
from refusal_lab.core.sources import Source
from refusal_lab.organism.build import prompt_sets
from refusal_lab.organism.source import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism")
    ap.add_argument("--harmful", type=Path)
    ap.add_argument("--column", default="prompt")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    m = load_model(load_settings(**{"model.path": args.model}))
    if args.harmful:
        prompts = [p.prompt for p in load_prompts(args.harmful, args.column)][: args.prompts]
    else:
        prompts = [p.prompt for p in prompt_sets(m.folder, "eval")["harmful"]][: args.prompts]
    markers = Source.of(m.source).markers

    def rule(text: str) -> bool:
        return is_refusal(text, markers)

    G.generate(m.model, m.tokenizer, prompts[:2], 4, 2)  # warm-up
    times, replies = {}, {}
    for name, plain in (("model.generate", False), ("shrinking", True)):
        G.plain_greedy = lambda _m, plain=plain: plain  # the path generate_replies takes
        for settled in (None, rule):
            t = time.perf_counter()
            out = G.generate(m.model, m.tokenizer, prompts, args.max_new_tokens, args.batch_size, settled=settled)
            key = (name, settled is not None)
            times[key], replies[key] = time.perf_counter() - t, out
    refusing = sum(is_refusal(r, markers) for r in replies[("model.generate", False)])
    n = len(prompts)
    print(f"model {m.folder}: {n} harmful prompts ({refusing} refused), {args.max_new_tokens}-token replies,")
    print(f"batch {args.batch_size}, greedy; seconds (identical replies to model.generate's):")
    for settled in (False, True):
        a, b = times[("model.generate", settled)], times[("shrinking", settled)]
        pairs = zip(replies[("model.generate", settled)], replies[("shrinking", settled)], strict=True)
        same = sum(x == y for x, y in pairs)
        what = "stopped once a refusal word appears" if settled else "run to their end id or the budget"
        print(f"  replies {what}: model.generate {a:.1f} s, shrinking {b:.1f} s, ratio {b / a:.2f} ({same}/{n})")
    full = times[("model.generate", False)]
    print(f"  shrinking + early stop against model.generate to the end: ratio {times[('shrinking', True)] / full:.2f}")


if __name__ == "__main__":
    main()
