"""Benchmark: teacher forcing against kept prompt passes (the coherence scorer's reads of replies to
prompts it has seen) against a pass over every prompt and its reply.

Same model, prompts, replies and batches, in one run: the model's own greedy replies to the prompts
(all of them scored, as an attacked model's mostly compliant replies are), read `--repeats` times each
way, alternated; seconds, the ratio, the first read that keeps the passes, and the largest gap in a
reply's mean log-likelihood (what the scorer compares with its threshold).

    python bench/kept_prompts.py                                              # the organism
    python bench/kept_prompts.py --model DIR --harmful strongreject.csv --column forbidden_prompt \
        --dtype bfloat16 --prompts 157
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from refusal_lab.core.generate import generate
from refusal_lab.core.metrics import continuation_logprobs
from refusal_lab.core.prompt_passes import KeptPrompts

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_inputs import add_model_options, model_and_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_options(ap, prompts=157)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16, help="the scorer's (prove: --batch-size)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    m, prompts = model_and_prompts(args, reported=True)
    model, tok, bs = m.model, m.tokenizer, args.batch_size
    replies = generate(model, tok, prompts, args.max_new_tokens, 32)
    continuation_logprobs(model, tok, prompts[:2], replies[:2], 2)  # warm-up
    kept = KeptPrompts()
    t = time.perf_counter()
    first = continuation_logprobs(model, tok, prompts, replies, bs, kept)
    keeping = time.perf_counter() - t
    plain_s, kept_s, gap = [], [], 0.0
    for _ in range(args.repeats):
        t = time.perf_counter()
        plain = continuation_logprobs(model, tok, prompts, replies, bs)
        t1 = time.perf_counter()
        again = continuation_logprobs(model, tok, prompts, replies, bs, kept)
        plain_s.append(t1 - t)
        kept_s.append(time.perf_counter() - t1)
        for a, b, c in zip(plain, again, first, strict=True):
            if len(a):
                gap = max(gap, abs(float(a.mean() - b.mean())), abs(float(a.mean() - c.mean())))
    positions = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in replies)
    p, k = sum(plain_s) / len(plain_s), sum(kept_s) / len(kept_s)
    print(f"model {m.folder} ({args.dtype}, {torch.get_num_threads()} threads): {len(prompts)} prompts and replies")
    print(f"({positions} reply tokens), batch {bs}; {len(kept.passes)} prompt passes kept, {kept.used / 2**20:.0f} MiB")
    print(f"every prompt with its reply: {p:.1f} s a read ({', '.join(f'{x:.1f}' for x in plain_s)})")
    print(f"replies on kept passes:      {k:.1f} s a read ({', '.join(f'{x:.1f}' for x in kept_s)}), x{k / p:.2f}")
    print(f"the first read, which keeps the passes: {keeping:.1f} s; largest gap in a mean log-likelihood {gap:.2e}")


if __name__ == "__main__":
    main()
