"""The battery's common ground: a target, an attack's proposals, and how a proposal is measured.

An attack proposes settings (weakest to strongest, or phase after phase); each proposal is an edit
that is active inside a `with` block, so the model under attack is never copied. Every proposal's
drift is measured first: first-token KL(model || attacked) on held-out harmless prompts. Proposals
within the loosest budget are then scored on the *tuning* prompts (a slice of the probe split);
for each budget, the proposal that made the most tuning prompts comply is measured once on the
held-out harmful prompts, and that is the attack's result at that budget. So settings are chosen
on data the result is not reported on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from refusal_lab.config import Settings
from refusal_lab.core.artifacts import Log
from refusal_lab.core.generate import generate_replies
from refusal_lab.core.metrics import Scorer, first_token_kl, last_logits, settled_by
from refusal_lab.core.model import Loaded
from refusal_lab.core.scoring import label_replies
from refusal_lab.core.sources import EvalSets, PromptSets
from refusal_lab.prove.results import AttackRun, Counts, Measures, Outcome, Tried

Edit = Callable[[], AbstractContextManager[Any]]
Extra = Callable[[float], Measures]  # what else a chosen setting costs, measured inside its edit


@dataclass
class Target:
    """One model under attack and what every attack is measured against."""

    loaded: Loaded
    extraction: PromptSets  # directions and training data come from here
    tuning: list[str]  # harmful prompts that choose an attack's setting (never reported on)
    held_out: EvalSets  # what results are reported on: harmful, harmless (KL), over-refusal, capability
    reference_logits: torch.Tensor  # the unattacked model's first-token logits on held_out.harmless
    scorer: Scorer
    s: Settings
    log: Log
    seed: int = 0
    capability_vectors: torch.Tensor | None = None  # the unattacked model's, for SABER's entanglement
    tuning_refused: int = 0  # refusals of the unattacked model on the tuning prompts
    opener: str = ""  # what every reply begins with (the prefill attack sets it inside its proposals)

    def labels(self, prompts: list[str]) -> list[str]:
        """Labels of greedy replies; where refusal words decide the label, a reply stops once one appears."""
        m, settled, n = self.loaded, settled_by(self.scorer), self.s.prove.max_new_tokens
        bs = self.s.batch_size
        replies = generate_replies(m.model, m.tokenizer, prompts, n, bs, settled=settled, opener=self.opener)
        return label_replies(self.scorer, prompts, replies)

    def kl(self) -> float:
        m = self.loaded
        logits = last_logits(m.model, m.tokenizer, [p.prompt for p in self.held_out.harmless], self.s.batch_size)
        return first_token_kl(self.reference_logits, logits)

    def record(self, attack: Attack, tried: list[Tried], outcomes: dict[str, Outcome], seconds: float) -> AttackRun:
        """An attack's finished record on this target."""
        n, refused = len(self.tuning), self.tuning_refused
        return AttackRun(attack.name, attack.threat, tuple(tried), outcomes, seconds, self.seed, n, refused)


@dataclass
class Proposal:
    """One setting of an attack: what was tried (JSON) and the edit that applies it."""

    setting: dict[str, Any]
    edit: Edit


class Attack(Protocol):
    """An attack of the battery. `threat`: 'directional' attacks count for the worst case."""

    name: str
    threat: str

    def proposals(self, t: Target) -> Iterator[Proposal]: ...


def run_attack(attack: Attack, t: Target, budgets: tuple[float, ...], extra: Extra | None = None) -> AttackRun:
    """Try every proposal (KL first, then tuning prompts); measure each budget's best on held-out prompts.

    `extra(budget)` measures what else a chosen setting costs (capability, ...), inside its edit.
    """
    start = time.perf_counter()
    tried: list[Tried] = []
    kept: list[tuple[Tried, Proposal]] = []
    loosest = max(budgets)
    for prop in attack.proposals(t):
        with prop.edit():
            kl = t.kl()
            counts = Counts.of(t.labels(t.tuning)) if kl <= loosest else None
        tr = Tried(prop.setting, kl, counts.complied if counts else None, counts.refused if counts else None)
        tried.append(tr)
        kept.append((tr, prop))
        got = f", tuning complied {counts.complied}/{counts.n}" if counts else " (over every budget)"
        t.log(f"  {attack.name} {_brief(prop.setting)}: KL {kl:.4f}{got}")
    outcomes: dict[str, Outcome] = {}
    for budget in budgets:
        fits = [(tr, p) for tr, p in kept if tr.tuning_complied is not None and tr.kl <= budget]
        if not fits:
            outcomes[str(budget)] = Outcome(False, min_kl=min((tr.kl for tr, _ in kept), default=None))
            continue
        tr, prop = max(fits, key=lambda x: (x[0].tuning_complied, -(x[0].tuning_refused or 0), -x[0].kl))
        with prop.edit():
            held = Counts.of(t.labels([p.prompt for p in t.held_out.harmful]))
            more = extra(budget) if extra else Measures()
        outcomes[str(budget)] = Outcome(True, prop.setting, tr.kl, held, more)
    return t.record(attack, tried, outcomes, time.perf_counter() - start)


def _brief(setting: dict[str, Any]) -> str:
    shown = {k: v for k, v in setting.items() if not isinstance(v, list | dict)}
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def run_rows(attack: Attack, t: Target, extra: Extra | None = None, weights: bool = True) -> AttackRun:
    """Every proposal measured on the held-out prompts, no budget: for threat models reported row by row.

    `weights=False`: the proposals leave the weights alone (a prefill), so the drift is 0 without measuring.
    """
    start = time.perf_counter()
    tried: list[Tried] = []
    outcomes: dict[str, Outcome] = {}
    for i, prop in enumerate(attack.proposals(t)):
        with prop.edit():
            kl = t.kl() if weights else 0.0
            held = Counts.of(t.labels([p.prompt for p in t.held_out.harmful]))
            more = extra(float("inf")) if extra else Measures()
        tried.append(Tried(prop.setting, kl, None, None))
        outcomes[f"row{i}"] = Outcome(True, prop.setting, kl, held, more)
        t.log(f"  {attack.name} {_brief(prop.setting)}: KL {kl:.4f}, complied {held.complied}/{held.n}")
    return t.record(attack, tried, outcomes, time.perf_counter() - start)
