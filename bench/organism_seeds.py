"""SABER's defaults against a per-category oracle on organisms built with different seeds.

Scored with the organism's own refusal words and with the generic keyword markers, on the
held-out eval split. The oracle knows the harm categories: one difference of means per
category at the middle layer, made orthogonal to the harmless mean, removed from every writer.
Organisms not yet in the cache are trained first (about 2-3 minutes each on 2 cores). Usage:

    python bench/organism_seeds.py --seeds 0 1 2
    python bench/organism_seeds.py --seeds 1 --steps 1400
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from refusal_lab.ablate.edit import Ablation, hooked, orthogonalize
from refusal_lab.ablate.saber import saber
from refusal_lab.config import load_settings
from refusal_lab.core.activations import residual_at_position
from refusal_lab.core.arch import adapt
from refusal_lab.core.model import Loaded, load
from refusal_lab.core.sources import Source
from refusal_lab.evaluate.metrics import Behaviour, first_token_kl, last_logits
from refusal_lab.organism.build import default_organism, organism_behaviour, organism_config, prompt_sets
from refusal_lab.probe.directions import projected_directions


def row(label: str, b: Behaviour, kl: float) -> str:
    return (
        f"{label:<28} {b.harmful_refusal:>8.1%} {b.harmful_refusal_generic:>8.1%} {b.harmful_compliance:>9.1%}"
        f" {b.harmless_refusal:>9.1%} {b.harmless_compliance:>10.1%} {b.capability:>7.1%} {b.recognition:>7.1%}"
        f" {kl:>8.4f}"
    )


def scored(m: Loaded, ablations: list[Ablation], base_logits: torch.Tensor, harmless: list[str]) -> tuple:
    with hooked(adapt(m.model), ablations):
        b, _ = organism_behaviour(m.model, m.tokenizer, m.source)
        return b, first_token_kl(base_logits, last_logits(m.model, m.tokenizer, harmless))


def oracle(m: Loaded) -> torch.nn.Module:
    """A copy of the model without one projected direction per harm category (middle layer)."""
    a = adapt(m.model)
    probe = prompt_sets(m.source, "probe")
    mu_h, per_h = residual_at_position(m.model, m.tokenizer, a, [p.prompt for p in probe["harmful"]], keep=True)
    mu_b, _ = residual_at_position(m.model, m.tokenizer, a, [p.prompt for p in probe["harmless"]])
    cats = [p.category for p in probe["harmful"]]
    layer = mu_h.shape[0] // 2
    groups = {c: per_h[[i for i, x in enumerate(cats) if x == c], layer].mean(0) for c in sorted(set(cats))}
    model = copy.deepcopy(m.model)
    orthogonalize(adapt(model), projected_directions(groups, mu_b[layer]))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the organism's)")
    args = ap.parse_args()
    s = load_settings()
    head = "harmful  (generic)  complied  harmless  complied  capab.  recog.  KL"
    print(f"{'organism / method':<28} {head}")
    for seed in args.seeds:
        settings = {**s.organism.model_dump(), "seed": seed}
        if args.steps:
            settings["steps"] = args.steps
        start = time.perf_counter()
        folder = default_organism(s.cache_dir, organism_config(s.organism.model_copy(update=settings)), log=print)
        m = load(folder, "float32", "cpu")
        harmless = [p.prompt for p in prompt_sets(folder, "eval")["harmless"]]
        base_logits = last_logits(m.model, m.tokenizer, harmless)
        b, _ = organism_behaviour(m.model, m.tokenizer, folder)
        print(row(f"seed {seed} base", b, 0.0))
        sets = Source.of(Path(folder)).probe_sets(s.prompts)
        texts = (sets.texts("harmful"), sets.texts("harmless"), sets.texts("capability"))
        res = saber(m.model, m.tokenizer, adapt(m.model), *texts, s.probe, s.ablate.saber)
        print(row(f"seed {seed} saber defaults", *scored(m, res.ablations, base_logits, harmless)))
        edited = Loaded(oracle(m), m.tokenizer, m.source)
        print(row(f"seed {seed} oracle", *scored(edited, [], base_logits, harmless)))
        print(f"  ({time.perf_counter() - start:.0f} s incl. any build)", flush=True)


if __name__ == "__main__":
    main()
