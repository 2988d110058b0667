"""What each attack of the prove battery costs, as a multiple of one forward pass over its prompts.

The unit is one batched forward pass over the held-out prompts an attack is measured on (harmful
+ harmless), timed in the same process ("x fwd") and counted in token positions through the model
("x tok": the work, whatever else the machine runs; a decoding step counts one position per reply).
Every attack then runs as `prove` runs it (proposals, KL gate, the proxy, tuning replies where a
proposal can still win, held-out measurement). Per
attack: its proposals, how many the proxy read, how many generated tuning replies (the rest were
pruned by the proxy or over every budget), the proxy's largest over-prediction on those, and the
held-out result per budget. `--compare` runs each attack again without the proxy, side by side.

    python bench/prove_costs.py --compare            # the organism
    python bench/prove_costs.py --model DIR --dtype bfloat16 --harmful strongreject.csv \\
        --column forbidden_prompt --compare
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
from refusal_lab.search.proxy import Proxy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="organism")
    ap.add_argument("--harmful", type=Path)
    ap.add_argument("--column", default="prompt")
    ap.add_argument("--attacks", help="comma-separated (default: prove's default battery)")
    ap.add_argument("--search-trials", type=int, default=24)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compare", action="store_true", help="each attack again without the proxy, side by side")
    args = ap.parse_args()
    overrides = {"model.path": args.model, "prove.search_trials": args.search_trials, "model.dtype": args.dtype}
    overrides |= {"prove.attacks": args.attacks} if args.attacks else {}
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
    tokens = [0]  # token positions through the model: the cost in work, whatever else the machine runs

    def count(_mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens[0] += int(ids.numel()) if ids is not None else 0

    m.model.register_forward_pre_hook(count, with_kwargs=True)
    forward()
    one = tokens[0]  # the unit pass, counted as it is timed
    target = build_target(m, s, ev, lambda _m: None, 0)
    print(f"model {m.source.name}: one forward pass over {len(prompts)} held-out prompts = {unit:.3f} s (best of 3)")
    print(f"{len(target.tuning)} tuning prompts, {len(ev.sets.harmful)} held-out harmful; refusal openers: "
          f"{[m.tokenizer.decode([i]) for i in target.refusal_ids]}")  # fmt: skip
    head = f"{'attack':<10} {'proxy':<5} {'seconds':>8} {'x fwd':>6} {'x tok':>6} {'proposals':>9} {'read':>5}"
    head += f" {'generated':>9}"
    print(f"{head} {'off by':>6}  held-out complied per budget")
    modes = (target.proxy, Proxy(target.proxy.refusal_ids, None)) if args.compare else (target.proxy,)
    organism = ev.scorer.name == "exact"
    with tempfile.TemporaryDirectory() as work:  # one journal per mode: the search attack's second study starts anew
        battery = [attacks_for(s, Path(work) / str(i), 0, None, organism) for i in range(len(modes))]
        for same in zip(*battery, strict=True):
            for attack, proxy in zip(same, modes, strict=True):
                target.proxy = proxy
                start, tokens[0] = time.perf_counter(), 0
                if attack.threat == "directional":
                    res = run_attack(attack, target, s.prove.budgets)
                else:
                    res = run_rows(attack, target, weights=attack.threat != "prefill")
                took = time.perf_counter() - start
                read = sum(t.predicted_refused is not None for t in res.tried)
                gen = sum(t.tuning_refused is not None for t in res.tried)
                errs = [e for t in res.tried if (e := t.over_predicted) is not None]
                held = " ".join(f"{k}:{o.counts.complied}/{o.counts.n}" for k, o in res.budgets.items() if o.fits)
                mode = "on" if proxy.margin is not None else "off"
                print(
                    f"{attack.name:<10} {mode:<5} {took:>8.1f} {took / unit:>6.0f} {tokens[0] / one:>6.0f} "
                    f"{len(res.tried):>9} {read:>5} {gen:>9} {max(errs, default=0):>+6d}  {held}",
                    flush=True,
                )
                if attack.threat != "directional":
                    break  # rows are measured whole: the proxy plays no part


def _timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
