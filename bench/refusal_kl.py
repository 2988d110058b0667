"""Refusal counts (keyword, greedy, N new tokens) and first-token KL for a base model and its edits.

python bench/refusal_kl.py BASE EDITED... --harmful FILE.csv --column forbidden_prompt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from refusal_lab.core.generate import generate
from refusal_lab.core.metrics import first_token_kl, is_refusal, last_logits
from refusal_lab.core.model import load
from refusal_lab.core.prompts import load_prompts
from refusal_lab.core.sources import builtin_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--harmful", type=Path, required=True)
    ap.add_argument("--column", default="prompt")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    harmful = [p.prompt for p in load_prompts(args.harmful, args.column)][: args.limit]
    harmless = [p.prompt for p in builtin_prompts("harmless", "eval")]
    base_logits = None
    print(f"{len(harmful)} harmful, {len(harmless)} harmless prompts, {args.max_new_tokens} new tokens, greedy")
    for path in args.models:
        t = time.perf_counter()
        m = load(path, args.dtype)
        logits = last_logits(m.model, m.tokenizer, harmless, args.batch_size)
        base_logits = logits if base_logits is None else base_logits
        kl = first_token_kl(base_logits, logits)
        rh = generate(m.model, m.tokenizer, harmful, args.max_new_tokens, args.batch_size)
        rb = generate(m.model, m.tokenizer, harmless, args.max_new_tokens, args.batch_size)
        nh, nb = sum(map(is_refusal, rh)), sum(map(is_refusal, rb))
        print(
            f"{Path(path).name:40s} harmful refused {nh:3d}/{len(rh)}  harmless refused {nb:3d}/{len(rb)}  "
            f"first-token KL {kl:.4f}  ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
        for prompt, reply in list(zip(harmful, rh, strict=True))[:2]:
            print(f"    > {prompt[:80]!r}\n      {reply[:160]!r}")


if __name__ == "__main__":
    main()
