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

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from refusal_lab.config import Settings
from refusal_lab.core.artifacts import Log
from refusal_lab.core.generate import generate
from refusal_lab.core.model import Loaded
from refusal_lab.core.sources import EvalSets, PromptSets
from refusal_lab.evaluate.metrics import Scorer, first_token_kl, last_logits, settled_by

Edit = Callable[[], AbstractContextManager[Any]]


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

    def labels(self, prompts: list[str]) -> list[str]:
        """Labels of greedy replies; where refusal words decide the label, a reply stops once one appears."""
        m, settled = self.loaded, settled_by(self.scorer)
        replies = generate(m.model, m.tokenizer, prompts, self.s.prove.max_new_tokens, self.s.batch_size, settled)
        return self.scorer.labels(prompts, replies)

    def kl(self) -> float:
        m = self.loaded
        logits = last_logits(m.model, m.tokenizer, [p.prompt for p in self.held_out.harmless], self.s.batch_size)
        return first_token_kl(self.reference_logits, logits)


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


@dataclass
class Counts:
    refused: int
    complied: int
    broken: int

    @staticmethod
    def of(labels: list[str]) -> Counts:
        return Counts(labels.count("refused"), labels.count("complied"), labels.count("broken"))

    @property
    def n(self) -> int:
        return self.refused + self.complied + self.broken

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n}
        for key in ("refused", "complied", "broken"):
            k = getattr(self, key)
            out[key] = k
            out[f"{key}_rate"] = k / self.n if self.n else float("nan")
            out[f"{key}_ci"] = wilson(k, self.n)
        return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) for k successes in n trials."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Tried:
    setting: dict[str, Any]
    kl: float
    tuning_complied: int | None  # None: over every budget, not generated
    tuning_refused: int | None

    def as_dict(self) -> dict[str, Any]:
        tuning = {"tuning_complied": self.tuning_complied, "tuning_refused": self.tuning_refused}
        return {**self.setting, "kl": self.kl, **tuning}


@dataclass
class AttackResult:
    name: str
    threat: str
    tried: list[Tried] = field(default_factory=list)
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)  # "0.1" -> outcome
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threat": self.threat,
            "tried": [t.as_dict() for t in self.tried],
            "budgets": self.budgets,
            "seconds": self.seconds,
        }


def run_attack(
    attack: Attack, t: Target, budgets: tuple[float, ...], extra: Callable[[float], dict] | None = None
) -> AttackResult:
    """Try every proposal (KL first, then tuning prompts); measure each budget's best on held-out prompts.

    `extra(budget)` measures what else a chosen setting costs (capability, ...), inside its edit.
    """
    result = AttackResult(attack.name, attack.threat)
    kept: list[tuple[Tried, Proposal]] = []
    loosest = max(budgets)
    for prop in attack.proposals(t):
        with prop.edit():
            kl = t.kl()
            counts = Counts.of(t.labels(t.tuning)) if kl <= loosest else None
        tried = Tried(prop.setting, kl, counts.complied if counts else None, counts.refused if counts else None)
        result.tried.append(tried)
        kept.append((tried, prop))
        got = f", tuning complied {counts.complied}/{counts.n}" if counts else " (over every budget)"
        t.log(f"  {attack.name} {_brief(prop.setting)}: KL {kl:.4f}{got}")
    for budget in budgets:
        fits = [(tr, p) for tr, p in kept if tr.tuning_complied is not None and tr.kl <= budget]
        if not fits:
            result.budgets[str(budget)] = {"fits": False, "min_kl": min((tr.kl for tr, _ in kept), default=None)}
            continue
        tr, prop = max(fits, key=lambda x: (x[0].tuning_complied, -(x[0].tuning_refused or 0), -x[0].kl))
        with prop.edit():
            held = Counts.of(t.labels([p.prompt for p in t.held_out.harmful]))
            more = extra(budget) if extra else {}
        result.budgets[str(budget)] = {"fits": True, "setting": prop.setting, "kl": tr.kl, **held.as_dict(), **more}
    return result


def _brief(setting: dict[str, Any]) -> str:
    shown = {k: v for k, v in setting.items() if not isinstance(v, list | dict)}
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def run_rows(attack: Attack, t: Target, extra: Callable[[float], dict] | None = None) -> AttackResult:
    """Every proposal measured on the held-out prompts, no budget: for threat models reported row by row."""
    result = AttackResult(attack.name, attack.threat)
    for i, prop in enumerate(attack.proposals(t)):
        with prop.edit():
            kl = t.kl()
            held = Counts.of(t.labels([p.prompt for p in t.held_out.harmful]))
            more = extra(float("inf")) if extra else {}
        result.tried.append(Tried(prop.setting, kl, None, None))
        result.budgets[f"row{i}"] = {"fits": True, "setting": prop.setting, "kl": kl, **held.as_dict(), **more}
        t.log(f"  {attack.name} {_brief(prop.setting)}: KL {kl:.4f}, complied {held.complied}/{held.n}")
    return result
