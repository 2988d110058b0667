"""A gradient-optimised refusal direction ("The Geometry of Refusal", refusal direction optimisation).

A unit direction r is trained so that removing it from everything written into the residual
stream (every writer's output and the embedding, as a weight edit would) makes the model's own
refusal openers unlikely on harmful prompts, while a KL term keeps harmless prompts' next-token
distributions where they were. Only r is trained; the model's weights stay frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from refusal_lab.ablate.edit import Ablation, hooked
from refusal_lab.core.arch import Adapter
from refusal_lab.core.artifacts import timed
from refusal_lab.core.generate import encode, headed, length_order, prompt_forward
from refusal_lab.probe.directions import unit
from refusal_lab.prove.battery import Proposal, Target
from refusal_lab.prove.directional import hooks, last_token_vectors

RDO_LR = 0.02  # the optimiser's step size: the attack's default (the CLI's is --rdo-lr)
RDO_NOISE = 0.3  # how far the start is perturbed, about its norm: different seeds find different directions


def _first_logits(model: torch.nn.Module, tok: object, prompts: list[str]) -> torch.Tensor:
    """Next-token logits of a batch, differentiable: its rows' shared head (the template's system prompt)
    runs once, as in `last_logits`, which the gradient flows back through like the rest."""
    batch = headed(encode(tok, prompts, next(model.parameters()).device))
    return prompt_forward(model, batch, 1).logits[:, -1, :].float()


def optimise_direction(
    t: Target, steps: int, lr: float, batch: int = 16, check_every: int = 5
) -> tuple[torch.Tensor, list[float]]:
    """Train r on the target; returns the unit direction and the loss per step.

    It starts from the difference of means at the layer where harmful and harmless last-token
    activations lie furthest apart, perturbed by the seed. Every `check_every` steps, where the target
    has a proxy, the tuning prompts are read with r removed: once none of them opens with a refusal
    token the loss has nothing left to remove there, so the optimisation stops (a step costs about six
    prompt passes of its batch, the check one of 16 prompts)."""
    m = t.loaded
    xh, xb = last_token_vectors(t, [])
    layer = int(((xh.mean(0) - xb.mean(0)).norm(dim=-1)).argmax())
    start = xh[:, layer].mean(0) - xb[:, layer].mean(0)

    def done(v: torch.Tensor, step: int) -> bool:
        return t.proxied and step % check_every == 0 and _clear(t, v)

    harmful, harmless = t.extraction.texts("harmful"), t.extraction.texts("harmless")
    return train_direction(
        m.model, m.tokenizer, m.adapter, harmful, harmless, list(t.refusal_ids), start, steps, lr, t.seed, batch, done
    )


def train_direction(
    model: torch.nn.Module,
    tok: object,
    adapter: Adapter,
    harmful: list[str],
    harmless: list[str],
    ids: list[int],
    start: torch.Tensor,
    steps: int,
    lr: float,
    seed: int,
    batch: int = 16,
    done: Callable[[torch.Tensor, int], bool] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """A unit direction whose removal (every writer and the embedding) makes the refusal openers `ids`
    unlikely on `harmful` while harmless first-token distributions stay put; and the loss per step.

    Only the direction trains (every parameter is frozen meanwhile and restored after), from `start`
    perturbed by RDO_NOISE (drawn with `seed`); `done(v, step)` may end it early. A step's batch is a
    window of prompts of like length (each set is sorted by length once), so it computes little padding."""
    harmful = [harmful[i] for i in length_order(tok, harmful)]
    harmless = [harmless[i] for i in length_order(tok, harmless)]
    g = torch.Generator().manual_seed(seed)
    start = unit(start.double().cpu())
    start = start + RDO_NOISE * torch.randn(start.shape, generator=g, dtype=start.dtype) / start.numel() ** 0.5
    device = next(model.parameters()).device
    v = start.to(device, torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses: list[float] = []
    try:
        with torch.no_grad():
            base = {
                i: torch.log_softmax(_first_logits(model, tok, harmless[i : i + batch]), -1)
                for i in range(0, len(harmless), batch)
            }
        order = torch.Generator().manual_seed(seed)
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
            if done is not None and done(v.detach(), len(losses)):
                break
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return unit(v.detach().double().cpu()), losses


def _clear(t: Target, v: torch.Tensor) -> bool:
    """Whether no tuning prompt's greedy first reply token is a refusal opener with v removed."""
    with torch.no_grad(), hooked(t.loaded.adapter, [Ablation(unit(v.double().cpu()))]):
        return t.predicted_refused(t.tuning) == 0


@dataclass
class RdoAttack:
    steps: int = 60
    lr: float = RDO_LR
    strengths: tuple[float, ...] = (0.5, 0.75, 1.0)
    name: str = "rdo"
    threat: str = "directional"

    def proposals(self, t: Target) -> Iterator[Proposal]:
        with timed(t.log, f"  rdo: optimising a direction, up to {self.steps} steps"):
            r, losses = optimise_direction(t, self.steps, self.lr)
        early = f" (of {self.steps}: no tuning prompt opened with a refusal token)" if len(losses) < self.steps else ""
        t.log(f"  rdo: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps{early} (seed {t.seed})")
        for a in self.strengths:
            setting = {"seed": t.seed, "strength": a, "final_loss": losses[-1], "steps": len(losses)}
            yield Proposal(setting, hooks(t, [Ablation(r, a)]))
