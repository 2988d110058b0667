"""Single-direction ablations: projected (one layer's direction from every writer) and a
Heretic-style kernel (one interpolated direction, a per-layer strength tent per component)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from refusal_lab.ablate.edit import Ablation
from refusal_lab.config import KernelSettings
from refusal_lab.probe.directions import unit


@dataclass
class Kernel:
    """Heretic-style per-layer strength: a tent peaking at `position`, down to min at `width`."""

    max_weight: float
    position: float  # fraction of depth
    min_fraction: float  # min weight as a fraction of max
    width: float  # fraction of depth; layers further away get 0

    @staticmethod
    def of(k: KernelSettings) -> Kernel:
        return Kernel(k.kernel_max, k.kernel_position, k.kernel_min, k.kernel_width)

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
