"""The search stage: a resumable multi-objective Optuna study over ablation settings.

Objectives: harmful prompts still refused (keyword count) and first-token KL on harmless
prompts, both minimised. Trials apply their edit as hooks on one loaded model, against base
logits and probe activations computed once, so a trial costs one evaluation, not a model copy.
A trial whose KL already exceeds `kl_prune` is pruned before any generation.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_lab.arch import Adapter
from refusal_lab.directions import Probe
from refusal_lab.edit import COMPONENTS, Ablation, hooked
from refusal_lab.errors import UserError
from refusal_lab.evaluate import REFUSAL_MARKERS, first_token_kl, is_refusal, last_logits, markers_for
from refusal_lab.generate import generate
from refusal_lab.select import Kernel, SaberConfig, kernel_ablations, saber

SPACE_VERSION = 2
Log = Callable[[str], None]
SABER_DEFAULTS = {  # SABER's published point, two passes (the search space holds one or two)
    "method": "saber",
    "band_lo": 0.2,
    "band_hi": 0.8,
    "top_k": 14,
    "per_layer": 4,
    "alpha": 0.825,
    "alpha_entangled": 0.03,
    "threshold": 0.55,
    "passes": 2,
    "components": "both",
}


@dataclass
class SearchSetup:
    """Everything a trial needs, computed once per worker."""

    model: torch.nn.Module
    tok: object
    adapter: Adapter
    probe: Probe  # SABER's first pass (svd, biprojected) on the probe prompts
    per_layer: torch.Tensor  # [L, H] projected difference of means per layer (kernel method)
    probe_texts: dict[str, list[str]]
    eval_harmful: list[str]
    eval_harmless: list[str]
    base_logits: torch.Tensor
    max_new_tokens: int = 32
    batch_size: int = 16
    methods: tuple[str, ...] = ("saber", "kernel")
    capability_vectors: torch.Tensor | None = None  # [n, L, H] of the unedited model, for entanglement
    markers: tuple[str, ...] = REFUSAL_MARKERS  # standard markers plus the model folder's declared words


def suggest(trial, n_layers: int, methods: tuple[str, ...]) -> dict:  # noqa: ANN001 - optuna.Trial
    """Sample one point of the ablation space (parameter names are part of SPACE_VERSION)."""
    p: dict = {"method": trial.suggest_categorical("method", list(methods))}
    if p["method"] == "saber":
        p["band_lo"] = trial.suggest_float("band_lo", 0.0, 0.5)
        p["band_hi"] = trial.suggest_float("band_hi", 0.5, 1.0)
        p["top_k"] = trial.suggest_int("top_k", 1, 32, log=True)
        p["per_layer"] = trial.suggest_int("per_layer", 1, 4)
        p["alpha"] = trial.suggest_float("alpha", 0.3, 1.5)
        p["alpha_entangled"] = trial.suggest_float("alpha_entangled", 0.0, 0.3)
        p["threshold"] = trial.suggest_float("threshold", 0.2, 0.9)
        p["passes"] = trial.suggest_int("passes", 1, 2)  # each further pass re-probes: it costs a capture
        p["components"] = trial.suggest_categorical("components", ["both", "attention", "mlp"])
    else:
        last = max(1, n_layers - 1)
        p["direction_index"] = trial.suggest_float("direction_index", 0.2 * last, 0.9 * last)
        for part in ("attn", "mlp"):
            p[f"{part}_max"] = trial.suggest_float(f"{part}_max", 0.0, 1.5)
            p[f"{part}_position"] = trial.suggest_float(f"{part}_position", 0.2, 1.0)
            p[f"{part}_min"] = trial.suggest_float(f"{part}_min", 0.0, 1.0)
            p[f"{part}_width"] = trial.suggest_float(f"{part}_width", 0.05, 0.8)
    return p


def ablations_for(params: dict, setup: SearchSetup) -> list[Ablation]:
    """Rebuild a trial's edit from its parameters (the same code path serves --pick)."""
    if params["method"] == "saber":
        cfg = SaberConfig(
            directions_per_layer=4,
            global_top_k=params["top_k"],
            max_per_layer=params["per_layer"],
            alpha_base=params["alpha"],
            alpha_entangled=params["alpha_entangled"],
            entanglement_threshold=params["threshold"],
            max_passes=params["passes"],
            band=(params["band_lo"], params["band_hi"]),
        )
        res = saber(
            setup.model,
            setup.tok,
            setup.adapter,
            setup.probe_texts["harmful"],
            setup.probe_texts["harmless"],
            setup.probe_texts["capability"],
            cfg,
            setup.batch_size,
            setup.probe,
            capability_vectors=setup.capability_vectors,
        )
        keep = COMPONENTS if params["components"] == "both" else (params["components"],)
        for ab in res.ablations:
            ab.components = keep
        return res.ablations
    kern = {
        part: Kernel(params[f"{part}_max"], params[f"{part}_position"], params[f"{part}_min"], params[f"{part}_width"])
        for part in ("attn", "mlp")
    }
    return kernel_ablations(setup.per_layer, params["direction_index"], kern["attn"], kern["mlp"])


