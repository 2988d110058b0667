"""Stage-2 hardening throughput (tokens per second) and what each ablation-aware option adds.

Each configuration trains the same steps on the same examples from a fresh copy of the model, in
one process, side by side: plain stage 2, + ablation-aware, + invariance, and both. Usage:

    python bench/harden_throughput.py                         # the organism
    python bench/harden_throughput.py --model DIR --harmful strongreject.csv --column forbidden_prompt --steps 10
    python bench/harden_throughput.py --model DIR ... --dtype bfloat16     # weights in bf16 (native-bf16 CPUs)
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

from refusal_lab.config import load_settings
from refusal_lab.harden.data import apply_mix, encode_example
from refusal_lab.harden.stage import harden_inputs
from refusal_lab.harden.train import Trainer, make_plan
from refusal_lab.organism.source import load_model

CONFIGS = {
    "plain stage 2": {"ablation_aware": False, "invariance": 0.0},
    "+ ablation-aware": {"ablation_aware": True, "invariance": 0.0},
    "+ aware, harmful only": {"ablation_aware": True, "aware_harmless": False, "invariance": 0.0},
    "+ invariance": {"ablation_aware": False, "invariance": 1.0},
    "both": {"ablation_aware": True, "invariance": 1.0},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism")
    ap.add_argument("--harmful", type=Path)
    ap.add_argument("--column", default="prompt")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    args = ap.parse_args()
    s = load_settings(
        **{
            "model.path": args.model,
            "model.dtype": args.dtype,
            "prompts.harmful": args.harmful,
            "prompts.column": args.column,
        }
    )
    first = load_model(s)
    examples, _, weights = harden_inputs(first, s, print)
    order = apply_mix([e.category for e in examples], weights, 0)[: args.steps * args.batch]
    encoded = [encode_example(first.tokenizer, e, s.harden.max_length) for e in examples]
    tokens = sum(len(encoded[i].ids) for i in order)
    probes = (
        [e.prompt for e in examples if e.kind == "harmful"][:64],
        [e.prompt for e in examples if e.kind != "harmful"][:64],
    )
    dtype = next(first.model.parameters()).dtype
    print(f"model {first.source.name} ({dtype}): {args.steps} steps x {args.batch} examples = {tokens} tokens each")
    base = None
    for name, opts in CONFIGS.items():
        cfg = s.harden.model_copy(update={**opts, "train_batch_size": args.batch, "checkpoint_every": 10**9})
        m = load_model(s)
        plan = make_plan(0, [order], args.batch, 0)
        with tempfile.TemporaryDirectory() as work:
            trainer = Trainer(m, cfg, plan, None, encoded, probes, Path(work), lambda _m: None, s.batch_size)
            trainer.check_memory()  # its trial step is not part of the timing
            start = time.perf_counter()
            trainer.run()
            took = time.perf_counter() - start
        del trainer, m
        gc.collect()  # one configuration's model and adapter at a time: a 0.5B model's steps need the room
        base = base or took
        print(f"{name:<18} {took:>7.1f} s  {tokens / took:>9.0f} tokens/s  overhead x{took / base:.2f}", flush=True)


if __name__ == "__main__":
    main()
