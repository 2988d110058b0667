"""Benchmark: replies decoded at several generation batch sizes, the way prove decodes them.

Same model and prompts in one run, each size timed in alternation (16, 32, 16, 32, ...) so a
neighbour on the machine slows every size alike: greedy replies with prove's stopping rule (a reply
stops once a refusal word settles its label), once as asked (the model's own mix of short refusals
and long answers) and once begun with a compliant opener (prove's prefill row: mostly long answers).
Prints seconds per size and the ratio to the first size.

    python bench/generation_batch.py                                              # the organism
    python bench/generation_batch.py --model DIR --harmful strongreject.csv --column forbidden_prompt \
        --dtype bfloat16 --prompts 157 --sizes 16,32
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from refusal_lab.config import load_settings
from refusal_lab.core.generate import generate_replies
from refusal_lab.core.metrics import is_refusal
from refusal_lab.core.prompts import load_prompts
from refusal_lab.core.sources import Source
from refusal_lab.organism.build import prompt_sets
from refusal_lab.organism.source import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--harmful", type=Path)
    ap.add_argument("--column", default="prompt")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--sizes", default="16,32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--opener", default="Sure, here is")
    args = ap.parse_args()
    m = load_model(load_settings(**{"model.path": args.model, "model.dtype": args.dtype}))
    if args.harmful:
        prompts = [p.prompt for p in load_prompts(args.harmful, args.column)][-args.prompts :]
    else:
        prompts = [p.prompt for p in prompt_sets(m.folder, "eval")["harmful"]][: args.prompts]
    markers = Source.of(m.source).markers
    sizes = [int(x) for x in args.sizes.split(",")]
    model, tok, n = m.model, m.tokenizer, args.max_new_tokens
    generate_replies(model, tok, prompts[:2], 4, 2)  # warm-up
    print(f"model {m.folder} ({args.dtype}): {len(prompts)} prompts, {n} new tokens, sizes {sizes}")
    for opener in ("", args.opener):
        times: dict[int, list[float]] = {size: [] for size in sizes}
        refused: dict[int, int] = {}
        for _ in range(args.repeats):
            for size in sizes:
                t = time.perf_counter()
                replies = generate_replies(
                    model, tok, prompts, n, size, settled=lambda r: is_refusal(r, markers), opener=opener
                )
                times[size].append(time.perf_counter() - t)
                refused[size] = sum(is_refusal(r.answer, markers) for r in replies)
        first = statistics.median(times[sizes[0]])
        shown = f"begun with {opener!r}" if opener else "as asked"
        for size in sizes:
            med = statistics.median(times[size])
            runs = ", ".join(f"{x:.1f}" for x in times[size])
            print(
                f"{shown}: batch {size}: {med:.1f} s (runs {runs}; x{med / first:.2f}), "
                f"{refused[size]} of {len(prompts)} replies refuse"
            )


if __name__ == "__main__":
    main()
