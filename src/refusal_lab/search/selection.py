"""The layer a new study starts from: Arditi et al.'s direction selection read through the search's proxy."""

from __future__ import annotations

import time
from dataclasses import dataclass

from refusal_lab.ablate.arditi import Candidate, Judge, Rules, select
from refusal_lab.core.artifacts import Log
from refusal_lab.search.setup import SearchSetup
from refusal_lab.search.space import ablations_for, candidate_layers, flat_kernel


@dataclass(frozen=True)
class LayerChoice:
    """What the layer selection chose; `table` holds every candidate's predicted refusals and, where it
    was measured, its KL."""

    layer: int
    predicted_refused: int
    kl: float
    within_limit: bool  # False: no candidate met the KL limit, so the least-KL one was taken
    table: list[dict]


def select_layer(setup: SearchSetup, log: Log) -> LayerChoice | None:
    """Arditi et al.'s direction selection (ablate.arditi.select), scored by the search's proxy.

    Each candidate layer's direction is ablated from every writer at full strength (as Arditi et al.
    ablate) and scored by the refusal proxy on the harmful evaluation prompts (one prompt pass); KL on
    the harmless prompts is then measured in order of fewest predicted refusals until a candidate is
    within the limit. The paper scores refusal-token log-odds on a held-out split and also rules out
    directions whose addition does not induce refusal; this reads the same prompts the trials are
    scored on and keeps only the ablation test, so it costs one pass per layer plus a few. It edits
    through hooks: it only chooses a direction, and the trials made from it are measured as exported
    (trial_edit). None when there is no proxy (no refusal openers) or selection is off.
    """
    if setup.select_max_kl is None or not setup.proxy.refusal_ids or "kernel" not in setup.methods:
        return None
    m = setup.loaded
    began = time.perf_counter()
    candidates = [
        Candidate(layer, -1, ablations_for(flat_kernel(layer, 1.0), setup))
        for layer in candidate_layers(m.adapter.num_layers)
    ]
    judge = Judge(
        m.model, m.tokenizer, m.adapter, setup.eval_harmful, setup.eval_harmless, setup.base_logits, setup.batch_size
    )
    rules = Rules(setup.select_max_kl, steering=False)
    sel = select(candidates, judge, setup.proxy.score, rules, relax="gentlest")
    table = [{"layer": c.layer, "predicted_refused": int(c.ablation_score), "kl": c.kl} for c in candidates]
    c = sel.chosen
    choice = LayerChoice(c.layer, int(c.ablation_score), c.kl, not sel.relaxed, table)
    n, within = len(setup.eval_harmful), choice.within_limit
    log(
        f"layer selection: layer {choice.layer} ({choice.predicted_refused}/{n} predicted refusals, KL "
        f"{choice.kl:.4f}{'' if within else f', none within KL {setup.select_max_kl}'}; {len(table)} candidates, "
        f"{time.perf_counter() - began:.1f} s)"
    )
    return choice
