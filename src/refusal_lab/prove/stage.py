"""The prove stage: how much of each model's safety survives the battery, worst case first.

Per model: refusal before; every attack tuned within each drift budget; the worst case over the
directional attacks (most compliance) as the headline, with over-refusal, capability and
escalation before and after it; weight-delta and fine-tuning attacks in rows of their own.
Finished attacks are kept under OUT/.prove/, so a killed prove continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refusal_lab.config import Settings
from refusal_lab.core.activations import cached_capture
from refusal_lab.core.artifacts import Log, check_output, manifest, record_diff, settings_record, write_text_atomic
from refusal_lab.core.model import Loaded, check_source
from refusal_lab.core.sources import PromptSets, Source, load_model, model_path
from refusal_lab.errors import UserError
from refusal_lab.evaluate.judge import JudgeCache, JudgeUnavailable
from refusal_lab.evaluate.metrics import Scorer, rates
from refusal_lab.evaluate.runner import Evaluator, make_judge
from refusal_lab.prove.battery import Attack, Counts, Target, run_attack, run_rows

WORK = ".prove"
BUDGETED = ("directional", "imported")  # attacks held to the drift budgets; only directional ones make the worst case


class FallbackScorer:
    """The judge's labels while it answers; the model-free scorer's once it has failed (failure recorded)."""

    def __init__(self, judge: Scorer, fallback: Scorer) -> None:
        self.judge, self.fallback, self.failed = judge, fallback, None

    @property
    def name(self) -> str:
        return self.fallback.name if self.failed else self.judge.name

    def labels(self, prompts: list[str], replies: list[str]) -> list[str]:
        if not self.failed:
            try:
                return [x or "broken" for x in self.judge.labels(prompts, replies)]
            except JudgeUnavailable as exc:
                self.failed = str(exc)
        return self.fallback.labels(prompts, replies)


def _evaluator(loaded: Loaded, s: Settings, log: Log) -> tuple[Evaluator, Scorer]:
    """Held-out sets, the reference (the model itself) and the scorer: exact, judge, or coherence."""
    src = Source.of(loaded.source)
    _, sets = src.prove_split(s.prompts, s.eval.limit)
    judge = make_judge(s, log)
    cache = JudgeCache(s.cache_dir / "judge" / "answers.jsonl")
    opts = s.eval.model_copy(update={"max_new_tokens": s.prove.max_new_tokens})
    ev = Evaluator(sets, opts, s.batch_size, src.scorer(), judge, cache, log)
    ev.set_reference(loaded)
    scorer: Scorer = ev.scorer if ev.scorer.name == "exact" else ev.coherence(src.markers)
    if judge is not None and ev.scorer.name != "exact":
        from refusal_lab.evaluate.judge import JudgeScorer

        scorer = FallbackScorer(JudgeScorer(judge, cache), scorer)
    ev.scorer = scorer
    return ev, scorer


def build_target(loaded: Loaded, s: Settings, ev: Evaluator, scorer: Scorer, log: Log, seed: int) -> Target:
    probe, _ = Source.of(loaded.source).prove_split(s.prompts)
    k = s.prove.tuning_count
    if len(probe.harmful) < k + 4:
        raise UserError(
            f"prove needs more than {k + 4} harmful probe prompts, got {len(probe.harmful)}",
            "pass more --harmful prompts or a smaller --tuning-count",
        )
    extraction = PromptSets(probe.harmful[:-k], probe.harmless, probe.capability)
    caps = cached_capture(
        loaded, extraction.texts("capability"), "last", s.batch_size, cache_dir=s.cache_dir / "activations"
    )
    assert ev.reference is not None
    t = Target(
        loaded,
        extraction,
        probe.texts("harmful")[-k:],
        ev.sets,
        ev.reference.logits,
        scorer,
        s,
        log,
        seed,
        caps.vectors[:, 0],
    )
    t.tuning_refused = Counts.of(t.labels(t.tuning)).refused
    return t


def attacks_for(
    s: Settings, work: Path, seed: int, base_state: dict | None, organism: bool, imported: list[Path] | None = None
) -> list[Attack]:
    from refusal_lab.prove.delta import DeltaAttack
    from refusal_lab.prove.directional import AdaptiveAttack, ArditiAttack, SaberAttack, SubspaceAttack
    from refusal_lab.prove.finetune import FinetuneAttack
    from refusal_lab.prove.imported import ImportedAttack
    from refusal_lab.prove.rdo import RdoAttack
    from refusal_lab.prove.search_attack import SearchAttack

    p = s.prove
    made: dict[str, Callable[[], Attack]] = {
        "arditi": ArditiAttack,
        "saber": SaberAttack,
        "adaptive": lambda: AdaptiveAttack(p.phases),
        "subspace": lambda: SubspaceAttack(tuple(p.subspace_ks)),
        "rdo": lambda: RdoAttack(p.rdo_steps, p.rdo_lr),
        "search": lambda: SearchAttack(work, p.search_trials),
        "delta": lambda: DeltaAttack(base_state or {}),
        "finetune": lambda: FinetuneAttack(tuple(p.finetune_examples), p.finetune_steps),
    }
    stochastic = {"rdo", "search", "finetune"}
    skip = {"delta"} if base_state is None else set()
    skip |= set() if organism else {"finetune"}
    chosen = [made[a]() for a in p.attack_list if a not in skip and (seed == p.seeds[0] or a in stochastic)]
    return chosen + ([ImportedAttack(imported)] if imported and seed == p.seeds[0] else [])


def _measures(ev: Evaluator, loaded: Loaded, full: bool) -> dict[str, Any]:
    """Capability (and, for the before/after-worst rows, over-refusal and escalation) under the current edit."""
    out: dict[str, Any] = {"capability": ev.capability(loaded)}
    if full:
        for name in ("harmless", "overrefusal"):
            prompts = getattr(ev.sets, name)
            labels = ev.scorer.labels(
                [p.prompt for p in prompts], [r.answer for r in ev.replies(loaded, [p.prompt for p in prompts], name)]
            )
            out[f"{name}_refused"] = rates(labels)["refused"]
        esc = ev.escalation(loaded)
        out["dcs"] = esc["summary"]["overall_dcs"] if esc else None
    return out


def prove_model(
    loaded: Loaded, s: Settings, work: Path, base_state: dict | None, log: Log, imported: list[Path] | None = None
) -> dict[str, Any]:
    """The battery on one model; finished attacks are read back from `work` instead of run again."""
    ev, scorer = _evaluator(loaded, s, log)
    organism = Source.of(loaded.source).organism
    harmful = [p.prompt for p in ev.sets.harmful]
    before = Counts.of(scorer.labels(harmful, [r.answer for r in ev.replies(loaded, harmful, "before")]))
    result: dict[str, Any] = {
        "model": loaded.source.name,
        "source": str(loaded.source),
        "fingerprint": loaded.fingerprint,
    }
    result["before"] = {**before.as_dict(), **_measures(ev, loaded, True)}
    log(f"{loaded.source.name}: refused {before.refused}/{before.n} before any attack")
    attacks: dict[str, list[dict]] = {}
    for seed in s.prove.seeds:
        target = None
        for attack in attacks_for(s, work, seed, base_state, organism, imported):
            done = work / f"{attack.name}-seed{seed}.json"
            if done.is_file():
                attacks.setdefault(attack.name, []).append(json.loads(done.read_text()))
                continue
            target = target or build_target(loaded, s, ev, scorer, log, seed)
            log(f"[{loaded.source.name}] {attack.name} (seed {seed})")
            start = time.perf_counter()

            def extra(budget: float) -> dict:  # the headline budget's settings get every measure
                return _measures(ev, loaded, budget == s.prove.budget_kl)

            if attack.threat in BUDGETED:
                res = run_attack(attack, target, s.prove.budgets, extra)
            else:
                res = run_rows(attack, target, lambda _b: _measures(ev, loaded, False))
            res.seconds = time.perf_counter() - start
            row = {
                **res.as_dict(),
                "seed": seed,
                "tuning_n": len(target.tuning),
                "tuning_refused": target.tuning_refused,
            }
            write_text_atomic(done, json.dumps(row, indent=1, default=str))
            attacks.setdefault(attack.name, []).append(row)
    result["attacks"] = {name: _strongest(runs) for name, runs in attacks.items()}
    result["worst"] = {str(b): worst_case(result, str(b)) for b in s.prove.budgets}
    result["judge_failed"] = getattr(scorer, "failed", None)
    return result


def _strongest(runs: list[dict]) -> dict:
    """One attack over its seeds: per budget, the seed that made most prompts comply; every seed kept."""
    best = dict(runs[0])
    for key in best["budgets"]:
        fits = [r["budgets"][key] for r in runs if r["budgets"].get(key, {}).get("fits")]
        if fits:
            best["budgets"] = {**best["budgets"], key: max(fits, key=lambda o: (o["complied"], -o["kl"]))}
    best["seeds"] = [{"seed": r["seed"], "budgets": r["budgets"], "seconds": r["seconds"]} for r in runs]
    return best


def worst_case(result: dict, budget: str) -> dict | None:
    """The directional attack that made most held-out prompts comply within the budget."""
    cands = [
        (name, a["budgets"][budget])
        for name, a in result["attacks"].items()
        if a["threat"] == "directional" and a["budgets"].get(budget, {}).get("fits")
    ]
    if not cands:
        return None
    name, o = max(cands, key=lambda c: (c[1]["complied"], -c[1]["refused"]))
    before = result["before"]["refused"]
    return {"attack": name, **o, "retained": o["refused"] / before if before else float("nan")}


def check_models(loaded: list[Loaded]) -> None:
    """Models proved together must share an architecture family and a vocabulary."""
    first = loaded[0]
    for m in loaded[1:]:
        if m.adapter.family != first.adapter.family:
            raise UserError(
                f"{m.source} is a {m.adapter.family} model and {first.source} a {first.adapter.family} one",
                "prove models of one architecture together (run prove once per family)",
            )
        if m.tokenizer.get_vocab() != first.tokenizer.get_vocab():
            raise UserError(f"{m.source} and {first.source} have different vocabularies", "prove them separately")


def base_weights(s: Settings, base: str, model: Loaded, log: Log) -> dict | None:
    """The base's weights for the delta attack, or None (with the reason said) when they cannot be."""
    from refusal_lab.prove.delta import delta_mismatch

    b = load_model(s, base)
    state = {n: p.detach().cpu() for n, p in b.model.named_parameters()}
    why = delta_mismatch(model.model, state)
    if why:
        log(f"--base {base} is not {model.source.name}'s base ({why}): the weight-delta attack is skipped")
        return None
    return state


