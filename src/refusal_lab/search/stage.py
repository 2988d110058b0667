"""The search stage: a resumable multi-objective study over ablation settings, and exporting a pick.

Each worker probes once (activations cached on disk), captures the capability activations and
the base logits once, then applies every trial's edit as hooks on the one loaded model, so a
trial costs one evaluation. Replies are labelled refused / complied / broken (exactly on an
organism, by coherence against the unedited model otherwise); the objective counts what was not
complied with, so breaking the model is not rewarded.

Trials are multi-fidelity. Every trial is first measured without generating: one forward pass
over the harmless prompts gives its KL, one over the harmful prompts its *proxy*, the number of
prompts whose greedy first reply token is one of the model's own refusal openers (the prompt pass
that generating then continues from, so a generating trial pays for it once). A trial whose KL
exceeds `kl_prune` is pruned; so is one that a fully measured trial already dominates on the
proxy's evidence (no more KL, and fewer prompts not complied with than the trial's predicted
refusals less a margin). Only the rest generate, and a reply stops as soon as a refusal word
settles its verdict. A pruned trial never enters the front; `proxy.json` says how well the proxy
predicted the refusals of the trials that were measured in full.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from refusal_lab.ablate.edit import Ablation, hooked, weights_edited
from refusal_lab.ablate.stage import export, export_dtype
from refusal_lab.config import ProbeSettings, Settings
from refusal_lab.core.activations import cached_capture
from refusal_lab.core.artifacts import SETTINGS_FILE, Log, write_text_atomic
from refusal_lab.core.generate import generate, prefill
from refusal_lab.core.model import Loaded
from refusal_lab.core.sources import PromptSets, Source
from refusal_lab.evaluate.coherence import CoherenceScorer
from refusal_lab.evaluate.metrics import Scorer, first_token_kl, last_logits, refusal_openers, settled_by
from refusal_lab.probe.directions import Probe
from refusal_lab.probe.stage import run_probe
from refusal_lab.search import study as S
from refusal_lab.search.space import SPACE_VERSION, ablations_for, candidate_layers, flat_kernel, starts, suggest


@dataclass
class SearchSetup:
    """Everything a trial needs, computed once per worker."""

    loaded: Loaded
    probe: Probe  # SABER's first pass on the probe prompts
    probe_opts: ProbeSettings
    per_layer: torch.Tensor  # [L, H] projected difference of means per layer (kernel method)
    probe_texts: dict[str, list[str]]
    eval_harmful: list[str]
    eval_harmless: list[str]
    base_logits: torch.Tensor
    capability_vectors: torch.Tensor  # [n, L, H] of the unedited model, for entanglement
    scorer: Scorer
    batch_size: int
    max_new_tokens: int
    methods: tuple[str, ...]
    refusal_ids: tuple[int, ...] = ()  # the model's own refusal openers (the proxy reads them)
    proxy_margin: float | None = 0.1  # share of prompts the proxy may be off by; None: no proxy
    proxy_learn: int = 0  # measured trials after which the margin is the proxy's own worst over-prediction
    select_max_kl: float | None = 0.1  # the layer selection's KL limit (Arditi's); None: no selection
    store: torch.dtype | None = None  # None: trials hook the edit; else they edit the weights, rounded to this
    norm_preserving: bool = False


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


class Pruned(Exception):
    """A trial ruled out before generating: by its KL, or by the proxy against a measured trial."""

    def __init__(self, kl: float, predicted: int | None = None, by: int | None = None) -> None:
        why = f"KL {kl:.3f} above the pruning limit" if by is None else f"dominated by trial {by} (proxy)"
        super().__init__(why)
        self.kl, self.predicted, self.by = kl, predicted, by


Dominated = Callable[[float, int], "int | None"]  # (KL, predicted refusals) -> a dominating trial, or None


def make_setup(
    loaded: Loaded,
    sets: PromptSets,
    eval_harmful: list[str],
    eval_harmless: list[str],
    s: Settings,
    scorer: Scorer,
    log: Log,
    base_logits: torch.Tensor | None = None,
    trials: bool = True,
) -> SearchSetup:
    """Probe once (cached on disk) and compute the base logits: what every trial reuses.

    trials=False (pick: rebuild one trial's edit) skips what only measuring trials needs.
    """
    cache = s.cache_dir / "activations"
    probe = run_probe(loaded, sets, s.probe, s.batch_size, cache, log)
    dom_opts = ProbeSettings(extraction="dom", directions_per_layer=1, biproject=s.probe.biproject)
    dom = run_probe(loaded, sets, dom_opts, s.batch_size, cache, log)
    caps = cached_capture(loaded, sets.texts("capability"), "last", s.batch_size, cache_dir=cache)
    if base_logits is None:
        base_logits = last_logits(loaded.model, loaded.tokenizer, eval_harmless, s.batch_size)
    markers = Source.of(loaded.source).markers
    current, stored = next(loaded.model.parameters()).dtype, export_dtype(loaded)
    hooks_exact = current in (torch.float32, torch.float64) and stored == current and not s.ablate.norm_preserving
    ids: tuple[int, ...] = ()
    if s.search.proxy and trials:  # the model's own refusal openers, from short replies to the probe prompts
        ids = tuple(refusal_openers(loaded.model, loaded.tokenizer, sets.texts("harmful"), markers, s.batch_size, 8))
    return SearchSetup(
        loaded=loaded,
        probe=probe,
        probe_opts=s.probe,
        per_layer=dom.directions[:, :, 0],
        probe_texts={k: sets.texts(k) for k in ("harmful", "harmless", "capability")},
        eval_harmful=eval_harmful,
        eval_harmless=eval_harmless,
        base_logits=base_logits,
        capability_vectors=caps.vectors[:, 0],
        scorer=scorer,
        batch_size=s.batch_size,
        max_new_tokens=s.search.max_new_tokens,
        methods=s.search.method_list,
        refusal_ids=ids,
        proxy_margin=s.search.proxy_margin if s.search.proxy else None,
        proxy_learn=s.search.proxy_learn,
        select_max_kl=s.ablate.arditi.arditi_max_kl if s.search.select_start else None,
        store=None if hooks_exact else stored,
        norm_preserving=s.ablate.norm_preserving,
    )


def build_setup(loaded: Loaded, s: Settings, log: Log, trials: bool = True) -> SearchSetup:
    """The search command's setup: the model's search split (probe prompts | evaluation prompts)."""
    src = Source.of(loaded.source)
    sets, ev = src.search_split(s.prompts, s.search.probe_count, s.search.eval_count)
    harmful, harmless = [p.prompt for p in ev.harmful], [p.prompt for p in ev.harmless]
    scorer = search_scorer(loaded, harmless, s, calibrate_it=trials)
    return make_setup(loaded, sets, harmful, harmless, s, scorer, log, trials=trials)


@dataclass(frozen=True)
class Unscored:
    """A scorer's name without its calibration: pick needs the study's identity, not labels."""

    name: str

    def labels(self, prompts: list[str], replies: list[str]) -> list[str]:
        raise RuntimeError("this setup rebuilds edits only; it does not score replies")


def search_scorer(loaded: Loaded, harmless: list[str], s: Settings, calibrate_it: bool = True) -> Scorer:
    """Exact on an organism; otherwise coherence against the unedited model, as prove scores.

    A keyword count would call a broken edit's babble compliance and put it on the front. The
    threshold is a low quantile of the model's own replies' likelihood on the evaluation harmless
    prompts. The scorer reads the same loaded model the trials edit: evaluate_trial labels replies
    after its hooks are gone, so it scores against the base.
    """
    src = Source.of(loaded.source)
    scorer = src.scorer()
    if scorer.name == "exact":
        return scorer
    if not calibrate_it:
        return Unscored("coherence")
    m, bs = loaded, s.batch_size
    replies = generate(m.model, m.tokenizer, harmless, s.search.max_new_tokens, bs)
    return CoherenceScorer.calibrated(
        m.model, m.tokenizer, harmless, replies, s.eval.coherence_quantile, src.markers, bs
    )


def proxy_refusals(setup: SearchSetup, first: torch.Tensor) -> int | None:
    """Harmful evaluation prompts whose greedy first reply token (`first`) is a refusal opener."""
    if not setup.refusal_ids:
        return None
    return int(torch.isin(first.cpu(), torch.tensor(setup.refusal_ids)).sum())


@dataclass(frozen=True)
class LayerChoice:
    """What the layer selection chose; `table` holds every candidate's predicted refusals and, where it
    was measured, its KL."""

    layer: int
    predicted_refused: int
    kl: float
    within_limit: bool  # False: no candidate met the KL limit, so the least-KL one was taken
    table: list[dict]


def select_layer(setup: SearchSetup, log: Log) -> LayerChoice | None:
    """Arditi et al.'s direction selection, read through the search's proxy.

    Each candidate layer's direction is ablated from every writer at full strength (as Arditi et al.
    ablate) and scored by the refusal proxy on the harmful evaluation prompts (one prompt pass); KL on
    the harmless prompts is then measured in order of fewest predicted refusals until a candidate is
    within the limit. The paper scores refusal-token log-odds on a held-out split and also rules out
    directions whose addition does not induce refusal; this reads the same prompts the trials are
    scored on and keeps only the ablation test, so it costs one pass per layer plus a few. It edits
    through hooks: it only chooses a direction, and the trials made from it are measured as exported
    (trial_edit). None when there is no proxy (no refusal openers) or selection is off.
    """
    if setup.select_max_kl is None or not setup.refusal_ids or "kernel" not in setup.methods:
        return None
    m = setup.loaded
    began = time.perf_counter()
    edits = {layer: ablations_for(flat_kernel(layer, 1.0), setup) for layer in candidate_layers(m.adapter.num_layers)}
    rows = []
    for layer, edit in edits.items():
        with hooked(m.adapter, edit):
            first = last_logits(m.model, m.tokenizer, setup.eval_harmful, setup.batch_size).argmax(-1)
        rows.append({"layer": layer, "predicted_refused": proxy_refusals(setup, first), "kl": None})
    chosen = None
    for row in sorted(rows, key=lambda r: (r["predicted_refused"], r["layer"])):
        with hooked(m.adapter, edits[row["layer"]]):
            logits = last_logits(m.model, m.tokenizer, setup.eval_harmless, setup.batch_size)
        row["kl"] = first_token_kl(setup.base_logits, logits)
        if row["kl"] <= setup.select_max_kl:
            chosen = row
            break
    within = chosen is not None
    if chosen is None:  # every candidate was measured: take the gentlest
        chosen = min(rows, key=lambda r: r["kl"])
    choice = LayerChoice(chosen["layer"], chosen["predicted_refused"], chosen["kl"], within, rows)
    n = len(setup.eval_harmful)
    log(
        f"layer selection: layer {choice.layer} ({choice.predicted_refused}/{n} predicted refusals, KL "
        f"{choice.kl:.4f}{'' if within else f', none within KL {setup.select_max_kl}'}; {len(rows)} candidates, "
        f"{time.perf_counter() - began:.1f} s)"
    )
    return choice


def trial_edit(setup: SearchSetup, ablations: list[Ablation]) -> AbstractContextManager:
    """A trial's edit as its export will hold it.

    Hooks on the writers compute what the edited weights do only where nothing is rounded: float32
    weights saved as float32. In bfloat16 a hooked trial and its export were measured a prompt apart,
    so there the trial edits the weights (about 1 s for a 0.5B model), rounded as saving rounds them.
    """
    if setup.store is None:
        return hooked(setup.loaded.adapter, ablations)
    return weights_edited(setup.loaded.adapter, ablations, setup.norm_preserving, setup.store)


def evaluate_trial(
    setup: SearchSetup, ablations: list[Ablation], kl_prune: float | None = None, dominated: Dominated | None = None
) -> TrialResult:
    """Labels of the harmful evaluation replies and first-token KL; Pruned when KL or the proxy rules it out."""
    m = setup.loaded
    with trial_edit(setup, ablations):
        logits = last_logits(m.model, m.tokenizer, setup.eval_harmless, setup.batch_size)
        kl = first_token_kl(setup.base_logits, logits)
        if kl_prune is not None and kl > kl_prune:
            raise Pruned(kl)
        passes = prefill(m.model, m.tokenizer, setup.eval_harmful, setup.batch_size)
        first = torch.cat([p.first for p in passes])
        predicted = proxy_refusals(setup, first) if setup.proxy_margin is not None else None
        by = dominated(kl, predicted) if dominated is not None and predicted is not None else None
        if by is not None:
            raise Pruned(kl, predicted, by)
        settled = settled_by(setup.scorer)
        replies = generate(
            m.model, m.tokenizer, setup.eval_harmful, setup.max_new_tokens, setup.batch_size, settled, passes
        )
    labels = setup.scorer.labels(setup.eval_harmful, replies)  # hooks removed: a coherence scorer reads the base
    return TrialResult(labels.count("refused"), labels.count("complied"), labels.count("broken"), kl, predicted)


def study_meta(setup: SearchSetup) -> dict:
    prompts = json.dumps([setup.probe_texts, setup.eval_harmful, setup.eval_harmless])
    return {
        "space_version": SPACE_VERSION,
        "objectives": list(S.OBJECTIVES),
        "scorer": setup.scorer.name,
        "model_fingerprint": setup.loaded.fingerprint,
        "methods": list(setup.methods),
        "prompts_hash": hashlib.sha256(prompts.encode()).hexdigest()[:16],
        "max_new_tokens": setup.max_new_tokens,
        # how a trial is measured: a study of full-only trials is not mixed with proxy-pruned ones
        "fidelity": fidelity(setup),
    }


def fidelity(setup: SearchSetup) -> str:
    if setup.proxy_margin is None:
        return "full"
    learned = f", learned after {setup.proxy_learn}" if setup.proxy_learn else ""
    return f"proxy-v1 margin {setup.proxy_margin}{learned}"


def over_predictions(done: list[Any]) -> list[float]:
    """Predicted refusals less prompts not complied with, for each trial measured with the proxy: a
    positive value is the error that could prune a trial wrongly."""
    return [t.user_attrs["proxy_refused"] - t.values[0] for t in done if "proxy_refused" in t.user_attrs]


def fixed_slack(setup: SearchSetup) -> float:
    """--proxy-margin in prompts."""
    return (setup.proxy_margin or 0.0) * len(setup.eval_harmful)


def proxy_slack(setup: SearchSetup, done: list[Any]) -> float:
    """How many prompts the proxy may over-predict by before it prunes.

    The fixed margin until `proxy_learn` trials were measured in full; then the proxy's own largest
    over-prediction on them (never more than the fixed margin): a proxy that has been exact on this
    model prunes what it predicts to be dominated, one that over-predicts keeps its margin.
    """
    fixed = fixed_slack(setup)
    seen = over_predictions(done)
    if not setup.proxy_learn or len(seen) < setup.proxy_learn:
        return fixed
    return min(fixed, max(0.0, *seen))


def open_search(loaded: Loaded, s: Settings, out: Path, log: Log, trials: bool = True) -> tuple[SearchSetup, Any]:
    """The worker's setup and its study (created, or resumed when it matches)."""
    setup = build_setup(loaded, s, log, trials)
    storage = S.storage_for(s.search.storage, out)
    return setup, open_with_starts(storage, s.search.study_name, setup, s.search.sampler, s.search.sampler_seed, log)


