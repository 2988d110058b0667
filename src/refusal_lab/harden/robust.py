"""Training-time defences aimed at ablation: the pieces the hardening loss can switch on.

- A refusal subspace re-estimated on the model being trained (per layer, k SVD directions of
  harmful vs harmless last-token activations, and the best layers' differences of means as
  global directions), so training sees the directions an attacker would extract now.
- Ablation during training: those directions removed from the writers' outputs, at random layers
  and positions (partial) or at every layer and position, as a weight edit would (full).
- Invariance: the next-token distribution with and without the ablation kept close on harmful
  prompts, with a margin that keeps the refusal itself likely.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from refusal_lab.ablate.edit import Ablation, hooked
from refusal_lab.core.arch import Adapter
from refusal_lab.probe.directions import fdr, layers_by_fdr, orthonormal_basis, probe_layers, project_out, unit


@dataclass(frozen=True)
class RefusalSubspace:
    per_layer: list[torch.Tensor]  # [H, k_l] orthonormal, one per layer
    global_dirs: torch.Tensor  # [H, g] unit differences of means of the most separable layers

    def joined(self, other: RefusalSubspace) -> RefusalSubspace:
        """Both subspaces at once (a later pass's directions, found with this one removed, added to it)."""
        pairs = zip(self.per_layer, other.per_layer, strict=True)
        per_layer = [orthonormal_basis(torch.cat([a, b], 1)) for a, b in pairs]
        return RefusalSubspace(per_layer, torch.cat([self.global_dirs, other.global_dirs], 1))


def estimate_subspace(xh: torch.Tensor, xb: torch.Tensor, k: int, n_global: int = 2) -> RefusalSubspace:
    """From last-token activations [n, L, H] of harmful and harmless prompts (float64)."""
    k = max(1, min(k, len(xh) - 1, len(xb) - 1))
    probe = probe_layers("svd", xh, xb, None, k, biproject=True)
    per_layer = [orthonormal_basis(probe.directions[layer][:, probe.valid[layer]]) for layer in range(xh.shape[1])]
    doms = [unit(project_out(xh[:, i].mean(0) - xb[:, i].mean(0), xb[:, i].mean(0))) for i in range(xh.shape[1])]
    scores = [float(fdr(d[:, None], xh[:, i], xb[:, i])[0]) for i, d in enumerate(doms)]
    return RefusalSubspace(per_layer, torch.stack([doms[i] for i in layers_by_fdr(scores)[:n_global]], 1))


def subspace_ablations(
    sub: RefusalSubspace, n_layers: int, layers: set[int] | None, use_global: bool
) -> list[Ablation]:
    """The subspace as full-strength edits: each layer's writers lose that layer's directions (on `layers`,
    None: all) together with the global ones (use_global), and the embedding the global ones."""
    out = []
    for layer in range(n_layers):
        dirs = [sub.per_layer[layer]] if layers is None or layer in layers else []
        dirs += [sub.global_dirs] if use_global else []
        if dirs:
            only = torch.zeros(n_layers, dtype=torch.float64)
            only[layer] = 1.0
            out.append(Ablation(torch.cat(dirs, 1), 1.0, only, embedding=False))
    if use_global:
        out.append(Ablation(sub.global_dirs, 1.0, torch.zeros(n_layers, dtype=torch.float64), embedding=True))
    return out


def ablating(
    adapter: Adapter,
    sub: RefusalSubspace,
    layers: set[int] | None = None,
    positions: torch.Tensor | None = None,
    use_global: bool = False,
    resolve: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> AbstractContextManager[None]:
    """The subspace removed from writer outputs while the model trains (gradients reach the model): per
    layer on `layers` (None: all), at the positions where `positions` [batch, seq] is 1 (None: all);
    with use_global, the global directions from every writer and the embedding too. `resolve` maps a
    writer to the module that wraps it (a LoRA layer), so the adapter's own contribution is ablated too."""
    ablations = subspace_ablations(sub, adapter.num_layers, layers, use_global)
    return hooked(adapter, ablations, positions=positions, resolve=resolve)


def first_reply_logits(logits: torch.Tensor, prompt_end: torch.Tensor) -> torch.Tensor:
    """[batch, vocab]: the logits that predict each row's first reply token (right-padded rows)."""
    return logits[torch.arange(len(logits)), (prompt_end - 1).clamp_min(0)]


def invariance_loss(clean: torch.Tensor, ablated: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """KL(clean || ablated) of first-reply distributions, plus a hinge keeping the clean target likely.

    Without the hinge, invariance is also reached by never refusing at all.
    """
    p = torch.log_softmax(clean.float(), -1)
    q = torch.log_softmax(ablated.float(), -1)
    kl = (p.detach().exp() * (p.detach() - q)).sum(-1).mean()
    return kl + keep_likely(clean, target, margin)


def keep_likely(logits: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean hinge wanting log p(target) >= -margin at each row's first reply token; zero once it holds.

    One-sided: it bites only where a reply's opening is slipping away (a refusal on a harmful
    prompt, an answer on a harmless one), and leaves the rest of the distribution free.
    """
    logp = torch.log_softmax(logits.float(), -1).gather(-1, target[:, None]).squeeze(-1)
    return torch.relu(-margin - logp).mean()
