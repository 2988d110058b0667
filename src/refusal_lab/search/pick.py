"""Picking one trial of a search's front and exporting its edit through the ablate stage."""

from __future__ import annotations

from pathlib import Path

from refusal_lab.ablate.stage import AblationRecord, export
from refusal_lab.config import Settings
from refusal_lab.core.artifacts import Log
from refusal_lab.core.model import Loaded
from refusal_lab.errors import UserError
from refusal_lab.search import study as S
from refusal_lab.search.result import FrontPoint
from refusal_lab.search.space import ablations_for, norm_preserving
from refusal_lab.search.stage import open_search


def choose(front: list[FrontPoint], max_kl: float | None, max_not_complied: float | None) -> FrontPoint:
    """The front's point with most compliance under a KL limit, or least KL under a non-compliance limit."""
    if max_kl is not None:
        ok = [p for p in front if p.kl <= max_kl]
        best = min(ok, key=lambda p: (p.not_complied, p.kl)) if ok else None
    elif max_not_complied is not None:
        ok = [p for p in front if p.not_complied <= max_not_complied]
        best = min(ok, key=lambda p: (p.kl, p.not_complied)) if ok else None
    else:
        raise UserError("pick needs --max-kl or --min-complied", "say which constraint chooses the trial")
    if best is None:
        raise UserError("no trial on the Pareto front meets the limit", "relax the limit or run more trials")
    return best


def with_norm_preserving(s: Settings, keep_norms: bool) -> Settings:
    """The settings an export of a trial runs under: its own norm-preserving choice, which a searched
    dimension sets per trial (the exported settings.toml records it, so reproduce.sh makes the same edit)."""
    return s.model_copy(update={"ablate": s.ablate.model_copy(update={"norm_preserving": keep_norms})})


def pick_and_export(
    loaded: Loaded,
    s: Settings,
    out: Path,
    max_kl: float | None,
    min_complied: int | None,
    target: Path,
    force: bool,
    log: Log,
    lora: Path | None = None,
) -> AblationRecord:
    """Rebuild a front trial's edit and write it through the ablate stage's export (and adapter); its record."""
    setup, study = open_search(loaded, s, out, log, trials=False)
    n = len(setup.eval_harmful)
    front = [FrontPoint.of(t, n) for t in S.pareto(study)]
    point = choose(front, max_kl, None if min_complied is None else n - min_complied)
    log(f"picked trial {point.trial}: complied {point.complied}/{n}, KL {point.kl:.4f}, {point.params}")
    storage = s.search.storage or str(out / "study.journal")
    chosen = {**point.to_json(), "study": s.search.study_name, "storage": storage}
    record = AblationRecord(f"search:{point.params['method']}", chosen, options=point.params)
    limit = f"--max-kl {max_kl}" if max_kl is not None else f"--min-complied {min_complied}"
    command = f"pick {out.resolve()} {limit}"
    as_measured = with_norm_preserving(s, norm_preserving(point.params))
    export(loaded, ablations_for(point.params, setup), target, record, as_measured, command, force, lora)
    return record
