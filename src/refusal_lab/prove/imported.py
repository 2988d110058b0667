"""Attacked copies made by other tools (a Heretic export, another abliteration), measured like the battery.

Each folder is one proposal: its weights are put into the model under attack inside the edit and
restored exactly after, so it is held to the same drift budgets, chosen on the same tuning prompts
and scored on the same held-out prompts as refusal-lab's own attacks. Its row is reported apart from
the worst case, so a comparison with another tool is never mixed into the battery's headline.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from refusal_lab.errors import UserError
from refusal_lab.prove.battery import Proposal, Target
from refusal_lab.prove.delta import attenuated, delta_mismatch


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no .safetensors weights", "pass a model folder saved with save_pretrained")
    return files


def folder_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder's safetensors files (never pickle)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        state.update(load_file(str(f)))
    return state


def folder_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the safetensors headers: checking a copy loads no weights."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in _weight_files(folder):
        with safe_open(str(f), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def check_imported(model: torch.nn.Module, folders: list[Path]) -> None:
    """Each folder must be an attacked copy of `model` (same tensors, same shapes); say which is not."""
    for folder in folders:
        why = delta_mismatch(model, folder_shapes(folder), "copy")
        if why:
            raise UserError(f"{folder} is not a copy of the model under attack ({why})", "import copies of that model")


@dataclass
class ImportedAttack:
    folders: list[Path]
    name: str = "imported"
    threat: str = "imported"

    def proposals(self, t: Target) -> Iterator[Proposal]:
        for folder in self.folders:

            @contextmanager
            def edit(folder: Path = folder) -> Iterator[None]:
                with attenuated(t.loaded.model, folder_state(folder), 0.0):  # lambda 0: the copy's own weights
                    yield

            yield Proposal({"folder": str(folder)}, edit)
