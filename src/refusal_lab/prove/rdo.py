"""A gradient-optimised refusal direction ("The Geometry of Refusal", refusal direction optimisation).

A unit direction r is trained so that removing it from everything written into the residual
stream (every writer's output and the embedding, as a weight edit would) makes the model's own
refusal openers unlikely on harmful prompts, while a KL term keeps harmless prompts' next-token
distributions where they were. Only r is trained; the model's weights stay frozen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from refusal_lab.ablate.edit import Ablation, hooked
from refusal_lab.core.generate import encode, tail_logits
from refusal_lab.prove.battery import Proposal, Target
from refusal_lab.prove.directional import hooks, last_token_vectors


def _first_logits(model: torch.nn.Module, tok: object, prompts: list[str]) -> torch.Tensor:
    batch = encode(tok, prompts, next(model.parameters()).device)
    return tail_logits(model, 1, **batch)[:, -1, :].float()


def optimise_direction(t: Target, steps: int, lr: float, batch: int = 16) -> tuple[torch.Tensor, list[float]]:
    """Train r; returns the unit direction and the loss per step."""
    m = t.loaded
    model, tok, adapter = m.model, m.tokenizer, m.adapter
    harmful, harmless = t.extraction.texts("harmful"), t.extraction.texts("harmless")
    ids = list(t.refusal_ids)
    xh, xb = last_token_vectors(t, [])
    layer = int(((xh.mean(0) - xb.mean(0)).norm(dim=-1)).argmax())
    g = torch.Generator().manual_seed(t.seed)
    start = xh[:, layer].mean(0) - xb[:, layer].mean(0)
    start = start / start.norm() + 0.3 * torch.randn(start.shape, generator=g, dtype=start.dtype) / start.numel() ** 0.5
    device = next(model.parameters()).device
    v = start.to(device, torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses = []
    try:
        with torch.no_grad():
            base = {
                i: torch.log_softmax(_first_logits(model, tok, harmless[i : i + batch]), -1)
                for i in range(0, len(harmless), batch)
            }
        order = torch.Generator().manual_seed(t.seed)
        for _ in range(steps):
            hi = torch.randint(0, max(1, len(harmful) - batch + 1), (1,), generator=order).item()
            bi = batch * torch.randint(0, len(base), (1,), generator=order).item()
            with hooked(adapter, [Ablation(v)], differentiable=True):  # gradients reach v
                p = torch.softmax(_first_logits(model, tok, harmful[hi : hi + batch]), -1)[:, ids].sum(-1)
                refusal = -torch.log1p(-p.clamp(max=1 - 1e-6)).mean()  # -log P(not a refusal opener)
                q = torch.log_softmax(_first_logits(model, tok, harmless[bi : bi + batch]), -1)
                kl = (base[bi].exp() * (base[bi] - q)).sum(-1).mean()
            loss = refusal + kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return (v.detach().double().cpu() / v.detach().norm().item()), losses


@dataclass
class RdoAttack:
    steps: int = 60
    lr: float = 0.02
    strengths: tuple[float, ...] = (0.5, 0.75, 1.0)
    name: str = "rdo"
    threat: str = "directional"

    def proposals(self, t: Target) -> Iterator[Proposal]:
        r, losses = optimise_direction(t, self.steps, self.lr)
        t.log(f"  rdo: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps (seed {t.seed})")
        for a in self.strengths:
            yield Proposal({"seed": t.seed, "strength": a, "final_loss": losses[-1]}, hooks(t, [Ablation(r, a)]))
