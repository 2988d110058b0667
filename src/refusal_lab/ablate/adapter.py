"""An ablation as a PEFT LoRA adapter: the exact low-rank change of every edited tensor.

A projection edit changes a writer W [H, inner] by delta = -L U' W: rank k for k directions, so a
LoRA pair B = -L, A = U' W with lora_alpha = r (scale 1) carries it exactly; successive ablations add
their ranks. The change is read off the weights, not re-derived from the directions, so any edit the
ablate stage makes is covered: the edit itself runs in float64 one group at a time (the embedding, then
each layer's writers), delta = edited - base is exact, and a seeded range finder factors it with the
fewest components (at most the edit's number of directions) that reproduce it within half an ulp of the
saved dtype at every entry. An edit that is not low-rank at that precision (a norm-preserving rescale
that moves weights by more than saving rounds away) is refused with a one-line error.

What a LoRA adapter cannot carry is refused too: a bias change (LoRA adds to weights only), a fused
expert tensor (not an nn.Linear module), and an embedding edit on a model that ties its input and
output embeddings (the edit unties them; merging a LoRA into the shared tensor would move the read-out
as well). An untied embedding is a PEFT embedding LoRA (lora_embedding_A [r, vocab], _B [H, r]).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_lab.ablate.edit import Ablation, weights_edited
from refusal_lab.config import Settings
from refusal_lab.core.artifacts import write_folder, write_replay
from refusal_lab.core.model import Loaded
from refusal_lab.errors import UserError

SAVE_INSTEAD = "save the full edited folder (-o) instead"


@dataclass(frozen=True)
class LowRank:
    """One tensor's change as b @ a (float64), with how far the product is from the change."""

    module: str  # the module's name in the model (a PEFT target)
    b: torch.Tensor  # [rows, r]
    a: torch.Tensor  # [r, cols]
    residual: float  # max |delta - b a|
    share: float  # the largest |delta - b a| as a share of its entry's allowed error (at most 1)
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.b.shape[1]


@dataclass(frozen=True)
class AdapterSummary:
    """What an adapter export holds: one entry per edited tensor."""

    parts: tuple[LowRank, ...]

    def ranks(self) -> dict[str, int]:
        return {p.module: p.rank for p in self.parts}

    def to_json(self) -> dict[str, Any]:
        return {
            "ranks": self.ranks(),
            "max_residual": max(p.residual for p in self.parts),
            "largest_share_of_precision": max(p.share for p in self.parts),
        }


def factor(
    delta: torch.Tensor, cap: int, allowed: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b, a, rest): the fewest leading singular components of delta [m, n] (float64) whose product is
    within `allowed` of it entry by entry, or all `cap` of them when no fewer are (the caller checks), and
    what they leave, delta - b a (delta's own memory: it is consumed, as an embedding's is large).

    A seeded range finder with a few more probe columns than `cap` finds the column space, then the SVD
    of the small projected matrix orders the components; no full SVD of a large matrix.
    """
    m, n = delta.shape
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, min(cap + 8, m, n), generator=gen, dtype=torch.float64).to(delta.device)
    q, s, _ = torch.linalg.svd(delta @ omega, full_matrices=False)
    q = q[:, s > s[0] * 1e-13] if s.numel() and s[0] > 0 else q[:, :0]
    uc, sc, vc = torch.linalg.svd(q.T @ delta, full_matrices=False)
    b, a = (q @ uc) * sc, vc
    rest, r = delta, 0
    while r < min(cap, sc.numel()) and bool((rest.abs() > allowed).any()):
        rest -= torch.outer(b[:, r], a[r])
        r += 1
    return b[:, :r], a[:r], rest


def allowed_error(base: torch.Tensor, edited: torch.Tensor, store: torch.dtype) -> torch.Tensor:
    """What the factors may miss the exact change by, entry by entry: half an ulp of the saved dtype at the
    entry's size, or at a typical entry's if smaller (below that, saving rounds the difference away)."""
    typical = float(edited.pow(2).mean().sqrt().clamp_min(1e-30))
    scale = base.abs()
    torch.maximum(scale, edited.abs(), out=scale)
    return scale.clamp_min_(typical).mul_(torch.finfo(store).eps / 2)


def low_rank(
    module: str, base: torch.Tensor, edited: torch.Tensor, cap: int, store: torch.dtype, embedding: bool = False
) -> LowRank:
    """The change base -> edited (float64) as a LowRank, or a one-line error when it is not low-rank."""
    allowed = allowed_error(base, edited, store)
    b, a, rest = factor(edited - base, cap, allowed)
    residual = float(rest.abs_().max())
    share = float(rest.div_(allowed).max())
    if share > 1.0:
        raise UserError(
            f"the edit of {module} is not low-rank: {b.shape[1]} components leave {residual:.2e}, "
            f"{share:.0f}x the {store} precision, so no LoRA adapter equals it",
            SAVE_INSTEAD,
        )
    return LowRank(module, b, a, residual, share, embedding)


def _check_adaptable(loaded: Loaded, ablations: Sequence[Ablation]) -> None:
    """Refuse, before any work, what a LoRA adapter cannot carry."""
    if any(ab.embedding for ab in ablations) and loaded.adapter.tied_embeddings:
        raise UserError(
            "the edit changes the input embedding of a model that ties it to the output embedding; merging a "
            "LoRA adapter into the shared tensor would change the output embedding too",
            f"use an edit that leaves the embedding alone (kernel, or SABER with --scope local), or {SAVE_INSTEAD}",
        )


@contextmanager
def _float64(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """The parameters held in float64 for the block (the edit then computes and keeps exact numbers)."""
    kept = [(p, p.data) for p in params]
    for p, data in kept:
        p.data = data.double()
    try:
        yield
    finally:
        for p, data in kept:
            p.data = data


def _restricted(ablations: Sequence[Ablation], layer: int | None, n_layers: int) -> list[Ablation]:
    """The ablations as they apply to one layer's writers (None: to the embedding alone)."""
    out = []
    for ab in ablations:
        scale = torch.zeros(n_layers, dtype=torch.float64)
        if layer is not None:
            scale[layer] = ab.scale(layer)
        if (layer is None and ab.embedding) or (layer is not None and scale[layer] != 0):
            out.append(Ablation(ab.directions, ab.alphas, scale, layer is None, ab.components))
    return out


