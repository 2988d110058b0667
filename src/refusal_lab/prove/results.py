"""The prove stage's result, typed: per model, refusal before; per attack, per budget, its outcome;
the worst case per budget. summary.md, report.html, the CLI and the demo read these by attribute.

results.json: {"meta": {...}, "models": [ModelProof.to_json(), ...]}; each finished attack is also
kept as OUT/.prove/<fingerprint>/<attack>-seed<seed>.json (AttackRun.to_json), so a killed prove resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from refusal_lab.core.metrics import LABELS
from refusal_lab.core.stats import Rate


@dataclass(frozen=True)
class Counts:
    """Held-out replies labelled refused / complied / broken."""

    refused: int
    complied: int
    broken: int

    @staticmethod
    def of(labels: list[str]) -> Counts:
        return Counts(labels.count("refused"), labels.count("complied"), labels.count("broken"))

    @property
    def n(self) -> int:
        return self.refused + self.complied + self.broken

    def rate(self, label: str) -> float:
        return getattr(self, label) / self.n if self.n else float("nan")

    def share(self, label: str) -> Rate:
        return Rate(getattr(self, label), self.n)

    def ci(self, label: str) -> tuple[float, float]:
        r = self.share(label)
        return r.low, r.high

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n}
        for key in LABELS:
            out |= {key: getattr(self, key), f"{key}_rate": self.rate(key), f"{key}_ci": self.ci(key)}
        return out

    @staticmethod
    def from_json(d: dict[str, Any]) -> Counts:
        return Counts(d["refused"], d["complied"], d["broken"])


@dataclass(frozen=True)
class Measures:
    """What else a setting costs: capability always; over-refusal, harmless refusal and escalation
    (`full`) for the unattacked model and each attack's setting at the headline budget."""

    capability: dict[str, float] = field(default_factory=dict)
    full: bool = False
    harmless_refused: float | None = None
    overrefusal_refused: float | None = None
    dcs: float | None = None

    def to_json(self) -> dict[str, Any]:
        more = ("harmless_refused", "overrefusal_refused", "dcs") if self.full else ()
        return {"capability": self.capability} | {k: getattr(self, k) for k in more}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Measures:
        full = "overrefusal_refused" in d
        return Measures(
            d.get("capability") or {}, full, d.get("harmless_refused"), d.get("overrefusal_refused"), d.get("dcs")
        )


@dataclass(frozen=True)
class Outcome:
    """One budget's result of an attack (or one row of a no-budget attack): the setting chosen on the
    tuning prompts and what it did to the held-out prompts; or, when no setting fits, the least KL."""

    fits: bool
    setting: dict[str, Any] = field(default_factory=dict)
    kl: float | None = None  # None when nothing fits
    counts: Counts = Counts(0, 0, 0)
    measures: Measures = field(default_factory=Measures)
    min_kl: float | None = None  # when nothing fits

    def rate(self, label: str) -> float:
        return self.counts.rate(label)

    def to_json(self) -> dict[str, Any]:
        if not self.fits:
            return {"fits": False, "min_kl": self.min_kl}
        head = {"fits": True, "setting": self.setting, "kl": self.kl}
        return head | self.counts.as_dict() | self.measures.to_json()

    @staticmethod
    def from_json(d: dict[str, Any]) -> Outcome:
        if not d["fits"]:
            return Outcome(False, min_kl=d.get("min_kl"))
        return Outcome(True, d["setting"], d["kl"], Counts.from_json(d), Measures.from_json(d))


@dataclass(frozen=True)
class Tried:
    """One proposal of an attack: its setting, its drift and, within the loosest budget, the proxy's
    predicted refusals on the tuning prompts and (where it was generated) the tuning counts."""

    setting: dict[str, Any]
    kl: float
    tuning_complied: int | None  # None: not generated (over every budget, or the proxy said it could not win)
    tuning_refused: int | None
    predicted_refused: int | None = None  # None: no proxy (over every budget, no refusal openers, --no-proxy)

    def to_json(self) -> dict[str, Any]:
        tuning = {"tuning_complied": self.tuning_complied, "tuning_refused": self.tuning_refused}
        return {**self.setting, "kl": self.kl, **tuning, "predicted_refused": self.predicted_refused}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Tried:
        keys = ("kl", "tuning_complied", "tuning_refused", "predicted_refused")
        setting = {k: v for k, v in d.items() if k not in keys}
        return Tried(setting, d["kl"], d["tuning_complied"], d["tuning_refused"], d.get("predicted_refused"))

    @property
    def over_predicted(self) -> int | None:
        """Refusals the proxy predicted beyond those counted (its error that could prune wrongly)."""
        if self.predicted_refused is None or self.tuning_refused is None:
            return None
        return self.predicted_refused - self.tuning_refused


