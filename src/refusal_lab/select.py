"""Choosing what to ablate, where and how strongly: SABER, Arditi et al., projected, kernel.

Each method turns probe results (and, for Arditi and SABER, a few forward passes) into a list
of Ablations for edit.py. Searches use the hook form of the edit, so no model copy is made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.activations import capture
from refusal_lab.arch import Adapter
from refusal_lab.directions import Probe, probe_layers, unit
from refusal_lab.edit import Ablation, hooked
from refusal_lab.errors import UserError
from refusal_lab.evaluate import first_token_kl, last_logits, refusal_score

Log = Callable[[str], None]


def band_layers(n_layers: int, band: tuple[float, float]) -> list[int]:
    """Layers int(lo*L) .. int(hi*L), inclusive, clipped to the model (SABER's depth band)."""
    lo, hi = int(band[0] * n_layers), min(n_layers - 1, int(band[1] * n_layers))
    return list(range(lo, hi + 1))


# --- SABER -----------------------------------------------------------------------------------


@dataclass
class SaberConfig:
    """SABER's published defaults (Gemma-4-E4B release run) unless a measured reason says otherwise."""

    extraction: str = "svd"
    directions_per_layer: int = 4
    global_top_k: int = 14
    max_per_layer: int = 4
    alpha_base: float = 0.825
    alpha_entangled: float = 0.03
    entanglement_threshold: float = 0.55
    max_passes: int = 4
    decay: float = 0.7  # strength multiplier per further pass
    stop_separability: float = 0.01  # stop when the mean FDR left on the selected directions is below
    band: tuple[float, float] = (0.2, 0.8)
    shrinkage: float = 0.1
    cap_variance: float = 0.9
    biproject: bool = True  # directions orthogonal to the harmless mean (measured reason: tests/test_ablate.py)
    scope: str = "local"  # local: layer l's writers only (SABER); global: every writer and the embedding
    positions: str = "last"  # harmful/harmless positions re-probed each pass; "post": every post-instruction token


@dataclass
class Pick:
    layer: int
    index: int
    fdr: float
    rho: float
    score: float
    alpha: float


def saber_pick(probe: Probe, cfg: SaberConfig, strength: float = 1.0) -> list[Pick]:
    """Global top-k (layer, direction) pairs by FDR x (1 - rho) within the band, capped per layer."""
    layers = band_layers(probe.directions.shape[0], cfg.band)
    cands = [
        (float(probe.score[layer, j]), layer, j)
        for layer in layers
        for j in range(probe.directions.shape[2])
        if probe.valid[layer, j]
    ]
    cands.sort(reverse=True)
    picks: list[Pick] = []
    per_layer: dict[int, int] = {}
    for score, layer, j in cands:
        if len(picks) >= cfg.global_top_k:
            break
        if per_layer.get(layer, 0) >= cfg.max_per_layer or score <= 0:
            continue
        per_layer[layer] = per_layer.get(layer, 0) + 1
        rho = float(probe.rho[layer, j])
        alpha = cfg.alpha_base if rho <= cfg.entanglement_threshold else cfg.alpha_entangled
        picks.append(Pick(layer, j, float(probe.fdr[layer, j]), rho, score, alpha * strength))
    return picks


def picks_to_ablations(probe: Probe, picks: Sequence[Pick], n_layers: int, scope: str = "local") -> list[Ablation]:
    """Local (SABER): layer l's writers lose layer l's directions. Global: every writer loses all."""
    if scope == "global":
        dirs = torch.stack([probe.directions[p.layer, :, p.index] for p in picks], dim=1)
        return [Ablation(dirs, torch.tensor([p.alpha for p in picks]), None, embedding=True)]
    out = []
    for layer in sorted({p.layer for p in picks}):
        mine = [p for p in picks if p.layer == layer]
        dirs = torch.stack([probe.directions[layer, :, p.index] for p in mine], dim=1)
        scale = torch.zeros(n_layers, dtype=torch.float64)
        scale[layer] = 1.0
        out.append(Ablation(dirs, torch.tensor([p.alpha for p in mine]), scale, embedding=False))
    return out


@dataclass
class SaberPass:
    picks: list[Pick]
    separability_before: float
    separability_after: float


@dataclass
class SaberResult:
    ablations: list[Ablation]
    passes: list[SaberPass] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"passes": [asdict(p) for p in self.passes]}