Group = list[tuple[str, Any, bool]]  # (name, Writer or the embedding module, is the embedding)


def _group(
    loaded: Loaded, ablations: list[Ablation], tensors: Group, norm_preserving: bool, store: torch.dtype
) -> list[LowRank]:
    """LowRanks of one group of tensors (the embedding, or one layer's writers) under its ablations."""
    names = {id(m): n for n, m in loaded.model.named_modules()}
    params = [p for _, obj, _ in tensors for p in (obj.weight, getattr(obj, "bias", None)) if p is not None]
    base = {id(p): p.detach().double().clone() for p in params}
    cap, parts = sum(ab.directions.shape[1] for ab in ablations), []
    with _float64(params), weights_edited(loaded.adapter, ablations, norm_preserving):
        for name, obj, is_embedding in tensors:
            bias = getattr(obj, "bias", None)
            if bias is not None and not torch.equal(bias.detach(), base[id(bias)]):
                raise UserError(
                    f"the edit changes the bias of {name}; a LoRA adapter changes weights only", SAVE_INSTEAD
                )
            before = base[id(obj.weight)]
            if torch.equal(obj.weight.detach(), before):
                continue
            if not is_embedding and (not isinstance(obj.module, nn.Linear) or obj.module.weight is not obj.weight):
                raise UserError(f"writer {name} is a fused expert tensor, which PEFT cannot target", SAVE_INSTEAD)
            module = names[id(obj if is_embedding else obj.module)]
            parts.append(low_rank(module, before, obj.weight.detach(), cap, store, is_embedding))
    return parts


def edit_deltas(
    loaded: Loaded, ablations: Sequence[Ablation], norm_preserving: bool, store: torch.dtype
) -> AdapterSummary:
    """Every tensor the edit changes, as a LowRank of its exact change, to the precision of `store`.

    The edit is applied in float64 one group at a time (the embedding, then each layer's writers), so the
    change is exact and only one layer is ever held in float64."""
    _check_adaptable(loaded, ablations)
    adapter, parts = loaded.adapter, []
    n = adapter.num_layers
    if any(ab.embedding for ab in ablations):
        embedding = [("embedding", adapter.embedding, True)]
        parts += _group(loaded, _restricted(ablations, None, n), embedding, norm_preserving, store)
    for lw in adapter.writers:
        sub = _restricted(ablations, lw.index, n)
        if sub:
            parts += _group(loaded, sub, [(w.name, w, False) for w in lw.all], norm_preserving, store)
    if not parts:
        raise UserError("the edit changes no weight, so there is no adapter to write", "check the ablation settings")
    return AdapterSummary(tuple(parts))


