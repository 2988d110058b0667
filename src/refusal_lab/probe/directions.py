"""Refusal directions and their scores: plain functions over float64 tensors.

Extraction methods, per layer (harmful set h, harmless set b, capability set c):
- dom:          unit(mu_h - mu_b)                                    (Arditi et al.)
- projected:    dom made orthogonal to mu_b                           (projected abliteration)
- svd:          top-k right singular vectors of [x_h - mu_b]          (SABER's multi-direction)
- svd_paired:   top-k right singular vectors of [x_h,i - x_b,i]
- lda:          Fisher LDA with shrinkage; multi-class over harmful categories when known
- whitened_svd: svd after whitening by the harmless covariance (shrunk), mapped back
Scores, per layer and direction d:
- FDR(d) = (d . (mu_h - mu_b))^2 / (d' S_h d + d' S_b d)
- rho(d) = ||C C' d||^2 / ||d||^2, C the top principal basis of capability activations
- score = FDR x (1 - rho)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusal_lab.errors import UserError

METHODS = ("dom", "projected", "svd", "svd_paired", "lda", "whitened_svd")


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


def diff_of_means(mu_harmful: torch.Tensor, mu_harmless: torch.Tensor) -> torch.Tensor:
    """Arditi et al.'s direction: the normalised difference of class means (per layer if 2-D)."""
    d = mu_harmful - mu_harmless
    return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def orthonormal_basis(vectors: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """Columns spanning the same space as `vectors` [hidden, k], orthonormal; drops dependent ones."""
    return gram_schmidt(vectors, tol)[0]


def gram_schmidt(vectors: torch.Tensor, tol: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormalise columns in order (earlier ones keep their direction); also the kept indices."""
    if vectors.ndim == 1:
        vectors = vectors[:, None]
    v = vectors.double()
    scale = float(v.norm(dim=0).max()) if v.numel() else 1.0
    cols, kept = [], []
    for j in range(v.shape[1]):
        x = v[:, j].clone()
        for _ in range(2):  # twice is enough for numerical orthogonality
            for q in cols:
                x -= (q @ x) * q
        if x.norm() > tol * max(1.0, scale):
            cols.append(x / x.norm())
            kept.append(j)
    basis = torch.stack(cols, dim=1) if cols else torch.zeros(v.shape[0], 0, dtype=torch.float64)
    return basis, torch.tensor(kept, dtype=torch.long)


def project_out(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove from v its component in span(basis columns); basis need not be orthonormal."""
    q = orthonormal_basis(basis)
    return v - q @ (q.T @ v)


def projected_directions(mu_harmful_groups: dict[str, torch.Tensor], mu_harmless: torch.Tensor) -> torch.Tensor:
    """One direction per harmful group, each made orthogonal to the harmless mean, orthonormalised.

    Removing the harmless-mean component keeps the edit from shifting ordinary prompts;
    separate group directions cover refusals that differ by kind. Returns [hidden, k].
    """
    cols = [project_out(mu - mu_harmless, mu_harmless) for mu in mu_harmful_groups.values()]
    return orthonormal_basis(torch.stack(cols, dim=1))


def _cov(x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(0)
    return xc.T @ xc / max(1, len(x) - 1)


def shrunk(cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """(1 - s) S + s (tr S / H) I: keeps LDA and whitening stable when prompts < hidden size."""
    h = cov.shape[0]
    mu = torch.trace(cov) / h
    return (1 - shrinkage) * cov + shrinkage * mu.clamp_min(1e-12) * torch.eye(h, dtype=cov.dtype)


def _top_right_singular(d: torch.Tensor, k: int, sign_ref: torch.Tensor) -> torch.Tensor:
    _, _, vh = torch.linalg.svd(d, full_matrices=False)
    v = vh[:k].T  # [H, k]
    signs = torch.sign(sign_ref @ v)
    signs[signs == 0] = 1
    return v * signs


def _inv_sqrt(m: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(m)
    return evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T


def layer_directions(
    method: str,
    xh: torch.Tensor,
    xb: torch.Tensor,
    k: int,
    groups: list[str] | None = None,
    shrinkage: float = 0.1,
) -> torch.Tensor:
    """Directions [H, k'] (k' <= k, unit columns) at one layer from per-prompt vectors [n, H]."""
    mu_h, mu_b = xh.mean(0), xb.mean(0)
    delta = mu_h - mu_b
    if method == "dom":
        return unit(delta)[:, None]
    if method == "projected":
        return unit(project_out(delta, mu_b))[:, None]
    if method == "svd":
        return _top_right_singular(xh - mu_b, k, delta)
    if method == "svd_paired":
        n = min(len(xh), len(xb))
        return _top_right_singular(xh[:n] - xb[:n], k, delta)
    if method == "whitened_svd":
        w = _inv_sqrt(shrunk(_cov(xb), shrinkage))
        v = _top_right_singular((xh - mu_b) @ w, k, delta @ w)
        back = w @ v
        return back / back.norm(dim=0, keepdim=True)
    if method == "lda":
        classes = [xb] + (
            [xh[[i for i, g in enumerate(groups) if g == c]] for c in sorted(set(groups))] if groups else [xh]
        )
        classes = [c for c in classes if len(c)]
        sw = sum((len(c) - 1) * _cov(c) for c in classes) / max(1, sum(len(c) for c in classes) - len(classes))
        grand = torch.cat(classes).mean(0)
        sb = sum(len(c) * torch.outer(c.mean(0) - grand, c.mean(0) - grand) for c in classes) / sum(
            len(c) for c in classes
        )
        w = _inv_sqrt(shrunk(sw, shrinkage))
        evals, evecs = torch.linalg.eigh(w @ sb @ w)
        order = torch.argsort(evals, descending=True)[: min(k, len(classes) - 1)]
        dirs = w @ evecs[:, order]
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        signs = torch.sign(delta @ dirs)
        signs[signs == 0] = 1
        return dirs * signs
    raise UserError(f"unknown direction method {method!r}", f"use one of {', '.join(METHODS)}")


def fdr(d: torch.Tensor, xh: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """Fisher discriminant ratio of each column of d [H, k] (float64)."""
    ph, pb = xh @ d, xb @ d  # [n, k]
    num = (ph.mean(0) - pb.mean(0)) ** 2
    den = ph.var(0, unbiased=True) + pb.var(0, unbiased=True)
    return num / den.clamp_min(1e-12)


def layers_by_fdr(fdr_by_layer: torch.Tensor | Sequence[float], layers: Sequence[int] | None = None) -> list[int]:
    """Layers (all, or those in `layers`) from the most separable down; ties keep layer order.

    The one rule for "the layer whose difference of means separates best": the projected method's
    and the search's start, the kernel's default centre, and the attacks' global directions read it.
    """
    scores = [float(x) for x in fdr_by_layer]
    return sorted(range(len(scores)) if layers is None else layers, key=lambda i: -scores[i])


def best_layer_by_fdr(fdr_by_layer: torch.Tensor | Sequence[float], layers: Sequence[int] | None = None) -> int:
    """The most separable layer (all, or among `layers`): the first of `layers_by_fdr`."""
    return layers_by_fdr(fdr_by_layer, layers)[0]


def capability_basis(xc: torch.Tensor, variance: float = 0.9, max_rank: int = 64) -> torch.Tensor:
    """Top principal directions [H, m] of centred capability activations covering `variance`."""
    xc = xc - xc.mean(0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    share = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-12)
    m = min(int((share < variance).sum()) + 1, max_rank, len(s))
    return vh[:m].T


def entanglement(d: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """rho = ||C C' d||^2 / ||d||^2 for each column of d."""
    return ((basis.T @ d) ** 2).sum(0) / (d**2).sum(0).clamp_min(1e-12)


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised squared singular values: 1 for one direction, k for k equal ones."""
    s2 = torch.linalg.svdvals(x) ** 2
    p = s2 / s2.sum().clamp_min(1e-12)
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))


@dataclass
class Probe:
    """Per-layer directions and scores: the probe stage's artifact."""

    method: str
    directions: torch.Tensor  # [L, H, k] float64 (zero columns where a layer has fewer)
    valid: torch.Tensor  # [L, k] bool
    fdr: torch.Tensor  # [L, k]
    rho: torch.Tensor  # [L, k]
    mu_harmful: torch.Tensor  # [L, H]
    mu_harmless: torch.Tensor  # [L, H]

    @property
    def score(self) -> torch.Tensor:
        return torch.where(self.valid, self.fdr * (1 - self.rho), torch.zeros_like(self.fdr))

    def summary(self, diffs_at_best: torch.Tensor | None = None) -> dict[str, float]:
        """How concentrated the separability is: top direction share, top layer share, eff. rank."""
        f = torch.where(self.valid, self.fdr, torch.zeros_like(self.fdr))
        total = float(f.sum()) or 1.0
        out = {
            "top_direction_share": float(f.max()) / total,
            "top_layer_share": float(f.sum(1).max()) / total,
            "best_layer": best_layer_by_fdr(f.sum(1)),
        }
        if diffs_at_best is not None:
            out["effective_rank"] = effective_rank(diffs_at_best)
        return out


def probe_layers(
    method: str,
    xh: torch.Tensor,
    xb: torch.Tensor,
    xc: torch.Tensor | None,
    k: int,
    groups: list[str] | None = None,
    shrinkage: float = 0.1,
    cap_variance: float = 0.9,
    biproject: bool = False,
) -> Probe:
    """Directions and scores at every layer from per-prompt vectors [n, L, H].

    biproject: make every direction orthogonal to that layer's harmless mean, so removing it
    leaves the average harmless activation where it was (projected abliteration).
    """
    n_layers, hidden = xh.shape[1], xh.shape[2]
    if len(xh) < 2 or len(xb) < 2:
        raise UserError(f"need at least 2 harmful and 2 harmless prompts, got {len(xh)} and {len(xb)}", "add prompts")
    if method in ("svd", "svd_paired", "whitened_svd") and k > min(len(xh), len(xb)):
        raise UserError(
            f"{k} directions per layer asked from only {min(len(xh), len(xb))} prompts per set",
            "use more prompts or fewer directions (--directions-per-layer)",
        )
    xh, xb = xh.double(), xb.double()
    dirs = torch.zeros(n_layers, hidden, k, dtype=torch.float64)
    valid = torch.zeros(n_layers, k, dtype=torch.bool)
    f = torch.zeros(n_layers, k, dtype=torch.float64)
    rho = torch.zeros(n_layers, k, dtype=torch.float64)
    for layer in range(n_layers):
        d = layer_directions(method, xh[:, layer], xb[:, layer], k, groups, shrinkage)
        if biproject:
            d = orthonormal_basis(project_out(d, xb[:, layer].mean(0)))
        j = d.shape[1]
        dirs[layer, :, :j], valid[layer, :j] = d, True
        f[layer, :j] = fdr(d, xh[:, layer], xb[:, layer])
        if xc is not None and len(xc) > 1:
            rho[layer, :j] = entanglement(d, capability_basis(xc[:, layer].double(), cap_variance))
    return Probe(method, dirs, valid, f, rho, xh.mean(0), xb.mean(0))
