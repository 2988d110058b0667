"""Resumable training state: the step, the adapter, the optimiser and schedule, and the directions in use.

A checkpoint holds tensors and plain values only (loaded with weights_only, so no pickled code
runs) and is replaced atomically, so a process killed while writing leaves the previous one whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refusal_lab.harden.robust import RefusalSubspace

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class Checkpoint:
    """Everything a resumed run needs to take the same steps an uninterrupted one would."""

    step: int
    adapter: dict[str, torch.Tensor]
    opt: dict[str, Any]
    sched: dict[str, Any]
    subspace: RefusalSubspace | None  # the directions in use: a resumed run must ablate the same ones


def save_checkpoint(work: Path, ck: Checkpoint) -> None:
    """Write `ck` as work/checkpoint.pt, atomically."""
    state: dict[str, Any] = {"step": ck.step, "adapter": ck.adapter, "opt": ck.opt, "sched": ck.sched}
    if ck.subspace is not None:
        state["subspace"] = {"per_layer": ck.subspace.per_layer, "global": ck.subspace.global_dirs}
    tmp = work / f".{CHECKPOINT}.{os.getpid()}"
    torch.save(state, tmp)
    tmp.replace(work / CHECKPOINT)


def load_checkpoint(work: Path) -> Checkpoint | None:
    """The checkpoint in `work`, or None when there is none."""
    path = work / CHECKPOINT
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)  # tensors and plain values only: no pickled code
    sub = state.get("subspace")
    return Checkpoint(
        step=int(state["step"]),
        adapter=state["adapter"],
        opt=state["opt"],
        sched=state["sched"],
        subspace=None if sub is None else RefusalSubspace(sub["per_layer"], sub["global"]),
    )
