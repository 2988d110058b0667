"""Weight-delta attenuation: W_base + lambda (W_model - W_base), then SABER, for lambda from 0 to 1.

A fine-tune's safety can sit in its weight delta; shrinking the delta toward the public base and
then abliterating is a separate threat model (it needs the base), so it is reported in its own
rows and never counted in the worst case over the directional attacks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from refusal_lab.ablate.edit import hooked
from refusal_lab.ablate.saber import saber
from refusal_lab.prove.battery import Proposal, Target


def delta_mismatch(
    model: torch.nn.Module, base_state: Mapping[str, torch.Tensor | tuple[int, ...]], what: str = "base"
) -> str | None:
    """Why `base_state` (tensors, or their shapes) cannot be the model's base (or another `what` of it):
    missing tensors, other shapes."""
    for name, p in model.named_parameters():
        if name not in base_state:
            return f"the {what} has no tensor {name}"
        other = base_state[name]
        shape = tuple(other.shape) if isinstance(other, torch.Tensor) else tuple(other)
        if shape != tuple(p.shape):
            return f"{name} is {tuple(p.shape)} in the model and {shape} in the {what}"
    return None


@contextmanager
def attenuated(model: torch.nn.Module, base_state: dict[str, torch.Tensor], lam: float) -> Iterator[None]:
    """The model's weights set to base + lam * (model - base) inside the block, restored exactly after."""
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                b = base_state[n].to(p.device, torch.float64)
                p.copy_((b + lam * (saved[n].double() - b)).to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


@dataclass
class DeltaAttack:
    base_state: dict[str, torch.Tensor]
    lambdas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    name: str = "delta"
    threat: str = "delta"

    def proposals(self, t: Target) -> Iterator[Proposal]:
        m, s, x = t.loaded, t.s, t.extraction
        texts = (x.texts("harmful"), x.texts("harmless"), x.texts("capability"))
        for lam in self.lambdas:
            with attenuated(m.model, self.base_state, lam):
                res = saber(m.model, m.tokenizer, m.adapter, *texts, s.probe, s.ablate.saber, s.batch_size)

            @contextmanager
            def edit(lam: float = lam, ablations: list = res.ablations) -> Iterator[None]:
                with attenuated(m.model, self.base_state, lam), hooked(m.adapter, ablations):
                    yield

            yield Proposal({"lambda": lam, "then": "saber", "passes": len(res.passes)}, edit)