def check_destination(lora: Path, *taken: Path) -> None:
    """Refuse an adapter folder that is the model's or the edited folder's (--force would replace it)."""
    if lora.expanduser().resolve() in {p.expanduser().resolve() for p in taken}:
        raise UserError(
            f"the adapter folder {lora} is also the model or the edited folder", "give --lora its own folder"
        )


def lora_config(summary: AdapterSummary, base_name: str) -> Any:
    """A LoraConfig targeting exactly the edited modules, each at its own rank with scale alpha / r = 1."""
    from peft import LoraConfig

    ranks = summary.ranks()
    top = max(ranks.values())
    pattern = {re.escape(name): r for name, r in ranks.items() if r != top}
    return LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_name,
    )


def _shell(model: nn.Module, summary: AdapterSummary) -> nn.Module:
    """Weightless (meta) stand-ins for the edited modules at their own paths: all PEFT needs to name its
    tensors as the real model's, without building (or wrapping) the model itself."""
    root = nn.Module()
    for part in summary.parts:
        real = model.get_submodule(part.module)
        if part.embedding:
            leaf: nn.Module = nn.Embedding(real.num_embeddings, real.embedding_dim, device="meta")
        else:
            leaf = nn.Linear(real.in_features, real.out_features, bias=real.bias is not None, device="meta")
        parent = root
        *path, name = part.module.split(".")
        for step in path:
            if not hasattr(parent, step):
                parent.add_module(step, nn.Module())
            parent = parent.get_submodule(step)
        parent.add_module(name, leaf)
    return root


def peft_model(model: nn.Module, summary: AdapterSummary, base_name: str) -> nn.Module:
    """A PeftModel holding the factors, over a weightless shell of the edited modules (so PEFT writes its own
    format and the loaded model is never wrapped)."""
    from peft import get_peft_model

    shell = _shell(model, summary)
    shell.name_or_path = base_name  # what PEFT records as the base model
    wrapped = get_peft_model(shell, lora_config(summary, base_name))
    for part in summary.parts:
        layer = wrapped.base_model.model.get_submodule(part.module)
        b, a = part.b.float().contiguous(), part.a.float().contiguous()
        if part.embedding:  # PEFT's embedding delta is (B A)' with A [r, vocab], B [H, r]
            layer.lora_embedding_A["default"] = nn.Parameter(b.T.contiguous(), requires_grad=False)
            layer.lora_embedding_B["default"] = nn.Parameter(a.T.contiguous(), requires_grad=False)
        else:
            layer.lora_A["default"].weight = nn.Parameter(a, requires_grad=False)
            layer.lora_B["default"].weight = nn.Parameter(b, requires_grad=False)
    return wrapped


def adapter_card(card: str, summary: AdapterSummary, command: str) -> str:
    """The edited folder's model card, retold for the adapter: PEFT front matter, ranks, how to apply it."""
    lo, hi = min(summary.ranks().values()), max(summary.ranks().values())
    rank = str(lo) if lo == hi else f"{lo} to {hi}"
    lines = [
        "",
        "## LoRA adapter",
        "",
        f"The edit above as a PEFT LoRA adapter on {len(summary.parts)} modules (rank {rank} "
        "per module, the edit's own rank; lora_alpha = r, so the scale is 1). Merged into the base it gives "
        "the edited folder's weights to the saved dtype's precision (the factors miss the change by at most "
        f"{summary.to_json()['max_residual']:.1e}); the rank of each module is in `ablation.json`.",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base, ADAPTER_FOLDER).merge_and_unload()",
        "```",
        "",
        f"`sh reproduce.sh FOLDER` writes the full edited folder; `refusal-lab {command} --config settings.toml "
        "-o FOLDER --lora NEW_ADAPTER` writes this adapter again.",
        "",
    ]
    return card + "\n".join(lines)


def write_adapter(
    loaded: Loaded,
    summary: AdapterSummary,
    out: Path,
    record: dict[str, Any],
    s: Settings,
    command: str,
    force: bool = False,
) -> None:
    """Write an edit's factors as a PEFT adapter folder (atomically), beside its record, settings and model card."""
    from refusal_lab.core.card import model_card

    full = {**record, "adapter": summary.to_json()}

    def fill(tmp: Path) -> None:
        peft_model(loaded.model, summary, str(loaded.source)).save_pretrained(tmp, save_embedding_layers=False)
        (tmp / "ablation.json").write_text(json.dumps(full, indent=1, default=str) + "\n")
        write_replay(tmp, s, command)
        card = model_card(loaded.folder, full, command, library="peft")
        (tmp / "README.md").write_text(adapter_card(card, summary, command))

    write_folder(out, fill, force)