def open_with_starts(storage: Any, name: str, setup: SearchSetup, sampler: str, seed: int, log: Log) -> Any:
    """Open the study; a new one is seeded with the methods' own points (the layer selection runs only then)."""
    chosen: list[LayerChoice] = []

    def first_trials() -> list[dict[str, Any]]:
        choice = select_layer(setup, log)
        chosen.extend([choice] if choice else [])
        return starts(setup, choice.layer if choice else None)

    study = S.open_study(storage, name, study_meta(setup), sampler, seed, first_trials)
    if chosen:
        study.set_user_attr("layer_selection", asdict(chosen[0]))
    return study


def trial_objective(setup: SearchSetup, kl_prune: float | None, log: Log) -> Any:
    """What one trial does: sample a point, edit with hooks, count what was not complied with, and KL."""
    import optuna

    n = len(setup.eval_harmful)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = suggest(trial, setup.loaded.adapter.num_layers, setup.methods)
        began = time.perf_counter()

        def dominated(kl: float, predicted: int) -> int | None:
            """A measured trial with no more KL and fewer not complied than this one's refusals alone."""
            done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            slack = proxy_slack(setup, done)
            trial.set_user_attr("proxy_slack", slack)
            better = [t for t in done if t.values[1] <= kl and t.values[0] <= predicted - slack]
            return min(better, key=lambda t: t.values[0]).number if better else None

        try:
            r = evaluate_trial(setup, ablations_for(params, setup), kl_prune, dominated)
        except Pruned as p:
            trial.set_user_attr("kl", p.kl)
            trial.set_user_attr("pruned_by", "kl" if p.by is None else "proxy")
            if p.predicted is not None:
                trial.set_user_attr("proxy_refused", p.predicted)
            log(f"  trial {trial.number}: {params['method']} pruned, {p} ({time.perf_counter() - began:.1f} s)")
            raise optuna.TrialPruned(str(p)) from p
        for key in ("refused", "complied", "broken"):
            trial.set_user_attr(key, getattr(r, key))
        if r.predicted_refused is not None:
            trial.set_user_attr("proxy_refused", r.predicted_refused)
        log(
            f"  trial {trial.number}: {params['method']} complied {r.complied}/{n} "
            f"(refused {r.refused}, broken {r.broken}) KL {r.kl:.4f} ({time.perf_counter() - began:.1f} s)"
        )
        return float(r.not_complied), r.kl

    return objective


