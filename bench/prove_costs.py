"""What each attack of the prove battery costs, as a multiple of one forward pass over its prompts.

The unit is one batched forward pass over the held-out prompts an attack is measured on (harmful
+ harmless), timed in the same process; every attack then runs as `prove` runs it (proposals,
KL gate, tuning replies, held-out measurement). Usage:

    python bench/prove_costs.py                      # the organism
    python bench/prove_costs.py --model DIR --harmful strongreject.csv --column forbidden_prompt \\
        --attacks arditi,saber,adaptive,subspace,search --search-trials 6
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from refusal_lab.config import load_settings
from refusal_lab.core.generate import encode
from refusal_lab.organism.source import load_model
from refusal_lab.prove.battery import run_attack, run_rows
from refusal_lab.prove.stage import attacks_for, build_target, prove_evaluator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism")
    ap.add_argument("--harmful", type=Path)
    ap.add_argument("--column", default="prompt")
    ap.add_argument("--attacks", default="arditi,saber,adaptive,subspace,rdo,search,finetune")
    ap.add_argument("--search-trials", type=int, default=24)
    args = ap.parse_args()
    overrides = {"model.path": args.model, "prove.attacks": args.attacks, "prove.search_trials": args.search_trials}
    overrides |= {"prompts.harmful": args.harmful, "prompts.column": args.column, "eval.escalation": "none"}
    s = load_settings(**overrides)
    m = load_model(s)
    ev = prove_evaluator(m, s, print)
    prompts = [p.prompt for p in ev.sets.harmful + ev.sets.harmless]

    @torch.inference_mode()
    def forward() -> None:
        for i in range(0, len(prompts), s.batch_size):
            m.model(**encode(m.tokenizer, prompts[i : i + s.batch_size], m.model.device), use_cache=False)

    forward()
    unit = min(_timed(forward) for _ in range(3))
    target = build_target(m, s, ev, lambda _m: None, 0)
    print(f"model {m.source.name}: one forward pass over {len(prompts)} held-out prompts = {unit:.3f} s (best of 3)")
    print(f"{'attack':<10} {'seconds':>9} {'x forward':>10}  proposals")
    with tempfile.TemporaryDirectory() as work:
        for attack in attacks_for(s, Path(work), 0, None, ev.scorer.name == "exact"):
            start = time.perf_counter()
            if attack.threat == "directional":
                res = run_attack(attack, target, s.prove.budgets)
            else:
                res = run_rows(attack, target)
            took = time.perf_counter() - start
            print(f"{attack.name:<10} {took:>9.1f} {took / unit:>10.0f}  {len(res.tried)}", flush=True)


def _timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
