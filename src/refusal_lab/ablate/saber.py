"""SABER: several directions per layer, ranked by separability and entanglement, removed in passes.

Each pass probes (the edited model, through hooks; on the weights for a norm-preserving edit),
picks the global top-k (layer, direction) pairs by FDR x (1 - rho) within a depth band, at most N
per layer, with a gentle strength for entangled directions, and adds their ablations; strengths
decay by pass, and passes stop when little separability is left on the directions just removed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.ablate.edit import COMPONENTS, Ablation, edited
from refusal_lab.config import ProbeSettings, SaberSettings
from refusal_lab.core.activations import capture
from refusal_lab.core.arch import Adapter
from refusal_lab.probe.directions import Probe
from refusal_lab.probe.stage import directions_of

Log = Callable[[str], None]


def band_layers(n_layers: int, lo: float, hi: float) -> list[int]:
    """Layers int(lo*L) .. int(hi*L), inclusive, clipped to the model (SABER's depth band)."""
    return list(range(int(lo * n_layers), min(n_layers - 1, int(hi * n_layers)) + 1))


@dataclass
class Pick:
    layer: int
    index: int
    fdr: float
    rho: float
    score: float
    alpha: float


def saber_pick(probe: Probe, cfg: SaberSettings, strength: float = 1.0) -> list[Pick]:
    """Global top-k (layer, direction) pairs by FDR x (1 - rho) within the band, capped per layer."""
    layers = band_layers(probe.directions.shape[0], cfg.band_lo, cfg.band_hi)
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
        if len(picks) >= cfg.top_k:
            break
        if per_layer.get(layer, 0) >= cfg.max_per_layer or score <= 0:
            continue
        per_layer[layer] = per_layer.get(layer, 0) + 1
        rho = float(probe.rho[layer, j])
        alpha = cfg.alpha if rho <= cfg.entanglement_threshold else cfg.alpha_entangled
        picks.append(Pick(layer, j, float(probe.fdr[layer, j]), rho, score, alpha * strength))
    return picks


def components_of(cfg: SaberSettings) -> tuple[str, ...]:
    return COMPONENTS if cfg.components == "both" else (cfg.components,)


def picks_to_ablations(probe: Probe, picks: Sequence[Pick], n_layers: int, cfg: SaberSettings) -> list[Ablation]:
    """Local (SABER): layer l's writers lose layer l's directions. Global: every writer loses all."""
    parts = components_of(cfg)
    if cfg.scope == "global":
        dirs = torch.stack([probe.directions[p.layer, :, p.index] for p in picks], dim=1)
        return [Ablation(dirs, torch.tensor([p.alpha for p in picks]), None, embedding=True, components=parts)]
    out = []
    for layer in sorted({p.layer for p in picks}):
        mine = [p for p in picks if p.layer == layer]
        dirs = torch.stack([probe.directions[layer, :, p.index] for p in mine], dim=1)
        scale = torch.zeros(n_layers, dtype=torch.float64)
        scale[layer] = 1.0
        out.append(Ablation(dirs, torch.tensor([p.alpha for p in mine]), scale, embedding=False, components=parts))
    return out


@dataclass
class SaberPass:
    picks: list[Pick]
    separability_before: float
    separability_after: float | None  # None: the last pass, not re-measured (measure_last=False)
    ablations: int = 0  # ablations in the result once this pass is done (the passes so far)


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
    probe_opts: ProbeSettings,
    cfg: SaberSettings,
    batch_size: int = 16,
    first_probe: Probe | None = None,
    log: Log = lambda _m: None,
    capability_vectors: torch.Tensor | None = None,
    measure_last: bool = True,
    norm_preserving: bool = False,
) -> SaberResult:
    """Iterative SABER: probe, pick, ablate (as hooks), re-probe the edited model, until separable no more.

    Directions are extracted as [probe] says (SABER's own: svd, 4 per layer, last token).
    Entanglement is always measured against the unedited model's capability activations
    (as SABER does); pass them in `capability_vectors` [n, L, H] to skip their capture.
    Every pass re-probes the edited model to measure the separability it left; measure_last=False
    skips that capture after the last pass (the search: it costs a whole probe and changes no edit).
    norm_preserving: the passes re-probe the model under the norm-preserving edit (on the weights),
    the edit the export will hold, instead of the plain one.
    """
    xc = capability_vectors
    if xc is None:
        xc = capture(model, tok, adapter, capability, "last", batch_size, keep=len(capability)).vectors[:, 0]
    result = SaberResult([])
    probe = first_probe

    def edited_vectors() -> tuple[torch.Tensor, torch.Tensor]:
        """Harmful and harmless vectors [n x positions, L, H] of the model with the edits so far."""
        pos = probe_opts.positions
        with edited(adapter, result.ablations, norm_preserving):
            xh = capture(model, tok, adapter, harmful, pos, batch_size, keep=len(harmful)).vectors
            xb = capture(model, tok, adapter, harmless, pos, batch_size, keep=len(harmless)).vectors
        return xh.flatten(0, 1), xb.flatten(0, 1)  # every position is a sample

    xh = xb = None
    for n in range(cfg.passes):
        if probe is None:
            if xh is None:
                xh, xb = edited_vectors()
            probe = directions_of(probe_opts, xh, xb, xc)
        picks = saber_pick(probe, cfg, cfg.decay**n)
        if not picks:
            break
        before = sum(p.fdr for p in picks) / len(picks)
        result.ablations += picks_to_ablations(probe, picks, adapter.num_layers, cfg)
        if n == cfg.passes - 1 and not measure_last:
            result.passes.append(SaberPass(picks, before, None, len(result.ablations)))
            break
        xh, xb = edited_vectors()  # measures this pass and seeds the next one's probe
        after = separability_left(xh, xb, picks, probe)
        result.passes.append(SaberPass(picks, before, after, len(result.ablations)))
        layers = sorted({p.layer for p in picks})
        log(f"  pass {n + 1}: {len(picks)} directions in layers {layers}, mean FDR {before:.3f} -> {after:.3f}")
        probe = None
        if after < cfg.stop_separability:
            break
    return result


def separability_left(xh: torch.Tensor, xb: torch.Tensor, picks: Sequence[Pick], probe: Probe) -> float:
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