def evaluate(setup: SearchSetup, ablations: list[Ablation], kl_prune: float | None = None) -> tuple[int, float]:
    """(harmful prompts refused, first-token KL); raises Pruned when KL alone rules the trial out."""
    with hooked(setup.adapter, ablations):
        kl = first_token_kl(
            setup.base_logits, last_logits(setup.model, setup.tok, setup.eval_harmless, setup.batch_size)
        )
        if kl_prune is not None and kl > kl_prune:
            raise Pruned(kl)
        replies = generate(setup.model, setup.tok, setup.eval_harmful, setup.max_new_tokens, setup.batch_size)
    return sum(is_refusal(r, setup.markers) for r in replies), kl


class Pruned(Exception):
    def __init__(self, kl: float) -> None:
        super().__init__(f"KL {kl:.3f} above the pruning limit")
        self.kl = kl


def study_meta(fingerprint: str, setup: SearchSetup) -> dict:
    prompts = json.dumps([setup.probe_texts, setup.eval_harmful, setup.eval_harmless])
    return {
        "space_version": SPACE_VERSION,
        "model_fingerprint": fingerprint,
        "methods": list(setup.methods),
        "prompts_hash": hashlib.sha256(prompts.encode()).hexdigest()[:16],
        "max_new_tokens": setup.max_new_tokens,
    }


def storage_for(url: str | None, folder: Path):  # noqa: ANN201 - an optuna storage
    """Default: an Optuna journal file in the output folder (kill -9 safe, resumable)."""
    import optuna

    if url is None:
        from optuna.storages.journal import JournalFileBackend

        folder.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:  # sqlalchemy raises many kinds; all mean "cannot use this storage"
        raise UserError(
            f"cannot open the study storage {url}: {exc.__class__.__name__}: {str(exc)[:200]}",
            "check the URL, that the server is up, and that its driver is installed",
        ) from exc


def open_study(storage, name: str, meta: dict, sampler_name: str, seed: int):  # noqa: ANN001, ANN201
    """Create or resume a study; refuse one made with another model, prompt set or search space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (
        optuna.samplers.NSGAIISampler(seed=seed)
        if sampler_name == "nsga2"
        else optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=10)
    )
    study = optuna.create_study(
        study_name=name, storage=storage, directions=["minimize", "minimize"], sampler=sampler, load_if_exists=True
    )
    old = study.user_attrs.get("meta")
    if old is None:
        study.set_user_attr("meta", meta)
        if "saber" in meta["methods"]:  # start from SABER's published point (with biprojection)
            study.enqueue_trial(SABER_DEFAULTS)
    elif old != meta:
        diff = [k for k in meta if old.get(k) != meta[k]]
        raise UserError(
            f"study {name!r} was made with a different {', '.join(diff)}",
            "use a new --study-name or output folder for this model/prompts/space",
        )
    return study


def run_trials(study, setup: SearchSetup, n_trials: int, kl_prune: float | None, log: Log) -> None:  # noqa: ANN001
    """Run until the study holds n_trials finished (complete or pruned) trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr("worker", worker)
        params = suggest(trial, setup.adapter.num_layers, setup.methods)
        try:
            refusals, kl = evaluate(setup, ablations_for(params, setup), kl_prune)
        except Pruned as p:
            trial.set_user_attr("kl", p.kl)
            raise optuna.TrialPruned(str(p)) from p
        log(f"  trial {trial.number}: {params['method']} refusals {refusals}/{len(setup.eval_harmful)} KL {kl:.4f}")
        return float(refusals), kl

    done = sum(
        t.state.is_finished()
        for t in study.trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )
    if done < n_trials:
        study.optimize(objective, n_trials=n_trials - done, catch=())


def pareto(study) -> list:  # noqa: ANN001
    return sorted(study.best_trials, key=lambda t: (t.values[0], t.values[1]))


