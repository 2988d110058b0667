"""Direction extraction and scores on synthetic data with planted structure (float64)."""

from __future__ import annotations

import pytest
import torch

from refusal_lab.errors import UserError
from refusal_lab.probe.directions import (
    METHODS,
    best_layer_by_fdr,
    capability_basis,
    effective_rank,
    entanglement,
    fdr,
    gram_schmidt,
    layer_directions,
    layers_by_fdr,
    probe_layers,
)

H = 24


def planted(n: int = 200, seed: int = 0):
    """Harmless ~ N(m, I); harmful = harmless + one of three planted offsets (categories)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(H, 3, generator=g, dtype=torch.float64))
    m = torch.randn(H, generator=g, dtype=torch.float64)
    xb = m + torch.randn(n, H, generator=g, dtype=torch.float64)
    cats = [i % 3 for i in range(n)]
    xh = m + torch.randn(n, H, generator=g, dtype=torch.float64) + 6 * basis[:, cats].T
    return xh, xb, basis, [str(c) for c in cats]


def subspace_overlap(d: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return ((basis.T @ d) ** 2).sum(0)


@pytest.mark.parametrize("method", ["svd", "svd_paired", "whitened_svd", "lda"])
def test_multi_direction_methods_find_the_planted_subspace(method):
    xh, xb, basis, cats = planted()
    d = layer_directions(method, xh, xb, 3, cats if method == "lda" else None)
    assert d.shape == (H, 3)
    torch.testing.assert_close(d.norm(dim=0), torch.ones(3, dtype=torch.float64))
    assert subspace_overlap(d, basis).min() > 0.8


def test_dom_and_projected():
    xh, xb, basis, _ = planted()
    d = layer_directions("dom", xh, xb, 1)[:, 0]
    assert subspace_overlap(d[:, None], basis) > 0.9
    p = layer_directions("projected", xh, xb, 1)[:, 0]
    assert abs(float(p @ xb.mean(0))) < 1e-9


def test_fdr_matches_the_formula_and_ranks_the_true_direction_first():
    xh, xb, basis, _ = planted()
    other = torch.linalg.qr(torch.cat([basis, torch.randn(H, 1, dtype=torch.float64)], 1))[0][:, 3:]
    d = torch.cat([basis[:, :1], other], dim=1)  # a planted direction and one orthogonal to all of them
    f = fdr(d, xh, xb)
    ph, pb = xh @ d[:, 0], xb @ d[:, 0]
    manual = (ph.mean() - pb.mean()) ** 2 / (ph.var() + pb.var())
    torch.testing.assert_close(f[0], manual)
    assert f[0] > 10 * f[1]


def test_entanglement_is_one_inside_the_capability_span_and_zero_outside():
    g = torch.Generator().manual_seed(1)
    span, _ = torch.linalg.qr(torch.randn(H, 2, generator=g, dtype=torch.float64))
    xc = torch.randn(100, 2, generator=g, dtype=torch.float64) @ span.T * 5
    c = capability_basis(xc, variance=0.999)
    inside = span[:, :1]
    outside = torch.linalg.qr(torch.cat([span, torch.randn(H, 1, generator=g, dtype=torch.float64)], 1))[0][:, 2:]
    torch.testing.assert_close(entanglement(inside, c), torch.ones(1, dtype=torch.float64), atol=1e-8, rtol=0)
    assert float(entanglement(outside, c)) < 1e-8


def test_effective_rank_and_gram_schmidt():
    q = torch.linalg.qr(torch.randn(H, 3, dtype=torch.float64))[0]
    assert effective_rank(q) == pytest.approx(3.0)
    assert effective_rank(q[:, :1]) == pytest.approx(1.0)
    v = torch.stack([q[:, 0], q[:, 0] + q[:, 1], 2 * q[:, 0]], 1)
    basis, kept = gram_schmidt(v)
    assert kept.tolist() == [0, 1] and torch.allclose(basis[:, 0], q[:, 0])


def test_probe_layers_scores_and_summary():
    xh, xb, _, _ = planted()
    stack = lambda x: torch.stack([x * 0.1, x, x * 0.5], dim=1)  # noqa: E731
    p = probe_layers("svd", stack(xh), stack(xb), stack(xb[:50]), 3)
    assert p.directions.shape == (3, H, 3) and bool(p.valid.all())
    s = p.summary()
    assert 0 < s["top_direction_share"] <= s["top_layer_share"] <= 1
    assert set(METHODS) >= {"dom", "svd", "lda"}


def test_too_few_prompts_for_the_directions_asked():
    xh, xb, _, _ = planted(n=3)
    with pytest.raises(UserError, match="directions per layer"):
        probe_layers("svd", xh[:, None], xb[:, None], None, 4)


def test_separability_left_falls_with_a_partial_edit_although_fdr_does_not():
    """FDR is scale-invariant, so SABER's residual measure compares the new gap with the old spread."""
    from refusal_lab.ablate.saber import Pick
    from refusal_lab.ablate.saber import separability_left as _separability_left

    xh, xb, _, _ = planted()
    stack = lambda x: torch.stack([x, x], dim=1)  # noqa: E731
    p = probe_layers("svd", stack(xh), stack(xb), stack(xb[:50]), 1)
    r = p.directions[1, :, 0]
    f0 = float(p.fdr[1, 0])
    pick = Pick(1, 0, f0, 0.0, f0, 0.825)
    shrink = lambda x: x - 0.825 * torch.outer(x @ r, r)  # noqa: E731 - what a 0.825 edit leaves
    eh, eb = stack(shrink(xh)), stack(shrink(xb))
    torch.testing.assert_close(fdr(r[:, None], eh[:, 1], eb[:, 1])[0], torch.tensor(f0, dtype=torch.float64))
    assert _separability_left(stack(xh), stack(xb), [pick], p) == pytest.approx(f0)
    assert _separability_left(eh, eb, [pick], p) == pytest.approx(f0 * 0.175**2)


def test_the_most_separable_layer_is_planted_where_the_classes_differ_most():
    """Per-layer FDR of the difference of means, with the offset planted strongest at layer 3; the
    best layer overall, within a range that excludes it, and the first of ties."""
    g = torch.Generator().manual_seed(0)
    n, layers = 64, 6
    push = torch.tensor([0.0, 0.5, 1.0, 3.0, 1.5, 0.2], dtype=torch.float64)
    xb = torch.randn(n, layers, H, generator=g, dtype=torch.float64)
    xh = torch.randn(n, layers, H, generator=g, dtype=torch.float64)
    xh[:, :, 0] += push
    probe = probe_layers("dom", xh, xb, None, 1)
    assert best_layer_by_fdr(probe.fdr[:, 0]) == 3
    assert best_layer_by_fdr(probe.fdr[:, 0], [0, 1, 2, 4, 5]) == 4
    assert layers_by_fdr(probe.fdr[:, 0])[:3] == [3, 4, 2]
    assert best_layer_by_fdr([1.0, 2.0, 2.0, 0.5]) == 1 and layers_by_fdr([1.0, 2.0, 2.0], [2, 1, 0]) == [2, 1, 0]
