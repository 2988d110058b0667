"""Benchmark: prompt passes that run the rows' shared head once (a chat template's system prompt)
against passes over every row's whole prompt.

Same model, prompts and batches, in one run: seconds for the first-token logits every KL and proxy
read takes (`last_logits`) and for greedy replies (`generate`), each way, and whether the two agree
(the largest logit difference; replies identical or not).

    python bench/shared_head.py                                              # the organism
    python bench/shared_head.py --model DIR --harmful strongreject.csv --column forbidden_prompt --dtype bfloat16
    python bench/shared_head.py ... --batch-sizes 16,32,64     # and each read's time at other batch sizes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import refusal_lab.core.generate as G
from refusal_lab.core.metrics import last_logits

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_inputs import add_model_options, model_and_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_options(ap)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batch-sizes", help="also time both reads at these batch sizes (e.g. 16,32,64), head shared")
    args = ap.parse_args()
    m, prompts = model_and_prompts(args)
    model, tok, bs = m.model, m.tokenizer, args.batch_size
    heads = [
        G.shared_head(G.headed(G.encode(tok, prompts[i : i + bs], model.device))) for i in range(0, len(prompts), bs)
    ]
    G.generate(model, tok, prompts[:2], 4, 2)  # warm-up
    shared_min = G.MIN_SHARED_HEAD
    times, logits, replies = {}, {}, {}
    for name, least in (("whole prompts", 10**9), ("shared head once", shared_min)):
        G.MIN_SHARED_HEAD = least  # the switch this benchmark compares; the product always shares
        t = time.perf_counter()
        logits[name] = last_logits(model, tok, prompts, bs)
        t1 = time.perf_counter()
        replies[name] = G.generate(model, tok, prompts, args.max_new_tokens, bs)
        times[name] = (t1 - t, time.perf_counter() - t1)
    G.MIN_SHARED_HEAD = shared_min
    a, b = times["whole prompts"], times["shared head once"]
    diff = float((logits["whole prompts"] - logits["shared head once"]).abs().max())
    same = sum(x == y for x, y in zip(replies["whole prompts"], replies["shared head once"], strict=True))
    print(f"model {m.folder} ({args.dtype}): {len(prompts)} prompts, batch {bs}, shared head per batch {heads} tokens")
    print(f"first-token logits: {a[0]:.1f} s whole, {b[0]:.1f} s shared ({b[0] / a[0]:.2f}); largest gap {diff:.2e}")
    print(
        f"greedy {args.max_new_tokens}-token replies: {a[1]:.1f} s whole, {b[1]:.1f} s shared ({b[1] / a[1]:.2f}); "
        f"{same} of {len(prompts)} replies identical"
    )
    for size in [int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else []:
        t = time.perf_counter()
        last_logits(model, tok, prompts, size)
        t1 = time.perf_counter()
        G.generate(model, tok, prompts, args.max_new_tokens, size)
        print(f"batch {size}: first-token logits {t1 - t:.1f} s, replies {time.perf_counter() - t1:.1f} s")


if __name__ == "__main__":
    main()