def pick(study, max_kl: float | None, max_refusals: float | None):  # noqa: ANN001, ANN201
    """The front's trial with fewest refusals under a KL limit, or least KL under a refusal limit."""
    front = pareto(study)
    if max_kl is not None:
        ok = [t for t in front if t.values[1] <= max_kl]
        best = min(ok, key=lambda t: (t.values[0], t.values[1])) if ok else None
    elif max_refusals is not None:
        ok = [t for t in front if t.values[0] <= max_refusals]
        best = min(ok, key=lambda t: (t.values[1], t.values[0])) if ok else None
    else:
        raise UserError("--pick needs --max-kl or --max-refusal", "say which constraint chooses the trial")
    if best is None:
        raise UserError("no trial on the Pareto front meets the limit", "relax the limit or run more trials")
    return best


def split_prompts(
    folder: Path, harmful: Path | None, harmless: Path | None, column: str, probe_n: int, eval_n: int
) -> tuple:
    """(probe PromptSets, eval harmful, eval harmless), never overlapping.

    The organism: its probe and eval splits. Otherwise the given files are cut in order, the
    first probe_n prompts for directions and the next eval_n for trials (refusal-lab's own
    harmless set when none is given).
    """
    from refusal_lab.pipeline import PromptSets, builtin_prompts, prompt_sets_for

    if (folder / "prompts" / "harmful_eval.jsonl").is_file() and harmful is None:
        from refusal_lab.organism.build import prompt_sets

        sets = prompt_sets_for(folder)
        ev = prompt_sets(folder, "eval")
        eval_h, eval_b = [p.prompt for p in ev["harmful"]], [p.prompt for p in ev["harmless"]]
    else:
        full = prompt_sets_for(folder, harmful, harmless, None, column)
        sets = PromptSets(full.harmful, full.harmless, full.capability)
        eval_h = [p.prompt for p in full.harmful[probe_n : probe_n + eval_n]]
        held = full.harmless[probe_n:] if harmless else builtin_prompts("harmless", "eval")
        eval_b = [p.prompt for p in held]
        if not eval_h:
            raise UserError(
                f"no harmful prompts left for evaluation after the first {probe_n}",
                "give more prompts or a smaller --probe-prompts",
            )
    sets.harmful, sets.harmless = sets.harmful[:probe_n], sets.harmless[:probe_n]
    return sets, eval_h[:eval_n], eval_b[:eval_n]


def build_setup(
    loaded,  # noqa: ANN001 - model.Loaded
    sets,  # noqa: ANN001 - pipeline.PromptSets (probe split)
    eval_harmful: list[str],
    eval_harmless: list[str],
    cache_dir: Path | None,
    batch_size: int,
    max_new_tokens: int,
    methods: tuple[str, ...],
    log: Log,
    fp: str | None = None,
) -> SearchSetup:
    """Probe once (cached on disk), cache base logits: what every trial reuses."""
    from refusal_lab.activations import cached_capture, fingerprint
    from refusal_lab.arch import adapt
    from refusal_lab.pipeline import ProbeOptions, run_probe

    adapter = adapt(loaded.model)
    fp = fp or fingerprint(loaded.model)
    probe = run_probe(loaded, sets, ProbeOptions("svd", 4, biproject=True, batch_size=batch_size), cache_dir, log, fp)
    dom = run_probe(loaded, sets, ProbeOptions("dom", 1, biproject=True, batch_size=batch_size), cache_dir, log, fp)
    base_logits = last_logits(loaded.model, loaded.tokenizer, eval_harmless, batch_size)
    texts = {k: sets.texts(k) for k in ("harmful", "harmless", "capability")}
    caps = cached_capture(
        cache_dir, loaded.model, loaded.tokenizer, adapter, texts["capability"], "last", batch_size, model_fp=fp
    )
    return SearchSetup(
        loaded.model,
        loaded.tokenizer,
        adapter,
        probe,
        dom.directions[:, :, 0],
        texts,
        eval_harmful,
        eval_harmless,
        base_logits,
        max_new_tokens,
        batch_size,
        methods,
        caps.vectors[:, 0],
        markers_for(loaded.source),
    )


def front_table(study) -> str:  # noqa: ANN001
    rows = [f"{'trial':>5}  {'method':<7} {'refusals':>8} {'KL':>8}"]
    rows += [
        f"{t.number:>5}  {t.params.get('method', '?'):<7} {t.values[0]:>8.0f} {t.values[1]:>8.4f}"
        for t in pareto(study)
    ]
    return "\n".join(rows)


def front_svg(study) -> str:  # noqa: ANN001
    """All finished trials and the Pareto front, refusals against KL."""
    import optuna

    from refusal_lab.report import line_plot_svg

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front = pareto(study)
    return line_plot_svg(
        "Search: refusals against KL",
        "first-token KL",
        "harmful prompts refused",
        {
            "trials": ([t.values[1] for t in done], [t.values[0] for t in done]),
            "Pareto front": ([t.values[1] for t in front], [t.values[0] for t in front]),
        },
        lines=False,
    )
