"""The prove stage: how much of each model's safety survives the battery, worst case first.

Per model: refusal before; every attack tuned within each drift budget; the worst case over the
directional attacks (most compliance) as the headline, with over-refusal, capability and
escalation before and after it; weight-delta and fine-tuning attacks in rows of their own.
Finished attacks are kept under OUT/.prove/, so a killed prove continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from refusal_lab.config import Settings
from refusal_lab.core.activations import cached_capture
from refusal_lab.core.artifacts import (
    Log,
    check_output,
    manifest,
    record_diff,
    settings_record,
    timed,
    write_text_atomic,
)
from refusal_lab.core.metrics import rates, refusal_openers, settled_by
from refusal_lab.core.model import Loaded, check_source
from refusal_lab.core.scoring import label_replies
from refusal_lab.core.sources import PromptSets, Source
from refusal_lab.errors import UserError
from refusal_lab.evaluate.runner import Evaluator, build_evaluator
from refusal_lab.organism.source import load_model, model_path
from refusal_lab.prove.battery import (
    Attack,
    Edit,
    Target,
    held_out_replies,
    replies_file,
    run_attack,
    run_rows,
    write_replies,
)
from refusal_lab.prove.results import AttackRun, Counts, Measures, ModelProof, ProveResult, SeedRun, Worst
from refusal_lab.search.proxy import Proxy

WORK = ".prove"
REPLIES = "worst_replies.jsonl"  # in each model's work folder, with --save-replies; copied to OUT/replies/
MEASURED = "replies"  # in each model's work folder, with --save-replies: every held-out measurement's replies
Key = tuple[str, int]  # an attack run: (attack name, seed)
BUDGETED = ("directional", "imported")  # attacks held to the drift budgets; only directional ones make the worst case


def prove_evaluator(loaded: Loaded, s: Settings, log: Log) -> Evaluator:
    """Held-out sets, the reference (the model itself) and the scorer `choose_scorer` decides."""
    src = Source.of(loaded.source)
    _, sets = src.prove_split(s.prompts, s.eval.limit)
    opts = s.eval.model_copy(update={"max_new_tokens": s.prove.max_new_tokens, "prefill": None})  # its own row
    return build_evaluator(sets, src, opts, s, loaded, log)


def build_target(loaded: Loaded, s: Settings, ev: Evaluator, log: Log, seed: int, saved: Path | None = None) -> Target:
    """What every attack on this model shares: the prompt splits, the unattacked model's logits,
    capability vectors and refusal openers (the proxy's), computed once. `saved`: where held-out replies
    are written (--save-replies)."""
    probe, _ = Source.of(loaded.source).prove_split(s.prompts)
    k = s.prove.tuning_count
    if len(probe.harmful) < k + 4:
        raise UserError(
            f"prove needs more than {k + 4} harmful probe prompts, got {len(probe.harmful)}",
            "pass more --harmful prompts or a smaller --tuning-count",
        )
    extraction = PromptSets(probe.harmful[:-k], probe.harmless, probe.capability)
    m, bs = loaded, s.batch_size
    with timed(log, f"[{m.name}] what every attack shares (captures, refusal openers, tuning replies)"):
        caps = cached_capture(m, extraction.texts("capability"), "last", bs, cache_dir=s.cache_dir / "activations")
        markers = Source.of(m.source).markers
        harmful = extraction.texts("harmful")
        ids = tuple(refusal_openers(m.model, m.tokenizer, harmful, markers, s.generation_batch_size))
        assert ev.reference is not None
        t = Target(
            m, extraction, probe.texts("harmful")[-k:], ev.sets, ev.reference.logits, ev.scorer, s, log, seed,
            caps.vectors[:, 0], proxy=Proxy(ids, s.search.proxy_margin if s.search.proxy else None), saved=saved,
        )  # fmt: skip
        t.tuning_refused = t.label(t.tuning, t.replies(t.tuning)).refused
    if s.search.proxy and not ids:
        log(f"[{m.name}] no reply to the extraction prompts refused: no proxy, every proposal generates")
    return t


def attacks_for(
    s: Settings, work: Path, seed: int, base_state: dict | None, organism: bool, imported: list[Path] | None = None
) -> list[Attack]:
    from refusal_lab.prove.delta import DeltaAttack
    from refusal_lab.prove.directional import AdaptiveAttack, ArditiAttack, SaberAttack, SubspaceAttack
    from refusal_lab.prove.finetune import FinetuneAttack
    from refusal_lab.prove.imported import ImportedAttack
    from refusal_lab.prove.prefill import PrefillAttack
    from refusal_lab.prove.rdo import RdoAttack
    from refusal_lab.prove.search_attack import SearchAttack

    p = s.prove
    made: dict[str, Callable[[], Attack]] = {
        "arditi": ArditiAttack,
        "saber": lambda: SaberAttack(scopes=tuple(p.saber_scopes.split(","))),
        "adaptive": lambda: AdaptiveAttack(p.phases),
        "subspace": lambda: SubspaceAttack(tuple(p.subspace_ks)),
        "rdo": lambda: RdoAttack(p.rdo_steps, p.rdo_lr),
        "search": lambda: SearchAttack(work, p.search_trials),
        "delta": lambda: DeltaAttack(base_state or {}),
        "finetune": lambda: FinetuneAttack.of(p, organism),
        "prefill": lambda: PrefillAttack(tuple(o for o in p.prefill_openers.split("|") if o), p.prefill_tokens),
    }
    stochastic = {"rdo", "search", "finetune"}
    skip = {"delta"} if base_state is None else set()
    chosen = [made[a]() for a in p.attack_list if a not in skip and (seed == p.seeds[0] or a in stochastic)]
    return chosen + ([ImportedAttack(imported)] if imported and seed == p.seeds[0] else [])


def _measures(
    ev: Evaluator, loaded: Loaded, full: bool, edit: Edit = nullcontext, capability: dict[str, float] | None = None
) -> Measures:
    """Capability (and, for the before/after-worst rows, over-refusal and escalation) under `edit`;
    replies are generated inside it and labelled after, against the unattacked model. `capability`:
    already measured under this edit (the worst case's, measured with its attack), so not again."""
    names = ("harmless", "overrefusal") if full else ()
    prompts = {name: [p.prompt for p in getattr(ev.sets, name)] for name in names}
    with edit():
        cap = ev.capability(loaded) if capability is None else capability
        settled = settled_by(ev.scorer)  # only counts are kept: a reply stops once its label is settled
        replies = {name: ev.replies(loaded, prompts[name], name, settled=settled) for name in names}
        esc = ev.escalation(loaded) if full else None
    if not full:
        return Measures(cap)
    refused = {name: rates(label_replies(ev.scorer, prompts[name], replies[name]))["refused"] for name in names}
    return Measures(cap, True, refused["harmless"], refused["overrefusal"], esc.summary.overall_dcs if esc else None)


def _run_one(attack: Attack, target: Target, ev: Evaluator, s: Settings, kept: dict[Key, Edit]) -> AttackRun:
    """One attack on the target: within every budget (directional, imported) or row by row.

    A directional attack's edit at the headline budget is kept in `kept`, so over-refusal and
    escalation are measured once, under the worst case, when every attack is done (`prove_model`)."""
    loaded = target.loaded

    def extra(served: tuple[float, ...], held: Counts, edit: Edit) -> Measures:
        if attack.threat == "directional" and s.prove.budget_kl in served:
            kept[(attack.name, target.seed)] = edit
        return _measures(ev, loaded, False, edit)

    if attack.threat in BUDGETED:
        return run_attack(attack, target, s.prove.budgets, extra)
    if attack.threat == "prefill":  # the weights are untouched: no drift, and capability is the model's own
        return run_rows(attack, target, weights=False)
    return run_rows(attack, target, lambda _b, _h, edit: _measures(ev, loaded, False, edit))


def prove_model(
    loaded: Loaded, s: Settings, work: Path, base_state: dict | None, log: Log, imported: list[Path] | None = None
) -> ModelProof:
    """The battery on one model; finished attacks are read back from `work` instead of run again."""
    name = loaded.name
    with timed(log, f"[{name}] reference replies and scorer"):
        ev = prove_evaluator(loaded, s, log)
    organism = Source.of(loaded.source).organism
    saved = work / MEASURED if s.prove.save_replies else None
    before, before_measures = _before(ev, loaded, work, log, saved)
    log(f"{name}: refused {before.refused}/{before.n} before any attack")
    attacks: dict[str, list[AttackRun]] = {}
    kept: dict[Key, Edit] = {}  # each directional attack's edit at the headline budget, by (attack, seed)
    target: Target | None = None

    def kept_on_disk(run: AttackRun) -> AttackRun:
        write_text_atomic(_run_file(work, run.name, run.seed), json.dumps(run.to_json(), indent=1, default=str))
        return run

    def attack_on(attack: Attack, seed: int) -> AttackRun:
        nonlocal target
        if target is None or target.seed != seed:
            target = build_target(loaded, s, ev, log, seed, saved)
        with timed(log, f"[{name}] {attack.name} (seed {seed})"):
            return kept_on_disk(_run_one(attack, target, ev, s, kept))

    for seed in s.prove.seeds:
        for attack in attacks_for(s, work, seed, base_state, organism, imported):
            done = _run_file(work, attack.name, seed)
            run = AttackRun.from_json(json.loads(done.read_text())) if done.is_file() else attack_on(attack, seed)
            attacks.setdefault(attack.name, []).append(run)
    headline = str(s.prove.budget_kl)
    replies = work / REPLIES if s.prove.save_replies else None

    def unfinished(w: Worst) -> bool:
        return not w.outcome.measures.full or (replies is not None and not replies.is_file())

    while (w := worst_case(_combined(attacks), before, headline)) is not None and unfinished(w):
        runs = attacks[w.attack]
        i = next(i for i, r in enumerate(runs) if r.budgets.get(headline) is w.outcome)
        seed = runs[i].seed
        if (w.attack, seed) not in kept:  # read back from a proof killed before this measure: attack again
            again = next(a for a in attacks_for(s, work, seed, base_state, organism, imported) if a.name == w.attack)
            runs[i] = attack_on(again, seed)
            continue
        if replies is not None and not replies.is_file():
            counted = replies_file(work / MEASURED, w.attack, seed, f"kl{headline}")
            if counted.is_file():  # generated when it was measured
                write_text_atomic(replies, counted.read_text())
            else:  # measured before --save-replies was given
                with timed(log, f"[{name}] the worst case's held-out replies ({w.attack}, seed {seed})"):
                    _write_replies(replies, ev, loaded, s, kept[(w.attack, seed)], w, seed)
        if w.outcome.measures.full:
            continue
        what = f"[{name}] over-refusal, harmless refusal and escalation under the worst case ({w.attack}, seed {seed})"
        with timed(log, what):
            full = _measures(ev, loaded, True, kept[(w.attack, seed)], w.outcome.measures.capability)
        measured = replace(w.outcome, measures=full)
        runs[i] = kept_on_disk(replace(runs[i], budgets={**runs[i].budgets, headline: measured}))
    strongest = _combined(attacks)
    worst = {str(b): worst_case(strongest, before, str(b)) for b in s.prove.budgets}
    source, failed = str(loaded.source), getattr(ev.scorer, "failed", None)
    return ModelProof(name, source, loaded.fingerprint, before, before_measures, strongest, worst, failed)


def _write_replies(path: Path, ev: Evaluator, loaded: Loaded, s: Settings, edit: Edit, w: Worst, seed: int) -> None:
    """The worst case's held-out harmful replies, generated as they were counted and labelled by the same
    scorer: to read before trusting that scorer, or to relabel with `refusal-lab label` and a stronger judge."""
    prompts = [p.prompt for p in ev.sets.harmful]
    with edit():
        replies = held_out_replies(loaded, ev.scorer, s, prompts)
    labels = label_replies(ev.scorer, prompts, replies)
    where = {"attack": w.attack, "seed": seed, "setting": w.outcome.setting, "kl": w.outcome.kl}
    write_replies(path, prompts, replies, labels, where)


def replies_paths(out: Path, results: ProveResult) -> list[Path]:
    """OUT/replies/MODEL.jsonl for each proved model (its fingerprint added where two share a name)."""
    names = [m.model for m in results.models]
    return [
        out / "replies" / f"{m.model if names.count(m.model) == 1 else f'{m.model}-{m.fingerprint[:8]}'}.jsonl"
        for m in results.models
    ]


def model_work(work: Path, fingerprint: str) -> Path:
    """One model's part of OUT/.prove: its finished attacks, measures before, and saved replies."""
    return work / fingerprint[:16]


def _run_file(work: Path, attack: str, seed: int) -> Path:
    """Where a finished attack run is kept, so a resumed proof reads it instead of attacking again."""
    return work / f"{attack}-seed{seed}.json"


def _combined(attacks: dict[str, list[AttackRun]]) -> dict[str, AttackRun]:
    """Each attack over its seeds (`_strongest`)."""
    return {name: _strongest(runs) for name, runs in attacks.items()}


def _before(ev: Evaluator, loaded: Loaded, work: Path, log: Log, saved: Path | None) -> tuple[Counts, Measures]:
    """The unattacked model's held-out counts and measures, kept in `work` like a finished attack's, so
    a resumed proof does not measure them again; its replies written to `saved` (--save-replies)."""
    done, name = work / "before.json", loaded.name
    if done.is_file():
        d = json.loads(done.read_text())
        return Counts.from_json(d["counts"]), Measures.from_json(d["measures"])
    harmful = [p.prompt for p in ev.sets.harmful]
    with timed(log, f"[{name}] before any attack: {len(harmful)} held-out harmful prompts"):
        replies = ev.replies(loaded, harmful, "before", settled=settled_by(ev.scorer))
        labels = label_replies(ev.scorer, harmful, replies)
        before = Counts.of(labels)
    if saved is not None:
        write_replies(saved / "before.jsonl", harmful, replies, labels, {"attack": None, "kl": 0.0})
    with timed(log, f"[{name}] before any attack: capability, over-refusal, escalation"):
        measures = _measures(ev, loaded, True)
    record = {"counts": before.as_dict(), "measures": measures.to_json()}
    write_text_atomic(done, json.dumps(record, indent=1, default=str))
    return before, measures


def _strongest(runs: list[AttackRun]) -> AttackRun:
    """One attack over its seeds: per budget, the seed that made most prompts comply; every seed kept."""
    first = runs[0]
    budgets = dict(first.budgets)
    for key in budgets:
        fits = [o for r in runs if (o := r.budgets.get(key)) is not None and o.fits]
        if fits:
            budgets[key] = max(fits, key=lambda o: (o.counts.complied, -o.kl))
    seeds = tuple(SeedRun(r.seed, r.budgets, r.seconds) for r in runs)
    return replace(first, budgets=budgets, seeds=seeds)


def worst_case(attacks: dict[str, AttackRun], before: Counts, budget: str) -> Worst | None:
    """The directional attack that made most held-out prompts comply within the budget."""
    cands = [
        (name, o)
        for name, a in attacks.items()
        if a.threat == "directional" and (o := a.budgets.get(budget)) is not None and o.fits
    ]
    if not cands:
        return None
    name, o = max(cands, key=lambda c: (c[1].counts.complied, -c[1].counts.refused))
    return Worst(name, o, o.counts.refused / before.refused if before.refused else float("nan"))


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
        log(f"--base {base} is not {model.name}'s base ({why}): the weight-delta attack is skipped")
        return None
    return state


def _stamp(work: Path, meta: dict, out: Path, force: bool) -> None:
    """Record what this proof is of in `work`; a folder holding another proof is refused (or, --force, emptied)."""
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


def run_prove(
    names: list[str],
    s: Settings,
    base: str | None,
    out: Path,
    force: bool,
    log: Log,
    imported: list[Path] | None = None,
) -> ProveResult:
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
    meta["settings"]["prove"].pop("save_replies")  # what is written, not what is measured: a proof may add it
    paths = [model_path(s, n) for n in names]
    for path in paths:  # a missing or malformed second model is named before the first one is attacked
        check_source(path, s.model.download)
        Source.of(path).prove_split(s.prompts, s.eval.limit)[1].refuse_trained_on(path)
    meta["models"] = [str(p) for p in paths]
    meta["base"] = base
    meta["imported"] = [str(f) for f in imported]
    _stamp(work, meta, out, force)
    models: list[ModelProof] = []
    first = None
    for name in names:
        m = load_model(s, name)
        if first is None:
            first = m
        else:
            check_models([first, m])
        state = base_weights(s, base, m, log) if base else None
        check_imported(m.model, imported)
        key = model_work(work, m.fingerprint)
        key.mkdir(exist_ok=True)
        models.append(prove_model(m, s, key, state, log, imported))
        if m is not first:
            m.release()
    results = ProveResult(manifest(**meta), tuple(models))
    if s.prove.save_replies:
        for proof, target in zip(results.models, replies_paths(out, results), strict=True):
            path = model_work(work, proof.fingerprint) / REPLIES
            if path.is_file():  # none where no directional attack made a worst case
                target.parent.mkdir(exist_ok=True)
                write_text_atomic(target, path.read_text())
            measured = sorted((model_work(work, proof.fingerprint) / MEASURED).glob("*.jsonl"))
            if measured:  # every held-out measurement's replies, in OUT/replies/MODEL/
                target.with_suffix("").mkdir(parents=True, exist_ok=True)
            for each in measured:
                write_text_atomic(target.with_suffix("") / each.name, each.read_text())
    write_text_atomic(out / "results.json", json.dumps(results.to_json(), indent=1, default=str))
    write_text_atomic(out / "summary.md", summary_md(results))
    write_text_atomic(out / "report.html", report_html(results))
    return results
