"""refusal-lab's own search as an attack: a fixed trial budget, objective = compliance.

Trials are scored on the tuning prompts and the KL budget's harmless prompts; every trial of the
resulting front is a proposal, carrying those measurements (the battery does not take them again).
The study lives in a journal under the prove folder, so a killed prove resumes its search too. Its
trials generate as many tokens as every other reply of the proof ([prove] max_new_tokens), so one
prove run has one reply length; the [search] options that shape a trial (methods, kl_prune, proxy,
proxy_margin, proxy_learn, select_start) are prove's flags too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from refusal_lab.prove.battery import Measured, Proposal, Target
from refusal_lab.prove.results import Counts
from refusal_lab.search import study as S
from refusal_lab.search.result import TrialResult
from refusal_lab.search.space import ablations_for, norm_preserving
from refusal_lab.search.stage import make_setup, open_with_starts, trial_objective
from refusal_lab.search.trial import trial_edit


@dataclass
class SearchAttack:
    work: Path  # where this target's study journal lives
    trials: int = 24
    name: str = "search"
    threat: str = "directional"

    def proposals(self, t: Target) -> Iterator[Proposal]:
        m = t.loaded
        search = t.s.search.model_copy(update={"max_new_tokens": t.s.prove.max_new_tokens})
        s = t.s.model_copy(update={"search": search})
        harmless = [p.prompt for p in t.held_out.harmless]
        setup = make_setup(
            m, t.extraction, t.tuning, harmless, s, t.scorer, t.log, t.reference_logits, refusal_ids=t.refusal_ids
        )  # the target's refusal openers, found once per model; the margin and learning are the search's
        storage = S.storage_for(None, self.work / f"search-seed{t.seed}")
        study = open_with_starts(storage, "prove", setup, "tpe", t.seed, t.log)
        S.run_trials(study, self.trials, trial_objective(setup, s.search.kl_prune, lambda m: t.log(f"  search: {m}")))
        for trial in S.pareto(study):
            keep = norm_preserving(trial.params)
            setting = {"trial": trial.number, "method": trial.params["method"], "norm_preserving": keep, "seed": t.seed}
            frozen = ablations_for(trial.params, setup)
            r = TrialResult.of(trial)  # measured on the tuning and KL prompts already, as the battery would
            known = r and Measured(r.kl, r.predicted_refused, Counts(r.refused, r.complied, r.broken))
            # the edit the trial was measured with (weights where hooks cannot compute it), not plain hooks
            yield Proposal(setting, lambda frozen=frozen, keep=keep: trial_edit(setup, frozen, keep), known)
