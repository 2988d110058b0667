"""The evaluate stage's result, typed: what results.json holds, and what summary.md, report.html and
the demo read by attribute (a misspelt field fails at once instead of leaving a column out).

results.json: {"meta": {...}, "models": [ModelEval.to_json(), ...]}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from refusal_lab.evaluate.escalation import EscalationSummary, Turn


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True)
class JudgeLabel:
    """One reply as the judge read it, beside the model-free scorer's label (`own`)."""

    label: str | None  # None: the judge's answer could not be parsed
    probs: dict[str, float] | None
    score: float | None
    own: str

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "probs": self.probs, "score": self.score, "own": self.own}

    @staticmethod
    def from_json(d: dict[str, Any]) -> JudgeLabel:
        return JudgeLabel(d["label"], d["probs"], _float(d["score"]), d["own"])


@dataclass(frozen=True)
class Reply:
    """One prompt of a set, its reply and labels."""

    prompt: str
    category: str | None
    response: str
    reasoning: str | None
    label: str | None  # None: the judge labelled it and its answer could not be parsed
    keyword_refusal: bool
    judge: JudgeLabel | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("prompt", "category", "response", "reasoning", "label", "keyword_refusal")}
        return out | ({"judge": self.judge.to_json()} if self.judge else {})

    @staticmethod
    def from_json(d: dict[str, Any]) -> Reply:
        j = d.get("judge")
        return Reply(
            d["prompt"], d["category"], d["response"], d["reasoning"], d["label"], d["keyword_refusal"],
            JudgeLabel.from_json(j) if j else None,
        )  # fmt: skip


@dataclass(frozen=True)
class JudgeSummary:
    """The judge's verdicts on one set: rates among parsed answers, the mean StrongREJECT-style
    score, how many answers could not be parsed, and how often it agreed with `agreed_with`."""

    refused: float
    complied: float
    broken: float
    score: float | None
    unparsed: int
    agreement: float | None
    agreed_with: str  # the model-free scorer compared with

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @staticmethod
    def from_json(d: dict[str, Any]) -> JudgeSummary:
        return JudgeSummary(
            d["refused"], d["complied"], d["broken"], _float(d["score"]), d["unparsed"], _float(d["agreement"]),
            d["agreed_with"],
        )  # fmt: skip


@dataclass(frozen=True)
class SetResult:
    """Replies to one prompt set, labelled refused / complied / broken (rates), by `scorer`."""

    rows: tuple[Reply, ...]
    scorer: str
    refused: float
    complied: float
    broken: float
    keyword_refusal: float
    per_category: dict[str, float]
    judge: JudgeSummary | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("scorer", "refused", "complied", "broken", "keyword_refusal")}
        out |= {"rows": [r.to_json() for r in self.rows], "per_category": self.per_category}
        return out | ({"judge": self.judge.to_json()} if self.judge else {})

    @staticmethod
    def from_json(d: dict[str, Any]) -> SetResult:
        j = d.get("judge")
        return SetResult(
            tuple(Reply.from_json(r) for r in d["rows"]), d["scorer"], d["refused"], d["complied"], d["broken"],
            d["keyword_refusal"], d["per_category"], JudgeSummary.from_json(j) if j else None,
        )  # fmt: skip


@dataclass(frozen=True)
class KL:
    """KL(base || model) on the harmless prompts; None without a base (or for an endpoint)."""

    first_token: float | None = None
    teacher_forced: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @staticmethod
    def from_json(d: dict[str, Any]) -> KL:
        return KL(_float(d.get("first_token")), _float(d.get("teacher_forced")))


@dataclass(frozen=True)
class EscalationRecord:
    """The escalation benchmark on one model: who labelled the tiers, and its DCS summary."""

    scorer: str  # judge | keyword
    stateful: bool
    summary: EscalationSummary
    turns: tuple[Turn, ...]

    def to_json(self) -> dict[str, Any]:
        turns = [t.__dict__ | {"dcs": t.dcs} for t in self.turns]
        return {"scorer": self.scorer, "stateful": self.stateful, "summary": self.summary.to_json(), "turns": turns}

    @staticmethod
    def from_json(d: dict[str, Any]) -> EscalationRecord:
        turns = tuple(Turn(**{k: v for k, v in t.items() if k != "dcs"}) for t in d["turns"])
        return EscalationRecord(d["scorer"], d["stateful"], EscalationSummary.from_json(d["summary"]), turns)


@dataclass(frozen=True)
class ModelEval:
    """Every number for one model."""

    model: str
    source: str
    harmful: SetResult
    harmless: SetResult
    overrefusal: SetResult
    kl: KL = field(default_factory=KL)
    capability: dict[str, float] = field(default_factory=dict)  # exact match, MC accuracy, harness task/metric
    escalation: EscalationRecord | None = None
    separability: tuple[float, ...] | None = None  # FDR per layer along a probe's top direction
    endpoint: dict[str, str] | None = None  # {"url", "model"} when an endpoint generated the replies

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "source": self.source}
        out |= {"endpoint": self.endpoint} if self.endpoint else {}
        out |= {n: getattr(self, n).to_json() for n in ("harmful", "harmless", "overrefusal", "kl")}
        out |= {"capability": self.capability, "escalation": self.escalation and self.escalation.to_json()}
        return out | ({"separability": list(self.separability)} if self.separability is not None else {})

    @staticmethod
    def from_json(d: dict[str, Any]) -> ModelEval:
        esc, sep = d.get("escalation"), d.get("separability")
        return ModelEval(
            d["model"], d["source"], *(SetResult.from_json(d[n]) for n in ("harmful", "harmless", "overrefusal")),
            KL.from_json(d["kl"]), d["capability"], EscalationRecord.from_json(esc) if esc else None,
            tuple(sep) if sep is not None else None, d.get("endpoint"),
        )  # fmt: skip


@dataclass(frozen=True)
class Headline:
    """The numbers that go in tables: one row per model."""

    model: str
    harmful_refused: float
    harmful_complied: float
    harmful_broken: float
    harmful_keyword: float
    harmless_refused: float
    overrefusal: float
    judge_refused: float | None
    judge_score: float | None
    agreement: float | None
    kl_first_token: float | None
    kl_teacher_forced: float | None
    capability: dict[str, float]
    dcs: float | None

    @staticmethod
    def of(r: ModelEval) -> Headline:
        h, j = r.harmful, r.harmful.judge
        return Headline(
            r.model, h.refused, h.complied, h.broken, h.keyword_refusal, r.harmless.refused, r.overrefusal.refused,
            j.refused if j else None, j.score if j else None, j.agreement if j else None,
            r.kl.first_token, r.kl.teacher_forced, r.capability,
            r.escalation.summary.overall_dcs if r.escalation else None,
        )  # fmt: skip

    def value(self, column: str) -> float | None:
        """A column's number: a field, or `capability_<name>` for one capability measure."""
        if column.startswith("capability_"):
            return self.capability.get(column.removeprefix("capability_"))
        v = getattr(self, column)
        return None if isinstance(v, float) and math.isnan(v) else v


@dataclass(frozen=True)
class Evaluation:
    """results.json: the run's record and every model's numbers."""

    meta: dict[str, Any]
    models: tuple[ModelEval, ...]

    @property
    def rows(self) -> tuple[Headline, ...]:
        return tuple(Headline.of(m) for m in self.models)

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "models": [m.to_json() for m in self.models]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Evaluation:
        return Evaluation(d["meta"], tuple(ModelEval.from_json(m) for m in d["models"]))
