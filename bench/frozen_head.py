"""Benchmark: first-token logits of a model whose weights are frozen (as under a LoRA, or while rdo
trains its direction), with the vocabulary projection's input made contiguous (what `load` installs)
and without it.

Same model, prompts and batches in one run, the two ways alternated so a neighbour on the machine
slows both alike: seconds per `last_logits` read, their ratio, and the largest logit difference.

    python bench/frozen_head.py                                              # the organism
    python bench/frozen_head.py --model DIR --harmful strongreject.csv --column forbidden_prompt --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from refusal_lab.core.metrics import last_logits
from refusal_lab.core.model import contiguous_head

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_inputs import add_model_options, model_and_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_options(ap)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    m, prompts = model_and_prompts(args)
    model, tok = m.model, m.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_output_embeddings()
    loaded_hooks = dict(head._forward_pre_hooks)  # the one `load` installed: off for the plain rows
    times: dict[str, list[float]] = {"strided (frozen weights)": [], "contiguous (frozen weights)": []}
    out: dict[str, torch.Tensor] = {}
    last_logits(model, tok, prompts[:2], 2)  # warm-up
    for _ in range(args.repeats):
        for name in times:
            head._forward_pre_hooks.clear()
            handle = contiguous_head(model) if name.startswith("contiguous") else None
            t = time.perf_counter()
            out[name] = last_logits(model, tok, prompts, args.batch_size)
            times[name].append(time.perf_counter() - t)
            if handle is not None:
                handle.remove()
    head._forward_pre_hooks.update(loaded_hooks)
    a, b = (statistics.median(v) for v in times.values())
    diff = float((out["strided (frozen weights)"] - out["contiguous (frozen weights)"]).abs().max())
    print(f"{m.name}, {len(prompts)} prompts, batch {args.batch_size}, {next(model.parameters()).dtype}:")
    for name, v in times.items():
        print(f"  {name}: {statistics.median(v):.2f} s (runs: {', '.join(f'{x:.2f}' for x in v)})")
    print(f"  contiguous / strided: x{b / a:.2f}; largest logit difference {diff:.2e}")


if __name__ == "__main__":
    main()