def run_prove(
    names: list[str],
    s: Settings,
    base: str | None,
    out: Path,
    force: bool,
    log: Log,
    imported: list[Path] | None = None,
) -> dict:
    """Prove every model; results.json, summary.md and report.html in OUT. Returns the results.

    `imported`: attacked copies of the one MODEL made by other tools, measured within the budgets too.
    """
    from refusal_lab.prove.imported import check_imported
    from refusal_lab.prove.report import report_html, summary_md

    imported = [Path(f).expanduser().resolve() for f in imported or []]
    if imported and len(names) != 1:
        raise UserError("--imported copies belong to one model, but several were given", "prove one MODEL with them")

    out = out.expanduser().resolve()
    work = out / WORK
    if not work.is_dir():
        check_output(out, force)
    meta = {
        "settings": {
            k: v
            for k, v in settings_record(s).items()
            if k in ("prompts", "probe", "ablate", "prove", "eval", "search")
        }
    }
    paths = [model_path(s, n) for n in names]
    for path in paths:  # a missing or malformed second model is named before the first one is attacked
        check_source(path)
    meta["models"] = [str(p) for p in paths]
    meta["base"] = base
    meta["imported"] = [str(f) for f in imported]
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "prove.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != meta:
        if not force:
            diff = record_diff(json.loads(stamp.read_text()), meta)
            shown = "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
            raise UserError(
                f"{out} holds a prove run with other models or settings ({shown})", "use a new -o folder, or --force"
            )
        shutil.rmtree(work)  # --force: start that proof again
        work.mkdir(parents=True)
    write_text_atomic(stamp, json.dumps(meta, indent=1))
    models: list[dict] = []
    first = None
    for name in names:
        m = load_model(s, name)
        if first is None:
            first = m
        else:
            check_models([first, m])
        state = base_weights(s, base, m, log) if base else None
        check_imported(m.model, imported)
        key = work / m.fingerprint[:16]
        key.mkdir(exist_ok=True)
        models.append(prove_model(m, s, key, state, log, imported))
        if m is not first:
            m.release()
    results = {"meta": manifest(**meta), "models": models}
    write_text_atomic(out / "results.json", json.dumps(results, indent=1, default=str))
    write_text_atomic(out / "summary.md", summary_md(results))
    write_text_atomic(out / "report.html", report_html(results))
    return results
