"""Norm-preserving edits against plain ones, side by side: refusal and first-token KL per method at
equal strength, and (with --search-trials) the search's front with the norm-preserving choice fixed
off, fixed on, and sampled.

Each method chooses its edit once, plain (its own defaults); that very edit (same directions, same
strengths) is then applied plain and norm-preserving, as an export holds it (the weights, rounded to
the saved dtype), and measured on the search's held-out evaluation prompts: refused / complied /
broken on the harmful ones by the scorer eval uses (exact on the organism, else coherence calibrated
on the base's own replies to the harmless prompts), first-token KL on the harmless ones. Arditi and
SABER measure an edit while choosing, so they are also run as `ablate --norm-preserving` runs them
(the "own choice" rows: chosen under the norm-preserving edit).

    python bench/norm_preserving.py --search-trials 16                     # the organism
    python bench/norm_preserving.py --model DIR --dtype bfloat16 --harmful FILE.csv --column forbidden_prompt \\
        --limit 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_lab.ablate.edit import Ablation, weights_edited
from refusal_lab.ablate.stage import choose_ablations, export_dtype
from refusal_lab.config import Settings, load_settings
from refusal_lab.core.generate import generate, generate_replies
from refusal_lab.core.metrics import Scorer, first_token_kl, last_logits
from refusal_lab.core.model import Loaded
from refusal_lab.core.scoring import choose_scorer, label_replies
from refusal_lab.core.sources import PromptSets, Source
from refusal_lab.organism.source import load_model

METHODS = ("arditi", "saber", "kernel", "projected")
OWN_CHOICE = ("arditi", "saber")  # the methods whose choice depends on the edit they measure


@dataclass(frozen=True)
class Bench:
    """The loaded model, its probe prompts, its held-out evaluation prompts and what the base gave on them."""

    loaded: Loaded
    sets: PromptSets
    harmful: list[str]
    harmless: list[str]
    base_logits: torch.Tensor
    scorer: Scorer
    max_new_tokens: int
    batch_size: int


@dataclass(frozen=True)
class Measured:
    refused: int
    complied: int
    broken: int
    kl: float
    seconds: float

    def cells(self, n: int) -> str:
        return f"{self.refused:3d} {self.complied:3d} {self.broken:3d}/{n}  {self.kl:9.5f}"


def settings(args: argparse.Namespace, **extra: object) -> Settings:
    keys = {"model.path": args.model, "model.dtype": args.dtype, "batch_size": args.batch_size}
    if args.harmful is not None:
        keys |= {"prompts.harmful": args.harmful, "prompts.column": args.column}
    keys |= {"search.probe_count": args.limit // 2, "search.eval_count": args.limit // 2}
    keys |= {"search.max_new_tokens": args.max_new_tokens, "search.sampler_seed": args.seed}
    return load_settings(**keys, **extra)


def make_bench(args: argparse.Namespace) -> Bench:
    s = settings(args)
    loaded = load_model(s)
    src = Source.of(loaded.source)
    sets, ev = src.search_split(s.prompts, s.search.probe_count, s.search.eval_count)
    harmful, harmless = [p.prompt for p in ev.harmful], [p.prompt for p in ev.harmless]
    m, bs = loaded, args.batch_size
    base_logits = last_logits(m.model, m.tokenizer, harmless, bs)
    own = src.scorer()
    replies = [] if own.name == "exact" else generate(m.model, m.tokenizer, harmless, args.max_new_tokens, bs)
    scorer = choose_scorer(src, loaded, harmless, replies, s.eval.coherence_quantile, bs)
    return Bench(loaded, sets, harmful, harmless, base_logits, scorer, args.max_new_tokens, bs)


def measure(b: Bench, ablations: list[Ablation], keep_norms: bool) -> Measured:
    """The edit as its export holds it (weights rounded to the saved dtype); labels and KL."""
    m = b.loaded
    began = time.perf_counter()
    with weights_edited(m.adapter, ablations, keep_norms, export_dtype(m)):
        kl = first_token_kl(b.base_logits, last_logits(m.model, m.tokenizer, b.harmless, b.batch_size))
        replies = generate_replies(m.model, m.tokenizer, b.harmful, b.max_new_tokens, b.batch_size)
    labels = label_replies(b.scorer, b.harmful, replies)
    counts = [labels.count(k) for k in ("refused", "complied", "broken")]
    return Measured(*counts, kl, time.perf_counter() - began)


def choose(b: Bench, args: argparse.Namespace, method: str, keep_norms: bool) -> list[Ablation]:
    s = settings(args, **{"ablate.method": method, "ablate.norm_preserving": keep_norms})
    return choose_ablations(b.loaded, b.sets, s, None, lambda _m: None).ablations


def method_table(b: Bench, args: argparse.Namespace) -> None:
    n = len(b.harmful)
    base = measure(b, [], False)
    print(f"\n{n} harmful / {len(b.harmless)} harmless held-out prompts, {b.max_new_tokens} new tokens, greedy; "
          f"scorer {b.scorer.name}; cells: refused complied broken/n  KL")  # fmt: skip
    print(f"{'edit':28s} {'plain':>24s}   {'norm-preserving':>24s}")
    print(f"{'base (no edit)':28s} {base.cells(n):>24s}")
    for method in args.methods.split(","):
        began = time.perf_counter()
        ablations = choose(b, args, method, False)
        plain, kept = measure(b, ablations, False), measure(b, ablations, True)
        print(f"{method + ' (same edit)':28s} {plain.cells(n):>24s}   {kept.cells(n):>24s}   "
              f"({time.perf_counter() - began:.0f} s)", flush=True)  # fmt: skip
        if method in OWN_CHOICE and args.own_choice:
            began = time.perf_counter()
            own = measure(b, choose(b, args, method, True), True)
            print(f"{method + ' (own choice)':28s} {'':>24s}   {own.cells(n):>24s}   "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)  # fmt: skip


def search_fronts(b: Bench, args: argparse.Namespace) -> None:
    """The search's front (kernel and SABER) with norm preservation fixed off, fixed on, and sampled."""
    from refusal_lab.search.stage import run_search

    n = len(b.harmful)
    modes = {
        "off": {"ablate.norm_preserving": False},
        "always on": {"ablate.norm_preserving": True},
        "searched": {"search.search_norm_preserving": True},
    }
    print(f"\nsearch fronts: {args.search_trials} trials each, methods saber,kernel, sampler seed {args.seed}; "
          "point: complied/n KL (method, np = norm-preserving)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in modes.items():
            s = settings(args, **{"search.trials": args.search_trials, **extra})
            began = time.perf_counter()
            front = run_search(b.loaded, s, Path(tmp) / name.replace(" ", "-"), lambda _m: None)
            points = [
                f"{p.complied}/{n} {p.kl:.5f} ({p.params['method']}{', np' if p.params.get('norm_preserving') else ''})"
                for p in front
            ]
            print(f"{name:10s} ({time.perf_counter() - began:.0f} s): " + "; ".join(points), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--harmful", type=Path)
    ap.add_argument("--column", default="prompt")
    ap.add_argument("--limit", type=int, default=64, help="harmful prompts: the first half probes, the rest evaluates")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-own-choice", dest="own_choice", action="store_false", help="skip the own-choice rows")
    ap.add_argument("--search-trials", type=int, default=0, help="also the search's fronts (0: skip)")
    ap.add_argument("--seed", type=int, default=0, help="the search's sampler seed")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    b = make_bench(args)
    a = b.loaded.adapter
    print(f"model {args.model}: {a.num_layers} layers, hidden {a.hidden_size}, dtype "
          f"{next(b.loaded.model.parameters()).dtype}, threads {torch.get_num_threads()}")  # fmt: skip
    method_table(b, args)
    if args.search_trials:
        search_fronts(b, args)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
