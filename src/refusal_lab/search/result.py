"""What a trial measured and what the front holds, typed: the study stores them, reports and pick read them.

A trial's counts live in the study as Optuna user attributes and a front point on disk as a row of
pareto.json; both are read back through these classes, so a misspelt or missing field fails where
it is read instead of passing on a None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from refusal_lab.errors import UserError

_COUNTS = ("refused", "complied", "broken")
PREDICTED = "proxy_refused"  # the user attribute holding the proxy's predicted refusals


@dataclass(frozen=True)
class TrialResult:
    refused: int
    complied: int
    broken: int
    kl: float
    predicted_refused: int | None = None  # the proxy's count

    @property
    def not_complied(self) -> int:
        return self.refused + self.broken

    def attrs(self) -> dict[str, int]:
        """The user attributes a finished trial stores (its objective values hold not_complied and KL)."""
        out = {k: getattr(self, k) for k in _COUNTS}
        return out | ({PREDICTED: self.predicted_refused} if self.predicted_refused is not None else {})

    @classmethod
    def of(cls, trial: Any) -> TrialResult | None:
        """A finished trial's result from the study; None for one told by a worker that stored no counts."""
        a = trial.user_attrs
        if not all(k in a for k in _COUNTS):
            return None
        return cls(*(int(a[k]) for k in _COUNTS), float(trial.values[1]), a.get(PREDICTED))


def predicted(trial: Any) -> int | None:
    """The proxy's predicted refusals stored on a trial (finished or pruned), if it was measured with one."""
    return trial.user_attrs.get(PREDICTED)


@dataclass(frozen=True)
class FrontPoint:
    """One trial of the Pareto front: a row of pareto.json, and what pick chooses among."""

    trial: int
    complied: int
    not_complied: int
    refused: int | None  # None: the trial was told by a worker that stored no counts
    broken: int | None
    kl: float
    params: dict[str, Any]

    @property
    def prompts(self) -> int:
        return self.complied + self.not_complied

    @classmethod
    def of(cls, trial: Any, n: int) -> FrontPoint:
        """From a finished Optuna trial of a study scored on n harmful prompts."""
        r = TrialResult.of(trial)
        not_complied = int(trial.values[0])
        return cls(
            trial.number,
            n - not_complied,
            not_complied,
            r.refused if r else None,
            r.broken if r else None,
            trial.values[1],
            dict(trial.params),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> FrontPoint:
        """A row of pareto.json; a row with other fields than these is refused."""
        names = {f.name for f in fields(cls)}
        if set(row) != names:
            odd = sorted(set(row) ^ names)
            raise UserError(f"a front point has unexpected or missing fields: {', '.join(odd)}", "rerun the search")
        return cls(**row)


def front_to_json(front: list[FrontPoint]) -> list[dict[str, Any]]:
    return [p.to_json() for p in front]


def front_from_json(rows: list[dict[str, Any]]) -> list[FrontPoint]:
    return [FrontPoint.from_json(r) for r in rows]
