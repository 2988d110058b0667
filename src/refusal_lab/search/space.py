"""The search space: one point is an ablation (SABER or kernel) built from sampled parameters.

Every point also says whether its edit is norm-preserving (`norm_preserving`): a categorical the
sampler chooses between plain and norm-preserving where the search samples it, and a single fixed
value otherwise, so each trial (and the pick) records which edit it measured.
Parameter names are part of SPACE_VERSION: a study made with another space is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from refusal_lab.ablate.edit import Ablation
from refusal_lab.ablate.kernel import Kernel, kernel_ablations
from refusal_lab.ablate.saber import saber
from refusal_lab.config import SaberSettings
from refusal_lab.probe.directions import best_layer_by_fdr

if TYPE_CHECKING:
    from refusal_lab.search.setup import SearchSetup

SPACE_VERSION = 4  # 4: norm_preserving is a parameter of every point
SABER_KEYS = ("band_lo", "band_hi", "top_k", "alpha", "alpha_entangled", "entanglement_threshold", "components")


def saber_start() -> dict[str, Any]:
    """SABER's published point (config.SaberSettings' defaults) with two passes: the space holds one or two."""
    d = SaberSettings()
    return {"method": "saber", **{k: getattr(d, k) for k in SABER_KEYS}, "per_layer": d.max_per_layer, "passes": 2}


def direction_range(n_layers: int) -> tuple[float, float]:
    """The space's range for the kernel's direction_index: not the first fifth nor the last tenth of depth."""
    last = max(1, n_layers - 1)
    return 0.2 * last, 0.9 * last


def candidate_layers(n_layers: int) -> list[int]:
    """The whole layers inside direction_range: the directions a layer selection chooses among."""
    lo, hi = direction_range(n_layers)
    return [i for i in range(n_layers) if lo <= i <= hi] or list(range(n_layers))


def flat_kernel(direction_index: float, strength: float) -> dict[str, Any]:
    """A kernel point that removes one direction from every attention and MLP writer at one strength
    (a flat tent covering all layers): the projected method, and Arditi et al.'s ablation at 1.0."""
    p: dict[str, Any] = {"method": "kernel", "direction_index": float(direction_index)}
    for part in ("attn", "mlp"):
        p |= {f"{part}_max": strength, f"{part}_position": 0.6, f"{part}_min": 1.0, f"{part}_width": 0.8}
    return p


def projected_start(setup: SearchSetup) -> dict[str, Any]:
    """The projected method as a kernel point: the most separable layer's direction, full strength."""
    layers = candidate_layers(setup.loaded.adapter.num_layers)
    return flat_kernel(best_layer_by_fdr(setup.probe.fdr[:, 0], layers), 1.0)


# Arditi et al.'s selection ablates its direction at full strength; the gentler copies step toward
# the front's low-KL end, where the published defaults (full strength) never land.
SELECTED_STRENGTHS = (1.0, 0.75, 0.5)


def starts(setup: SearchSetup, selected: int | None = None) -> list[dict[str, Any]]:
    """The first trials: each searched method's own default point, so the search begins where they do.

    `selected`: the layer an Arditi-style selection chose (selection.select_layer); its direction at
    SELECTED_STRENGTHS comes first, since each costs one evaluation and SABER's start two passes.
    """
    out = []
    if "kernel" in setup.methods and selected is not None:
        out += [flat_kernel(selected, s) for s in SELECTED_STRENGTHS]
    if "kernel" in setup.methods:
        out.append(projected_start(setup))
    return out + ([saber_start()] if "saber" in setup.methods else [])


def suggest(
    trial: Any, n_layers: int, methods: tuple[str, ...], norm_choices: tuple[bool, ...] = (False,)
) -> dict[str, Any]:
    """Sample one point of the ablation space from an optuna.Trial."""
    p: dict[str, Any] = {"method": trial.suggest_categorical("method", list(methods))}
    p["norm_preserving"] = trial.suggest_categorical("norm_preserving", list(norm_choices))
    if p["method"] == "saber":
        p["band_lo"] = trial.suggest_float("band_lo", 0.0, 0.5)
        p["band_hi"] = trial.suggest_float("band_hi", 0.5, 1.0)
        p["top_k"] = trial.suggest_int("top_k", 1, 32, log=True)
        p["per_layer"] = trial.suggest_int("per_layer", 1, 4)
        p["alpha"] = trial.suggest_float("alpha", 0.3, 1.5)
        p["alpha_entangled"] = trial.suggest_float("alpha_entangled", 0.0, 0.3)
        p["entanglement_threshold"] = trial.suggest_float("entanglement_threshold", 0.2, 0.9)
        p["passes"] = trial.suggest_int("passes", 1, 2)  # each further pass re-probes: it costs a capture
        p["components"] = trial.suggest_categorical("components", ["both", "attention", "mlp"])
    else:
        p["direction_index"] = trial.suggest_float("direction_index", *direction_range(n_layers))
        for part in ("attn", "mlp"):
            p[f"{part}_max"] = trial.suggest_float(f"{part}_max", 0.0, 1.5)
            p[f"{part}_position"] = trial.suggest_float(f"{part}_position", 0.2, 1.0)
            p[f"{part}_min"] = trial.suggest_float(f"{part}_min", 0.0, 1.0)
            p[f"{part}_width"] = trial.suggest_float(f"{part}_width", 0.05, 0.8)
    return p


def saber_settings(params: dict[str, Any]) -> SaberSettings:
    return SaberSettings(
        **{k: params[k] for k in SABER_KEYS}, max_per_layer=params["per_layer"], passes=params["passes"]
    )


def norm_preserving(params: dict[str, Any]) -> bool:
    """Whether a point's edit is norm-preserving (a point without the parameter is plain)."""
    return bool(params.get("norm_preserving", False))


def ablations_for(params: dict[str, Any], setup: SearchSetup) -> list[Ablation]:
    """Rebuild a point's edit from its parameters (the same code path serves --pick).

    SABER's passes re-probe under the point's own edit, norm-preserving or plain, as `ablate` does.
    """
    if params["method"] == "saber":
        m, texts = setup.loaded, setup.probe_texts
        return saber(
            m.model,
            m.tokenizer,
            m.adapter,
            texts["harmful"],
            texts["harmless"],
            texts["capability"],
            setup.probe_opts,
            saber_settings(params),
            setup.batch_size,
            setup.probe,
            capability_vectors=setup.capability_vectors,
            measure_last=False,  # the separability left after the last pass changes no edit
            norm_preserving=norm_preserving(params),
        ).ablations
    tents = {
        part: Kernel(params[f"{part}_max"], params[f"{part}_position"], params[f"{part}_min"], params[f"{part}_width"])
        for part in ("attn", "mlp")
    }
    return kernel_ablations(setup.per_layer, params["direction_index"], tents["attn"], tents["mlp"])
