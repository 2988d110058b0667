"""Benchmark: the same passes in float32 and in bfloat16 on this CPU, side by side in one run.

Whether bfloat16 helps depends on the CPU: with native bfloat16 (AVX512-BF16 or AMX) its matmuls run
in hardware, without it they are emulated. This prints whether the CPU has it, then, for each
dtype in alternation (so a neighbour on the machine slows both alike): seconds for the first-token
logits every KL and proxy read takes, and for greedy replies with prove's stopping rule, and the
ratio to the first dtype. Use it to choose `--dtype` for a long prove on a CPU.

    python bench/dtype_speed.py                                              # the organism
    python bench/dtype_speed.py --model DIR --harmful strongreject.csv --column forbidden_prompt --prompts 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from refusal_lab.core.generate import generate_replies
from refusal_lab.core.kernels import native_bf16
from refusal_lab.core.metrics import is_refusal, last_logits
from refusal_lab.core.sources import Source

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_inputs import add_model_options, model_and_prompts

NATIVE = {True: "yes", False: "no", None: "cannot tell"}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_options(ap, prompts=32)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    loaded = {}
    for dtype in dtypes:
        args.dtype = dtype
        loaded[dtype] = model_and_prompts(args, reported=True)
    prompts = loaded[dtypes[0]][1]
    markers = Source.of(loaded[dtypes[0]][0].source).markers
    print(
        f"model {loaded[dtypes[0]][0].folder}: {len(prompts)} prompts, {args.max_new_tokens} new tokens, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads; "
        f"native bfloat16 (AVX512-BF16 or AMX): {NATIVE[native_bf16()]}"
    )
    reads: dict[str, list[float]] = {d: [] for d in dtypes}
    decodes: dict[str, list[float]] = {d: [] for d in dtypes}
    refused: dict[str, int] = {}
    for d in dtypes:  # warm-up
        m = loaded[d][0]
        generate_replies(m.model, m.tokenizer, prompts[:2], 4, 2)
    for _ in range(args.repeats):
        for d in dtypes:
            m = loaded[d][0]
            t = time.perf_counter()
            last_logits(m.model, m.tokenizer, prompts, args.batch_size)
            reads[d].append(time.perf_counter() - t)
            t = time.perf_counter()
            replies = generate_replies(
                m.model,
                m.tokenizer,
                prompts,
                args.max_new_tokens,
                args.batch_size,
                settled=lambda r: is_refusal(r, markers),
            )
            decodes[d].append(time.perf_counter() - t)
            refused[d] = sum(is_refusal(r.answer, markers) for r in replies)
    first_read, first_decode = statistics.median(reads[dtypes[0]]), statistics.median(decodes[dtypes[0]])
    for d in dtypes:
        r, g = statistics.median(reads[d]), statistics.median(decodes[d])
        print(
            f"{d:>9}: first-token logits {r:6.1f} s (x{r / first_read:.2f}), "
            f"replies {g:6.1f} s (x{g / first_decode:.2f}), {refused[d]} of {len(prompts)} replies refuse"
        )


if __name__ == "__main__":
    main()