def saber(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    adapter: Adapter,
    harmful: Sequence[str],
    harmless: Sequence[str],
    capability: Sequence[str],
    cfg: SaberConfig,
    batch_size: int = 16,
    first_probe: Probe | None = None,
    log: Log = lambda _m: None,
    capability_vectors: torch.Tensor | None = None,
) -> SaberResult:
    """Iterative SABER: probe, pick, ablate (as hooks), re-probe the edited model, until separable no more.

    Entanglement is always measured against the unedited model's capability activations
    (as SABER does); pass them in `capability_vectors` [n, L, H] to skip their capture.
    """
    xc = capability_vectors
    if xc is None:
        xc = capture(model, tok, adapter, capability, "last", batch_size, keep=len(capability)).vectors[:, 0]
    result = SaberResult([])
    probe = first_probe

    def edited_vectors() -> tuple[torch.Tensor, torch.Tensor]:
        """Harmful and harmless vectors [n x positions, L, H] of the model with the edits so far."""
        with hooked(adapter, result.ablations):
            xh = capture(model, tok, adapter, harmful, cfg.positions, batch_size, keep=len(harmful)).vectors
            xb = capture(model, tok, adapter, harmless, cfg.positions, batch_size, keep=len(harmless)).vectors
        return xh.flatten(0, 1), xb.flatten(0, 1)  # every position is a sample

    xh = xb = None
    for n in range(cfg.max_passes):
        if probe is None:
            if xh is None:
                xh, xb = edited_vectors()
            probe = probe_layers(
                cfg.extraction,
                xh,
                xb,
                xc,
                cfg.directions_per_layer,
                None,
                cfg.shrinkage,
                cfg.cap_variance,
                cfg.biproject,
            )
        picks = saber_pick(probe, cfg, cfg.decay**n)
        if not picks:
            break
        before = sum(p.fdr for p in picks) / len(picks)
        result.ablations += picks_to_ablations(probe, picks, adapter.num_layers, cfg.scope)
        xh, xb = edited_vectors()  # measures this pass and seeds the next one's probe
        after = _separability_left(xh, xb, picks, probe)
        result.passes.append(SaberPass(picks, before, after))
        log(
            f"  pass {n + 1}: {len(picks)} directions in layers {sorted({p.layer for p in picks})}, "
            f"mean FDR {before:.3f} -> {after:.3f}"
        )
        probe = None
        if after < cfg.stop_separability:
            break
    return result


def _separability_left(xh: torch.Tensor, xb: torch.Tensor, picks: Sequence[Pick], probe: Probe) -> float:
    """Mean FDR left on this pass's directions, measured against the spread before the pass.

    FDR is scale-invariant: a partial edit (alpha < 1) shrinks the gap and the spread alike and
    leaves FDR unchanged, so the gap after the pass is set against the pre-pass spread:
    FDR_before x (gap_after / gap_before)^2.
    """
    vals = []
    for p in picks:
        r = probe.directions[p.layer, :, p.index].double()
        gap0 = float((probe.mu_harmful[p.layer] - probe.mu_harmless[p.layer]).double() @ r)
        gap1 = float((xh[:, p.layer].double().mean(0) - xb[:, p.layer].double().mean(0)) @ r)
        vals.append(p.fdr * (gap1 / gap0) ** 2 if abs(gap0) > 1e-12 else 0.0)
    return sum(vals) / len(vals)


# --- Arditi et al. ---------------------------------------------------------------------------


@dataclass
class ArditiConfig:
    max_kl: float = 0.1
    prune_last: float = 0.2  # never choose a layer in the last 20%
    positions: str = "post"  # candidate positions: every post-instruction token, or "last"
    max_prompts: int = 32  # per set, for the selection passes


@dataclass
class ArditiChoice:
    layer: int
    position: int  # negative offset from the end of the prompt
    direction: torch.Tensor  # unit [H]
    ablation_score: float
    steering_score: float
    kl: float
    table: list[dict] = field(default_factory=list)
    relaxed: list[str] = field(default_factory=list)  # constraints that no candidate could meet


def _steer(adapter: Adapter, layer: int, vector: torch.Tensor):  # noqa: ANN202
    """Add a vector to the residual stream entering `layer` (activation addition)."""

    def pre_hook(_m: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            h = args[0]
            return (h + vector.to(h.device, h.dtype), *args[1:]), kwargs
        h = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": h + vector.to(h.device, h.dtype)}

    return adapter.layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)


