"""Directional attacks: weight-space ablations applied as hooks on the model under attack.

- arditi: one difference-of-means direction (layer and position chosen on a held-out split), at
  growing strength;
- saber: SABER's defaults, pass after pass, at full and half strength, as local edits (each layer's
  writers) and as global ones (every writer and the embedding): which one breaks a hardened copy
  differs from copy to copy;
- adaptive: re-extract on the attacked model, ablate, repeat; each phase's direction is the best
  layer's difference of means on the model as attacked so far, made orthogonal to earlier phases;
- subspace: k directions per layer (SVD), each layer's writers losing that layer's subspace.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from refusal_lab.ablate.arditi import arditi
from refusal_lab.ablate.edit import Ablation, hooked
from refusal_lab.ablate.saber import saber
from refusal_lab.config import SABER_SCOPES
from refusal_lab.core.activations import capture
from refusal_lab.core.artifacts import timed
from refusal_lab.probe.directions import best_layer_by_fdr, fdr, orthonormal_basis, probe_layers, project_out, unit
from refusal_lab.probe.stage import run_probe
from refusal_lab.prove.battery import Edit, Proposal, Target


def hooks(t: Target, ablations: list[Ablation]) -> Edit:
    frozen = list(ablations)
    return lambda: hooked(t.loaded.adapter, frozen)


@dataclass
class ArditiAttack:
    name: str = "arditi"
    threat: str = "directional"
    strengths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)

    def proposals(self, t: Target) -> Iterator[Proposal]:
        m, s = t.loaded, t.s
        harmful, harmless = t.extraction.texts("harmful"), t.extraction.texts("harmless")
        ids, cfg = t.refusal_ids, s.ablate.arditi
        with timed(t.log, "  arditi: direction selection over layers and positions"):
            choice = arditi(m.model, m.tokenizer, m.adapter, harmful, harmless, ids, cfg, s.batch_size, t.log)
        for a in self.strengths:
            where = {"layer": choice.layer, "position": choice.position, "strength": a}
            yield Proposal(where, hooks(t, [Ablation(choice.direction, a)]))


@dataclass
class SaberAttack:
    name: str = "saber"
    threat: str = "directional"
    strengths: tuple[float, ...] = (0.5, 1.0)
    scopes: tuple[str, ...] = SABER_SCOPES

    def proposals(self, t: Target) -> Iterator[Proposal]:
        for where, ablations in self.edits(t):
            yield Proposal(where, hooks(t, ablations))

    def edits(self, t: Target) -> Iterator[tuple[dict[str, Any], list[Ablation]]]:
        """Each proposal's setting and the ablations it applies (bench/random_edit_control.py reads them too)."""
        m, s, x = t.loaded, t.s, t.extraction
        texts = (x.texts("harmful"), x.texts("harmless"), x.texts("capability"))
        with timed(t.log, "  saber: directions and entanglement of the unedited model"):
            first = run_probe(m, x, s.probe, s.batch_size, s.cache_dir / "activations", lambda _m: None)
        for scope in self.scopes:  # pass 1 is the same probe; later passes re-probe the model as each scope edited it
            cfg = s.ablate.saber.model_copy(update={"scope": scope})
            with timed(t.log, f"  saber ({scope}): passes"):
                res = saber(
                    m.model, m.tokenizer, m.adapter, *texts, s.probe, cfg, s.batch_size, first,
                    capability_vectors=t.capability_vectors,
                )  # fmt: skip
            for i, p in enumerate(res.passes, 1):
                for c in self.strengths:
                    where = {"scope": scope, "passes": i, "strength": c}
                    yield where, [ab.scaled(c) for ab in res.ablations[: p.ablations]]


def last_token_vectors(t: Target, ablations: list[Ablation]) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-token vectors [n, L, H] of harmful and harmless extraction prompts, with the edits so far;
    the unedited model's are captured once per target and shared by every attack that reads them."""
    if not ablations and t.base_vectors is not None:
        return t.base_vectors
    m, bs = t.loaded, t.s.batch_size
    h, b = t.extraction.texts("harmful"), t.extraction.texts("harmless")
    with hooked(m.adapter, ablations):
        xh = capture(m.model, m.tokenizer, m.adapter, h, "last", bs, keep=len(h)).vectors[:, 0].double()
        xb = capture(m.model, m.tokenizer, m.adapter, b, "last", bs, keep=len(b)).vectors[:, 0].double()
    if not ablations:
        t.base_vectors = xh, xb
    return xh, xb


@dataclass
class AdaptiveAttack:
    """Multi-phase re-extraction, as the adaptive attacks that broke published defences do."""

    phases: int = 8
    name: str = "adaptive"
    threat: str = "directional"

    def proposals(self, t: Target) -> Iterator[Proposal]:
        ablations: list[Ablation] = []
        earlier: list[torch.Tensor] = []
        for phase in range(1, self.phases + 1):
            xh, xb = last_token_vectors(t, ablations)
            depth = max(1, int(xh.shape[1] * (1 - t.s.ablate.arditi.prune_last)))  # as Arditi et al.
            dirs: dict[int, torch.Tensor] = {}
            for layer in range(depth):
                d = xh[:, layer].mean(0) - xb[:, layer].mean(0)
                if t.s.probe.biproject:  # leave the average harmless activation where it is
                    d = project_out(d, xb[:, layer].mean(0))
                if earlier:
                    d = project_out(d, torch.stack(earlier, 1))
                if d.norm() >= 1e-9:
                    dirs[layer] = unit(d)
            if not dirs:
                return
            scores = [float(fdr(dirs[i][:, None], xh[:, i], xb[:, i])[0]) if i in dirs else 0.0 for i in range(depth)]
            layer = best_layer_by_fdr(scores, list(dirs))
            score, d = scores[layer], dirs[layer]
            earlier.append(d)
            ablations.append(Ablation(d, 1.0, embedding=True))
            yield Proposal({"phase": phase, "layer": layer, "fdr": score}, hooks(t, ablations))


@dataclass
class SubspaceAttack:
    """k directions per layer at every layer (not one global direction)."""

    ks: tuple[int, ...] = (1, 2, 4, 8)
    strengths: tuple[float, ...] = (0.5, 1.0)
    name: str = "subspace"
    threat: str = "directional"

    def proposals(self, t: Target) -> Iterator[Proposal]:
        xh, xb = last_token_vectors(t, [])
        kmax = min(max(self.ks), len(xh), len(xb))
        probe = probe_layers("svd", xh, xb, None, kmax, biproject=t.s.probe.biproject)
        n_layers = xh.shape[1]
        for k in sorted(k for k in self.ks if k <= kmax):
            per_layer = []
            for layer in range(n_layers):
                valid = probe.valid[layer, :k]
                dirs = orthonormal_basis(probe.directions[layer, :, :k][:, valid])
                if dirs.shape[1] == 0:
                    continue
                onehot = torch.zeros(n_layers, dtype=torch.float64)
                onehot[layer] = 1.0
                per_layer.append(Ablation(dirs, 1.0, onehot, embedding=False))
            for c in self.strengths:
                yield Proposal({"k": k, "strength": c}, hooks(t, [ab.scaled(c) for ab in per_layer]))