def run_search(loaded: Loaded, s: Settings, out: Path, log: Log) -> list[dict]:
    """Run trials until the study holds `trials` finished ones; write pareto.json and pareto.svg."""
    from refusal_lab.config import to_toml
    from refusal_lab.core.artifacts import settings_record

    began = time.perf_counter()
    setup, study = open_search(loaded, s, out, log)
    log(f"search set-up (probe, base logits, refusal openers, scorer): {time.perf_counter() - began:.1f} s")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / SETTINGS_FILE, to_toml(settings_record(s, with_cache=True)) + "\n")  # `pick` reads it
    n = len(setup.eval_harmful)
    objective = trial_objective(setup, s.search.kl_prune, log)
    S.run_trials(study, s.search.trials, objective)
    front = [front_point(t, n) for t in S.pareto(study)]

    write_text_atomic(out / "pareto.json", json.dumps(front, indent=1) + "\n")
    write_text_atomic(out / "pareto.svg", front_svg(study, n))
    proxy = proxy_report(study, setup)
    write_text_atomic(out / "proxy.json", json.dumps(proxy, indent=1) + "\n")
    if proxy["measured_with_proxy"]:
        log(
            f"proxy: {proxy['pruned_by_proxy']} of {proxy['trials']} trials pruned without generating; on the "
            f"{proxy['measured_with_proxy']} measured, predicted refusals off by {proxy['mean_abs_error']:.1f} "
            f"of {n} on average, {proxy['over_predictions']} over-predicted beyond the margin"
        )
    return front