def arditi(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    adapter: Adapter,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int],
    cfg: ArditiConfig,
    batch_size: int = 16,
    log: Log = lambda _m: None,
) -> ArditiChoice:
    """Pick (layer, position) whose difference-of-means direction best removes refusal when ablated.

    Constraints as in Arditi et al.: adding the vector must not reduce refusal on harmless
    prompts (steering score >= 0), first-token KL on harmless prompts <= max_kl, and the
    layer must not be in the last `prune_last` fraction of the model.
    """
    if not refusal_ids:
        raise UserError("the model refused none of the harmful probe prompts", "check the prompts or the model")
    sh = capture(model, tok, adapter, harmful, cfg.positions, batch_size, keep=0)
    sb = capture(model, tok, adapter, harmless, cfg.positions, batch_size, keep=0)
    diffs = sh.mean - sb.mean  # [P, L, H]
    val_h, val_b = list(harmful[: cfg.max_prompts]), list(harmless[: cfg.max_prompts])
    base_b = last_logits(model, tok, val_b, batch_size)
    n_pos, n_layers = diffs.shape[0], diffs.shape[1]
    limit = int(n_layers * (1 - cfg.prune_last))
    rows = []
    for pos in range(n_pos):
        for layer in range(n_layers):
            d = diffs[pos, layer]
            ab = [Ablation(unit(d))]
            with hooked(adapter, ab):
                abl = float(refusal_score(last_logits(model, tok, val_h, batch_size), refusal_ids).mean())
                kl = first_token_kl(base_b, last_logits(model, tok, val_b, batch_size))
            handle = _steer(adapter, layer, d)
            try:
                steer = float(refusal_score(last_logits(model, tok, val_b, batch_size), refusal_ids).mean())
            finally:
                handle.remove()
            rows.append(
                {
                    "layer": layer,
                    "position": pos - n_pos,
                    "ablation_score": abl,
                    "steering_score": steer,
                    "kl": kl,
                    "direction": unit(d),
                }
            )
    # Constraints in Arditi et al.'s order; where none is met, the KL limit, then the steering
    # check, is relaxed and the relaxation recorded, so a method that falls short still returns.
    rules = {
        "depth": lambda r: r["layer"] < limit,
        "steering": lambda r: r["steering_score"] >= 0,
        "kl": lambda r: r["kl"] <= cfg.max_kl,
    }
    relaxed: list[str] = []
    finite = [r for r in rows if all(map(math.isfinite, (r["ablation_score"], r["kl"], r["steering_score"])))]
    for drop in ([], ["kl"], ["kl", "steering"]):
        ok = [r for r in finite if all(rule(r) for name, rule in rules.items() if name not in drop)]
        if ok:
            relaxed = drop
            break
    else:
        raise UserError("no (layer, position) candidate is usable", "check the prompt sets and the model")
    r = min(ok, key=lambda r: r["ablation_score"])
    table = [{k: v for k, v in row.items() if k != "direction"} for row in rows]
    choice = ArditiChoice(
        r["layer"], r["position"], r["direction"], r["ablation_score"], r["steering_score"], r["kl"], table, relaxed
    )
    log(
        f"  arditi: layer {choice.layer}, position {choice.position}, refusal score {choice.ablation_score:.2f}, "
        f"KL {choice.kl:.4f}" + (f" (relaxed: {', '.join(relaxed)})" if relaxed else "")
    )
    return choice


# --- projected and kernel --------------------------------------------------------------------


@dataclass
class Kernel:
    """Heretic-style per-layer strength: a tent peaking at `position`, down to min at `width`."""

    max_weight: float = 1.0
    position: float = 0.6  # fraction of depth
    min_fraction: float = 0.5  # min weight as a fraction of max
    width: float = 0.4  # fraction of depth; layers further away get 0

    def weights(self, n_layers: int) -> torch.Tensor:
        last = max(1, n_layers - 1)
        peak, dist = self.position * last, max(1e-6, self.width * last)
        lo = self.min_fraction * self.max_weight
        w = torch.zeros(n_layers, dtype=torch.float64)
        for layer in range(n_layers):
            delta = abs(layer - peak)
            if delta <= dist:
                w[layer] = self.max_weight + (delta / dist) * (lo - self.max_weight)
        return w


def interpolated_direction(per_layer: torch.Tensor, index: float) -> torch.Tensor:
    """Blend the unit directions of the two layers around a fractional layer index."""
    n = per_layer.shape[0]
    index = min(max(index, 0.0), n - 1.0)
    i = math.floor(index)
    f = index - i
    j = min(i + 1, n - 1)
    return unit((1 - f) * unit(per_layer[i]) + f * unit(per_layer[j]))


def kernel_ablations(per_layer: torch.Tensor, direction_index: float, attention: Kernel, mlp: Kernel) -> list[Ablation]:
    """One direction for all layers, a separate strength kernel for attention and MLP writers."""
    d = interpolated_direction(per_layer, direction_index)
    n = per_layer.shape[0]
    return [
        Ablation(d, 1.0, attention.weights(n), embedding=False, components=("attention",)),
        Ablation(d, 1.0, mlp.weights(n), embedding=False, components=("mlp",)),
    ]
