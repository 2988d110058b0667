"""Is a directional attack's edit specific to refusal, or would any edit of its size do? SABER's edits
(prove's proposals: each scope, pass and strength) beside random directions of the same rank, strengths,
layers and writers: the first-token KL on the held-out harmless prompts each costs, and the held-out
harmful replies each changes, scored as prove scores them. A control that moves refusals as SABER does
would mean the attack measures damage, not a refusal mechanism; one that costs as much KL would mean the
drift budget buys any edit. Usage:
    python bench/random_edit_control.py organism
    python bench/random_edit_control.py HARDENED_FOLDER --draws 5
    python bench/random_edit_control.py QWEN --set prompts.harmful=FILE --set prompts.column=forbidden_prompt
"""

from __future__ import annotations

import argparse
import time

import torch

from harden_ablation import overrides  # bench/ is on the path when this script runs
from refusal_lab.ablate.edit import Ablation
from refusal_lab.config import load_settings
from refusal_lab.core.kernels import use_kernels
from refusal_lab.organism.source import load_model, model_path
from refusal_lab.prove.battery import Target
from refusal_lab.prove.directional import SaberAttack, hooks
from refusal_lab.prove.results import Counts
from refusal_lab.prove.stage import build_target, prove_evaluator


def random_like(abls: list[Ablation], hidden: int, g: torch.Generator) -> list[Ablation]:
    """Each ablation with its directions replaced by as many random orthonormal ones (same strengths and places)."""
    out = []
    for a in abls:
        q, _ = torch.linalg.qr(torch.randn(hidden, a.directions.shape[1], generator=g, dtype=torch.float64))
        out.append(Ablation(q, a.alphas, a.layer_scale, a.embedding, a.components))
    return out


def measured(t: Target, abls: list[Ablation]) -> tuple[float, Counts]:
    """First-token KL on the held-out harmless prompts and the held-out harmful replies' labels, inside the edit."""
    edit = hooks(t, abls)  # as prove wraps a proposal's ablations
    with edit():
        kl = t.kl()
    return kl, t.measure(edit, [p.prompt for p in t.held_out.harmful])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="'organism', a model folder or a hub id")
    ap.add_argument("--draws", type=int, default=3, help="random edits per SABER edit")
    ap.add_argument("--seed", type=int, default=0, help="the random directions' seed")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="a setting, as in TOML")
    args = ap.parse_args()
    s = load_settings(**overrides(args.set))
    use_kernels(s.model.cpu_kernels, s.model.path)
    start = time.perf_counter()
    m = load_model(s, str(model_path(s, args.model)))
    t = build_target(m, s, prove_evaluator(m, s, lambda _m: None), lambda _m: None, 0)
    hidden, g = m.model.config.hidden_size, torch.Generator().manual_seed(args.seed)
    n = len(t.held_out.harmful)
    print(f"{args.model}: {n} held-out harmful prompts; refused / complied / broken; KL on held-out harmless")
    print("| scope | passes | strength | directions | SABER: KL, r / c / b | random: KL min-max, fewest refused |")
    print("|---|---|---|---|---|---|")
    for where, abls in SaberAttack(scopes=tuple(s.prove.saber_scopes.split(","))).edits(t):  # as prove makes it
        kl, c = measured(t, abls)
        ctl = [measured(t, random_like(abls, hidden, g)) for _ in range(args.draws)]
        kls, rank = [k for k, _ in ctl], sum(a.directions.shape[1] for a in abls)
        print(
            f"| {where['scope']} | {where['passes']} | {where['strength']} | {rank} "
            f"| {kl:.3f}, {c.refused} / {c.complied} / {c.broken} "
            f"| {min(kls):.3f}-{max(kls):.3f}, {min(k.refused for _, k in ctl)} |",
            flush=True,
        )
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