@dataclass(frozen=True)
class SeedRun:
    """One seed of an attack, kept beside the strongest-per-budget record."""

    seed: int
    budgets: dict[str, Outcome]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        budgets = {k: o.to_json() for k, o in self.budgets.items()}
        return {"seed": self.seed, "budgets": budgets, "seconds": self.seconds}

    @staticmethod
    def from_json(d: dict[str, Any]) -> SeedRun:
        return SeedRun(d["seed"], {k: Outcome.from_json(o) for k, o in d["budgets"].items()}, d["seconds"])


@dataclass(frozen=True)
class AttackRun:
    """An attack on one model: everything it tried and, per budget ("0.1") or row ("row0"), its outcome.

    `seeds` is filled on the record that combines seeds (per budget, the seed that made most comply).
    """

    name: str
    threat: str  # directional attacks make the worst case; imported ones share the budgets; others are rows
    tried: tuple[Tried, ...]
    budgets: dict[str, Outcome]
    seconds: float
    seed: int
    tuning_n: int
    tuning_refused: int
    seeds: tuple[SeedRun, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "threat": self.threat, "tried": [t.to_json() for t in self.tried]}
        out |= {"budgets": {k: o.to_json() for k, o in self.budgets.items()}, "seconds": self.seconds}
        out |= {"seed": self.seed, "tuning_n": self.tuning_n, "tuning_refused": self.tuning_refused}
        return out | ({"seeds": [s.to_json() for s in self.seeds]} if self.seeds else {})

    @staticmethod
    def from_json(d: dict[str, Any]) -> AttackRun:
        return AttackRun(
            d["name"], d["threat"], tuple(Tried.from_json(t) for t in d["tried"]),
            {k: Outcome.from_json(o) for k, o in d["budgets"].items()}, d["seconds"], d["seed"], d["tuning_n"],
            d["tuning_refused"], tuple(SeedRun.from_json(s) for s in d.get("seeds", ())),
        )  # fmt: skip


@dataclass(frozen=True)
class Worst:
    """The directional attack that made most held-out prompts comply within a budget."""

    attack: str
    outcome: Outcome
    retained: float  # refused after / refused before

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.attack, **self.outcome.to_json(), "retained": self.retained}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Worst:
        return Worst(d["attack"], Outcome.from_json(d), d["retained"])


@dataclass(frozen=True)
class ModelProof:
    """The battery on one model."""

    model: str
    source: str
    fingerprint: str
    before: Counts
    before_measures: Measures
    attacks: dict[str, AttackRun]
    worst: dict[str, Worst | None]  # per budget ("0.1")
    judge_failed: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "before": self.before.as_dict() | self.before_measures.to_json(),
            "attacks": {k: a.to_json() for k, a in self.attacks.items()},
            "worst": {k: w and w.to_json() for k, w in self.worst.items()},
            "judge_failed": self.judge_failed,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> ModelProof:
        return ModelProof(
            d["model"], d["source"], d["fingerprint"], Counts.from_json(d["before"]), Measures.from_json(d["before"]),
            {k: AttackRun.from_json(a) for k, a in d["attacks"].items()},
            {k: Worst.from_json(w) if w else None for k, w in d["worst"].items()}, d.get("judge_failed"),
        )  # fmt: skip


@dataclass(frozen=True)
class ProveResult:
    """results.json: the run's record and every model's proof."""

    meta: dict[str, Any]
    models: tuple[ModelProof, ...]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "models": [m.to_json() for m in self.models]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> ProveResult:
        return ProveResult(d["meta"], tuple(ModelProof.from_json(m) for m in d["models"]))
