"""One trial: its edit, its multi-fidelity measurement, and the Optuna objective around it.

Every trial is first measured without generating: one forward pass over the harmless prompts gives
its KL, one over the harmful prompts its proxy (search.proxy). A trial whose KL exceeds `kl_prune`
is pruned; so is one that a fully measured trial already dominates on the proxy's evidence. Only
the rest generate, and a reply stops as soon as a refusal word settles its verdict. The objective
counts what was not complied with, so breaking the model is not rewarded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from refusal_lab.ablate.edit import Ablation, edited
from refusal_lab.core.artifacts import Log
from refusal_lab.core.generate import generate_replies, prefill
from refusal_lab.core.metrics import first_token_kl, last_logits, settled_by
from refusal_lab.core.scoring import label_replies
from refusal_lab.search.result import PREDICTED, TrialResult
from refusal_lab.search.setup import SearchSetup
from refusal_lab.search.space import ablations_for, norm_preserving, suggest


class Pruned(Exception):
    """A trial ruled out before generating: by its KL, or by the proxy against a measured trial."""

    def __init__(self, kl: float, predicted: int | None = None, by: int | None = None) -> None:
        why = f"KL {kl:.3f} above the pruning limit" if by is None else f"dominated by trial {by} (proxy)"
        super().__init__(why)
        self.kl, self.predicted, self.by = kl, predicted, by


Dominated = Callable[[float, int], "int | None"]  # (KL, predicted refusals) -> a dominating trial, or None


def trial_edit(setup: SearchSetup, ablations: list[Ablation], keep_norms: bool = False) -> AbstractContextManager:
    """A trial's edit as its export will hold it (`keep_norms`: norm-preserving).

    Hooks on the writers compute what the edited weights do only for a plain edit where nothing is
    rounded: float32 weights saved as float32. In bfloat16 a hooked trial and its export were measured
    a prompt apart, so there the trial edits the weights (about 1 s for a 0.5B model), rounded as saving
    rounds them; a norm-preserving trial always edits the weights (no hook computes its rescale).
    """
    return edited(setup.loaded.adapter, ablations, keep_norms, setup.store)


def evaluate_trial(
    setup: SearchSetup,
    ablations: list[Ablation],
    kl_prune: float | None = None,
    dominated: Dominated | None = None,
    keep_norms: bool = False,
) -> TrialResult:
    """Labels of the harmful evaluation replies and first-token KL; Pruned when KL or the proxy rules it out.

    keep_norms: the edit is norm-preserving."""
    m = setup.loaded
    with trial_edit(setup, ablations, keep_norms):
        logits = last_logits(m.model, m.tokenizer, setup.eval_harmless, setup.batch_size)
        kl = first_token_kl(setup.base_logits, logits)
        if kl_prune is not None and kl > kl_prune:
            raise Pruned(kl)
        passes = prefill(m.model, m.tokenizer, setup.eval_harmful, setup.batch_size)
        first = torch.cat([p.first for p in passes])
        predicted = setup.proxy.refusals(first) if setup.proxy.margin is not None else None
        by = dominated(kl, predicted) if dominated is not None and predicted is not None else None
        if by is not None:
            raise Pruned(kl, predicted, by)
        settled = settled_by(setup.scorer)
        replies = generate_replies(
            m.model, m.tokenizer, setup.eval_harmful, setup.max_new_tokens, setup.batch_size,
            settled=settled, prefilled=passes,
        )  # fmt: skip
    labels = label_replies(setup.scorer, setup.eval_harmful, replies)  # hooks removed: coherence reads the base
    return TrialResult(labels.count("refused"), labels.count("complied"), labels.count("broken"), kl, predicted)


def dominated_by_study(setup: SearchSetup, trial: Any) -> Dominated:
    """A measured trial of the study with no more KL and fewer not complied than this one's refusals alone."""
    import optuna

    def dominated(kl: float, predicted: int) -> int | None:
        done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        slack = setup.proxy.slack(done, len(setup.eval_harmful))
        trial.set_user_attr("proxy_slack", slack)
        better = [t for t in done if t.values[1] <= kl and t.values[0] <= predicted - slack]
        return min(better, key=lambda t: t.values[0]).number if better else None

    return dominated


def trial_objective(setup: SearchSetup, kl_prune: float | None, log: Log) -> Any:
    """What one trial does: sample a point, edit as its export would, count what was not complied with, and KL."""
    import optuna

    n = len(setup.eval_harmful)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = suggest(trial, setup.loaded.adapter.num_layers, setup.methods, setup.norm_choices)
        keep = norm_preserving(params)
        began = time.perf_counter()
        try:
            r = evaluate_trial(setup, ablations_for(params, setup), kl_prune, dominated_by_study(setup, trial), keep)
        except Pruned as p:
            trial.set_user_attr("kl", p.kl)
            trial.set_user_attr("pruned_by", "kl" if p.by is None else "proxy")
            if p.predicted is not None:
                trial.set_user_attr(PREDICTED, p.predicted)
            log(f"  trial {trial.number}: {_label(params)} pruned, {p} ({time.perf_counter() - began:.1f} s)")
            raise optuna.TrialPruned(str(p)) from p
        for key, value in r.attrs().items():
            trial.set_user_attr(key, value)
        log(
            f"  trial {trial.number}: {_label(params)} complied {r.complied}/{n} "
            f"(refused {r.refused}, broken {r.broken}) KL {r.kl:.4f} ({time.perf_counter() - began:.1f} s)"
        )
        return float(r.not_complied), r.kl

    return objective


def _label(params: dict[str, Any]) -> str:
    """A trial's method as its log line names it ("kernel", "saber, norm-preserving")."""
    return params["method"] + (", norm-preserving" if norm_preserving(params) else "")