def proxy_report(study: Any, setup: SearchSetup) -> dict:
    """How the proxy did: trials pruned by it, and its error on the trials measured in full.

    An over-prediction beyond the margin (predicted refusals - margin > measured not complied) is the
    error that could prune a trial wrongly; it is counted.
    """
    import optuna

    TS = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED))
    measured = [t for t in trials if t.state == TS.COMPLETE and "proxy_refused" in t.user_attrs]
    errors = [abs(t.user_attrs["proxy_refused"] - t.user_attrs["refused"]) for t in measured]
    over = over_predictions(measured)
    return {
        "trials": len(trials),
        "pruned_by_kl": sum(t.user_attrs.get("pruned_by", "kl") == "kl" for t in trials if t.state == TS.PRUNED),
        "pruned_by_proxy": sum(t.user_attrs.get("pruned_by") == "proxy" for t in trials),
        "measured_with_proxy": len(measured),
        "mean_abs_error": sum(errors) / len(errors) if errors else None,
        "over_predictions": sum(o > fixed_slack(setup) for o in over),
        "largest_over_prediction": max(over) if over else None,
        "margin": setup.proxy_margin,
        "learned_after": setup.proxy_learn or None,
        "final_slack": proxy_slack(setup, measured) if setup.proxy_margin is not None else None,
        "refusal_openers": [setup.loaded.tokenizer.decode([i]) for i in setup.refusal_ids],
    }


