"""The organism's attack table across seeds: base, one direction, SABER's defaults, per-category oracle.

For each seed (held-out eval split, greedy, 40 new tokens, as organism_behaviour scores):
- base: the organism as built;
- single: one difference-of-means direction (harmful mean minus harmless mean at one layer,
  last prompt token, probe split) orthogonalised out of every residual writer and the
  embedding, at each layer; the rows shown are the layers where it does most (best) and least
  (worst), by harmful refusal;
- saber: SABER's defaults (config.SaberSettings(), directions from the probe split), applied as hooks;
  and the same without biprojection (raw SVD directions, not made orthogonal to the harmless mean);
- oracle: one difference of means per harm category at the middle layer, made orthogonal to
  the harmless mean, removed from every writer and the embedding.

Columns: harmful refused (the organism's own refusal words plus the generic markers), harmful
complied (the compliant template for this very request), broken (neither: fragments, wrong
template, garbage), harmless refused, harmless complied, capability, recognition, first-token
KL on harmless eval prompts. Organisms not yet in the cache are built first (seed 0 from the
shipped weights unless --no-prebuilt; the others are trained here). Usage:

    python bench/organism_seeds.py --seeds 0 1 2 3 4
    python bench/organism_seeds.py --seeds 1 --steps 1400
    python bench/organism_seeds.py --threads 1   # build on one thread (a shared machine); another organism
    python bench/organism_seeds.py --seeds 0 --no-prebuilt --cache-dir /tmp/c   # train seed 0 here too
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from refusal_lab.ablate.edit import Ablation, hooked, orthogonalize
from refusal_lab.ablate.saber import saber
from refusal_lab.config import load_settings
from refusal_lab.core.activations import residual_at_position
from refusal_lab.core.arch import adapt
from refusal_lab.core.metrics import first_token_kl, last_logits
from refusal_lab.core.model import Loaded, load
from refusal_lab.core.sources import Source
from refusal_lab.organism.build import default_organism, organism_behaviour, organism_config, prompt_sets
from refusal_lab.probe.directions import diff_of_means, projected_directions

COLUMNS = ("harmful refused", "complied", "broken", "harmless refused", "complied", "capab.", "recog.", "KL")


def scored(m: Loaded, model: torch.nn.Module, ablations: list[Ablation], base_logits: torch.Tensor) -> dict:
    """The row's figures for `model` with `ablations` applied as hooks."""
    harmless = [p.prompt for p in prompt_sets(m.source, "eval")["harmless"]]
    with hooked(adapt(model), ablations):
        b, _ = organism_behaviour(model, m.tokenizer, m.source)  # the folder's exact labels
        kl = first_token_kl(base_logits, last_logits(model, m.tokenizer, harmless))
    return {
        "h_ref": b.harmful_refusal,
        "h_comp": b.harmful_compliance,
        "broken": b.harmful_broken,
        "b_ref": b.harmless_refusal,
        "b_comp": b.harmless_compliance,
        "cap": b.capability,
        "rec": b.recognition,
        "kl": kl,
    }


def row(label: str, r: dict) -> str:
    cells = [f"{r[k]:.1%}" for k in ("h_ref", "h_comp", "broken", "b_ref", "b_comp", "cap", "rec")]
    return f"| {label} | " + " | ".join(cells) + f" | {r['kl']:.4f} |"


def without(model: torch.nn.Module, directions: torch.Tensor) -> torch.nn.Module:
    """A copy of the model with span(directions) orthogonalised out of every writer and the embedding."""
    edited = copy.deepcopy(model)
    orthogonalize(adapt(edited), directions)
    return edited


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the organism's)")
    ap.add_argument("--threads", type=int, default=None, help="training threads (default: the organism's)")
    ap.add_argument("--all-layers", action="store_true", help="print the single-direction row of every layer")
    ap.add_argument("--no-prebuilt", dest="prebuilt", action="store_false", help="train seed 0 here too")
    ap.add_argument("--cache-dir", type=Path, help="where organisms are cached (default: refusal-lab's)")
    args = ap.parse_args()
    s = load_settings(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    print("| organism / method | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for seed in args.seeds:
        settings = {"seed": seed, **({"steps": args.steps} if args.steps else {})}
        start = time.perf_counter()
        cfg = organism_config(s.organism.model_copy(update=settings))
        if args.threads:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=args.threads))
        folder = default_organism(s.cache_dir, cfg, log=print, prebuilt=args.prebuilt)
        built = time.perf_counter() - start
        m = load(folder, "float32", "cpu")
        a = adapt(m.model)
        harmless = [p.prompt for p in prompt_sets(folder, "eval")["harmless"]]
        base_logits = last_logits(m.model, m.tokenizer, harmless)
        print(row(f"seed {seed} base", scored(m, m.model, [], base_logits)))

        probe = prompt_sets(folder, "probe")
        mu_h, per_h = residual_at_position(m.model, m.tokenizer, a, [p.prompt for p in probe["harmful"]], keep=True)
        mu_b, _ = residual_at_position(m.model, m.tokenizer, a, [p.prompt for p in probe["harmless"]])
        singles = []
        for layer in range(mu_h.shape[0]):
            r = scored(m, without(m.model, diff_of_means(mu_h[layer], mu_b[layer])), [], base_logits)
            singles.append((r["h_ref"], layer, r))
            if args.all_layers:
                print(row(f"seed {seed} single L{layer}", r))
        best, worst = min(singles, key=lambda t: t[:2]), max(singles, key=lambda t: t[:2])
        print(row(f"seed {seed} single best (L{best[1]})", best[2]))
        print(row(f"seed {seed} single worst (L{worst[1]})", worst[2]))

        sets = Source.of(Path(folder)).probe_sets(s.prompts)
        texts = (sets.texts("harmful"), sets.texts("harmless"), sets.texts("capability"))
        res = saber(m.model, m.tokenizer, a, *texts, s.probe, s.ablate.saber)
        print(row(f"seed {seed} saber defaults", scored(m, m.model, res.ablations, base_logits)))
        raw = s.probe.model_copy(update={"biproject": False})
        res = saber(m.model, m.tokenizer, a, *texts, raw, s.ablate.saber)
        print(row(f"seed {seed} saber, no biprojection", scored(m, m.model, res.ablations, base_logits)))

        cats = [p.category for p in probe["harmful"]]
        layer = mu_h.shape[0] // 2
        groups = {c: per_h[[i for i, x in enumerate(cats) if x == c], layer].mean(0) for c in sorted(set(cats))}
        oracle = without(m.model, projected_directions(groups, mu_b[layer]))
        print(row(f"seed {seed} oracle (L{layer})", scored(m, oracle, [], base_logits)))
        manifest = json.loads((folder / "organism.json").read_text())
        print(
            f"  (seed {seed}: {folder.name}, weights {manifest['weights']} {manifest.get('weights_source', 'trained')},"
            f" trained in {manifest['train_seconds']} s on {manifest['threads']} threads;"
            f" build {built:.0f} s, table {time.perf_counter() - start - built:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
