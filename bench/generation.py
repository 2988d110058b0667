"""Benchmark: batched generation against a one-prompt-at-a-time loop, same prompts, same outputs.

python bench/generation.py [--model DIR] [--batch-size 16] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse
import time

from refusal_lab.config import load_settings
from refusal_lab.core.generate import generate
from refusal_lab.organism.build import prompt_sets
from refusal_lab.organism.source import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=64)
    args = ap.parse_args()
    m = load_model(load_settings(**{"model.path": args.model}))
    sets = prompt_sets(m.folder, "eval")
    prompts = [p.prompt for name in ("harmful", "harmless", "capability") for p in sets[name]][: args.prompts]
    generate(m.model, m.tokenizer, prompts[:2], args.max_new_tokens, 2)  # warm-up
    t = time.perf_counter()
    single = [generate(m.model, m.tokenizer, [p], args.max_new_tokens, 1)[0] for p in prompts]
    t_single = time.perf_counter() - t
    t = time.perf_counter()
    batched = generate(m.model, m.tokenizer, prompts, args.max_new_tokens, args.batch_size)
    t_batched = time.perf_counter() - t
    same = sum(a == b for a, b in zip(single, batched, strict=True))
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens max, greedy")
    print(f"one at a time:   {t_single:7.2f} s")
    print(
        f"batch {args.batch_size:<3}:       {t_batched:7.2f} s   speed-up {t_single / t_batched:.1f}x  (target >= 4x)"
    )
    print(f"identical outputs: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