def front_point(t: Any, n: int) -> dict:
    return {
        "trial": t.number,
        "complied": n - int(t.values[0]),
        "not_complied": int(t.values[0]),
        "refused": t.user_attrs.get("refused"),
        "broken": t.user_attrs.get("broken"),
        "kl": t.values[1],
        "params": t.params,
    }


def front_table(front: list[dict], n: int) -> str:
    rows = [f"{'trial':>5}  {'method':<7} {'complied':>8} {'refused':>7} {'broken':>6} {'KL':>8}"]
    rows += [
        f"{p['trial']:>5}  {p['params'].get('method', '?'):<7} {p['complied']:>5}/{n:<2} {p['refused']!s:>7} "
        f"{p['broken']!s:>6} {p['kl']:>8.4f}"
        for p in front
    ]
    return "\n".join(rows)


def front_svg(study: Any, n: int) -> str:
    """All finished trials and the Pareto front, complied against KL."""
    import optuna

    from refusal_lab.evaluate.plots import line_plot_svg

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front = S.pareto(study)
    return line_plot_svg(
        "Search: harmful prompts complied with against KL",
        "first-token KL",
        f"complied (of {n})",
        {
            "trials": ([t.values[1] for t in done], [n - t.values[0] for t in done]),
            "Pareto front": ([t.values[1] for t in front], [n - t.values[0] for t in front]),
        },
        lines=False,
    )


def pick_and_export(
    loaded: Loaded,
    s: Settings,
    out: Path,
    max_kl: float | None,
    min_complied: int | None,
    target: Path,
    force: bool,
    log: Log,
) -> dict:
    """Rebuild a front trial's edit and write it through the ablate stage's export."""
    setup, study = open_search(loaded, s, out, log, trials=False)
    n = len(setup.eval_harmful)
    trial = S.pick(study, max_kl, None if min_complied is None else n - min_complied)
    point = front_point(trial, n)
    log(f"picked trial {trial.number}: complied {point['complied']}/{n}, KL {point['kl']:.4f}, {trial.params}")
    record = {
        "method": f"search:{trial.params['method']}",
        "options": trial.params,
        "chosen": {**point, "study": s.search.study_name, "storage": s.search.storage or str(out / "study.journal")},
        "directions_file": "ablation.safetensors",
    }
    limit = f"--max-kl {max_kl}" if max_kl is not None else f"--min-complied {min_complied}"
    command = f"pick {out.resolve()} {limit}"
    export(loaded, ablations_for(trial.params, setup), target, record, s, command, force)
    return record
