"""The search stage: a resumable multi-objective study over ablation settings.

Each worker builds its setup once (search.setup), opens the study (created, or resumed when it
was made with the same model, prompts, space, objectives and fidelity; a new one starts from the
layer selection's direction and the methods' own defaults), and runs trials (search.trial) until
the study holds its budget. It writes the front (pareto.json, pareto.svg) and the proxy's record
(proxy.json). Trials are multi-fidelity: a trial the proxy or its KL rules out is pruned before it
generates and never enters the front.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from refusal_lab.config import Settings
from refusal_lab.core.artifacts import SETTINGS_FILE, Log, write_text_atomic
from refusal_lab.core.model import Loaded
from refusal_lab.core.sources import Source
from refusal_lab.search import study as S
from refusal_lab.search.report import front_svg, proxy_report
from refusal_lab.search.result import FrontPoint, front_to_json
from refusal_lab.search.selection import LayerChoice, select_layer
from refusal_lab.search.setup import SearchSetup, make_setup, search_scorer
from refusal_lab.search.space import SPACE_VERSION, starts
from refusal_lab.search.trial import trial_objective


def build_setup(loaded: Loaded, s: Settings, log: Log, trials: bool = True) -> SearchSetup:
    """The search command's setup: the model's search split (probe prompts | evaluation prompts)."""
    src = Source.of(loaded.source)
    sets, ev = src.search_split(s.prompts, s.search.probe_count, s.search.eval_count)
    harmful, harmless = [p.prompt for p in ev.harmful], [p.prompt for p in ev.harmless]
    scorer = search_scorer(loaded, harmless, s, calibrate_it=trials)
    return make_setup(loaded, sets, harmful, harmless, s, scorer, log, trials=trials)


def study_meta(setup: SearchSetup) -> dict:
    """What made a study: resuming it with anything else is refused."""
    prompts = json.dumps([setup.probe_texts, setup.eval_harmful, setup.eval_harmless])
    return {
        "space_version": SPACE_VERSION,
        "objectives": list(S.OBJECTIVES),
        "scorer": setup.scorer.name,
        "model_fingerprint": setup.loaded.fingerprint,
        "methods": list(setup.methods),
        "norm_preserving": list(setup.norm_choices),
        "prompts_hash": hashlib.sha256(prompts.encode()).hexdigest()[:16],
        "max_new_tokens": setup.max_new_tokens,
        # how a trial is measured: a study of full-only trials is not mixed with proxy-pruned ones
        "fidelity": setup.proxy.fidelity(),
    }


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


def run_search(loaded: Loaded, s: Settings, out: Path, log: Log) -> list[FrontPoint]:
    """Run trials until the study holds `trials` finished ones; write pareto.json, pareto.svg and proxy.json."""
    from refusal_lab.config import to_toml
    from refusal_lab.core.artifacts import settings_record

    began = time.perf_counter()
    setup, study = open_search(loaded, s, out, log)
    log(f"search set-up (probe, base logits, refusal openers, scorer): {time.perf_counter() - began:.1f} s")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / SETTINGS_FILE, to_toml(settings_record(s, with_cache=True)) + "\n")  # `pick` reads it
    n = len(setup.eval_harmful)
    S.run_trials(study, s.search.trials, trial_objective(setup, s.search.kl_prune, log))
    front = [FrontPoint.of(t, n) for t in S.pareto(study)]
    write_text_atomic(out / "pareto.json", json.dumps(front_to_json(front), indent=1) + "\n")
    write_text_atomic(out / "pareto.svg", front_svg(study, n))
    proxy = proxy_report(study, setup)
    write_text_atomic(out / "proxy.json", json.dumps(proxy.to_json(), indent=1) + "\n")
    if proxy.measured_with_proxy:
        log(
            f"proxy: {proxy.pruned_by_proxy} of {proxy.trials} trials pruned without generating; on the "
            f"{proxy.measured_with_proxy} measured, predicted refusals off by {proxy.mean_abs_error:.1f} "
            f"of {n} on average, {proxy.over_predictions} over-predicted beyond the margin"
        )
    return front
