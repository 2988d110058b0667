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
import sys
import time
from pathlib import Path

from refusal_lab.core.generate import generate_replies
from refusal_lab.core.metrics import is_refusal
from refusal_lab.core.sources import Source

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_inputs import add_model_options, model_and_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_options(ap)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--sizes", default="16,32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--opener", default="Sure, here is")
    args = ap.parse_args()
    m, prompts = model_and_prompts(args, reported=True)
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
